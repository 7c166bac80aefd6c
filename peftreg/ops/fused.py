# SPDX-License-Identifier: Apache-2.0
"""Typed wrappers over the fused adapter ops (``torch.ops.peftreg.*``).

The maths lives in the kernels (csrc/fused/); these functions only normalise arguments, check
that a compiled kernel exists for the tensors' device, and call the op. The same maths in plain
PyTorch, with the same signatures, is in :mod:`peftreg.ops.reference`.
"""

from __future__ import annotations

import torch

from peftreg import ops as _ops
from peftreg.ops.reference import new_dropout_seed

__all__ = ["lora_linear", "new_dropout_seed", "nf4_lora_linear"]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """A LoRA-adapted linear layer in one fused op: base product plus low-rank update.

    Computes ``x @ weight^T + bias + scaling * ((x_lora or x) @ lora_a^T) @ lora_b^T``
    (LoRA, Hu et al. 2021, eq. 3, with ``scaling = alpha / r``) without forming the dense
    ``lora_b @ lora_a`` product. Differentiable in every tensor argument; gradients are computed
    only for those that require them.

    Args:
        x: input of shape ``(..., in_features)``; any number of leading dimensions.
        weight: base weight, ``(out_features, in_features)`` (usually frozen).
        bias: base bias ``(out_features,)``, or None.
        lora_a: down-projection A, ``(r, in_features)``.
        lora_b: up-projection B, ``(out_features, r)``.
        scaling: factor applied to the low-rank update (``alpha / r``).
        x_lora: input of the low-rank path when it differs from ``x``, typically
            ``dropout(x)`` computed by the caller (so dropout's backward stays torch's); same
            shape as ``x``. ``None``, or ``x`` itself, means the LoRA path reads ``x``.
        dropout_p: dropout probability on the LoRA path's input, applied inside the op; the
            backward regenerates the mask from ``dropout_seed`` instead of saving it or
            ``dropout(x)`` (see docs/ops.md). Excludes ``x_lora``.
        dropout_seed: int64 tensor with one element (for example
            :func:`new_dropout_seed`); required when ``dropout_p > 0``.

    Returns:
        Tensor of shape ``(..., out_features)`` with ``x``'s dtype, on ``x``'s device.

    Raises:
        ExtensionUnavailableError: the compiled extension is not loaded, or it has no kernel for
            ``x``'s device (for example a CPU-only build given CUDA tensors).
        RuntimeError: mismatched shapes, dtypes or devices; the message names the argument.
            All tensors must share one dtype (float32, bfloat16, float16; float64 is accepted
            for gradient checking) and one device.
    """
    if not _ops.has_extension():
        raise _ops.ExtensionUnavailableError(
            f"peftreg.ops.fused.lora_linear needs the compiled extension: {_ops.extension_error()}"
        )
    if not torch.compiler.is_compiling():
        # While compiling, the fake kernel validates; the device check is for eager calls.
        _ops.require_kernel("lora_linear", x.device)
    if x_lora is x:
        x_lora = None  # identical inputs: take the cheaper path, gradients are the same
    return torch.ops.peftreg.lora_linear.default(
        x, weight, bias, lora_a, lora_b, float(scaling), x_lora, float(dropout_p), dropout_seed
    )



def nf4_lora_linear(
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
    """A QLoRA layer in one fused op: NF4 base product plus the LoRA update.

    Computes ``x @ dequant(W)^T + bias + scaling * ((x_lora or x) @ lora_a^T) @ lora_b^T`` with
    ``W`` decoded tile by tile (as :func:`peftreg.ops.nf4.linear`) and every sum in float32,
    rounded once to ``x.dtype``. Differentiable in ``x``, ``bias``, ``lora_a``, ``lora_b`` and
    ``x_lora`` (first order); the quantized weight is frozen.

    Args:
        x: ``(..., in_features)``, float32/bfloat16/float16 (float64 for gradient checks).
        codes, absmax, nested_absmax, offset, blocksize, nested_blocksize: the NF4 weight, as
            for :func:`peftreg.ops.nf4.linear`.
        out_features, in_features: the weight's shape.
        lora_a, lora_b: ``(r, in_features)`` and ``(out_features, r)`` in ``x.dtype``.
        scaling: the update's factor (``alpha / r``).
        bias: ``(out_features,)`` in ``x.dtype``, or None.
        x_lora: input of the low-rank path when it differs from ``x``.
        dropout_p, dropout_seed: dropout inside the op, as for :func:`lora_linear`.

    Raises:
        ExtensionUnavailableError: no compiled kernel for ``x``'s device.
        RuntimeError: mismatched shapes, dtypes or devices, naming the argument; a 16-bit output
            that overflowed from finite inputs (CPU).
    """
    if not _ops.has_extension():
        raise _ops.ExtensionUnavailableError(
            "peftreg.ops.fused.nf4_lora_linear needs the compiled extension: "
            f"{_ops.extension_error()}")
    if not torch.compiler.is_compiling():
        _ops.require_kernel("nf4_lora_linear", x.device)
    if x_lora is x:
        x_lora = None
    return torch.ops.peftreg.nf4_lora_linear.default(
        x, codes, absmax, nested_absmax, offset, int(blocksize), int(nested_blocksize),
        int(out_features), int(in_features), bias, lora_a, lora_b, float(scaling), x_lora,
        float(dropout_p), dropout_seed)
