# SPDX-License-Identifier: Apache-2.0
"""The NF4 format's two code books, as data the library itself needs.

QLoRA's 16 NF4 code points (Dettmers et al. 2023, section 3 / appendix E) and the signed 8-bit
dynamic code of double quantization (Dettmers et al. 2022), with the decision boundaries
bitsandbytes' CPU quantizer uses for the latter (measured; tests/bnb_dynamic_probe.py).
:class:`peftreg.quant.NF4Tensor` checks files against them and :mod:`peftreg.ops.reference`
quantizes with them; the kernels compile the same values from csrc/nf4/nf4_format.h.
"""

from __future__ import annotations

import torch

__all__ = ["BNB_DYNAMIC_UPPER_BITS", "NF4_CODE_VALUES", "NF4_ZERO_CODE", "bnb_dynamic_bounds",
           "dynamic_code", "nf4_code"]

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


#: float32 bit patterns: entry k is the largest normalised value that bitsandbytes 0.50's CPU
#: blockwise quantizer maps to a dynamic code <= k (255 entries, ascending).
BNB_DYNAMIC_UPPER_BITS: tuple[int, ...] = (
    0xbf7c66fd, 0xbf78ccf9, 0xbf7532f6, 0xbf7198f2, 0xbf6e00ef, 0xbf6a66eb, 0xbf66cce7, 0xbf6332e4,
    0xbf5f98e0, 0xbf5c00dd, 0xbf5866d9, 0xbf54ccd5, 0xbf5132d2, 0xbf4d98ce, 0xbf4a00cb, 0xbf4666c7,
    0xbf42ccc3, 0xbf3f32c0, 0xbf3b98bc, 0xbf3800b9, 0xbf3466b5, 0xbf30ccb2, 0xbf2d32ae, 0xbf2998aa,
    0xbf2600a7, 0xbf2266a3, 0xbf1ecca0, 0xbf1b329c, 0xbf179a98, 0xbf140095, 0xbf106691, 0xbf0ccc8e,
    0xbf09328a, 0xbf059a86, 0xbf020083, 0xbefcccfe, 0xbef598f7, 0xbeee64ef, 0xbee734ea, 0xbee000e2,
    0xbed8ccda, 0xbed198d3, 0xbeca64cb, 0xbec334c6, 0xbebc00be, 0xbeb4ccb6, 0xbead98af, 0xbea664a7,
    0xbe9f34a2, 0xbe98009a, 0xbe90cc92, 0xbe89988b, 0xbe826483, 0xbe7668fb, 0xbe6800eb, 0xbe5998db,
    0xbe4b30ce, 0xbe3cd0be, 0xbe2e68b3, 0xbe2000a3, 0xbe119893, 0xbe033086, 0xbde9a0ec, 0xbdd290d5,
    0xbdc710cc, 0xbdc140c5, 0xbdbb80bc, 0xbdb5c0bc, 0xbdb000b5, 0xbdaa40ac, 0xbda480ac, 0xbd9eb0a5,
    0xbd98f09c, 0xbd933095, 0xbd8d7095, 0xbd87b08c, 0xbd81f085, 0xbd786109, 0xbd6cc0f8, 0xbd6140e9,
    0xbd55c0d8, 0xbd4a40d8, 0xbd3ec0c9, 0xbd3340b8, 0xbd27a0a9, 0xbd1c20a9, 0xbd10a098, 0xbd052089,
    0xbcf34111, 0xbcdc40f0, 0xbcc500d1, 0xbcae00b0, 0xbc9700b0, 0xbc800091, 0xbc5200e0, 0xbc2d00e0,
    0xbc1a80a1, 0xbc1180a1, 0xbc0800a1, 0xbbfe0141, 0xbbec0141, 0xbbd90141, 0xbbc70141, 0xbbb400c0,
    0xbba200c0, 0xbb8f00c0, 0xbb7a0180, 0xbb540180, 0xbb300180, 0xbb0c0180, 0xbacc0101, 0xba900101,
    0xba680201, 0xba480201, 0xba300201, 0xba100201, 0xb9e00401, 0xb9b00401, 0xb9600801, 0xb9000801,
    0xb8c01001, 0xb8801001, 0xb8002001, 0xb3000001, 0xb3000001, 0xb3000001, 0xb3000001, 0xb3000001,
    0xb3000001, 0xb3000001, 0xb3000001, 0x37ff7fff, 0x387fbfff, 0x38bfdfff, 0x38ffdfff, 0x395fefff,
    0x39aff7ff, 0x39dff7ff, 0x3a0ffbff, 0x3a2ffbff, 0x3a47fbff, 0x3a67fbff, 0x3a8ffdff, 0x3acbfdff,
    0x3b0bfeff, 0x3b2ffeff, 0x3b53feff, 0x3b79feff, 0x3b8f0080, 0x3ba20080, 0x3bb40080, 0x3bc70080,
    0x3bd90080, 0x3bec0080, 0x3bfe0080, 0x3c080040, 0x3c118040, 0x3c1a8040, 0x3c2d0040, 0x3c5200bf,
    0x3c80005f, 0x3c97005f, 0x3cae00a0, 0x3cc500a0, 0x3cdc40a0, 0x3cf340df, 0x3d05206f, 0x3d10a090,
    0x3d1c2090, 0x3d27a090, 0x3d3340af, 0x3d3ec0af, 0x3d4a40af, 0x3d55c0d0, 0x3d6140d0, 0x3d6cc0d0,
    0x3d7860ef, 0x3d81f077, 0x3d87b077, 0x3d8d7088, 0x3d933088, 0x3d98f097, 0x3d9eb097, 0x3da48097,
    0x3daa40a8, 0x3db000a8, 0x3db5c0a8, 0x3dbb80b7, 0x3dc140b7, 0x3dc710b7, 0x3dd290c8, 0x3de9a0e8,
    0x3e03307b, 0x3e11988b, 0x3e20009b, 0x3e2e68ab, 0x3e3cd0bb, 0x3e4b30c4, 0x3e5998d4, 0x3e6800e4,
    0x3e7668f4, 0x3e826482, 0x3e899885, 0x3e90cc8d, 0x3e980095, 0x3e9f349d, 0x3ea664a5, 0x3ead98aa,
    0x3eb4ccb2, 0x3ebc00ba, 0x3ec334c2, 0x3eca64ca, 0x3ed198cd, 0x3ed8ccd5, 0x3ee000dd, 0x3ee734e5,
    0x3eee64ed, 0x3ef598f2, 0x3efcccfa, 0x3f020081, 0x3f059a85, 0x3f093289, 0x3f0ccc8a, 0x3f10668e,
    0x3f140092, 0x3f179a96, 0x3f1b329a, 0x3f1ecc9d, 0x3f2266a1, 0x3f2600a5, 0x3f2998a9, 0x3f2d32ad,
    0x3f30ccae, 0x3f3466b2, 0x3f3800b6, 0x3f3b98ba, 0x3f3f32be, 0x3f42ccc1, 0x3f4666c5, 0x3f4a00c9,
    0x3f4d98cd, 0x3f5132d1, 0x3f54ccd2, 0x3f5866d6, 0x3f5c00da, 0x3f5f98de, 0x3f6332e2, 0x3f66cce5,
    0x3f6a66e9, 0x3f6e00ed, 0x3f7198f1, 0x3f7532f5, 0x3f78ccf6, 0x3f7c66fa, 0x3f7f18fe,
)


def bnb_dynamic_bounds(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' 255 decision boundaries for the dynamic code (float32, ascending)."""
    bits = torch.tensor(BNB_DYNAMIC_UPPER_BITS, dtype=torch.int64).to(torch.int32)
    return bits.view(torch.float32).to(device)
