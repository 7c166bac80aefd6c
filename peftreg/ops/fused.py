# SPDX-License-Identifier: Apache-2.0
"""Typed wrappers over the fused adapter ops (``torch.ops.peftreg.*``).

The maths lives in the kernels (csrc/fused/); these functions only normalise arguments, check
that a compiled kernel exists for the tensors' device, and call the op. The same maths in plain
PyTorch, with the same signatures, is in :mod:`peftreg.ops.reference`.
"""

from __future__ import annotations

import torch

from peftreg import ops as _ops

__all__ = ["lora_linear"]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
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
        x, weight, bias, lora_a, lora_b, float(scaling), x_lora
    )
