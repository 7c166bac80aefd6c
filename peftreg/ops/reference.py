# SPDX-License-Identifier: Apache-2.0
"""Plain-PyTorch maths of every peftreg op, written from the papers.

This module is the test oracle for the compiled kernels, the baseline of the benchmarks, and the
plain-PyTorch path a plugin takes when the compiled extension is unavailable. It imports nothing
from the kernels and is never registered with the dispatcher: a missing compiled kernel must fail
loudly rather than silently land here. Signatures match :mod:`peftreg.ops.fused`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    """LoRA forward: ``h = W0 x + b + scaling * B A x`` (Hu et al. 2021, eq. 3).

    LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685), section 4.1, writes
    the adapted layer as ``h = W0 x + ΔW x = W0 x + B A x`` with ``B`` (d x r), ``A`` (r x k)
    and the update scaled by ``alpha / r``. Here ``W0 = weight`` (out x in), ``A = lora_a``
    (r x in), ``B = lora_b`` (out x r), and rows of ``x`` are the vectors ``x``. The update is
    applied as two skinny products (``B (A x)``) so the dense ``B A`` is never formed.

    Args:
        x: input ``(..., in_features)``.
        weight: frozen base weight ``W0``, ``(out_features, in_features)``.
        bias: base bias ``(out_features,)`` or None.
        lora_a: ``A``, ``(r, in_features)``.
        lora_b: ``B``, ``(out_features, r)``.
        scaling: ``alpha / r``.
        x_lora: input of the low-rank path (e.g. ``dropout(x)``); None means ``x``.

    Returns:
        ``(..., out_features)`` tensor; autograd flows through ordinary torch ops.
    """
    base = F.linear(x, weight, bias)
    x_l = x if x_lora is None else x_lora
    update = F.linear(F.linear(x_l, lora_a), lora_b)
    return base + scaling * update
