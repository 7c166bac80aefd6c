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
normally frozen), and the forward saves only the inputs those gradients read. ``u`` is recomputed
in the backward rather than saved: the op returns ``y`` alone, ``u`` costs rows * in * r
multiply-adds (a fraction r/out of the forward's main product) and is only needed for ``grad_B``.
The dense (out, in) product ``B A`` is never formed.
"""

from __future__ import annotations

from typing import Any

import torch

_LORA_NUM_INPUTS = 7  # x, weight, bias, lora_a, lora_b, scaling, x_lora


def _needs_input_grad(ctx: Any) -> tuple[bool, ...]:
    """``ctx.needs_input_grad`` for the op's inputs, padded to all of them.

    The dispatcher drops trailing arguments equal to their defaults (``x_lora=None``), and
    torch.library may append an entry of its own, so the raw tuple can be shorter or longer
    than the schema. Entries past the real inputs are False either way.
    """
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:_LORA_NUM_INPUTS])
    return needs + (False,) * (_LORA_NUM_INPUTS - len(needs))


def _lora_linear_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, _bias, lora_a, lora_b, scaling, x_lora = inputs
    need_x, need_w, _need_bias, need_a, need_b, _, need_xl = _needs_input_grad(ctx)
    need_xl = need_xl and x_lora is not None
    has_x_lora = x_lora is not None
    # grad_u feeds grad_A, grad_x_lora, and grad_x when x is also the LoRA input.
    need_grad_u = need_a or need_xl or (need_x and not has_x_lora)
    save_x = need_w or (not has_x_lora and (need_a or need_b))
    save_x_lora = has_x_lora and (need_a or need_b)
    save_a = need_b or need_xl or (need_x and not has_x_lora)
    ctx.save_for_backward(
        x if save_x else None,
        weight if need_x else None,
        lora_a if save_a else None,
        lora_b if need_grad_u else None,
        x_lora if save_x_lora else None,
    )
    ctx.scaling = float(scaling)
    ctx.has_x_lora = has_x_lora
    ctx.x_shape = x.shape
    ctx.in_features = x.shape[-1]


def _lora_linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight, lora_a, lora_b, x_lora = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b, _, need_xl = _needs_input_grad(ctx)
    need_xl = need_xl and ctx.has_x_lora
    s = ctx.scaling
    in_features = ctx.in_features
    g = grad.reshape(-1, grad.shape[-1])  # (rows, out)
    x2d = x.reshape(-1, in_features) if x is not None else None
    xl2d = x_lora.reshape(-1, in_features) if ctx.has_x_lora and x_lora is not None else x2d

    grad_u = None
    if need_a or need_xl or (need_x and not ctx.has_x_lora):
        grad_u = torch.mm(g, lora_b) * s  # (rows, r)

    grad_x = grad_w = grad_bias = grad_a = grad_b = grad_xl = None
    if need_x:
        grad_x2d = torch.mm(g, weight)
        if not ctx.has_x_lora:
            grad_x2d = grad_x2d.addmm_(grad_u, lora_a)  # fresh buffer: safe to update in place
        grad_x = grad_x2d.reshape(ctx.x_shape)
    if need_w:
        grad_w = torch.mm(g.t(), x2d)
    if need_bias:
        grad_bias = g.sum(0)
    if need_a:
        grad_a = torch.mm(grad_u.t(), xl2d)
    if need_b:
        u = torch.mm(xl2d, lora_a.t())  # recomputed, see the module docstring
        grad_b = torch.mm(g.t(), u) * s
    if need_xl:
        grad_xl = torch.mm(grad_u, lora_a).reshape(ctx.x_shape)
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None, grad_xl


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


for _op in ("nf4_quantize", "nf4_double_quantize", "nf4_dequantize"):
    _backward, _setup = _not_differentiable(_op)
    torch.library.register_autograd(f"peftreg::{_op}", _backward, setup_context=_setup)
