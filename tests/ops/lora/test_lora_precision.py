# SPDX-License-Identifier: Apache-2.0
"""16-bit LoRA products on CPU: both compute paths, and the forward's overflow guard.

On processors without native bf16/fp16 arithmetic the kernels widen 16-bit operands to float32
(csrc/fused/lora_math.h); ``PEFTREG_CPU_WIDEN_16BIT`` forces either path so both are tested
here against a float64 evaluation of LoRA's equation (Hu et al. 2021, eq. 3).
"""

from __future__ import annotations

import pytest
import torch
from tolerances import scaled_close

from peftreg.ops import lora as lora_ops

pytestmark = pytest.mark.usefixtures("require_extension")
WIDEN = pytest.mark.parametrize("widen", ["1", "0"], ids=["widened", "aten16"])
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


def _inputs(dtype: torch.dtype, scale: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows, inn, out, r = (3, 7), 37, 29, 5  # odd sizes on purpose

    def t(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    return {"x": t(*rows, inn, s=scale), "weight": t(out, inn, s=inn**-0.5), "bias": t(out),
            "lora_a": t(r, inn, s=inn**-0.5), "lora_b": t(out, r, s=0.5)}


def _reference(m: dict[str, torch.Tensor], s: float) -> torch.Tensor:
    d = {k: v.double() for k, v in m.items()}
    return d["x"] @ d["weight"].T + d["bias"] + s * (d["x"] @ d["lora_a"].T) @ d["lora_b"].T


@WIDEN
@DTYPES
def test_forward_and_backward_match_float64(monkeypatch, widen, dtype):
    monkeypatch.setenv("PEFTREG_CPU_WIDEN_16BIT", widen)
    m = _inputs(dtype)
    leaves = {k: v.clone().requires_grad_(k in ("x", "lora_a", "lora_b")) for k, v in m.items()}
    y = lora_ops.lora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"],
                          leaves["lora_b"], 1.5)
    assert y.dtype == dtype
    scaled_close(y, _reference(m, 1.5), "lora_linear.forward", dtype)

    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(upstream)
    ref_leaves = {k: v.double().requires_grad_(k in ("x", "lora_a", "lora_b"))
                  for k, v in m.items()}
    _reference(ref_leaves, 1.5).backward(upstream.double())
    for name in ("x", "lora_a", "lora_b"):
        assert leaves[name].grad.dtype == dtype
        scaled_close(leaves[name].grad, ref_leaves[name].grad, "lora_linear.backward", dtype)


@WIDEN
def test_large_bf16_activations_stay_finite_and_exact(monkeypatch, widen):
    """Activations near bf16's top decade give a finite, correct output and gradients."""
    monkeypatch.setenv("PEFTREG_CPU_WIDEN_16BIT", widen)
    m = _inputs(torch.bfloat16, scale=1e36)
    x = m["x"].clone().requires_grad_()
    a, b = m["lora_a"].clone().requires_grad_(), m["lora_b"].clone().requires_grad_()
    y = lora_ops.lora_linear(x, m["weight"], m["bias"], a, b, 2.0)
    assert torch.isfinite(y).all()
    scaled_close(y, _reference(m, 2.0), "lora_linear.forward", torch.bfloat16)
    y.backward(torch.ones_like(y))
    for grad in (x.grad, a.grad, b.grad):
        assert torch.isfinite(grad).all()


@WIDEN
@DTYPES
def test_forward_overflow_from_finite_inputs_is_an_error(monkeypatch, widen, dtype):
    monkeypatch.setenv("PEFTREG_CPU_WIDEN_16BIT", widen)
    top = torch.finfo(dtype).max
    m = _inputs(dtype)
    m["x"] = torch.full_like(m["x"], top / 8)
    m["weight"] = torch.full_like(m["weight"], 1.0)  # 37 terms of top/8: far beyond the range
    assert all(torch.isfinite(v).all() for v in m.values())
    with pytest.raises(RuntimeError, match=r"peftreg::lora_linear: the .* output overflowed"):
        lora_ops.lora_linear(m["x"], m["weight"], m["bias"], m["lora_a"], m["lora_b"], 1.0)


@DTYPES
def test_non_finite_inputs_pass_through(dtype):
    """inf/NaN that come in are the caller's: they propagate instead of raising."""
    m = _inputs(dtype)
    m["x"][0, 0, 0] = float("inf")
    y = lora_ops.lora_linear(m["x"], m["weight"], m["bias"], m["lora_a"], m["lora_b"], 1.0)
    assert not torch.isfinite(y[0, 0]).all()
    assert torch.isfinite(y[1:]).all()


def test_fp32_is_never_widened_or_guarded():
    """float32 runs ATen's own GEMM: equal to the plain expression up to summation order."""
    m = _inputs(torch.float32)
    y = lora_ops.lora_linear(m["x"], m["weight"], m["bias"], m["lora_a"], m["lora_b"], 1.5)
    scaled_close(y, _reference(m, 1.5), "lora_linear.forward", torch.float32)
