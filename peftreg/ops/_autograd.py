# SPDX-License-Identifier: Apache-2.0
"""Backward formulas of the differentiable peftreg ops, written with ATen matmuls.

``peftreg::lora_linear`` computes, with rows flattened (``x`` is (rows, in)) and ``x_l`` the
LoRA input (``x_lora`` when given, else ``x``)::

    u = x_l A^T                      (rows, r)
    y = x W^T + b + s * u B^T        (rows, out)

so for an upstream gradient ``g = dL/dy`` (rows, out)::

    grad_u  = s * g B                (rows, r)
    grad_B  = s * g^T u              (out, r)
    grad_A  = grad_u^T x_l           (r, in)
    grad_x  = g W  (+ grad_u A when x_lora is None: x feeds both paths)
    grad_xl = grad_u A               (only when x_lora is given; dropout's own backward is torch's)
    grad_b  = g.sum(0)
    grad_W  = g^T x

Each gradient is computed only when ``ctx.needs_input_grad`` asks for it (the base weight is
normally frozen), and the forward saves only the inputs those gradients read. All but ``grad_W``
and ``grad_b`` come from one compiled op, ``peftreg::lora_linear_backward`` (csrc/fused/), which
shares the forward's compute-dtype rules; ``u`` is recomputed there rather than saved (it costs a
fraction r/out of the forward's main product). The dense (out, in) product ``B A`` is never
formed.
"""

from __future__ import annotations

from typing import Any

import torch

_LORA_NUM_INPUTS = 9  # x, weight, bias, lora_a, lora_b, scaling, x_lora, dropout_p, seed


def _needs_input_grad(ctx: Any) -> tuple[bool, ...]:
    """``ctx.needs_input_grad`` for the op's inputs, padded to all of them.

    The dispatcher drops trailing arguments equal to their defaults (``x_lora=None``), and
    torch.library may append an entry of its own, so the raw tuple can be shorter or longer
    than the schema. Entries past the real inputs are False either way.
    """
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:_LORA_NUM_INPUTS])
    return needs + (False,) * (_LORA_NUM_INPUTS - len(needs))


def _with_defaults(inputs: tuple[Any, ...], count: int, trailing: tuple[Any, ...]
                   ) -> tuple[Any, ...]:
    """``inputs`` completed to ``count`` entries with the schema's defaults for the trailing
    ``len(trailing)`` arguments (the dispatcher may drop trailing arguments left at default)."""
    inputs = tuple(inputs)[:count]
    missing = count - len(inputs)
    return inputs + trailing[len(trailing) - missing:] if missing else inputs


def _lora_linear_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, _bias, lora_a, lora_b, scaling, x_lora, dropout_p, dropout_seed = _with_defaults(
        inputs, _LORA_NUM_INPUTS, (None, 0.0, None))
    need_x, need_w, _need_bias, need_a, need_b, _, need_xl, *_ = _needs_input_grad(ctx)
    has_x_lora = x_lora is not None
    # x is read by grad_W, and by grad_A/grad_B when it is also the LoRA input (dropout's mask
    # is regenerated from the seed, so dropout(x) itself is never saved); weight by grad_x.
    save_x = need_w or (not has_x_lora and (need_a or need_b))
    save_x_lora = has_x_lora and (need_a or need_b)
    ctx.save_for_backward(
        x if save_x else None,
        weight if need_x else None,
        lora_a,
        lora_b,
        x_lora if save_x_lora else None,
        dropout_seed,
    )
    ctx.dropout_p = float(dropout_p or 0.0)
    ctx.scaling = float(scaling)
    ctx.has_x_lora = has_x_lora
    ctx.output_mask = [need_x, need_a, need_b, need_xl and has_x_lora]


def _lora_grads_differentiable(grad: torch.Tensor, x: torch.Tensor | None,
                               weight: torch.Tensor | None, lora_a: torch.Tensor,
                               lora_b: torch.Tensor, s: float, x_lora: torch.Tensor | None,
                               mask: list[bool], dropout_p: float = 0.0,
                               seed: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """The module docstring's formulas as plain matmuls (for a differentiable backward)."""
    from peftreg.ops.reference import lora_dropout

    need_x, need_a, need_b, need_xl = mask
    g = grad.reshape(-1, grad.shape[-1])
    x_l = x_lora if x_lora is not None else x
    if dropout_p > 0 and x_l is not None:
        x_l = lora_dropout(x_l, dropout_p, seed)
    xl2d = x_l.reshape(-1, lora_a.shape[1]) if x_l is not None else None
    grad_u = torch.mm(g, lora_b) * s
    x_shape = (*grad.shape[:-1], lora_a.shape[1])
    grad_x = grad_a = grad_b = grad_xl = None
    if need_x:
        grad_x = torch.mm(g, weight)
        if x_lora is None:
            low = torch.mm(grad_u, lora_a)
            if dropout_p > 0:  # dropout's backward: the same mask and scale
                low = lora_dropout(low, dropout_p, seed)
            grad_x = grad_x + low
        grad_x = grad_x.reshape(x_shape)
    if need_a:
        grad_a = torch.mm(grad_u.t(), xl2d)
    if need_b:
        grad_b = torch.mm(g.t(), torch.mm(xl2d, lora_a.t())) * s
    if need_xl:
        grad_xl = torch.mm(grad_u, lora_a).reshape(x_shape)
    return [grad_x, grad_a, grad_b, grad_xl]


def _lora_linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight, lora_a, lora_b, x_lora, seed = ctx.saved_tensors
    _, need_w, need_bias, *_ = _needs_input_grad(ctx)
    mask = ctx.output_mask
    grads: list[torch.Tensor | None] = [None, None, None, None]
    if any(mask) and torch.is_grad_enabled():
        # backward(create_graph=True): the compiled backward has no derivative of its own, so
        # the same formulas run as differentiable matmuls (double backward, gradgradcheck).
        grads = _lora_grads_differentiable(grad, x, weight, lora_a, lora_b, ctx.scaling, x_lora,
                                           mask, ctx.dropout_p, seed)
    elif any(mask):
        grads = list(torch.ops.peftreg.lora_linear_backward.default(
            grad, x, weight, lora_a, lora_b, ctx.scaling, x_lora, mask, ctx.dropout_p, seed))
        grads = [g if wanted else None for g, wanted in zip(grads, mask, strict=True)]
    grad_x, grad_a, grad_b, grad_xl = grads
    grad_w = grad_bias = None
    g = grad.reshape(-1, grad.shape[-1])
    if need_w:
        grad_w = torch.mm(g.t(), x.reshape(-1, x.shape[-1]))
    if need_bias:
        grad_bias = g.sum(0)
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None, grad_xl, None, None


torch.library.register_autograd(
    "peftreg::lora_linear",
    _lora_linear_backward,
    setup_context=_lora_linear_setup_context,
)


# --- peftreg::nf4_linear ----------------------------------------------------------------------
#
# y = x W^T + b with a frozen NF4 weight W (out, in), so for g = dL/dy:
#     grad_x = g W        (peftreg::nf4_linear_grad_input: W decoded tile by tile, never dense)
#     grad_b = g.sum over rows
# and no gradient for the quantized weight fields. The grad-input op is linear in g, so its own
# backward (double backward) is nf4_linear again: d(g W)/dg applied to gg is gg W^T.

_NF4_LINEAR_NUM_INPUTS = 10  # x, codes, absmax, nested_absmax, offset, bs, nbs, out, in, bias


def _padded_needs(ctx: Any, count: int) -> tuple[bool, ...]:
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:count])
    return needs + (False,) * (count - len(needs))


def _nf4_weight_setup(ctx: Any, inputs: tuple[Any, ...]) -> None:
    _, codes, absmax, nested_absmax, offset, blocksize, nested_blocksize, out_f, in_f = inputs[:9]
    ctx.save_for_backward(codes, absmax, nested_absmax, offset)
    ctx.weight_meta = (int(blocksize), int(nested_blocksize), int(out_f), int(in_f))


def _nf4_linear_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _nf4_weight_setup(ctx, inputs)


def _nf4_linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    codes, absmax, nested_absmax, offset = ctx.saved_tensors
    blocksize, nested_blocksize, out_f, in_f = ctx.weight_meta
    needs = _padded_needs(ctx, _NF4_LINEAR_NUM_INPUTS)
    grad_x = grad_bias = None
    if needs[0]:
        grad_x = torch.ops.peftreg.nf4_linear_grad_input.default(
            grad, codes, absmax, nested_absmax, offset, blocksize, nested_blocksize, out_f, in_f)
    if needs[9]:
        grad_bias = grad.reshape(-1, out_f).sum(0)
    return (grad_x, None, None, None, None, None, None, None, None, grad_bias)


def _nf4_grad_input_setup_context(ctx: Any, inputs: tuple[Any, ...],
                                  output: torch.Tensor) -> None:
    _nf4_weight_setup(ctx, inputs)


def _nf4_grad_input_backward(ctx: Any, gg: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    codes, absmax, nested_absmax, offset = ctx.saved_tensors
    blocksize, nested_blocksize, out_f, in_f = ctx.weight_meta
    grad_grad = None
    if _padded_needs(ctx, 1)[0]:
        grad_grad = torch.ops.peftreg.nf4_linear.default(
            gg, codes, absmax, nested_absmax, offset, blocksize, nested_blocksize, out_f, in_f,
            None)
    return (grad_grad, None, None, None, None, None, None, None, None)


torch.library.register_autograd(
    "peftreg::nf4_linear",
    _nf4_linear_backward,
    setup_context=_nf4_linear_setup_context,
)
torch.library.register_autograd(
    "peftreg::nf4_linear_grad_input",
    _nf4_grad_input_backward,
    setup_context=_nf4_grad_input_setup_context,
)


# --- peftreg::nf4_lora_linear ------------------------------------------------------------------
#
# lora_linear's formulas with the base W frozen in NF4: grad_x = g dequant(W) (+ grad_u A), A's
# and B's gradients as for lora_linear, grad_b = g summed over rows; all but grad_b come from
# peftreg::nf4_lora_linear_backward.

_NF4_LORA_NUM_INPUTS = 16  # x, 4 weight tensors, 4 ints, bias, A, B, scaling, x_lora, p, seed


def _nf4_lora_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, codes, absmax, nested_absmax, offset, bs, nbs, out_f, in_f, _bias, lora_a, lora_b, \
        scaling, x_lora, dropout_p, dropout_seed = _with_defaults(inputs, _NF4_LORA_NUM_INPUTS,
                                                                  (None, 0.0, None))
    needs = _padded_needs(ctx, _NF4_LORA_NUM_INPUTS)
    need_x, need_bias, need_a, need_b, need_xl = needs[0], needs[9], needs[10], needs[11], \
        needs[13]
    has_x_lora = x_lora is not None
    save_x = not has_x_lora and (need_a or need_b)
    save_x_lora = has_x_lora and (need_a or need_b)
    ctx.save_for_backward(x if save_x else None, codes, absmax, nested_absmax, offset, lora_a,
                          lora_b, x_lora if save_x_lora else None, dropout_seed)
    ctx.dropout_p = float(dropout_p or 0.0)
    ctx.weight_meta = (int(bs), int(nbs), int(out_f), int(in_f))
    ctx.scaling = float(scaling)
    ctx.need_bias = need_bias
    ctx.output_mask = [need_x, need_a, need_b, need_xl and has_x_lora]


def _nf4_lora_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, codes, absmax, nested_absmax, offset, lora_a, lora_b, x_lora, seed = ctx.saved_tensors
    bs, nbs, out_f, in_f = ctx.weight_meta
    mask = ctx.output_mask
    grads: list[torch.Tensor | None] = [None, None, None, None]
    if any(mask):
        if torch.is_grad_enabled():
            raise RuntimeError("peftreg::nf4_lora_linear supports first-order gradients only "
                               "(backward with create_graph=True is not implemented)")
        grads = list(torch.ops.peftreg.nf4_lora_linear_backward.default(
            grad, x, codes, absmax, nested_absmax, offset, bs, nbs, out_f, in_f, lora_a, lora_b,
            ctx.scaling, x_lora, mask, ctx.dropout_p, seed))
        grads = [g if wanted else None for g, wanted in zip(grads, mask, strict=True)]
    grad_x, grad_a, grad_b, grad_xl = grads
    grad_bias = grad.reshape(-1, out_f).sum(0) if ctx.need_bias else None
    return (grad_x, None, None, None, None, None, None, None, None, grad_bias, grad_a, grad_b,
            None, grad_xl, None, None)


torch.library.register_autograd(
    "peftreg::nf4_lora_linear",
    _nf4_lora_backward,
    setup_context=_nf4_lora_setup_context,
)


# --- the NF4 storage ops: not differentiable ---------------------------------------------------
#
# Quantization is piecewise constant, and the dequantized weight of a QLoRA base layer is frozen,
# so these ops have no useful gradient. They still get an autograd registration (every peftreg op
# has one): calling backward through them raises a clear error instead of silently returning
# zeros. (nf4_dequantize_into mutates its output, which torch.library cannot register here; its
# Autograd kernel is torch's "not implemented" fallback, registered in csrc/nf4/nf4_cpu.cpp.)


def _not_differentiable(op: str) -> Any:
    def backward(ctx: Any, *grads: Any) -> tuple[torch.Tensor | None, ...]:
        raise RuntimeError(
            f"peftreg::{op} is not differentiable (NF4 storage is frozen); detach its tensor "
            "inputs, or use peftreg::nf4_linear, whose input gradient is defined")

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        return None

    return backward, setup_context


for _op in ("nf4_quantize", "nf4_double_quantize", "nf4_dequantize", "lora_linear_backward",
            "nf4_lora_linear_backward"):
    _backward, _setup = _not_differentiable(_op)
    torch.library.register_autograd(f"peftreg::{_op}", _backward, setup_context=_setup)


# === IA3, Houlsby, multi-LoRA =====================================================================
#
# peftreg::ia3_linear, output scaling (scale_input=False), rows flattened, p = x W^T + b:
#     y = p * l
#     grad_x = (g * l) W      grad_W = (g * l)^T x      grad_b = sum_rows(g * l)
#     grad_l = sum_rows(g * p)                           (peftreg::ia3_scale_grad)
# The output y and the input x are saved instead of p: y is usually kept by its consumer anyway
# (attention saves keys and values) and one x is shared by the key and value projections.
# ia3_scale_grad recovers p = y / l, recomputing it from x and W only for channels whose scale is
# exactly zero (x is what makes that exact). The memory trade-off is in docs/ops.md.
#
# Input scaling (scale_input=True), xs = x * l:
#     y = xs W^T + b
#     gW = g W                grad_x = gW * l           grad_l = sum_rows(x * gW)
#     grad_W = g^T xs         grad_b = sum_rows(g)
# Only x (an input, alive anyway) and l are saved; xs is rebuilt only if W trains.

_IA3_NUM_INPUTS = 5  # x, weight, bias, scale, scale_input


def _ia3_linear_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, bias, scale, scale_input = inputs
    need_x, need_w, _need_b, need_l, _ = _padded_needs(ctx, _IA3_NUM_INPUTS)
    ctx.scale_input = bool(scale_input)
    ctx.x_shape = x.shape
    if ctx.scale_input:
        ctx.save_for_backward(x if (need_l or need_w) else None,
                              weight if (need_x or need_l) else None, scale, None, None)
    else:
        ctx.save_for_backward(x if (need_w or need_l) else None,
                              weight if (need_x or need_l) else None, scale,
                              output if need_l else None, bias if need_l else None)


def _ia3_linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight, scale, out, bias = ctx.saved_tensors
    need_x, need_w, need_b, need_l, _ = _padded_needs(ctx, _IA3_NUM_INPUTS)
    in_features = ctx.x_shape[-1]
    g = grad.reshape(-1, grad.shape[-1])
    x2d = x.reshape(-1, in_features) if x is not None else None
    grad_x = grad_w = grad_b = grad_l = None
    if ctx.scale_input:
        if need_x or need_l:
            g_w = torch.mm(g, weight)  # (rows, in): shared by grad_x and grad_l
            if need_x:
                grad_x = (g_w * scale).reshape(ctx.x_shape)
            if need_l:
                grad_l = (x2d * g_w).sum(0)
        if need_w:
            grad_w = torch.mm(g.t(), x2d * scale)
        if need_b:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, grad_l, None
    g_l = g * scale if (need_x or need_w or need_b) else None
    if need_x:
        grad_x = torch.mm(g_l, weight).reshape(ctx.x_shape)
    if need_w:
        grad_w = torch.mm(g_l.t(), x2d)
    if need_b:
        grad_b = g_l.sum(0)
    if need_l:
        grad_l = torch.ops.peftreg.ia3_scale_grad.default(grad, out, x, weight, bias, scale)
    return grad_x, grad_w, grad_b, grad_l, None


torch.library.register_autograd(
    "peftreg::ia3_linear", _ia3_linear_backward, setup_context=_ia3_linear_setup_context)

_ia3_grad_backward, _ia3_grad_setup = _not_differentiable("ia3_scale_grad")
torch.library.register_autograd(
    "peftreg::ia3_scale_grad", _ia3_grad_backward, setup_context=_ia3_grad_setup)


# peftreg::houlsby_adapter, rows flattened, z = h Wd^T + bd, a = act(z):
#     out = h + a Wu^T + bu
#     grad_a = g Wu           grad_z = act'(z) * grad_a    (aten's *_backward of the activation)
#     grad_h = g + grad_z Wd  grad_Wd = grad_z^T h          grad_bd = sum_rows(grad_z)
#     grad_Wu = g^T a         grad_bu = sum_rows(g)
# Saved: h (an input), the weights, and z (rows x bottleneck, the op's second output); a is
# recomputed from z (one elementwise pass over a small matrix) instead of being stored.

_HOULSBY_NUM_INPUTS = 6  # h, w_down, b_down, w_up, b_up, activation
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
    need_h, need_wd, need_bd, need_wu, _need_bu, _ = _padded_needs(ctx, _HOULSBY_NUM_INPUTS)
    need_grad_z = need_h or need_wd or need_bd
    ctx.save_for_backward(h if need_wd else None, w_down if need_h else None,
                          w_up if need_grad_z else None, z if (need_grad_z or need_wu) else None)
    ctx.activation = activation
    ctx.h_shape = h.shape


def _houlsby_backward(ctx: Any, grad: torch.Tensor, _grad_z: torch.Tensor | None
                      ) -> tuple[torch.Tensor | None, ...]:
    h, w_down, w_up, z = ctx.saved_tensors
    need_h, need_wd, need_bd, need_wu, need_bu, _ = _padded_needs(ctx, _HOULSBY_NUM_INPUTS)
    hidden = ctx.h_shape[-1]
    g = grad.reshape(-1, hidden)
    z2d = z.reshape(-1, z.shape[-1]) if z is not None else None
    grad_h = grad_wd = grad_bd = grad_wu = grad_bu = None
    if need_h or need_wd or need_bd:
        grad_z = _houlsby_act_backward(torch.mm(g, w_up), z2d, ctx.activation)
        if need_h:
            grad_h = grad.reshape(ctx.h_shape) + torch.mm(grad_z, w_down).reshape(ctx.h_shape)
        if need_wd:
            grad_wd = torch.mm(grad_z.t(), h.reshape(-1, hidden))
        if need_bd:
            grad_bd = grad_z.sum(0)
    if need_wu:
        grad_wu = torch.mm(g.t(), _HOULSBY_FORWARD[ctx.activation](z2d))
    if need_bu:
        grad_bu = g.sum(0)
    return grad_h, grad_wd, grad_bd, grad_wu, grad_bu, None


torch.library.register_autograd(
    "peftreg::houlsby_adapter", _houlsby_backward, setup_context=_houlsby_setup_context)


# peftreg::lora_multi_add is an inference op (multi-adapter serving): peftreg.ops.adapters
# refuses to call it when a gradient would be needed, and this registration makes any backward
# that still reaches it fail with the same explanation instead of returning wrong zeros.


def _lora_multi_backward(ctx: Any, *grads: Any) -> tuple[torch.Tensor | None, ...]:
    raise RuntimeError(
        "peftreg::lora_multi_add is inference-only (per-row multi-adapter LoRA serving) and has "
        "no backward; train each adapter on its own (model.set_active(name)) and use per-row "
        "adapters under torch.no_grad() / model.eval()")


def _lora_multi_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    return None


torch.library.register_autograd(
    "peftreg::lora_multi_add", _lora_multi_backward, setup_context=_lora_multi_setup)
