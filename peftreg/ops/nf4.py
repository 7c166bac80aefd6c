# SPDX-License-Identifier: Apache-2.0
"""The NF4 ops (``peftreg::nf4_*``, QLoRA's 4-bit storage): wrapper, fake and autograd of each.

The maths lives in the kernels (csrc/nf4/); the wrappers normalise arguments and call the op.
The same maths in plain PyTorch is in :mod:`peftreg.ops.reference` (``nf4_*`` functions,
positional arguments in the schemas' order), which each :class:`~peftreg.ops._op.Op` here names
for its plain path. The storage record most callers want is :class:`peftreg.quant.NF4Tensor`.

A quantized weight is described by the same fields everywhere (docs/ops.md):

* ``codes``: uint8, ``(numel + 1) // 2`` packed bytes (two 4-bit codes per byte);
* ``absmax``: float32 per block, or uint8 codes with double quantization;
* ``nested_absmax`` and ``offset``: float32, only with double quantization;
* ``blocksize`` (32..4096, power of two) and ``nested_blocksize`` (256 in bitsandbytes files).

Autograd: ``nf4_linear`` is ``y = x W^T + b`` with W frozen, so ``grad_x = g W``
(``nf4_linear_grad_input``, W decoded tile by tile) and ``grad_b = g`` summed over rows; the
grad-input op is linear in ``g``, so its own backward is ``nf4_linear`` again.
``nf4_lora_linear`` has lora_linear's formulas (:mod:`peftreg.ops.lora`) with W frozen. The
storage ops have no useful gradient (quantization is piecewise constant, the base is frozen):
their registered backward raises instead of returning zeros.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from peftreg.ops import _checks as ck
from peftreg.ops import reference
from peftreg.ops._op import Op
from peftreg.ops.lora import (
    check_lora_backward,
    check_lora_factors,
    cpu_widens_16bit,
    lora_grads_fake,
    padded_needs,
    with_defaults,
)

__all__ = ["cpu_rounds_weight", "dequantize", "double_quantize", "linear", "linear_grad_input",
           "lora_linear", "quantize"]

# Up to this many input rows the CPU products run the decoding GEMV (kGemvMaxRows in
# csrc/nf4/nf4_cpu.cpp).
CPU_GEMV_MAX_ROWS = 8


def cpu_rounds_weight(dtype: torch.dtype, rows: int) -> bool:
    """Whether the CPU NF4 products over ``rows`` input rows of ``dtype`` round W to ``dtype``.

    True for more than :data:`CPU_GEMV_MAX_ROWS` rows of bf16/fp16 on a processor with native
    arithmetic for that dtype (AVX512-BF16 / AVX512-FP16): there the kernels decode W tiles
    into ``dtype`` (each weight rounded as :func:`dequantize` rounds it) and run ATen's 16-bit
    GEMM, whose result is rounded to ``dtype`` (docs/ops.md "nf4_linear"). Everywhere else W
    enters at float32 precision. ``PEFTREG_CPU_WIDEN_16BIT=1``/``=0`` forces float32/16-bit
    tiles, as for the dense LoRA kernels. Mirrors ``tiles_in_16bit`` in csrc/nf4/nf4_cpu.cpp.
    """
    return (rows > CPU_GEMV_MAX_ROWS and dtype in (torch.bfloat16, torch.float16)
            and not cpu_widens_16bit(dtype))


def _dequantize_into_plain(codes: torch.Tensor, absmax: torch.Tensor,
                           nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                           blocksize: int, nested_blocksize: int, out: torch.Tensor) -> None:
    out.copy_(reference.nf4_dequantize(codes, absmax, nested_absmax, offset, blocksize,
                                       nested_blocksize, list(out.shape), out.dtype))


QUANTIZE = Op("nf4_quantize", reference=reference.nf4_quantize)
DOUBLE_QUANTIZE = Op("nf4_double_quantize", reference=reference.nf4_double_quantize)
DEQUANTIZE = Op("nf4_dequantize", reference=reference.nf4_dequantize)
DEQUANTIZE_INTO = Op("nf4_dequantize_into", reference=_dequantize_into_plain)
LINEAR = Op("nf4_linear", reference=reference.nf4_linear)
LINEAR_GRAD_INPUT = Op("nf4_linear_grad_input", reference=reference.nf4_linear_grad_input)
LORA_LINEAR = Op("nf4_lora_linear", reference=reference.nf4_lora_linear)
LORA_LINEAR_BACKWARD = Op("nf4_lora_linear_backward")


def quantize(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4 quantization of ``x`` (any shape; flattened).

    Args:
        x: float32, bfloat16 or float16 tensor; every value must be finite.
        blocksize: elements per absmax block, a power of two from 32 to 4096.

    Returns:
        ``(codes, absmax)``: uint8 ``((numel + 1) // 2, 1)`` (element 2i in the high nibble of
        byte i; an odd count pads with code 7, i.e. 0.0) and float32 ``(ceil(numel / blocksize),)``.

    Raises:
        ExtensionUnavailableError: no compiled kernel for ``x``'s device.
        RuntimeError: NaN/inf in ``x``, a bad ``blocksize`` or dtype (the message says which).
    """
    return QUANTIZE(x, int(blocksize))


def double_quantize(absmax: torch.Tensor, nested_blocksize: int = 256, nearest: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of the float32 block scales (QLoRA section 3).

    Args:
        absmax: float32 ``(blocks,)`` from :func:`quantize`.
        nested_blocksize: scales per second-level block (bitsandbytes uses 256).
        nearest: pick the nearest 8-bit code instead of bitsandbytes' code (docs/format.md).

    Returns:
        ``(absmax_codes, nested_absmax, offset)``: uint8 ``(blocks,)``, float32
        ``(ceil(blocks / nested_blocksize),)`` and a float32 0-dim tensor (the mean of ``absmax``).
    """
    return DOUBLE_QUANTIZE(absmax, int(nested_blocksize), bool(nearest))


def check_out(out: torch.Tensor, size: list[int], dtype: torch.dtype) -> None:
    """Refuse an ``out`` tensor for :func:`dequantize` that does not match ``size``/``dtype``.

    Raises:
        RuntimeError: the shape or dtype differs (the op itself would only see ``out``).
    """
    if list(out.shape) != size or out.dtype != dtype:
        raise RuntimeError(
            f"{DEQUANTIZE.qualname}: argument 'out' has shape {list(out.shape)} and dtype "
            f"{out.dtype} but 'shape' is {size} and 'dtype' is {dtype}")


def dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    *,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense tensor: each code value times its block's float32 scale, rounded once to ``dtype``.

    Args:
        codes, absmax, nested_absmax, offset, blocksize, nested_blocksize: the quantized tensor.
        shape: shape of the dense tensor.
        dtype: float32, bfloat16, float16 or float64.
        out: optional preallocated contiguous tensor of ``shape`` and ``dtype`` to write into.

    Returns:
        The dense tensor (``out`` itself when given).
    """
    size = [int(s) for s in shape]
    if out is not None:
        check_out(out, size, dtype)
        DEQUANTIZE_INTO(codes, absmax, nested_absmax, offset, int(blocksize),
                        int(nested_blocksize), out)
        return out
    return DEQUANTIZE(codes, absmax, nested_absmax, offset, int(blocksize),
                      int(nested_blocksize), size, dtype)


def linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    *,
    blocksize: int,
    out_features: int,
    in_features: int,
    nested_absmax: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W^T + bias`` for an NF4 weight ``W`` of shape ``(out_features, in_features)``.

    ``W`` is decoded tile by tile inside the product (never kept as a dense tensor). The weight
    enters at float32 precision, sums accumulate in float32, and the output is rounded once to
    ``x.dtype``; except for many rows of bf16/fp16 on CUDA, and on a CPU with arithmetic for the
    dtype (:func:`cpu_rounds_weight`), where W is rounded to ``x.dtype`` first, as in
    dequantize-then-matmul. Differentiable in ``x`` and ``bias``; the weight is frozen.

    Args:
        x: ``(..., in_features)``, float32/bfloat16/float16 (float64 for gradient checks).
        codes, absmax, nested_absmax, offset, blocksize, nested_blocksize: the quantized weight.
        out_features, in_features: the weight's shape.
        bias: ``(out_features,)`` in ``x.dtype``, or None.

    Returns:
        ``(..., out_features)`` in ``x.dtype``.
    """
    return LINEAR(x, codes, absmax, nested_absmax, offset, int(blocksize), int(nested_blocksize),
                  int(out_features), int(in_features), bias)


def linear_grad_input(
    grad: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    *,
    blocksize: int,
    out_features: int,
    in_features: int,
    nested_absmax: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """``grad @ W``: the input gradient of :func:`linear`, again without a dense ``W``.

    Returns:
        ``(..., in_features)`` in ``grad.dtype``.
    """
    return LINEAR_GRAD_INPUT(grad, codes, absmax, nested_absmax, offset, int(blocksize),
                             int(nested_blocksize), int(out_features), int(in_features))


def lora_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    *,
    blocksize: int,
    out_features: int,
    in_features: int,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    nested_absmax: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    bias: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """A QLoRA layer in one fused op (``peftreg::nf4_lora_linear``): NF4 base plus LoRA update.

    Computes ``x @ dequant(W)^T + bias + scaling * ((x_lora or x) @ lora_a^T) @ lora_b^T`` with
    ``W`` decoded tile by tile (as :func:`linear`) and every sum in float32, rounded once to
    ``x.dtype``; where :func:`cpu_rounds_weight` holds (and on CUDA) the layer runs in
    ``x.dtype`` instead, as dequantize-then-matmul does. Differentiable in ``x``, ``bias``,
    ``lora_a``, ``lora_b`` and ``x_lora`` (first order); the quantized weight is frozen.

    Args:
        x: ``(..., in_features)``, float32/bfloat16/float16 (float64 for gradient checks).
        codes, absmax, nested_absmax, offset, blocksize, nested_blocksize: the NF4 weight, as
            for :func:`linear`.
        out_features, in_features: the weight's shape.
        lora_a, lora_b: ``(r, in_features)`` and ``(out_features, r)`` in ``x.dtype``.
        scaling: the update's factor (``alpha / r``).
        bias: ``(out_features,)`` in ``x.dtype``, or None.
        x_lora: input of the low-rank path when it differs from ``x``.
        dropout_p, dropout_seed: dropout inside the op, as for
            :func:`peftreg.ops.lora.lora_linear`.

    Raises:
        ExtensionUnavailableError: no compiled kernel for ``x``'s device.
        RuntimeError: mismatched shapes, dtypes or devices, naming the argument; a 16-bit output
            that overflowed from finite inputs (CPU).
    """
    if x_lora is x:
        x_lora = None
    return LORA_LINEAR(x, codes, absmax, nested_absmax, offset, int(blocksize),
                       int(nested_blocksize), int(out_features), int(in_features), bias, lora_a,
                       lora_b, float(scaling), x_lora, float(dropout_p), dropout_seed)


# --- fake kernels (the checks of csrc/nf4/nf4_kernels.h and csrc/fused/lora_kernels.h) -------

_QUANTIZE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_weight(op: str, codes: torch.Tensor, absmax: torch.Tensor,
                  nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                  blocksize: int, nested_blocksize: int, numel: int) -> None:
    """check_quantized_weight (csrc/nf4/nf4_kernels.h), same order and wording."""
    ck.blocksize(op, "blocksize", blocksize)
    blocks = (numel + blocksize - 1) // blocksize
    ck.dtype(op, codes, "codes", torch.uint8)
    ck.numel(op, codes, "codes", (numel + 1) // 2,
             "(numel + 1) // 2 packed bytes for the weight's element count")
    ck.numel(op, absmax, "absmax", blocks, "one per block: ceil(numel / blocksize)")
    if absmax.dtype == torch.uint8:
        ck.blocksize(op, "nested_blocksize", nested_blocksize)
        ck.check(op, nested_absmax is not None and offset is not None,
                 "argument 'absmax' is uint8 (double-quantized), so 'nested_absmax' and "
                 "'offset' are required")
        if nested_absmax is None or offset is None:  # unreachable: the check above raised
            return
        ck.dtype(op, nested_absmax, "nested_absmax", torch.float32)
        ck.dtype(op, offset, "offset", torch.float32)
        ck.numel(op, nested_absmax, "nested_absmax",
                 (blocks + nested_blocksize - 1) // nested_blocksize,
                 "one per nested block: ceil(blocks / nested_blocksize)")
        ck.numel(op, offset, "offset", 1, "one scalar: the mean of the absmax")
    else:
        ck.check(op, absmax.dtype == torch.float32,
                 f"argument 'absmax' has dtype {ck.scalar_name(absmax.dtype)}; expected Float "
                 "(float32 scales) or Byte (uint8 double-quantized scales)")
        ck.check(op, nested_absmax is None and offset is None,
                 "arguments 'nested_absmax' and 'offset' belong to double-quantized weights "
                 "(uint8 'absmax') but 'absmax' is float32; pass None for both")


def _check_input(op: str, x: torch.Tensor, name: str, features: int, features_name: str,
                 out_features: int, in_features: int) -> None:
    """check_linear_input (csrc/nf4/nf4_kernels.h)."""
    ck.check(op, in_features >= 0 and out_features >= 0,
             f"out_features ({out_features}) and in_features ({in_features}) must not be "
             "negative")
    ck.min_dim(op, x, name, 1, "(..., features)")
    ck.check(op, x.shape[-1] == features,
             f"argument '{name}' has {x.shape[-1]} features in its last dimension (shape "
             f"{ck.shape(x)}) but {features_name} is {features}")
    ck.supported_dtype(op, x, name)


def _check_bias(op: str, bias: torch.Tensor | None, x: torch.Tensor, out_features: int) -> None:
    if bias is None:
        return
    ck.dim(op, bias, "bias", 1, "(out_features,)")
    ck.check(op, bias.shape[0] == out_features,
             f"argument 'bias' has shape {ck.shape(bias)} but out_features is {out_features}")
    ck.same_dtype(op, [("bias", bias)], x, "x")
    ck.same_device(op, [("bias", bias)], x, "x")


@QUANTIZE.register_fake
def _quantize_fake(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    op = QUANTIZE.qualname
    ck.blocksize(op, "blocksize", blocksize)
    ck.check(op, x.dtype in _QUANTIZE_DTYPES,
             f"argument 'x' has dtype {ck.scalar_name(x.dtype)}; expected Float (float32), "
             "BFloat16 or Half (float16)")
    n = x.numel()
    codes = x.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = x.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32)
    return codes, absmax


@DOUBLE_QUANTIZE.register_fake
def _double_quantize_fake(absmax: torch.Tensor, nested_blocksize: int = 256,
                          nearest: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = DOUBLE_QUANTIZE.qualname
    ck.blocksize(op, "nested_blocksize", nested_blocksize)
    ck.dtype(op, absmax, "absmax", torch.float32)
    ck.check(op, absmax.dim() == 1,
             f"argument 'absmax' must be 1-D (blocks,) but has shape {ck.shape(absmax)}")
    n = absmax.numel()
    codes = absmax.new_empty((n,), dtype=torch.uint8)
    nested = absmax.new_empty(((n + nested_blocksize - 1) // nested_blocksize,))
    return codes, nested, absmax.new_empty(())


@DEQUANTIZE.register_fake
def _dequantize_fake(codes: torch.Tensor, absmax: torch.Tensor,
                     nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                     blocksize: int, nested_blocksize: int, shape: list[int],
                     dtype: torch.dtype) -> torch.Tensor:
    op = DEQUANTIZE.qualname
    size = list(shape)
    ck.check(op, dtype in ck.SUPPORTED_FLOATS,
             f"argument 'dtype' is {ck.scalar_name(dtype)}; expected one of Float (float32), "
             "BFloat16, Half (float16) or Double")
    for s in size:
        ck.check(op, s >= 0, f"argument 'shape' {size} has a negative size")
    _check_weight(op, codes, absmax, nested_absmax, offset, blocksize, nested_blocksize,
                  math.prod(size))
    return codes.new_empty(tuple(size), dtype=dtype)


@DEQUANTIZE_INTO.register_fake
def _dequantize_into_fake(codes: torch.Tensor, absmax: torch.Tensor,
                          nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                          blocksize: int, nested_blocksize: int, out: torch.Tensor) -> None:
    op = DEQUANTIZE_INTO.qualname
    ck.supported_dtype(op, out, "out")
    _check_weight(op, codes, absmax, nested_absmax, offset, blocksize, nested_blocksize,
                  out.numel())
    ck.same_device(op, [("out", out)], codes, "codes")
    ck.check(op, out.is_contiguous(), f"argument 'out' must be contiguous but has strides "
             f"{list(out.stride())} for shape {ck.shape(out)}")


def _linear_out(op: str, x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                blocksize: int, nested_blocksize: int, out_features: int, in_features: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    _check_input(op, x, "x", in_features, "in_features", out_features, in_features)
    _check_weight(op, codes, absmax, nested_absmax, offset, blocksize, nested_blocksize,
                  out_features * in_features)
    _check_bias(op, bias, x, out_features)
    return x.new_empty((*x.shape[:-1], out_features))


@LINEAR.register_fake
def _linear_fake(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                 nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                 blocksize: int, nested_blocksize: int, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    return _linear_out(LINEAR.qualname, x, codes, absmax, nested_absmax, offset, blocksize,
                       nested_blocksize, out_features, in_features, bias)


@LINEAR_GRAD_INPUT.register_fake
def _linear_grad_input_fake(grad: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                            nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                            blocksize: int, nested_blocksize: int, out_features: int,
                            in_features: int) -> torch.Tensor:
    op = LINEAR_GRAD_INPUT.qualname
    _check_input(op, grad, "grad", out_features, "out_features", out_features, in_features)
    _check_weight(op, codes, absmax, nested_absmax, offset, blocksize, nested_blocksize,
                  out_features * in_features)
    return grad.new_empty((*grad.shape[:-1], in_features))


@LORA_LINEAR.register_fake
def _lora_linear_fake(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                      nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                      blocksize: int, nested_blocksize: int, out_features: int,
                      in_features: int, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, scaling: float, x_lora: torch.Tensor | None = None,
                      dropout_p: float = 0.0, dropout_seed: torch.Tensor | None = None
                      ) -> torch.Tensor:
    op = LORA_LINEAR.qualname
    out = _linear_out(op, x, codes, absmax, nested_absmax, offset, blocksize, nested_blocksize,
                      out_features, in_features, bias)
    check_lora_factors(op, lora_a, lora_b, in_features, out_features, "in_features",
                       "out_features")
    named = [("lora_a", lora_a), ("lora_b", lora_b)]
    if x_lora is not None:
        ck.same_shape(op, x_lora, "x_lora", x, "x")
        named.append(("x_lora", x_lora))
    ck.same_dtype(op, named, x, "x")
    ck.same_device(op, named, x, "x")
    return out


@LORA_LINEAR_BACKWARD.register_fake
def _lora_linear_backward_fake(
    grad: torch.Tensor, x: torch.Tensor | None, codes: torch.Tensor, absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int,
    nested_blocksize: int, out_features: int, in_features: int, lora_a: torch.Tensor,
    lora_b: torch.Tensor, scaling: float, x_lora: torch.Tensor | None,
    output_mask: Sequence[bool], dropout_p: float = 0.0, dropout_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = LORA_LINEAR_BACKWARD.qualname
    check_lora_backward(op, grad, x, None, lora_a, lora_b, x_lora, output_mask,
                        weight_needed=False)
    ck.check(op, grad.shape[-1] == out_features and lora_a.shape[1] == in_features,
             f"grad has {grad.shape[-1]} features and lora_a {lora_a.shape[1]} but the weight "
             f"is ({out_features}, {in_features})")
    if output_mask[0]:  # the weight is read for grad_x only
        _check_weight(op, codes, absmax, nested_absmax, offset, blocksize, nested_blocksize,
                      out_features * in_features)
    return lora_grads_fake(grad, lora_a, lora_b, x_lora is not None, output_mask)


# --- autograd ---------------------------------------------------------------------------------

_LINEAR_NUM_INPUTS = 10  # x, codes, absmax, nested_absmax, offset, bs, nbs, out, in, bias
_LORA_NUM_INPUTS = 16  # x, 4 weight tensors, 4 ints, bias, A, B, scaling, x_lora, p, seed


def _weight_setup(ctx: Any, inputs: tuple[Any, ...]) -> None:
    _, codes, absmax, nested_absmax, offset, blocksize, nested_blocksize, out_f, in_f = inputs[:9]
    ctx.save_for_backward(codes, absmax, nested_absmax, offset)
    ctx.weight_meta = (int(blocksize), int(nested_blocksize), int(out_f), int(in_f))


def _linear_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _weight_setup(ctx, inputs)


def _linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    codes, absmax, nested_absmax, offset = ctx.saved_tensors
    blocksize, nested_blocksize, out_f, in_f = ctx.weight_meta
    needs = padded_needs(ctx, _LINEAR_NUM_INPUTS)
    grad_x = grad_bias = None
    if needs[0]:
        grad_x = LINEAR_GRAD_INPUT.overload(grad, codes, absmax, nested_absmax, offset,
                                            blocksize, nested_blocksize, out_f, in_f)
    if needs[9]:
        grad_bias = grad.reshape(-1, out_f).sum(0)
    return (grad_x, None, None, None, None, None, None, None, None, grad_bias)


def _grad_input_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _weight_setup(ctx, inputs)


def _grad_input_backward(ctx: Any, gg: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    codes, absmax, nested_absmax, offset = ctx.saved_tensors
    blocksize, nested_blocksize, out_f, in_f = ctx.weight_meta
    grad_grad = None
    if padded_needs(ctx, 1)[0]:
        grad_grad = LINEAR.overload(gg, codes, absmax, nested_absmax, offset, blocksize,
                                    nested_blocksize, out_f, in_f, None)
    return (grad_grad, None, None, None, None, None, None, None, None)


def _lora_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, codes, absmax, nested_absmax, offset, bs, nbs, out_f, in_f, _bias, lora_a, lora_b, \
        scaling, x_lora, dropout_p, dropout_seed = with_defaults(inputs, _LORA_NUM_INPUTS,
                                                                 (None, 0.0, None))
    needs = padded_needs(ctx, _LORA_NUM_INPUTS)
    need_x, need_bias, need_a, need_b, need_xl = (needs[0], needs[9], needs[10], needs[11],
                                                 needs[13])
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


def _lora_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, codes, absmax, nested_absmax, offset, lora_a, lora_b, x_lora, seed = ctx.saved_tensors
    bs, nbs, out_f, in_f = ctx.weight_meta
    mask = ctx.output_mask
    grads: list[torch.Tensor | None] = [None, None, None, None]
    if any(mask):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{LORA_LINEAR.qualname} supports first-order gradients only "
                               "(backward with create_graph=True is not implemented)")
        grads = list(LORA_LINEAR_BACKWARD.overload(
            grad, x, codes, absmax, nested_absmax, offset, bs, nbs, out_f, in_f, lora_a, lora_b,
            ctx.scaling, x_lora, mask, ctx.dropout_p, seed))
        grads = [g if wanted else None for g, wanted in zip(grads, mask, strict=True)]
    grad_x, grad_a, grad_b, grad_xl = grads
    grad_bias = grad.reshape(-1, out_f).sum(0) if ctx.need_bias else None
    return (grad_x, None, None, None, None, None, None, None, None, grad_bias, grad_a, grad_b,
            None, grad_xl, None, None)


LINEAR.register_autograd(_linear_backward, _linear_setup_context)
LINEAR_GRAD_INPUT.register_autograd(_grad_input_backward, _grad_input_setup_context)
LORA_LINEAR.register_autograd(_lora_backward, _lora_setup_context)
# nf4_dequantize_into mutates its output, which torch.library cannot register here; its Autograd
# kernel is torch's "not implemented" fallback, registered in csrc/nf4/nf4_ops.cpp.
for _storage_op in (QUANTIZE, DOUBLE_QUANTIZE, DEQUANTIZE):
    _storage_op.not_differentiable(
        "is not differentiable (NF4 storage is frozen); detach its tensor inputs, or use "
        "peftreg::nf4_linear, whose input gradient is defined")
LORA_LINEAR_BACKWARD.not_differentiable(
    "is not differentiable: it is nf4_lora_linear's first-order backward")
