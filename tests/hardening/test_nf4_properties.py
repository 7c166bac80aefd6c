"""NF4 quantize/dequantize on arbitrary shapes and values (hypothesis).

Properties, each for any finite input of any shape and every block size:

* the compiled kernels give bit for bit what the plain-PyTorch reference gives;
* the round-trip error of every element is at most half the widest gap between neighbouring
  NF4 code values times its block's absmax (nearest-value rounding cannot do worse);
* quantizing the dequantized tensor again gives the same codes and scales (codes round-trip);
* any NaN or infinity is refused by both with an error that says so.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peftreg import ops
from peftreg.ops import nf4, reference

pytestmark = pytest.mark.skipif(not ops.has_extension(),
                                reason="the compiled extension is not built")

CODE = torch.tensor(reference.NF4_CODE_VALUES, dtype=torch.float64)
HALF_WIDEST_GAP = float((CODE[1:] - CODE[:-1]).max()) / 2  # 0.152: between -1.0 and -0.696
# Scaling by the float32 reciprocal of absmax rounds once (2**-24 relative) before choosing
# the nearest code, and the product code * absmax rounds once more; both are far below the
# gap, so a relative slack of 2**-20 of absmax covers them with room to spare.
ROUNDING_SLACK = 2.0**-20
# Blocks whose absmax is below this are scaled by its inverse instead (bitsandbytes does the
# same), which only maps values towards code 0: the error is then at most the absmax itself.
MIN_ABSMAX = 1e-38
BLOCKSIZES = [32, 64, 128, 256]

magnitudes = st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30])
values = st.floats(min_value=-1.0, max_value=1.0, width=32) | st.sampled_from([0.0, -0.0])


@st.composite
def tensors(draw, dtype=torch.float32):
    if draw(st.booleans()):
        dims = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))
    else:  # long tensors with several blocks, the last one partly filled
        dims = [draw(st.integers(1, 700))]
    n = math.prod(dims)
    flat = draw(st.lists(values, min_size=n, max_size=n))
    scale = draw(magnitudes)
    x = torch.tensor(flat, dtype=torch.float32) * scale
    return x.reshape(dims).to(dtype)


def _per_element_absmax(absmax: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    return absmax.double().repeat_interleave(blocksize)[:n]


@settings(max_examples=60, deadline=None)
@given(x=tensors(), blocksize=st.sampled_from(BLOCKSIZES))
def test_round_trip_error_is_within_half_the_widest_code_gap(x, blocksize):
    codes, absmax = nf4.quantize(x, blocksize)
    ref_codes, ref_absmax = reference.nf4_quantize(x, blocksize)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    out = nf4.dequantize(codes, absmax, blocksize=blocksize, shape=x.shape, dtype=torch.float32)
    assert out.shape == x.shape
    err = (out.double() - x.double()).abs().reshape(-1)
    scale = _per_element_absmax(absmax, blocksize, x.numel())
    bound = torch.where(scale >= MIN_ABSMAX, scale * (HALF_WIDEST_GAP + ROUNDING_SLACK), scale)
    worst = float((err - bound).max())
    assert worst <= 0, f"error exceeds the bound by {worst} (blocksize {blocksize})"
    # The scale is each block's largest magnitude, stored exactly; bitsandbytes clamps only the
    # trailing partial block's to 1e-38.
    blocks = -(-x.numel() // blocksize)
    padded = torch.zeros(blocks * blocksize)
    padded[: x.numel()] = x.reshape(-1).abs()
    expected = padded.view(blocks, blocksize).amax(dim=1)
    if x.numel() % blocksize:
        expected[-1] = expected[-1].clamp(min=MIN_ABSMAX)
    assert torch.equal(absmax, expected)


@settings(max_examples=25, deadline=None)
@given(x=tensors(), blocksize=st.sampled_from(BLOCKSIZES))
def test_codes_round_trip(x, blocksize):
    codes, absmax = nf4.quantize(x, blocksize)
    again_codes, again_absmax = nf4.quantize(
        nf4.dequantize(codes, absmax, blocksize=blocksize, shape=x.shape, dtype=torch.float32),
        blocksize)
    # Blocks scaled by the clamp (absmax < 1e-38) may lose their +-1.0 code: compare the rest.
    normal = (absmax >= MIN_ABSMAX).repeat_interleave(blocksize)[: x.numel()]
    unpacked = torch.stack([codes.reshape(-1) >> 4, codes.reshape(-1) & 15], 1).reshape(-1)
    again = torch.stack([again_codes.reshape(-1) >> 4, again_codes.reshape(-1) & 15],
                        1).reshape(-1)
    n = x.numel()
    assert torch.equal(unpacked[:n][normal], again[:n][normal])
    assert torch.equal(absmax[absmax >= MIN_ABSMAX], again_absmax[absmax >= MIN_ABSMAX])


@settings(max_examples=25, deadline=None)
@given(x=tensors(torch.bfloat16), blocksize=st.sampled_from(BLOCKSIZES),
       out_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_bf16_input_and_any_output_dtype_match_the_reference(x, blocksize, out_dtype):
    codes, absmax = nf4.quantize(x, blocksize)
    ref_codes, ref_absmax = reference.nf4_quantize(x, blocksize)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    out = nf4.dequantize(codes, absmax, blocksize=blocksize, shape=x.shape, dtype=out_dtype)
    ref = reference.nf4_dequantize(codes, absmax, None, None, blocksize, 256, list(x.shape),
                                   out_dtype)
    assert torch.equal(out, ref)


@settings(max_examples=20, deadline=None)
@given(x=tensors(), blocksize=st.sampled_from(BLOCKSIZES), data=st.data())
def test_any_nan_or_inf_is_refused_by_both(x, blocksize, data):
    flat = x.reshape(-1).clone()
    index = data.draw(st.integers(0, flat.numel() - 1), label="index")
    flat[index] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    with pytest.raises(RuntimeError, match=r"argument 'x' contains NaN or infinity"):
        nf4.quantize(flat.reshape(x.shape), blocksize)
    with pytest.raises(RuntimeError, match=r"argument 'x' contains NaN or infinity"):
        reference.nf4_quantize(flat.reshape(x.shape), blocksize)


@settings(max_examples=25, deadline=None)
@given(x=tensors(), blocksize=st.sampled_from(BLOCKSIZES),
       nested=st.sampled_from([32, 256]))
def test_double_quantization_matches_the_reference(x, blocksize, nested):
    _, absmax = nf4.quantize(x, blocksize)
    got = nf4.double_quantize(absmax, nested)
    want = reference.nf4_double_quantize(absmax, nested)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
