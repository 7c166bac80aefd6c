# SPDX-License-Identifier: Apache-2.0
"""Blockwise 8-bit storage of AdamW's moments (issue 17): the dynamic maps and decoding.

The maps are the dynamic tree quantization of Dettmers et al. 2022 ("8-bit Optimizers via
Block-wise Quantization", section 2): a code is a sign bit (signed map only), a run of ``e``
zero bits giving the decimal exponent ``10**-e``, an indicator bit, and the remaining bits as
a linear fraction: the midpoint of one of ``2**bits`` equal bins of ``[0.1, 1]``. The signed map
(for ``exp_avg``) has 7 bits after the sign, so exponents 0..6 with 6..0 fraction bits on each
side of zero; the unsigned map (for ``exp_avg_sq``, never negative) spends the sign bit on one
more fraction bit. Both add 0 and 1.0 (the two patterns without an indicator bit), so each has
256 sorted values, the signed one from -0.99296875 to 1.

A moment tensor is cut into blocks of :data:`BLOCK` elements (the last may be shorter); each
block stores its absmax ``A`` as float32 and each element ``x`` as the index of the map value
nearest to ``x * (1 / A)`` in float32 (bitsandbytes' order: one division per block; ``x / A``
where ``A`` is too small to have a finite reciprocal). Ties go to the lower index; an all-zero
block has ``A = 0`` and the code of 0. Decoding is ``map[code] * A``. The encoder is compiled
(``csrc/paged/``); decoding is one gather and one multiply, done here so it runs on any device.
"""

from __future__ import annotations

from typing import Final

import torch

__all__ = ["BLOCK", "MAP_NAME", "dequantize_blockwise", "dynamic_map"]

#: Elements per block (one float32 absmax each), as in bitsandbytes' blockwise optimizers.
BLOCK: Final[int] = 256
#: Name of the maps recorded in quantized state dicts, so a future change is detected.
MAP_NAME: Final[str] = "dynamic-tree-8bit"


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted float32 values of the signed or unsigned 8-bit dynamic map."""
    fraction_bits_at_e0 = 6 if signed else 7
    values = [0.0, 1.0]
    for e in range(7):
        bins = 2 ** (fraction_bits_at_e0 - e)
        scale = 10.0**-e
        for k in range(bins):
            x = scale * (0.1 + 0.9 * (k + 0.5) / bins)
            values.append(x)
            if signed:
                values.append(-x)
    return torch.tensor(sorted(values), dtype=torch.float64).to(torch.float32)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor
                         ) -> torch.Tensor:
    """Decode ``codes`` (uint8, any shape) with per-block ``absmax`` into float32 of the same
    shape, on the codes' device."""
    flat = codes.reshape(-1).long()
    scale = absmax.to(codes.device, torch.float32).repeat_interleave(BLOCK)[:flat.numel()]
    return (qmap.to(codes.device)[flat] * scale).reshape(codes.shape)
