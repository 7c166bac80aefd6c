# SPDX-License-Identifier: Apache-2.0
"""peftreg::ia3_linear / ia3_scale_grad against the float64 reference, opcheck, and the IA3
plugin's fused path (auto vs reference mode, torch.compile fullgraph)."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import scaled_close

import peftreg
from peftreg import ops
from peftreg.ops import adapters, kernels, reference

pytestmark = pytest.mark.usefixtures("require_extension")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
dtype_param = pytest.mark.parametrize("dtype", list(DTYPES.values()),
                                      ids=[f"dtype={k}" for k in DTYPES])
side_param = pytest.mark.parametrize("scale_input", [False, True],
                                     ids=["scale=output", "scale=input"])
# (leading dims, in, out): odd sizes, a 1-D input, more rows than the kernel's 256-row block.
SHAPES = [((1,), 1, 3), ((7,), 17, 31), ((3, 5), 65, 33), ((), 9, 4), ((300,), 33, 7)]
shape_param = pytest.mark.parametrize("shape", SHAPES,
                                      ids=[f"shape={'x'.join(map(str, s[0])) or 'vec'},"
                                           f"in={s[1]},out={s[2]}" for s in SHAPES])


def masters(lead, in_f, out_f, scale_input, *, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = in_f if scale_input else out_f
    return {
        "x": torch.randn(*lead, in_f, generator=gen, dtype=torch.float64),
        "weight": torch.randn(out_f, in_f, generator=gen, dtype=torch.float64) / math.sqrt(in_f),
        "bias": torch.randn(out_f, generator=gen, dtype=torch.float64) if bias else None,
        "scale": torch.rand(n, generator=gen, dtype=torch.float64) + 0.5,
    }


def compare(m, scale_input, dtype, device):
    low, high = {}, {}
    for k, v in m.items():
        if v is None:
            low[k] = high[k] = None
            continue
        r = v.to(dtype)
        low[k] = r.to(device).detach().requires_grad_()
        high[k] = r.detach().double().requires_grad_()
    out = adapters.ia3_linear(low["x"], low["weight"], low["bias"], low["scale"], scale_input)
    exp = reference.ia3_linear(high["x"], high["weight"], high["bias"], high["scale"],
                               scale_input)
    assert out.dtype == dtype and out.shape == exp.shape
    scaled_close(out, exp, "ia3_linear.forward", dtype, "output")
    g = torch.randn(exp.shape, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64).to(dtype)
    out.backward(g.to(device))
    exp.backward(g.double())
    for k in m:
        if m[k] is not None:
            scaled_close(low[k].grad, high[k].grad, "ia3_linear.backward", dtype, f"grad {k}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@shape_param
@side_param
@dtype_param
def test_matches_reference(op_device, dtype, scale_input, shape, bias):
    lead, in_f, out_f = shape
    compare(masters(lead, in_f, out_f, scale_input, bias=bias), scale_input, dtype, op_device)


def test_zero_scale_channels_get_the_true_gradient(op_device):
    """grad_l recovers x W^T + b from the output as y / l; a zero l needs the recompute path."""
    m = masters((6,), 11, 5, False)
    m["scale"][1] = 0.0
    m["scale"][3] = 0.0
    compare(m, False, torch.float32, op_device)
    # Twin that can fail: those channels' gradients are really non-zero.
    x, w, b, s = (m[k].float().to(op_device) for k in ("x", "weight", "bias", "scale"))
    s.requires_grad_()
    adapters.ia3_linear(x, w, b, s, False).sum().backward()
    assert s.grad[1] != 0 and s.grad[3] != 0


@side_param
def test_gradcheck_float64(op_device, scale_input):
    m = masters((2, 3), 5, 4, scale_input)
    m["scale"][0] = 0.0  # exercises the zero-channel branch of ia3_scale_grad
    leaves = [m[k].to(op_device).requires_grad_() for k in ("x", "weight", "bias", "scale")]
    assert torch.autograd.gradcheck(lambda *t: adapters.ia3_linear(*t, scale_input),
                                    tuple(leaves))


def test_only_requested_gradients(op_device):
    """IA3 training: only the scale trains; x, weight and bias get no gradient."""
    m = masters((4,), 9, 6, False)
    x, w, b, s = (m[k].float().to(op_device) for k in ("x", "weight", "bias", "scale"))
    s.requires_grad_()
    adapters.ia3_linear(x, w, b, s, False).square().sum().backward()
    assert s.grad is not None and x.grad is None and w.grad is None and b.grad is None


def _opcheck_cases(device):
    def t(*shape, grad=False, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, device=device).add(0.1).requires_grad_(grad)

    return {
        "out_grads": (torch.ops.peftreg.ia3_linear.default,
                      (t(2, 3, 8, grad=True), t(6, 8), t(6), t(6, grad=True), False)),
        "in_all_grads": (torch.ops.peftreg.ia3_linear.default,
                         (t(5, 8, grad=True), t(6, 8, grad=True), t(6, grad=True),
                          t(8, grad=True), True)),
        "out_no_bias_bf16": (torch.ops.peftreg.ia3_linear.default,
                             (t(3, 8, dtype=torch.bfloat16), t(6, 8, dtype=torch.bfloat16), None,
                              t(6, dtype=torch.bfloat16), False)),
        "scale_grad": (torch.ops.peftreg.ia3_scale_grad.default,
                       (t(4, 6), t(4, 6), t(4, 8), t(6, 8), t(6), t(6))),
    }


@pytest.mark.parametrize("case", ["out_grads", "in_all_grads", "out_no_bias_bf16", "scale_grad"])
def test_opcheck(op_device, case):
    op, args = _opcheck_cases(op_device)[case]
    torch.library.opcheck(op, args)


BAD = {
    "scale_len": ({"scale": torch.randn(5)},
                  r"argument 'scale' must have shape \(out_features,\).*scale_input=False"),
    "weight_in": ({"weight": torch.randn(6, 7)}, r"argument 'weight' must have shape"),
    "scale_dtype": ({"scale": torch.randn(6, dtype=torch.float64)},
                    r"argument 'scale' has dtype"),
}


@pytest.mark.parametrize("mode", ["eager", "fake"])
@pytest.mark.parametrize("case", list(BAD), ids=[f"bad={c}" for c in BAD])
def test_bad_arguments_name_the_argument(case, mode):
    args = {"x": torch.randn(2, 8), "weight": torch.randn(6, 8), "bias": torch.randn(6),
            "scale": torch.randn(6), **BAD[case][0]}

    def call(a):
        return torch.ops.peftreg.ia3_linear.default(a["x"], a["weight"], a["bias"], a["scale"],
                                                    False)

    if mode == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as fake:
            args = {k: fake.from_tensor(v) for k, v in args.items()}
            with pytest.raises(RuntimeError, match=BAD[case][1]):
                call(args)
    else:
        with pytest.raises(RuntimeError, match=BAD[case][1]):
            call(args)


# --- through the plugin --------------------------------------------------------------------


def _ia3_model(make_tiny, dtype):
    from peftreg_plugins.ia3 import IA3Config

    model = peftreg.adapt(make_tiny().to(dtype), IA3Config(init_ia3_weights=False))
    return model


def _run(model, ids, train):
    model.train(train)
    model.zero_grad(set_to_none=True)
    if not train:
        with torch.no_grad():
            return model(ids)["logits"], []
    out = model(ids, labels=ids)
    out["loss"].backward()
    return out["logits"].detach(), [p.grad for p in model.adapter_parameters("default")]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@dtype_param
def test_plugin_auto_equals_reference(make_tiny, token_batch, dtype, train):
    model = _ia3_model(make_tiny, dtype)
    with kernels("compiled"):
        fused = _run(model, token_batch, train)
    with kernels("reference"):
        plain = _run(model, token_batch, train)
    scaled_close(fused[0], plain[0], "adapters.plugin_paths", dtype, "logits")
    for gf, gp in zip(fused[1], plain[1], strict=True):
        scaled_close(gf, gp, "adapters.plugin_paths", dtype, "grad")
    # Twin: the adapter does change the model.
    with model.disable_adapters(), torch.no_grad():
        base = model(token_batch)["logits"]
    assert not torch.allclose(base.float(), fused[0].float(), atol=1e-3)


def test_plugin_calls_the_fused_op(make_tiny, token_batch, op_calls):
    """``compiled`` runs peftreg::ia3_linear in every adapted layer, ``reference`` never, and
    ``auto`` follows the measured crossover."""
    model = _ia3_model(make_tiny, torch.float32)
    with kernels("compiled"):
        model(token_batch)
    assert op_calls.count("ia3_linear") == 6  # k, v, down x 2 layers
    op_calls.clear()
    with kernels("reference"):
        model(token_batch)
    assert "ia3_linear" not in op_calls
    expected = 6 if adapters.IA3_LINEAR.faster(torch.zeros(3, 9, 32)) else 0
    with kernels("auto"):
        model(token_batch)
    assert op_calls.count("ia3_linear") == expected


@pytest.mark.compile
def test_compile_fullgraph_ia3_model(make_tiny, token_batch):
    torch._dynamo.reset()
    model = _ia3_model(make_tiny, torch.float32)
    assert ops.kernel_available("ia3_linear", "cpu")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager = _run(model, token_batch, True)
    graph = _run(compiled, token_batch, True)
    torch.testing.assert_close(graph[0], eager[0])
    for ge, gg in zip(eager[1], graph[1], strict=True):
        torch.testing.assert_close(gg, ge)
    torch._dynamo.reset()
