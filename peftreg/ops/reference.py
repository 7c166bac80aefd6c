# SPDX-License-Identifier: Apache-2.0
"""Plain-PyTorch maths of every peftreg op, written from the papers.

This module is the test oracle for the compiled kernels, the baseline of the benchmarks, and the
plain-PyTorch path a plugin takes when the compiled extension is unavailable. It imports nothing
from the kernels and is never registered with the dispatcher: a missing compiled kernel must fail
loudly rather than silently land here. Signatures match the op wrappers in
:mod:`peftreg.ops.lora`, :mod:`peftreg.ops.nf4` and :mod:`peftreg.ops.adapters`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

# The format's code books are data the library needs too (NF4Tensor checks files against them);
# they live in peftreg.ops.nf4_codes and are re-exported here for the tests.
from peftreg.ops.nf4_codes import NF4_CODE_VALUES, NF4_ZERO_CODE, dynamic_code, nf4_code

__all__ = ["lora_linear"]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | int | None = None,
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
        dropout_p, dropout_seed: dropout on the low-rank path's input with the fused ops'
            mask (:func:`lora_dropout`), when ``dropout_p > 0``.

    Returns:
        ``(..., out_features)`` tensor; autograd flows through ordinary torch ops.
    """
    base = F.linear(x, weight, bias)
    x_l = x if x_lora is None else x_lora
    if dropout_p > 0:
        x_l = lora_dropout(x_l, dropout_p, dropout_seed)
    update = F.linear(F.linear(x_l, lora_a), lora_b)
    return base + scaling * update


_M32 = 0xFFFFFFFF


def lora_dropout_mask(seed: int, numel: int, p: float,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The fused ops' dropout mask (csrc/fused/lora_dropout.h) with torch integer ops.

    Element ``i`` of the rows-flattened input is kept when a 32-bit hash of ``(seed, i)``
    (MurmurHash3's fmix32 finaliser of the index mixed with the seed) is at least
    ``p * 2**32``. Values stay below 2**32 in int64, so products wrap only above bit 63 and
    the low 32 bits are exact.
    """
    i = torch.arange(numel, dtype=torch.int64, device=device)
    h = ((i & _M32) * 0x9E3779B1 & _M32) + ((i >> 32) * 0x85EBCA77 & _M32) + (seed & _M32)
    h = (h & _M32) ^ ((seed >> 32) & _M32)
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    h = h ^ (h >> 16)
    threshold = min(int(p * 2**32), _M32)
    return h >= threshold


def lora_dropout(x: torch.Tensor, p: float, seed: torch.Tensor | int | None) -> torch.Tensor:
    """Inverted dropout of ``x`` with :func:`lora_dropout_mask` (kept values scaled 1/(1-p))."""
    if seed is None:
        raise ValueError("dropout_p > 0 needs a dropout_seed")
    keep = lora_dropout_mask(int(seed), x.numel(), p, x.device).view(x.shape)
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros_like(x))


# --- NF4 storage (QLoRA, Dettmers et al. 2023; bitsandbytes' byte format) --------------------
#
# Written from the format facts in docs/format.md ("NF4 storage"), not from the kernels:
# * NF4 code points: QLoRA section 3 / appendix E (the 16 float32 values of the format);
# * blockwise absmax quantization with the nearest code (ties to the lower code), a full block
#   scaled by the float32 reciprocal of max(absmax, 1e-38), a trailing partial block divided by
#   it (bitsandbytes' quantize does exactly this);
# * two codes per byte, element 2i in the high nibble, odd counts padded with code 7 (0.0);
# * double quantization (QLoRA section 3, "Double Quantization"): the absmax minus their mean,
#   blockwise-quantized with the signed dynamic 8-bit code of Dettmers et al. 2022 ("8-bit
#   Optimizers via Block-wise Quantization", dynamic tree quantization). bitsandbytes' CPU
#   quantizer does not pick the nearest code there: its codes follow the measured boundaries
#   below (tests/bnb_dynamic_probe.py measures them against bitsandbytes itself).

_MIN_ABSMAX = 1e-38

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

__all__ += [
    "BNB_DYNAMIC_UPPER_BITS",
    "NF4_CODE_VALUES",
    "bnb_dynamic_bounds",
    "dynamic_code",
    "nf4_code",
    "nf4_dequantize",
    "nf4_double_quantize",
    "nf4_linear",
    "nf4_linear_grad_input",
    "nf4_quantize",
]


def bnb_dynamic_bounds(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' 255 decision boundaries for the dynamic code (float32, ascending)."""
    bits = torch.tensor(BNB_DYNAMIC_UPPER_BITS, dtype=torch.int64).to(torch.int32)
    return bits.view(torch.float32).to(device)


def _blockwise_codes(flat: torch.Tensor, blocksize: int, code: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest ``code`` index (int64) of every element and the float32 absmax of every block."""
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32, device=flat.device)
    padded[:n] = flat.float()
    grid = padded.view(blocks, blocksize)
    absmax = grid.abs().amax(dim=1) if blocks else padded.new_zeros(0)
    divisor = absmax.clamp(min=_MIN_ABSMAX)
    scaled = grid * (1.0 / divisor).unsqueeze(1)
    if n % blocksize:  # the trailing partial block divides instead of multiplying
        scaled[-1] = grid[-1] / divisor[-1]
    scaled = scaled.clamp(-1.0, 1.0).reshape(-1)[:n]
    midpoints = (code[:-1] + code[1:]) / 2
    # Index = number of midpoints strictly below the value: ties go to the lower code.
    index = torch.bucketize(scaled, midpoints.to(scaled.device), right=False)
    return index, absmax


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise RuntimeError(f"argument '{name}' contains NaN or infinity; NF4 can only store "
                           "finite values")


def _check_blocksize(value: int, name: str) -> None:
    if not (32 <= value <= 4096 and value & (value - 1) == 0):
        raise RuntimeError(f"argument '{name}' is {value}; expected a power of two from 32 "
                           "to 4096")


def nf4_quantize(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4 quantization of ``x`` (flattened), packed two codes per byte.

    Returns:
        ``(codes, absmax)``: uint8 ``((n + 1) // 2, 1)`` and float32 ``(ceil(n / blocksize),)``.
    """
    _check_blocksize(blocksize, "blocksize")
    flat = x.detach().reshape(-1)
    _check_finite(flat, "x")
    index, absmax = _blockwise_codes(flat, blocksize, nf4_code(flat.device))
    if flat.numel() % blocksize:  # bitsandbytes stores a partial block's absmax clamped to 1e-38
        absmax[-1] = absmax[-1].clamp(min=_MIN_ABSMAX)
    if index.numel() % 2:
        index = torch.cat([index, index.new_full((1,), NF4_ZERO_CODE)])
    packed = (index[0::2] << 4) | index[1::2]
    return packed.to(torch.uint8).unsqueeze(1), absmax


def nf4_double_quantize(absmax: torch.Tensor, nested_blocksize: int = 256, nearest: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the float32 absmax: ``offset = mean``, then 8-bit dynamic blockwise codes.

    With ``nearest=False`` (bitsandbytes' bytes) a residual ``r`` in a block whose largest
    ``|r|`` is ``m`` gets the number of bitsandbytes boundaries strictly below ``fp32(r / m)``
    (``0 / 0`` is NaN, code 0); with ``nearest=True`` the nearest code, scaled as the 4-bit codes.

    Returns:
        ``(absmax_codes uint8 (n,), nested_absmax float32 (ceil(n / nested_blocksize),),
        offset float32 0-dim)``.
    """
    _check_blocksize(nested_blocksize, "nested_blocksize")
    _check_finite(absmax, "absmax")
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    residual = absmax - offset
    if nearest:
        index, nested = _blockwise_codes(residual, nested_blocksize, dynamic_code(absmax.device))
        return index.to(torch.uint8), nested, offset
    n = residual.numel()
    blocks = -(-n // nested_blocksize)
    padded = residual.new_zeros(blocks * nested_blocksize)
    padded[:n] = residual
    nested = padded.view(blocks, nested_blocksize).abs().amax(dim=1)
    z = (padded.view(blocks, nested_blocksize) / nested.unsqueeze(1)).reshape(-1)[:n]
    index = torch.bucketize(z, bnb_dynamic_bounds(absmax.device), right=False)
    index = torch.where(torch.isnan(z), torch.zeros_like(index), index)
    return index.to(torch.uint8), nested, offset


def _block_scales(absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                  offset: torch.Tensor | None, nested_blocksize: int) -> torch.Tensor:
    """float32 absmax per block; with double quantization fp32(fp32(code * nested) + offset)."""
    if absmax.dtype != torch.uint8:
        return absmax.float()
    if nested_absmax is None or offset is None:
        raise ValueError("uint8 absmax codes need nested_absmax and offset (double quantization)")
    per_block = nested_absmax.repeat_interleave(nested_blocksize)[: absmax.numel()]
    product = dynamic_code(absmax.device)[absmax.long()] * per_block
    return product + offset.reshape(())


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                   offset: torch.Tensor | None, blocksize: int, nested_blocksize: int,
                   shape: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The dense tensor: ``fp32(code_value * block_scale)`` rounded once to ``dtype``."""
    n = math.prod(shape)
    flat = codes.reshape(-1)
    index = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n].long()
    scales = _block_scales(absmax, nested_absmax, offset, nested_blocksize)
    values = nf4_code(codes.device)[index] * scales.repeat_interleave(blocksize)[:n]
    return values.to(dtype).reshape(tuple(shape))


def nf4_linear(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
               nested_absmax: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int,
               nested_blocksize: int, out_features: int, in_features: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` with the dense weight: dequantize (float32 values), then ``F.linear``.

    The weight is rounded to ``x.dtype`` before the product (pass float64 ``x`` for an exact
    oracle). Autograd flows to ``x`` and ``bias`` through ordinary torch ops.
    """
    weight = nf4_dequantize(codes, absmax, nested_absmax, offset, blocksize, nested_blocksize,
                            (out_features, in_features), torch.float32)
    return F.linear(x, weight.to(x.dtype), bias)


def nf4_linear_grad_input(grad: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                          nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                          blocksize: int, nested_blocksize: int, out_features: int,
                          in_features: int) -> torch.Tensor:
    """``grad @ W``: the input gradient of :func:`nf4_linear`."""
    weight = nf4_dequantize(codes, absmax, nested_absmax, offset, blocksize, nested_blocksize,
                            (out_features, in_features), torch.float32)
    return grad @ weight.to(grad.dtype)


def nf4_lora_linear(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                    nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                    blocksize: int, nested_blocksize: int, out_features: int, in_features: int,
                    bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scaling: float, x_lora: torch.Tensor | None = None,
                    dropout_p: float = 0.0, dropout_seed: torch.Tensor | int | None = None
                    ) -> torch.Tensor:
    """QLoRA's layer (Dettmers et al. 2023, eq. 5): the dequantized base plus the LoRA update."""
    base = nf4_linear(x, codes, absmax, nested_absmax, offset, blocksize, nested_blocksize,
                      out_features, in_features, bias)
    x_l = x if x_lora is None else x_lora
    if dropout_p > 0:
        x_l = lora_dropout(x_l, dropout_p, dropout_seed)
    return base + scaling * F.linear(F.linear(x_l, lora_a), lora_b)


# --- IA3, Houlsby, multi-LoRA -----------------------------------------------------------------

__all__ += ["HOULSBY_ACTIVATIONS", "houlsby_adapter", "ia3_linear", "lora_multi_add"]


def ia3_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               scale: torch.Tensor, scale_input: bool) -> torch.Tensor:
    """(IA)^3 on one linear layer (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
    Better and Cheaper than In-Context Learning", section 3.3).

    The method rescales activations element-wise with learned vectors: keys and values of the
    attention, ``l_k ⊙ K`` and ``l_v ⊙ V`` (the *outputs* of the key/value projections), and the
    feed-forward activation ``(l_ff ⊙ act(W1 x)) W2`` (the *input* of the down projection).

    Args:
        x: ``(..., in_features)``.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
        scale: ``l``: ``(out_features,)`` when ``scale_input`` is False, ``(in_features,)``
            when True.
        scale_input: scale the layer's input (feed-forward) rather than its output.

    Returns:
        ``(x W^T + b) ⊙ l`` or ``(x ⊙ l) W^T + b``, shape ``(..., out_features)``.
    """
    if scale_input:
        return F.linear(x * scale, weight, bias)
    return F.linear(x, weight, bias) * scale


HOULSBY_ACTIVATIONS: dict[str, Any] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
}


def houlsby_adapter(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None,
                    w_up: torch.Tensor, b_up: torch.Tensor | None, activation: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bottleneck adapter (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
    section 2.1, figure 2): project the ``d``-dimensional features down to ``m``, apply a
    nonlinearity, project back up, and add a skip connection.

    Args:
        h: the sub-layer output, ``(..., hidden)``.
        w_down: ``(bottleneck, hidden)``; b_down: ``(bottleneck,)`` or None.
        w_up: ``(hidden, bottleneck)``; b_up: ``(hidden,)`` or None.
        activation: ``"relu"``, ``"gelu"`` (exact), ``"silu"`` or ``"tanh"``.

    Returns:
        ``(h + act(z) W_up^T + b_up, z)`` with ``z = h W_down^T + b_down`` (the pre-activation
        the compiled op also returns for its backward).
    """
    z = F.linear(h, w_down, b_down)
    return h + F.linear(HOULSBY_ACTIVATIONS[activation](z), w_up, b_up), z


def lora_multi_add(base: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, scaling: torch.Tensor, index: torch.Tensor
                   ) -> torch.Tensor:
    """Many LoRA adapters in one batch, one adapter per row (S-LoRA, Sheng et al. 2023,
    section 4; Punica's SGMV, Chen et al. 2023): ``h_i = base_i + s_k (x_i A_k^T) B_k^T`` with
    ``k = index_i`` (LoRA, Hu et al. 2021, eq. 3, per row); ``k = -1`` leaves ``base_i``.

    Written as the segmented product the papers describe: the rows of each adapter are gathered,
    multiplied by that adapter's factors, and scattered back. Ranks below ``r`` are zero-padded,
    which adds exact zeros.

    Args:
        base: base layer output ``(..., out_features)``.
        x: layer input ``(..., in_features)``.
        lora_a: stacked ``A``, ``(adapters, r, in_features)``.
        lora_b: stacked ``B``, ``(adapters, out_features, r)``.
        scaling: ``(adapters,)`` per-adapter ``alpha / r``.
        index: ``x.shape[:-1]`` int64 adapter per row, -1 for none.

    Returns:
        Tensor shaped like ``base``.
    """
    out_features = base.shape[-1]
    x2d = x.reshape(-1, x.shape[-1])
    idx = index.reshape(-1)
    out = base.reshape(-1, out_features).clone()
    for k in range(lora_a.shape[0]):
        rows = torch.nonzero(idx == k).reshape(-1)
        if rows.numel() == 0:
            continue
        update = F.linear(F.linear(x2d.index_select(0, rows), lora_a[k]), lora_b[k])
        out.index_add_(0, rows, (update * scaling[k]).to(out.dtype))
    return out.reshape(base.shape)
