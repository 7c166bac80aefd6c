# SPDX-License-Identifier: Apache-2.0
"""Measures where bitsandbytes' 8-bit blockwise quantizer (CPU) switches codes.

Double quantization stores each block scale as an 8-bit code of the signed dynamic map.
bitsandbytes' CPU kernel does not always pick the nearest code (its bucketed search works on
``float32(1 + z)``, which merges the codes near zero), so byte identity needs its decision
boundaries, not the midpoints. They are found by bisection over float32 bit patterns: for each
code k < 255, the largest normalised value ``z`` in [-1, 1] that it still maps to k or below.
``z`` is what the kernel searches: the residual divided by its block's absmax.

Run as a script to print the table in the C++ and Python forms kept in the sources::

    python tests/bnb_dynamic_probe.py
"""

from __future__ import annotations

import torch

_PER_BLOCK = 255  # probe values per 256-block; the first entry is 1.0 so the absmax is 1


def bnb_codes(z: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' code index (int64) of every normalised value in ``z`` (float32, [-1, 1])."""
    import bitsandbytes.functional as bnb_f

    flat = z.float().reshape(-1)
    n = flat.numel()
    blocks = -(-n // _PER_BLOCK)
    grid = torch.zeros(blocks, _PER_BLOCK + 1)
    grid[:, 0] = 1.0
    padded = torch.zeros(blocks * _PER_BLOCK)
    padded[:n] = flat
    grid[:, 1:] = padded.view(blocks, _PER_BLOCK)
    code = bnb_f.create_dynamic_map(signed=True).float()
    q, _ = bnb_f.quantize_blockwise(grid.reshape(-1), code=code, blocksize=256)
    return q.view(blocks, -1)[:, 1:].reshape(-1)[:n].long()


def _ordered(x: torch.Tensor) -> torch.Tensor:
    bits = x.view(torch.int32).long()
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _from_ordered(o: torch.Tensor) -> torch.Tensor:
    bits = torch.where(o < 0, (-o) | -(2**31), o)
    return bits.to(torch.int32).view(torch.float32)


def measure_upper_bounds() -> torch.Tensor:
    """float32 (255,): entry k is the largest z bitsandbytes maps to a code <= k."""
    k = torch.arange(255)
    low = _ordered(torch.full((255,), -1.0))   # maps to <= k for every k (code 0)
    high = _ordered(torch.full((255,), 1.0))   # maps to 255 > k
    while bool((high - low > 1).any()):
        mid = (low + high) // 2
        above = bnb_codes(_from_ordered(mid)) > k
        high = torch.where(above, mid, high)
        low = torch.where(above, low, mid)
    return _from_ordered(low)


def main() -> None:
    bounds = measure_upper_bounds()
    words = [f"0x{b & 0xFFFFFFFF:08x}" for b in bounds.view(torch.int32).tolist()]
    for start in range(0, 255, 8):
        print("    " + ", ".join(words[start:start + 8]) + ",")


if __name__ == "__main__":
    main()
