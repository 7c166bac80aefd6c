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
from peftreg.ops.nf4_codes import (
    NF4_CODE_VALUES,
    NF4_ZERO_CODE,
    bnb_dynamic_bounds,
    dynamic_code,
    nf4_code,
)

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
#   in peftreg.ops.nf4_codes (tests/bnb_dynamic_probe.py measures them against bitsandbytes).

_MIN_ABSMAX = 1e-38


__all__ += [
    "NF4_CODE_VALUES",
    "dynamic_code",
    "nf4_code",
    "nf4_dequantize",
    "nf4_double_quantize",
    "nf4_linear",
    "nf4_linear_grad_input",
    "nf4_quantize",
]


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
    ``|r|`` is ``m`` gets the number of bitsandbytes boundaries strictly below
    ``r * fp32(1 / m)`` (``0 * inf`` is NaN, code 0); with ``nearest=True`` the nearest code,
    scaled as the 4-bit codes.

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
    z = (padded.view(blocks, nested_blocksize) * (1.0 / nested).unsqueeze(1)).reshape(-1)[:n]
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
