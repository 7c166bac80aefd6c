# SPDX-License-Identifier: Apache-2.0
"""peftreg::lora_linear (via peftreg.ops.fused) against the float64 plain-PyTorch reference.

Every comparison rounds the inputs to the tested dtype first and gives the reference the same
rounded values in float64, so the only differences measured are the kernel's own roundings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from tolerances import tol

from peftreg import ops
from peftreg.ops import lora as lora_ops
from peftreg.ops import reference

pytestmark = pytest.mark.usefixtures("require_extension")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCALING = 0.5


@dataclass(frozen=True)
class Shape:
    rows: int
    in_features: int
    out_features: int
    rank: int

    @property
    def id(self) -> str:
        return f"shape={self.rows}x{self.in_features},out={self.out_features},r={self.rank}"


# Odd and non-power-of-two sizes on purpose: rows 1/7/33, in 1/17/64/65, out 3/31/128, r 1/4/16.
SHAPES = [
    Shape(1, 1, 3, 1),
    Shape(7, 17, 31, 4),
    Shape(33, 65, 128, 16),
    Shape(33, 64, 3, 16),
    Shape(7, 65, 128, 1),
    Shape(1, 64, 31, 4),
    Shape(33, 17, 3, 4),
    Shape(7, 1, 128, 16),
]

dtype_param = pytest.mark.parametrize("dtype", list(DTYPES.values()),
                                      ids=[f"dtype={k}" for k in DTYPES])
shape_param = pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
bias_param = pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
x_lora_param = pytest.mark.parametrize("with_x_lora", [False, True],
                                       ids=["x_lora=None", "x_lora=given"])

ARG_NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "x_lora")


def master_inputs(lead: tuple[int, ...], shape: Shape, *, with_bias: bool, with_x_lora: bool,
                  seed: int = 0) -> dict[str, torch.Tensor | None]:
    """float64 CPU inputs scaled so outputs and gradients are O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float64) * scale

    i, o, r = shape.in_features, shape.out_features, shape.rank
    return {
        "x": randn(*lead, i),
        "weight": randn(o, i, scale=1 / math.sqrt(i)),
        "bias": randn(o) if with_bias else None,
        "lora_a": randn(r, i, scale=1 / math.sqrt(i)),
        "lora_b": randn(o, r, scale=1 / math.sqrt(r)),
        "x_lora": randn(*lead, i) if with_x_lora else None,
    }


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, check: str,
                        dtype: torch.dtype, what: str) -> None:
    """assert_close after dividing both sides by max(1, max|expected|) (see tests/tolerances.py)."""
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    assert actual.shape == expected.shape, what
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual / scale, expected / scale, **tol(check, dtype),
                               msg=lambda m: f"{what}: {m}")


def run_and_compare(masters: dict[str, torch.Tensor | None], dtype: torch.dtype,
                    device: torch.device, *, layout=None, grads: bool = True) -> None:
    """Run fused and reference on the same rounded inputs; compare output and all gradients."""
    low: dict[str, torch.Tensor | None] = {}
    high: dict[str, torch.Tensor | None] = {}
    for name, t in masters.items():
        if t is None:
            low[name] = high[name] = None
            continue
        rounded = t.to(dtype)
        placed = rounded.to(device)
        if layout is not None:
            placed = layout(name, placed)
        low[name] = placed.detach().requires_grad_(grads)
        high[name] = rounded.double().requires_grad_(grads)

    out = lora_ops.lora_linear(low["x"], low["weight"], low["bias"], low["lora_a"], low["lora_b"],
                            SCALING, low["x_lora"])
    expected = reference.lora_linear(high["x"], high["weight"], high["bias"], high["lora_a"],
                                     high["lora_b"], SCALING, high["x_lora"])
    assert out.dtype == dtype and out.device.type == device.type
    assert out.is_contiguous()
    assert_close_scaled(out, expected, "lora_linear.forward", dtype, "output")
    if not grads:
        return
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).to(dtype)
    out.backward(upstream.to(device))
    expected.backward(upstream.double())
    for name in ARG_NAMES:
        if low[name] is None:
            continue
        assert low[name].grad is not None, f"no gradient for {name}"
        assert_close_scaled(low[name].grad, high[name].grad, "lora_linear.backward", dtype,
                            f"grad of {name}")


# --- forward and backward against the reference --------------------------------------------


@x_lora_param
@bias_param
@shape_param
@dtype_param
def test_forward_backward_match_reference(op_device, dtype, shape, with_bias, with_x_lora):
    masters = master_inputs((shape.rows,), shape, with_bias=with_bias, with_x_lora=with_x_lora)
    run_and_compare(masters, dtype, op_device)


LEADS = {"x=1-D": (), "x=2-D": (7,), "x=3-D": (3, 5), "x=4-D": (2, 3, 2)}


@pytest.mark.parametrize("with_x_lora", [False, True], ids=["x_lora=None", "x_lora=given"])
@pytest.mark.parametrize("lead", list(LEADS.values()), ids=list(LEADS))
@dtype_param
def test_leading_dimensions(op_device, dtype, lead, with_x_lora):
    shape = Shape(math.prod(lead), 17, 31, 4)
    masters = master_inputs(lead, shape, with_bias=True, with_x_lora=with_x_lora)
    run_and_compare(masters, dtype, op_device)


def _non_contiguous(name: str, t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (a different one per argument)."""
    if name in ("x", "weight") and t.dim() >= 2:
        # Column-major storage: what a transposed weight or a permuted activation looks like.
        view = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        # Every other element of a wider buffer: last-dim stride 2.
        view = torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]
    assert not view.is_contiguous() or view.numel() <= 1
    return view


@pytest.mark.parametrize("with_x_lora", [False, True], ids=["x_lora=None", "x_lora=given"])
@dtype_param
def test_non_contiguous_inputs(op_device, dtype, with_x_lora):
    shape = Shape(15, 33, 31, 4)
    masters = master_inputs((3, 5), shape, with_bias=True, with_x_lora=with_x_lora)
    run_and_compare(masters, dtype, op_device, layout=_non_contiguous)


@pytest.mark.parametrize("upstream_layout", ["expanded", "transposed"])
def test_non_contiguous_upstream_gradient(op_device, upstream_layout):
    shape = Shape(6, 17, 31, 4)
    m = master_inputs((6,), shape, with_bias=True, with_x_lora=False)
    args = {k: (v.float().to(op_device).requires_grad_() if v is not None else None)
            for k, v in m.items()}
    y = lora_ops.lora_linear(args["x"], args["weight"], args["bias"], args["lora_a"],
                          args["lora_b"], SCALING)
    if upstream_layout == "expanded":
        g = torch.randn(1, 31, device=op_device).expand(6, 31)
    else:
        g = torch.randn(31, 6, device=op_device).t()
    y.backward(g)
    ref = {k: (v.double().requires_grad_() if v is not None else None) for k, v in m.items()}
    y_ref = reference.lora_linear(ref["x"], ref["weight"], ref["bias"], ref["lora_a"],
                                  ref["lora_b"], SCALING)
    y_ref.backward(g.double().cpu())
    for name in ("x", "weight", "bias", "lora_a", "lora_b"):
        assert_close_scaled(args[name].grad, ref[name].grad, "lora_linear.backward",
                            torch.float32, f"grad of {name}")


# --- gradients: gradcheck, and only what is needed -----------------------------------------


@x_lora_param
@bias_param
def test_gradcheck_float64(op_device, with_bias, with_x_lora):
    m = master_inputs((2, 3), Shape(6, 5, 4, 2), with_bias=with_bias, with_x_lora=with_x_lora)
    names = [k for k in ARG_NAMES if m[k] is not None]
    leaves = [m[k].to(op_device).requires_grad_() for k in names]

    def op(*tensors: torch.Tensor) -> torch.Tensor:
        kw = dict(zip(names, tensors, strict=True))
        return lora_ops.lora_linear(kw["x"], kw["weight"], kw.get("bias"), kw["lora_a"],
                                 kw["lora_b"], SCALING, kw.get("x_lora"))

    assert torch.autograd.gradcheck(op, tuple(leaves))
    assert torch.autograd.gradgradcheck(op, tuple(leaves))


def test_frozen_weight_gets_no_gradient(op_device):
    """The usual LoRA setup: only A and B train; x, weight and bias stay without gradients."""
    m = master_inputs((4,), Shape(4, 9, 6, 2), with_bias=True, with_x_lora=False)
    t = {k: v.float().to(op_device) for k, v in m.items() if v is not None}
    t["lora_a"].requires_grad_()
    t["lora_b"].requires_grad_()
    y = lora_ops.lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALING)
    y.sum().backward()
    assert t["lora_a"].grad is not None and t["lora_b"].grad is not None
    assert t["x"].grad is None and t["weight"].grad is None and t["bias"].grad is None
    # Twin that can fail: with B = 0 (LoRA's initialisation) A's gradient is exactly zero but
    # B's is not, so the two gradients really come from different formulas.
    t["lora_b"] = torch.zeros_like(t["lora_b"]).requires_grad_()
    t["lora_a"].grad = None
    y = lora_ops.lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALING)
    y.sum().backward()
    assert torch.count_nonzero(t["lora_a"].grad) == 0
    assert torch.count_nonzero(t["lora_b"].grad) > 0


def test_x_lora_same_tensor_as_x(op_device):
    """Passing x as x_lora equals passing None, gradients included (x gets both paths)."""
    m = master_inputs((5,), Shape(5, 8, 6, 3), with_bias=False, with_x_lora=False)
    results = []
    for pass_x in (False, True):
        x = m["x"].float().to(op_device).requires_grad_()
        a = m["lora_a"].float().to(op_device)
        b = m["lora_b"].float().to(op_device)
        w = m["weight"].float().to(op_device)
        y = lora_ops.lora_linear(x, w, None, a, b, SCALING, x if pass_x else None)
        y.sum().backward()
        results.append((y.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    # Twin: a different x_lora does change the output.
    x_other = torch.zeros_like(m["x"]).float().to(op_device)
    y_other = lora_ops.lora_linear(m["x"].float().to(op_device), m["weight"].float().to(op_device),
                                None, m["lora_a"].float().to(op_device),
                                m["lora_b"].float().to(op_device), SCALING, x_other)
    assert not torch.allclose(y_other, results[0][0])


def test_empty_batch(op_device):
    m = master_inputs((0,), Shape(0, 8, 6, 3), with_bias=True, with_x_lora=False)
    t = {k: v.float().to(op_device) for k, v in m.items() if v is not None}
    y = lora_ops.lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALING)
    assert y.shape == (0, 6)


# --- torch.compile ---------------------------------------------------------------------------


def _small_model_step(x, w, b, a, bb):
    h = lora_ops.lora_linear(x, w, b, a, bb, SCALING)
    return torch.nn.functional.gelu(h).square().mean()


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(op_device, backend):
    """fullgraph=True: the op traces (fake kernel) and differentiates (autograd) without breaks.

    aot_eager exercises Dynamo, fake tensors and AOT autograd in a second; inductor also
    generates C++ and takes tens of seconds on small machines, hence `slow`.
    """
    torch._dynamo.reset()
    compiled = torch.compile(_small_model_step, fullgraph=True, backend=backend)
    for rows in (4, 9):  # a second shape exercises recompilation / dynamic shapes
        m = master_inputs((rows,), Shape(rows, 16, 12, 4), with_bias=True, with_x_lora=False)
        eager_args = [m[k].float().to(op_device).requires_grad_()
                      for k in ("x", "weight", "bias", "lora_a", "lora_b")]
        comp_args = [t.detach().clone().requires_grad_() for t in eager_args]
        loss_eager = _small_model_step(*eager_args)
        loss_comp = compiled(*comp_args)
        loss_eager.backward()
        loss_comp.backward()
        torch.testing.assert_close(loss_comp, loss_eager, **tol("lora_linear.compile",
                                                                 torch.float32))
        for te, tc in zip(eager_args, comp_args, strict=True):
            torch.testing.assert_close(tc.grad, te.grad, **tol("lora_linear.compile",
                                                               torch.float32))


# --- argument errors name the argument ---------------------------------------------------------


def _good_args(dtype=torch.float32, device="cpu"):
    return {
        "x": torch.randn(2, 3, 8, dtype=dtype, device=device),
        "weight": torch.randn(6, 8, dtype=dtype, device=device),
        "bias": torch.randn(6, dtype=dtype, device=device),
        "lora_a": torch.randn(4, 8, dtype=dtype, device=device),
        "lora_b": torch.randn(6, 4, dtype=dtype, device=device),
        "x_lora": None,
    }


BAD_CASES = {
    "x=0-D": ({"x": torch.tensor(1.0)}, r"argument 'x' must have at least 1 dimension"),
    "weight=1-D": ({"weight": torch.randn(6)}, r"argument 'weight' must be 2-D"),
    "weight_in=9": ({"weight": torch.randn(6, 9)},
                    r"argument 'weight' must have shape .*in_features = x\.shape\[-1\].*\[6, 9\]"),
    "lora_a_in=7": ({"lora_a": torch.randn(4, 7)}, r"argument 'lora_a' must have shape.*\[4, 7\]"),
    "lora_b_out=5": ({"lora_b": torch.randn(5, 4)},
                     r"argument 'lora_b' must have shape.*out_features = weight\.shape\[0\]"),
    "lora_b_r=3": ({"lora_b": torch.randn(6, 3)},
                   r"argument 'lora_b' must have shape.*r = lora_a\.shape\[0\].*\[6, 3\]"),
    "bias_len=5": ({"bias": torch.randn(5)}, r"argument 'bias' must have shape \(out_features,\)"),
    "x_lora_shape": ({"x_lora": torch.randn(2, 4, 8)},
                     r"argument 'x_lora' must have the same shape as 'x'.*\[2, 4, 8\]"),
    "x_int": ({"x": torch.ones(2, 3, 8, dtype=torch.int64)}, r"argument 'x' has dtype"),
    "lora_b_fp16": ({"lora_b": torch.randn(6, 4, dtype=torch.float16)},
                    r"argument 'lora_b' has dtype .* but 'x' has dtype"),
    "bias_bf16": ({"bias": torch.randn(6, dtype=torch.bfloat16)},
                  r"(?i)argument 'bias' has dtype .*bfloat16"),
}


def _call(args):
    return torch.ops.peftreg.lora_linear.default(
        args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], SCALING,
        args["x_lora"])


@pytest.mark.parametrize("mode", ["eager", "fake"])
@pytest.mark.parametrize("case", list(BAD_CASES), ids=[f"bad={c}" for c in BAD_CASES])
def test_bad_arguments_name_the_argument(case, mode):
    """The C++ checks (eager) and the fake kernel (tracing) reject the same inputs alike."""
    change, pattern = BAD_CASES[case]
    args = {**_good_args(), **change}
    if mode == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as fake_mode:
            args = {k: (fake_mode.from_tensor(v) if isinstance(v, torch.Tensor) else v)
                    for k, v in args.items()}
            with pytest.raises(RuntimeError, match=pattern):
                _call(args)
    else:
        with pytest.raises(RuntimeError, match=pattern):
            _call(args)


def test_device_mismatch_names_the_argument_cpu_kernel():
    """The CPU kernel's own device check, reached by dispatching to it directly."""
    args = {**_good_args(), "lora_b": torch.randn(6, 4, device="meta")}
    cpu_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=r"argument 'lora_b' is on device meta but 'x' is on"):
        torch.ops.peftreg.lora_linear.default.redispatch(
            cpu_only, args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"],
            SCALING, None)


def test_device_mismatch_names_the_argument_fake_kernel():
    args = {**_good_args(), "lora_a": torch.randn(4, 8, device="meta")}
    with pytest.raises(RuntimeError, match=r"argument 'lora_a' is on device meta but 'x' is on"):
        _call(args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_names_the_argument_cuda():
    if not ops.kernel_available("lora_linear", "cuda"):
        pytest.skip("this build has no CUDA kernels")
    args = {**_good_args(device="cuda"), "bias": torch.randn(6)}
    with pytest.raises(RuntimeError, match=r"argument 'bias' is on device cpu but 'x' is on"):
        _call(args)


def test_missing_cuda_kernel_is_a_clear_error():
    """A build without CUDA kernels refuses CUDA tensors loudly instead of falling back."""
    if ops.built_with_cuda():
        pytest.skip("this build has CUDA kernels")
    with pytest.raises(ops.ExtensionUnavailableError, match="no compiled cuda kernel"):
        ops.require_kernel("lora_linear", "cuda")
