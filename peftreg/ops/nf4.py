# SPDX-License-Identifier: Apache-2.0
"""Typed wrappers over the NF4 ops (``torch.ops.peftreg.nf4_*``).

The maths lives in the kernels (csrc/nf4/); these functions only normalise arguments, check that
a compiled kernel exists for the tensors' device, and call the op. The same maths in plain
PyTorch is in :mod:`peftreg.ops.reference` (``nf4_*`` functions, positional arguments in the
schemas' order). The storage record most callers want is :class:`peftreg.quant.NF4Tensor`.

A quantized weight is described by the same fields everywhere (docs/ops.md):

* ``codes``: uint8, ``(numel + 1) // 2`` packed bytes (two 4-bit codes per byte);
* ``absmax``: float32 per block, or uint8 codes with double quantization;
* ``nested_absmax`` and ``offset``: float32, only with double quantization;
* ``blocksize`` (32..4096, power of two) and ``nested_blocksize`` (256 in bitsandbytes files).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peftreg import ops as _ops

__all__ = ["dequantize", "double_quantize", "linear", "linear_grad_input", "quantize"]


def _require(op: str, device: torch.device) -> None:
    if not _ops.has_extension():
        raise _ops.ExtensionUnavailableError(
            f"peftreg.ops.nf4 needs the compiled extension for peftreg::{op}: "
            f"{_ops.extension_error()}"
        )
    if not torch.compiler.is_compiling():
        _ops.require_kernel(op, device)


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
    _require("nf4_quantize", x.device)
    return torch.ops.peftreg.nf4_quantize.default(x, int(blocksize))


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
    _require("nf4_double_quantize", absmax.device)
    return torch.ops.peftreg.nf4_double_quantize.default(absmax, int(nested_blocksize),
                                                         bool(nearest))


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
    _require("nf4_dequantize", codes.device)
    size = [int(s) for s in shape]
    if out is not None:
        if list(out.shape) != size or out.dtype != dtype:
            raise RuntimeError(
                f"peftreg::nf4_dequantize: argument 'out' has shape {list(out.shape)} and dtype "
                f"{out.dtype} but 'shape' is {size} and 'dtype' is {dtype}")
        torch.ops.peftreg.nf4_dequantize_into.default(
            codes, absmax, nested_absmax, offset, int(blocksize), int(nested_blocksize), out)
        return out
    return torch.ops.peftreg.nf4_dequantize.default(
        codes, absmax, nested_absmax, offset, int(blocksize), int(nested_blocksize), size, dtype)


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

    ``W`` is decoded tile by tile inside the product (never as a whole dense tensor). The weight
    enters at float32 precision, sums accumulate in float32, and the output is rounded once to
    ``x.dtype``. Differentiable in ``x`` and ``bias``; the weight is frozen.

    Args:
        x: ``(..., in_features)``, float32/bfloat16/float16 (float64 for gradient checks).
        codes, absmax, nested_absmax, offset, blocksize, nested_blocksize: the quantized weight.
        out_features, in_features: the weight's shape.
        bias: ``(out_features,)`` in ``x.dtype``, or None.

    Returns:
        ``(..., out_features)`` in ``x.dtype``.
    """
    _require("nf4_linear", x.device)
    return torch.ops.peftreg.nf4_linear.default(
        x, codes, absmax, nested_absmax, offset, int(blocksize), int(nested_blocksize),
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
    _require("nf4_linear_grad_input", grad.device)
    return torch.ops.peftreg.nf4_linear_grad_input.default(
        grad, codes, absmax, nested_absmax, offset, int(blocksize), int(nested_blocksize),
        int(out_features), int(in_features))
