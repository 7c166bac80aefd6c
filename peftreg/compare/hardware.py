# SPDX-License-Identifier: Apache-2.0
"""Choosing a compute dtype for this CPU by measuring, not by assuming.

QLoRA computes in bfloat16 by default (its paper's setting, right for GPUs). Many CPUs have no
bfloat16 arithmetic, and there a bfloat16 matrix product is several times slower than a float32
one, which would make QLoRA the slowest row of a comparison for a reason that has nothing to do
with the method. :func:`cpu_compute_dtype` times one product of the comparison's size in both
dtypes and keeps the 16-bit dtype only where it is not slower.
"""

from __future__ import annotations

import functools
import time

import torch

__all__ = ["cpu_compute_dtype"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SHAPE = (256, 384, 1536)   # rows x in x out: a MiniLM feed-forward product at batch 16 x 16


def _best_ms(dtype: torch.dtype, repeats: int = 5) -> float:
    rows, inner, out = _SHAPE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=gen).to(dtype)
    b = torch.randn(inner, out, generator=gen).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 1000 * best


@functools.cache
def cpu_compute_dtype(requested: str) -> tuple[str, str]:
    """``(dtype name to use, why)`` for a method asking for ``requested`` on this CPU.

    The 16-bit dtype is kept when its product is no slower than float32's (a CPU with native
    bfloat16 or float16 arithmetic); otherwise float32, with the measured ratio as the reason.
    """
    if requested not in ("bfloat16", "float16"):
        return requested, ""
    half = _best_ms(_DTYPES[requested])
    single = _best_ms(torch.float32)
    if half <= single:
        return requested, f"{requested} measured {single / half:.1f}x faster than float32 here"
    return "float32", f"{requested} measured {half / single:.1f}x slower than float32 here"
