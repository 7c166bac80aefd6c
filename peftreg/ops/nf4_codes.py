# SPDX-License-Identifier: Apache-2.0
"""The NF4 format's two code books, as data the library itself needs.

QLoRA's 16 NF4 code points (Dettmers et al. 2023, section 3 / appendix E) and the signed 8-bit
dynamic code of double quantization (Dettmers et al. 2022). :class:`peftreg.quant.NF4Tensor`
checks files against them and :mod:`peftreg.ops.reference` quantizes with them; the kernels
compile the same values from csrc/nf4/nf4_format.h.
"""

from __future__ import annotations

import torch

__all__ = ["NF4_CODE_VALUES", "NF4_ZERO_CODE", "dynamic_code", "nf4_code"]

NF4_CODE_VALUES: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_ZERO_CODE = 7


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 code points (float32, ascending; index 7 is exactly 0.0)."""
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The signed 8-bit dynamic code used for double quantization (256 float32, ascending).

    Dynamic tree quantization (Dettmers et al. 2022, section 2; Dettmers 2015): a value is an
    exponent level ``10^(e-6)`` (e = 0..6) times a linear fraction. Level ``e`` has ``2^e``
    fractions: the midpoints of ``2^e + 1`` evenly spaced points from 0.1 to 1. With both signs
    that is 2 * 127 values, plus 0 and 1.0. Computed in float32 throughout, as the format does.
    """
    levels: list[torch.Tensor] = []
    for e in range(7):
        points = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        fractions = (points[:-1] + points[1:]) / 2
        magnitude = fractions * torch.tensor(10.0 ** (e - 6), dtype=torch.float32)
        levels += [magnitude, -magnitude]
    levels.append(torch.tensor([0.0, 1.0], dtype=torch.float32))
    return torch.sort(torch.cat(levels)).values.to(device)
