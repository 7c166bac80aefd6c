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
