# SPDX-License-Identifier: Apache-2.0
"""The IA3, Houlsby and multi-LoRA ops: wrapper, fake kernel and autograd of each.

The maths lives in the kernels (csrc/fused/adapters_*); the wrappers normalise arguments and
call the op. The same maths in plain PyTorch, with the schemas' signatures, is in
:mod:`peftreg.ops.reference`; each :class:`~peftreg.ops._op.Op` names it for its plain path and
carries its measured crossover (docs/ops.md "When the fused ops run").

Autograd. ``ia3_linear``, output scaling (``scale_input=False``), rows flattened,
``p = x W^T + b``::

    y = p * l
    grad_x = (g * l) W      grad_W = (g * l)^T x      grad_b = sum_rows(g * l)
    grad_l = sum_rows(g * p)                           (peftreg::ia3_scale_grad)

The output y and the input x are saved instead of p: y is usually kept by its consumer anyway
(attention saves keys and values) and one x is shared by the key and value projections.
ia3_scale_grad recovers p = y / l, recomputing it from x and W only for channels whose scale is
exactly zero. Input scaling (``scale_input=True``), ``xs = x * l``::

    y = xs W^T + b
    gW = g W                grad_x = gW * l           grad_l = sum_rows(x * gW)
    grad_W = g^T xs         grad_b = sum_rows(g)

``houlsby_adapter``, ``z = h Wd^T + bd``, ``a = act(z)``, ``out = h + a Wu^T + bu``::

    grad_a = g Wu           grad_z = act'(z) * grad_a    (aten's *_backward of the activation)
    grad_h = g + grad_z Wd  grad_Wd = grad_z^T h          grad_bd = sum_rows(grad_z)
    grad_Wu = g^T a         grad_bu = sum_rows(g)

Saved: h, the weights and z (the op's second output); a is recomputed from z.
``lora_multi_add`` is inference-only: its backward raises.
"""

from __future__ import annotations

from typing import Any

import torch

from peftreg.ops import _checks as ck
from peftreg.ops import reference
from peftreg.ops._op import Op, saved
from peftreg.ops.lora import padded_needs

__all__ = ["HOULSBY_ADAPTER", "IA3_LINEAR", "LORA_MULTI_ADD", "houlsby_adapter", "ia3_linear",
           "lora_multi_add"]


def _cuda_only(*args: Any) -> bool:
    """Crossover of IA3 and Houlsby: on this project's CPU the fused op never beat plain
    PyTorch by more than the noise and lost up to 0.63x (docs/ops.md); on CUDA it saves the
    elementwise passes and temporaries."""
    return args[0].device.type != "cpu"  # x or h: the first argument of both ops


IA3_LINEAR = Op("ia3_linear", reference=reference.ia3_linear, faster=_cuda_only)
IA3_SCALE_GRAD = Op("ia3_scale_grad")
HOULSBY_ADAPTER = Op("houlsby_adapter", reference=reference.houlsby_adapter, faster=_cuda_only)
LORA_MULTI_ADD = Op("lora_multi_add", reference=reference.lora_multi_add)


def ia3_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               scale: torch.Tensor, scale_input: bool) -> torch.Tensor:
    """A linear layer with (IA)^3 scaling fused into its product (Liu et al. 2022, sec. 3.3).

    ``scale_input=False`` computes ``(x @ weight^T + bias) * scale`` (keys, values);
    ``scale_input=True`` computes ``(x * scale) @ weight^T + bias`` (feed-forward input).
    Differentiable in every tensor argument.

    Args:
        x: ``(..., in_features)``.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
        scale: the vector ``l``, any shape with ``out_features`` (output scaling) or
            ``in_features`` (input scaling) elements; plugins store ``(out, 1)`` / ``(1, in)``.
        scale_input: which side is scaled.

    Returns:
        ``(..., out_features)`` with ``x``'s dtype.

    Raises:
        ExtensionUnavailableError: no compiled kernel for ``x``'s device.
        RuntimeError: mismatched shapes, dtypes or devices (the message names the argument).
    """
    return IA3_LINEAR(x, weight, bias, scale.reshape(-1), bool(scale_input))


def houlsby_adapter(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None,
                    w_up: torch.Tensor, b_up: torch.Tensor | None,
                    activation: str) -> torch.Tensor:
    """The Houlsby bottleneck with its residual as one op (Houlsby et al. 2019, sec. 2.1).

    Computes ``h + act(h @ w_down^T + b_down) @ w_up^T + b_up``; differentiable in every tensor
    argument. The backward keeps only ``h`` and the ``(rows x bottleneck)`` pre-activation.

    Args:
        h: the adapted sub-layer's output, ``(..., hidden)``.
        w_down: ``(bottleneck, hidden)``; b_down: ``(bottleneck,)`` or None.
        w_up: ``(hidden, bottleneck)``; b_up: ``(hidden,)`` or None.
        activation: ``"relu"``, ``"gelu"`` (exact erf form, as ``nn.GELU()``), ``"silu"`` or
            ``"tanh"``.

    Returns:
        Tensor shaped like ``h``.

    Raises:
        ExtensionUnavailableError: no compiled kernel for ``h``'s device.
        RuntimeError: bad shapes, dtypes, devices or activation (named in the message).
    """
    out, _z = HOULSBY_ADAPTER(h, w_down, b_down, w_up, b_up, activation)
    return out


def row_index(index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``index`` as lora_multi_add takes it: int64 of shape ``x.shape[:-1]``; one adapter per
    sequence (``(x.shape[0],)``) is broadcast over the other leading dimensions."""
    lead = x.shape[:-1]
    if index.dim() == 1 and len(lead) > 1 and index.shape[0] == lead[0]:
        index = index.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)
    return index.to(torch.int64)


def _refuse_grad(base: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scaling: torch.Tensor) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in (base, x, lora_a, lora_b,
                                                                 scaling)):
        raise RuntimeError(
            "peftreg.ops.adapters.lora_multi_add is inference-only (no backward): call it under "
            "torch.no_grad() / torch.inference_mode(), or with tensors that do not require grad")


def lora_multi_add(base: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, scaling: torch.Tensor,
                   index: torch.Tensor) -> torch.Tensor:
    """Add each row's own LoRA update to ``base`` in one op (S-LoRA / Punica batching).

    Row ``i`` (of the flattened leading dimensions) gets
    ``base[i] + scaling[k] * (x[i] @ lora_a[k]^T) @ lora_b[k]^T`` with ``k = index[i]``, or
    ``base[i]`` unchanged for ``k = -1``. Adapters of lower rank are zero-padded to ``r``.

    Inference only: it has no backward, and it refuses to run when autograd would need one.

    Args:
        base: base layer output ``(..., out_features)``.
        x: layer input ``(..., in_features)``.
        lora_a: ``(adapters, r, in_features)``.
        lora_b: ``(adapters, out_features, r)``.
        scaling: ``(adapters,)`` per-adapter scale (``alpha / r``).
        index: adapter per row: shape ``x.shape[:-1]``, or ``(x.shape[0],)`` for one adapter
            per sequence (broadcast over the other leading dimensions); integer, -1 = none.

    Returns:
        Tensor shaped like ``base``.

    Raises:
        ExtensionUnavailableError: no compiled kernel for ``x``'s device.
        RuntimeError: a gradient is required, or bad shapes/dtypes/indices (named).
    """
    LORA_MULTI_ADD.require(x.device)
    _refuse_grad(base, x, lora_a, lora_b, scaling)
    return LORA_MULTI_ADD.overload(base, x, lora_a, lora_b, scaling, row_index(index, x))


# --- fake kernels (the checks of csrc/fused/adapters_kernels.h) ------------------------------


def _ia3_weight_checks(op: str, x: torch.Tensor, weight: torch.Tensor) -> int:
    ck.min_dim(op, x, "x", 1, "(..., in_features)")
    ck.dim(op, weight, "weight", 2, "(out_features, in_features)")
    return weight.shape[0]


def _bias_checks(op: str, bias: torch.Tensor | None, out_features: int) -> None:
    ck.optional_vector(op, bias, "bias", out_features, "(out_features,)",
                       "out_features = weight.shape[0]")


@IA3_LINEAR.register_fake
def _ia3_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     scale: torch.Tensor, scale_input: bool) -> torch.Tensor:
    op = IA3_LINEAR.qualname
    out_features = _ia3_weight_checks(op, x, weight)
    ck.dim(op, scale, "scale", 1, "(in_features,)" if scale_input else "(out_features,)")
    ck.size(op, weight, "weight", 1, x.shape[-1], "(out_features, in_features)",
            "in_features = x.shape[-1]")
    if scale_input:
        ck.size(op, scale, "scale", 0, x.shape[-1], "(in_features,)",
                "scale_input=True: in_features = x.shape[-1]")
    else:
        ck.size(op, scale, "scale", 0, out_features, "(out_features,)",
                "scale_input=False: out_features = weight.shape[0]")
    _bias_checks(op, bias, out_features)
    named = [("weight", weight), ("scale", scale)] + ([("bias", bias)] if bias is not None else [])
    ck.supported_dtype(op, x, "x")
    ck.same_dtype(op, named, x, "x")
    ck.same_device(op, named, x, "x")
    return x.new_empty((*x.shape[:-1], out_features))


@IA3_SCALE_GRAD.register_fake
def _ia3_scale_grad_fake(grad: torch.Tensor, out: torch.Tensor, x: torch.Tensor,
                         weight: torch.Tensor, bias: torch.Tensor | None,
                         scale: torch.Tensor) -> torch.Tensor:
    op = IA3_SCALE_GRAD.qualname
    out_features = _ia3_weight_checks(op, x, weight)
    ck.dim(op, scale, "scale", 1, "(out_features,)")
    ck.size(op, weight, "weight", 1, x.shape[-1], "(out_features, in_features)",
            "in_features = x.shape[-1]")
    ck.size(op, scale, "scale", 0, out_features, "(out_features,)",
            "out_features = weight.shape[0]")
    expected = [*x.shape[:-1], out_features]
    ck.check(op, list(out.shape) == expected,
             f"argument 'out' must have shape (*x.shape[:-1], out_features) = {expected} but "
             f"has shape {ck.shape(out)}")
    ck.same_shape(op, grad, "grad", out, "out")
    _bias_checks(op, bias, out_features)
    named = [("grad", grad), ("out", out), ("weight", weight), ("scale", scale)]
    if bias is not None:
        named.append(("bias", bias))
    ck.supported_dtype(op, x, "x")
    ck.same_dtype(op, named, x, "x")
    ck.same_device(op, named, x, "x")
    return x.new_empty((out_features,))


_HOULSBY_ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


@HOULSBY_ADAPTER.register_fake
def _houlsby_adapter_fake(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None,
                          w_up: torch.Tensor, b_up: torch.Tensor | None,
                          activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    op = HOULSBY_ADAPTER.qualname
    ck.min_dim(op, h, "h", 1, "(..., hidden)")
    ck.dim(op, w_down, "w_down", 2, "(bottleneck, hidden)")
    ck.dim(op, w_up, "w_up", 2, "(hidden, bottleneck)")
    hidden, bottleneck = h.shape[-1], w_down.shape[0]
    ck.size(op, w_down, "w_down", 1, hidden, "(bottleneck, hidden)", "hidden = h.shape[-1]")
    ck.size(op, w_up, "w_up", 0, hidden, "(hidden, bottleneck)", "hidden = h.shape[-1]")
    ck.size(op, w_up, "w_up", 1, bottleneck, "(hidden, bottleneck)",
            "bottleneck = w_down.shape[0]")
    ck.optional_vector(op, b_down, "b_down", bottleneck, "(bottleneck,)",
                       "bottleneck = w_down.shape[0]")
    ck.optional_vector(op, b_up, "b_up", hidden, "(hidden,)", "hidden = h.shape[-1]")
    named = [(name, t) for name, t in (("w_down", w_down), ("w_up", w_up), ("b_down", b_down),
                                       ("b_up", b_up)) if t is not None]
    ck.supported_dtype(op, h, "h")
    ck.same_dtype(op, named, h, "h")
    ck.same_device(op, named, h, "h")
    ck.check(op, activation in _HOULSBY_ACTIVATIONS,
             f"argument 'activation' is '{activation}'; expected one of relu, gelu, silu, tanh")
    return h.new_empty(h.shape), h.new_empty((*h.shape[:-1], bottleneck))


@LORA_MULTI_ADD.register_fake
def _lora_multi_add_fake(base: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                         lora_b: torch.Tensor, scaling: torch.Tensor,
                         index: torch.Tensor) -> torch.Tensor:
    op = LORA_MULTI_ADD.qualname
    ck.stacked_lora(op, x, lora_a, lora_b, scaling)
    out_features = lora_b.shape[1]
    expected = [*x.shape[:-1], out_features]
    ck.check(op, list(base.shape) == expected,
             f"argument 'base' must have shape (*x.shape[:-1], out_features) = {expected} but "
             f"has shape {ck.shape(base)}")
    ck.check(op, list(index.shape) == list(x.shape[:-1]),
             f"argument 'index' must have shape x.shape[:-1] = {list(x.shape[:-1])} (one "
             f"adapter per row) but has shape {ck.shape(index)}")
    ck.check(op, index.dtype == torch.int64,
             f"argument 'index' has dtype {ck.scalar_name(index.dtype)}; expected Long (int64)")
    ck.supported_dtype(op, x, "x")
    ck.same_dtype(op, [("base", base), ("lora_a", lora_a), ("lora_b", lora_b)], x, "x")
    ck.check(op, scaling.dtype in ck.SUPPORTED_FLOATS,
             f"argument 'scaling' has dtype {ck.scalar_name(scaling.dtype)}; expected a "
             "floating dtype")
    ck.same_device(op, [("base", base), ("lora_a", lora_a), ("lora_b", lora_b),
                        ("scaling", scaling), ("index", index)], x, "x")
    return base.new_empty(base.shape)


# --- autograd --------------------------------------------------------------------------------

_IA3_NUM_INPUTS = 5  # x, weight, bias, scale, scale_input
_HOULSBY_NUM_INPUTS = 6  # h, w_down, b_down, w_up, b_up, activation


def _ia3_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, bias, scale, scale_input = inputs
    need_x, need_w, _need_b, need_l, _ = padded_needs(ctx, _IA3_NUM_INPUTS)
    ctx.scale_input = bool(scale_input)
    ctx.x_shape = x.shape
    if ctx.scale_input:
        ctx.save_for_backward(x if (need_l or need_w) else None,
                              weight if (need_x or need_l) else None, scale, None, None)
    else:
        ctx.save_for_backward(x if (need_w or need_l) else None,
                              weight if (need_x or need_l) else None, scale,
                              output if need_l else None, bias if need_l else None)


def _ia3_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight, scale, out, bias = ctx.saved_tensors
    need_x, need_w, need_b, need_l, _ = padded_needs(ctx, _IA3_NUM_INPUTS)
    op = IA3_LINEAR.qualname
    in_features = ctx.x_shape[-1]
    g = grad.reshape(-1, grad.shape[-1])
    grad_x = grad_w = grad_b = grad_l = None
    if ctx.scale_input:
        if need_x or need_l:
            g_w = torch.mm(g, saved(weight, op, "weight"))  # (rows, in): grad_x and grad_l
            if need_x:
                grad_x = (g_w * scale).reshape(ctx.x_shape)
            if need_l:
                grad_l = (saved(x, op, "x").reshape(-1, in_features) * g_w).sum(0)
        if need_w:
            grad_w = torch.mm(g.t(), saved(x, op, "x").reshape(-1, in_features) * scale)
        if need_b:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, grad_l, None
    if need_x or need_w or need_b:
        g_l = g * scale
        if need_x:
            grad_x = torch.mm(g_l, saved(weight, op, "weight")).reshape(ctx.x_shape)
        if need_w:
            grad_w = torch.mm(g_l.t(), saved(x, op, "x").reshape(-1, in_features))
        if need_b:
            grad_b = g_l.sum(0)
    if need_l:
        grad_l = IA3_SCALE_GRAD.overload(grad, out, x, weight, bias, scale)
    return grad_x, grad_w, grad_b, grad_l, None


_HOULSBY_FORWARD = {
    "relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
    "tanh": torch.tanh,
}


def _houlsby_act_backward(grad_a: torch.Tensor, z: torch.Tensor, activation: str
                          ) -> torch.Tensor:
    aten = torch.ops.aten
    if activation == "relu":
        return aten.threshold_backward.default(grad_a, z, 0)
    if activation == "gelu":
        return aten.gelu_backward.default(grad_a, z, approximate="none")
    if activation == "silu":
        return aten.silu_backward.default(grad_a, z)
    return aten.tanh_backward.default(grad_a, torch.tanh(z))


def _houlsby_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    h, w_down, _b_down, w_up, _b_up, activation = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    need_h, need_wd, need_bd, need_wu, _need_bu, _ = padded_needs(ctx, _HOULSBY_NUM_INPUTS)
    need_grad_z = need_h or need_wd or need_bd
    ctx.save_for_backward(h if need_wd else None, w_down if need_h else None,
                          w_up if need_grad_z else None, z if (need_grad_z or need_wu) else None)
    ctx.activation = activation
    ctx.h_shape = h.shape


def _houlsby_backward(ctx: Any, grad: torch.Tensor, _grad_z: torch.Tensor | None
                      ) -> tuple[torch.Tensor | None, ...]:
    h, w_down, w_up, z = ctx.saved_tensors
    need_h, need_wd, need_bd, need_wu, need_bu, _ = padded_needs(ctx, _HOULSBY_NUM_INPUTS)
    op = HOULSBY_ADAPTER.qualname
    hidden = ctx.h_shape[-1]
    g = grad.reshape(-1, hidden)
    grad_h = grad_wd = grad_bd = grad_wu = grad_bu = None
    if need_h or need_wd or need_bd or need_wu:
        z2d = saved(z, op, "z").reshape(-1, z.shape[-1])
    if need_h or need_wd or need_bd:
        grad_z = _houlsby_act_backward(torch.mm(g, saved(w_up, op, "w_up")), z2d,
                                       ctx.activation)
        if need_h:
            grad_h = grad.reshape(ctx.h_shape) + torch.mm(
                grad_z, saved(w_down, op, "w_down")).reshape(ctx.h_shape)
        if need_wd:
            grad_wd = torch.mm(grad_z.t(), saved(h, op, "h").reshape(-1, hidden))
        if need_bd:
            grad_bd = grad_z.sum(0)
    if need_wu:
        grad_wu = torch.mm(g.t(), _HOULSBY_FORWARD[ctx.activation](z2d))
    if need_bu:
        grad_bu = g.sum(0)
    return grad_h, grad_wd, grad_bd, grad_wu, grad_bu, None


IA3_LINEAR.register_autograd(_ia3_backward, _ia3_setup_context)
IA3_SCALE_GRAD.not_differentiable("is not differentiable: it is ia3_linear's backward")
HOULSBY_ADAPTER.register_autograd(_houlsby_backward, _houlsby_setup_context)
LORA_MULTI_ADD.not_differentiable(
    "is inference-only (per-row multi-adapter LoRA serving) and has no backward; train each "
    "adapter on its own (model.set_active(name)) and use per-row adapters under "
    "torch.no_grad() / model.eval()")
