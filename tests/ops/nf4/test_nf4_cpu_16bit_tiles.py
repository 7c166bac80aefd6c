# SPDX-License-Identifier: Apache-2.0
"""The two CPU paths of the NF4 products for many rows of bf16/fp16 (docs/ops.md "nf4_linear").

``PEFTREG_CPU_WIDEN_16BIT=1`` forces float32 tiles (W at its exact float32 value, one rounding of
the output); ``=0`` forces tiles decoded into the input's dtype multiplied by ATen's 16-bit GEMM
(W rounded as ``nf4_dequantize`` rounds it, then one rounding of the output), the default on a
CPU with AVX512-BF16 / AVX512-FP16. Each path is checked against float64 products with its own
weight values, so both run and are checked on any CPU. Shapes stay tiny: without 16-bit
arithmetic ATen's 16-bit GEMM is a slow generic loop.
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import scaled_close

from peftreg.ops import nf4, reference
from peftreg.quant import NF4Tensor

pytestmark = pytest.mark.usefixtures("require_extension")

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# (out, in, rows, double quantization): odd in_features make blocks straddle weight rows and
# rows start on a low nibble; 80 x 96 spans several blocks per row.
CASES = {"out=40,in=65,rows=20": (40, 65, 20, True), "out=80,in=96,rows=70": (80, 96, 70, False),
         "out=29,in=67,rows=9": (29, 67, 9, True)}


def _case(out_f: int, in_f: int, rows: int, dq: bool, dtype: torch.dtype):
    g = torch.Generator().manual_seed(out_f * 131 + in_f)
    t = NF4Tensor.quantize(torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f), 64, dq)
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    grad = torch.randn(rows, out_f, generator=g).to(dtype)
    return t, x, grad


def _weight(t: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight as the reference dequantizes it to ``dtype``, in float64."""
    return reference.nf4_dequantize(t.codes, t.absmax, t.nested_absmax, t.offset, t.blocksize,
                                    t.nested_blocksize, list(t.shape), dtype).double()


def _kwargs(t: NF4Tensor) -> dict:
    return {"blocksize": t.blocksize, "out_features": t.shape[0], "in_features": t.shape[1],
            "nested_absmax": t.nested_absmax, "offset": t.offset,
            "nested_blocksize": t.nested_blocksize}


def _products(t: NF4Tensor, x: torch.Tensor, grad: torch.Tensor):
    y = nf4.linear(x, t.codes, t.absmax, **_kwargs(t))
    gx = nf4.linear_grad_input(grad, t.codes, t.absmax, **_kwargs(t))
    return y, gx


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
@pytest.mark.parametrize("widen", ["1", "0"], ids=["float32-tiles", "16bit-tiles"])
def test_each_forced_path_matches_its_weight_values(monkeypatch, widen, dtype, case):
    monkeypatch.setenv("PEFTREG_CPU_WIDEN_16BIT", widen)
    t, x, grad = _case(*case, dtype)
    assert nf4.cpu_rounds_weight(dtype, x.shape[0]) == (widen == "0")
    # float32 tiles multiply W's exact float32 values; 16-bit tiles the dequantized 16-bit ones.
    w = _weight(t, torch.float32 if widen == "1" else dtype)
    y, gx = _products(t, x, grad)
    assert y.dtype == dtype and gx.dtype == dtype
    # Either way only the output's one rounding (and float32 sums) remain.
    scaled_close(y, x.double() @ w.t(), "nf4_linear.forward", dtype, "y")
    scaled_close(gx, grad.double() @ w, "nf4_linear.backward", dtype, "grad_x")


@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
def test_forcing_switches_the_path(monkeypatch, dtype):
    """The override reaches the kernel on every call: the two paths' outputs differ."""
    t, x, grad = _case(80, 96, 70, False, dtype)
    outputs = {}
    for widen in ("1", "0"):
        monkeypatch.setenv("PEFTREG_CPU_WIDEN_16BIT", widen)
        outputs[widen] = _products(t, x, grad)
    for a, b in zip(outputs["1"], outputs["0"], strict=True):
        assert not torch.equal(a, b)  # W rounded to 16 bits moves some rounded outputs


@pytest.mark.parametrize("case", [("float32", 70), ("bfloat16", 8), ("float16", 3)],
                         ids=["fp32-many-rows", "bf16-8-rows", "fp16-3-rows"])
def test_other_paths_ignore_the_override(monkeypatch, case):
    """float32 input and few rows (the GEMV path) keep W at float32 under either setting."""
    dtype, rows = getattr(torch, case[0]), case[1]
    t, x, grad = _case(40, 65, rows, True, dtype)
    outputs = {}
    for widen in ("1", "0"):
        monkeypatch.setenv("PEFTREG_CPU_WIDEN_16BIT", widen)
        assert not nf4.cpu_rounds_weight(dtype, rows)
        outputs[widen] = _products(t, x, grad)
    for a, b in zip(outputs["1"], outputs["0"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("widen", ["1", "0"], ids=["float32-tiles", "16bit-tiles"])
def test_lora_layer_on_each_path_matches_float64(monkeypatch, widen):
    """nf4_lora_linear, forward and every gradient, with the tolerances of its path."""
    monkeypatch.setenv("PEFTREG_CPU_WIDEN_16BIT", widen)
    dtype = torch.bfloat16
    t, x, grad = _case(48, 67, 24, True, dtype)
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(4, 67, generator=g) / math.sqrt(67)).to(dtype)
    b = (torch.randn(48, 4, generator=g) * 0.3).to(dtype)
    bias = torch.randn(48, generator=g).to(dtype)
    leaves = [v.clone().requires_grad_() for v in (x, bias, a, b)]
    y = nf4.lora_linear(leaves[0], t.codes, t.absmax, **_kwargs(t), lora_a=leaves[2],
                        lora_b=leaves[3], scaling=1.5, bias=leaves[1])
    y.backward(grad)

    w = _weight(t, torch.float32 if widen == "1" else dtype)
    refs = [v.double().requires_grad_() for v in (x, bias, a, b)]
    expected = (refs[0] @ w.t() + refs[1]
                + 1.5 * (refs[0] @ refs[2].t()) @ refs[3].t())
    expected.backward(grad.double())
    # float32 tiles: one rounding of y; 16-bit tiles: lora_linear's 16-bit roundings.
    scaled_close(y, expected, "nf4_linear.forward" if widen == "1" else "lora_linear.forward",
                 dtype, "y")
    for name, mine, ref in zip(("x", "bias", "lora_a", "lora_b"), leaves, refs, strict=True):
        scaled_close(mine.grad, ref.grad, "lora_linear.backward", dtype, f"grad of {name}")
