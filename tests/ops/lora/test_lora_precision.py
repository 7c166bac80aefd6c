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


@pytest.mark.parametrize("rows", [(1,), (3, 7)], ids=["batch1", "3x7"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("with_x_lora", [False, True], ids=["x", "x_lora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("inn", [37, 1029])  # odd sizes: vector body and scalar tail
def test_16bit_row_kernel_backward_matches_float64(monkeypatch, rows, layout, with_x_lora,
                                                    dtype, inn):
    """The few-rows 16-bit backward (g @ W with W widened in registers, forced on here: this
    processor may have the arithmetic) against float64; a transposed weight takes ATen's path.
    fp16 needs F16C, so elsewhere the forced kernel is refused and ATen runs."""
    monkeypatch.setenv("PEFTREG_CPU_16BIT_ROWS", "1")
    g = torch.Generator().manual_seed(3)
    out, r = 29, 5

    def t(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    weight = t(out, inn, s=inn**-0.5)
    if layout == "transposed":
        weight = t(inn, out, s=inn**-0.5).T
    m = {"x": t(*rows, inn), "weight": weight, "bias": t(out), "lora_a": t(r, inn, s=inn**-0.5),
         "lora_b": t(out, r, s=0.5)}
    if with_x_lora:
        m["x_lora"] = t(*rows, inn)
    trainable = ("x", "lora_a", "lora_b", "x_lora")
    leaves = {k: v.clone().requires_grad_(k in trainable) for k, v in m.items()}
    y = lora_ops.lora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"],
                             leaves["lora_b"], 1.5, leaves.get("x_lora"))
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y.backward(upstream)

    d = {k: v.double().requires_grad_(k in trainable) for k, v in m.items()}
    xl = d.get("x_lora", d["x"])
    ref = d["x"] @ d["weight"].T + d["bias"] + 1.5 * (xl @ d["lora_a"].T) @ d["lora_b"].T
    ref.backward(upstream.double())
    for name in [k for k in trainable if k in m]:
        assert leaves[name].grad.dtype == dtype
        scaled_close(leaves[name].grad, d[name].grad, "lora_linear.backward", dtype)


def test_16bit_row_kernel_choice(monkeypatch):
    """Few rows of bf16/fp16 with an input gradient go to the op where the processor has no
    arithmetic for the dtype (ATen's g @ W is slow there); with it, or without grad, plain
    PyTorch stays (fp16 with fp16 arithmetic was not measured: ATen keeps it)."""
    monkeypatch.delenv("PEFTREG_CPU_16BIT_ROWS", raising=False)
    monkeypatch.delenv("PEFTREG_CPU_WIDEN_16BIT", raising=False)
    w, a, b = torch.zeros(8, 16), torch.zeros(4, 16), torch.zeros(8, 4)
    x = torch.zeros(2, 16, dtype=torch.bfloat16, requires_grad=True)
    args = (w.bfloat16(), None, a.bfloat16(), b.bfloat16(), 1.0)
    monkeypatch.setattr(lora_ops, "_NATIVE_16BIT", frozenset())
    monkeypatch.setattr(lora_ops, "_HAS_F16C", True)
    assert lora_ops.cpu_16bit_rows_kernel(torch.bfloat16, 2)
    assert not lora_ops.cpu_16bit_rows_kernel(torch.bfloat16, 32)
    assert lora_ops.cpu_16bit_rows_kernel(torch.float16, 2)
    assert not lora_ops.cpu_16bit_rows_kernel(torch.float16, 32)
    assert not lora_ops.cpu_16bit_rows_kernel(torch.float32, 2)
    x16 = x.detach().half().requires_grad_()
    args16 = (w.half(), None, a.half(), b.half(), 1.0)
    assert lora_ops._fused_is_faster(x16, *args16)
    monkeypatch.setattr(lora_ops, "_NATIVE_16BIT", frozenset({torch.float16}))
    assert not lora_ops.cpu_16bit_rows_kernel(torch.float16, 1)
    monkeypatch.setattr(lora_ops, "_NATIVE_16BIT", frozenset())
    monkeypatch.setattr(lora_ops, "_HAS_F16C", False)
    assert not lora_ops.cpu_16bit_rows_kernel(torch.float16, 1)
    assert lora_ops._fused_is_faster(x, *args)
    assert not lora_ops._fused_is_faster(x.detach(), *args)
    with torch.no_grad():
        assert not lora_ops._fused_is_faster(x, *args)
    monkeypatch.setattr(lora_ops, "_NATIVE_16BIT", frozenset({torch.bfloat16}))
    assert not lora_ops._fused_is_faster(x, *args)  # 2 rows: ATen's native bf16 is as fast
    one_row = x.detach()[:1].requires_grad_()
    assert lora_ops._fused_is_faster(one_row, *args)  # 1 row: the row kernel, measured faster
    monkeypatch.setenv("PEFTREG_CPU_16BIT_ROWS", "1")
    assert lora_ops._fused_is_faster(x, *args)
    monkeypatch.setenv("PEFTREG_CPU_16BIT_ROWS", "0")
    monkeypatch.setattr(lora_ops, "_NATIVE_16BIT", frozenset())
    assert not lora_ops._fused_is_faster(x, *args)
