# SPDX-License-Identifier: Apache-2.0
"""peftreg::houlsby_adapter against the float64 reference, opcheck, and the Houlsby plugin's
fused path (auto vs reference mode, torch.compile fullgraph)."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import scaled_close

import peftreg
from peftreg.ops import adapters, kernels, reference

pytestmark = pytest.mark.usefixtures("require_extension")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
dtype_param = pytest.mark.parametrize("dtype", list(DTYPES.values()),
                                      ids=[f"dtype={k}" for k in DTYPES])
ACTS = ["relu", "gelu", "silu", "tanh"]
act_param = pytest.mark.parametrize("activation", ACTS, ids=[f"act={a}" for a in ACTS])
# (leading dims, hidden, bottleneck): odd sizes, a 1-D input, bottleneck 1 and = hidden.
SHAPES = [((1,), 3, 1), ((7,), 31, 4), ((3, 5), 65, 17), ((), 9, 9)]
shape_param = pytest.mark.parametrize("shape", SHAPES,
                                      ids=[f"shape={'x'.join(map(str, s[0])) or 'vec'},"
                                           f"h={s[1]},m={s[2]}" for s in SHAPES])
NAMES = ("h", "w_down", "b_down", "w_up", "b_up")


def masters(lead, hidden, m, *, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0):
        return torch.randn(*size, generator=gen, dtype=torch.float64) * scale

    return {
        "h": randn(*lead, hidden),
        "w_down": randn(m, hidden, scale=1 / math.sqrt(hidden)),
        "b_down": randn(m, scale=0.5) if bias else None,
        "w_up": randn(hidden, m, scale=1 / math.sqrt(m)),
        "b_up": randn(hidden) if bias else None,
    }


def compare(m, activation, dtype, device):
    low, high = {}, {}
    for k, v in m.items():
        if v is None:
            low[k] = high[k] = None
            continue
        r = v.to(dtype)
        low[k] = r.to(device).detach().requires_grad_()
        high[k] = r.detach().double().requires_grad_()
    out = adapters.houlsby_adapter(*(low[k] for k in NAMES), activation)
    exp, z = reference.houlsby_adapter(*(high[k] for k in NAMES), activation)
    assert out.dtype == dtype
    scaled_close(out, exp, "houlsby_adapter.forward", dtype, "output")
    _, z_op = torch.ops.peftreg.houlsby_adapter.default(*(low[k] for k in NAMES), activation)
    scaled_close(z_op, z, "houlsby_adapter.forward", dtype, "z")
    g = torch.randn(exp.shape, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64).to(dtype)
    out.backward(g.to(device))
    exp.backward(g.double())
    for k in NAMES:
        if m[k] is not None:
            scaled_close(low[k].grad, high[k].grad, "houlsby_adapter.backward", dtype,
                         f"grad {k}")


@shape_param
@act_param
@dtype_param
def test_matches_reference(op_device, dtype, activation, shape):
    lead, hidden, m = shape
    compare(masters(lead, hidden, m), activation, dtype, op_device)


@pytest.mark.parametrize("dtype", [torch.float32], ids=["dtype=fp32"])
def test_without_biases(op_device, dtype):
    compare(masters((4, 3), 13, 5, bias=False), "gelu", dtype, op_device)


@act_param
def test_gradcheck_float64(op_device, activation):
    m = masters((2, 3), 5, 3)
    leaves = tuple(m[k].to(op_device).requires_grad_() for k in NAMES)
    assert torch.autograd.gradcheck(lambda *t: adapters.houlsby_adapter(*t, activation), leaves)


def test_zero_up_projection_is_identity(op_device):
    """Houlsby's near-identity init (W_up = 0, b_up = 0): out == h exactly; twin: not after."""
    m = masters((5,), 12, 3)
    h = m["h"].float().to(op_device)
    args = [m[k].float().to(op_device) for k in NAMES[1:]]
    args[2] = torch.zeros_like(args[2])
    args[3] = torch.zeros_like(args[3])
    torch.testing.assert_close(adapters.houlsby_adapter(h, *args, "relu"), h, rtol=0, atol=0)
    args[3] = torch.ones_like(args[3])
    assert not torch.equal(adapters.houlsby_adapter(h, *args, "relu"), h)


def _opcheck_args(device):
    def t(*shape, grad=False, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)

    return {
        "all_grads": (t(2, 3, 8, grad=True), t(4, 8, grad=True), t(4, grad=True),
                      t(8, 4, grad=True), t(8, grad=True), "gelu"),
        "adapter_grads": (t(5, 8), t(4, 8, grad=True), t(4, grad=True), t(8, 4, grad=True),
                          t(8, grad=True), "relu"),
        "no_bias_bf16": (t(3, 8, dtype=torch.bfloat16), t(2, 8, dtype=torch.bfloat16), None,
                         t(8, 2, dtype=torch.bfloat16), None, "tanh"),
    }


@pytest.mark.parametrize("case", ["all_grads", "adapter_grads", "no_bias_bf16"])
def test_opcheck(op_device, case):
    torch.library.opcheck(torch.ops.peftreg.houlsby_adapter.default, _opcheck_args(op_device)[case])


BAD = {
    "activation": ({"activation": "swish"}, r"argument 'activation' is 'swish'"),
    "w_up_shape": ({"w_up": torch.randn(8, 3)}, r"argument 'w_up' must have shape"),
    "b_up_len": ({"b_up": torch.randn(7)}, r"argument 'b_up' must have shape \(hidden,\)"),
}


@pytest.mark.parametrize("mode", ["eager", "fake"])
@pytest.mark.parametrize("case", list(BAD), ids=[f"bad={c}" for c in BAD])
def test_bad_arguments_name_the_argument(case, mode):
    args = {"h": torch.randn(2, 8), "w_down": torch.randn(4, 8), "b_down": torch.randn(4),
            "w_up": torch.randn(8, 4), "b_up": torch.randn(8), "activation": "relu",
            **BAD[case][0]}

    def call(a):
        return torch.ops.peftreg.houlsby_adapter.default(*(a[k] for k in NAMES), a["activation"])

    if mode == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as fake:
            args = {k: fake.from_tensor(v) if isinstance(v, torch.Tensor) else v
                    for k, v in args.items()}
            with pytest.raises(RuntimeError, match=BAD[case][1]):
                call(args)
    else:
        with pytest.raises(RuntimeError, match=BAD[case][1]):
            call(args)


# --- through the plugin --------------------------------------------------------------------


def _houlsby_model(make_tiny, dtype, activation="gelu"):
    from peftreg_plugins.houlsby import HoulsbyConfig

    model = peftreg.adapt(make_tiny().to(dtype),
                          HoulsbyConfig(bottleneck_size=5, non_linearity=activation))
    with torch.no_grad():  # the up projection starts at zero
        for p in model.adapter_parameters("default"):
            p.copy_(torch.linspace(-0.3, 0.3, p.numel()).view_as(p))
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
    model = _houlsby_model(make_tiny, dtype)
    with kernels("compiled"):
        fused = _run(model, token_batch, train)
    with kernels("reference"):
        plain = _run(model, token_batch, train)
    scaled_close(fused[0], plain[0], "adapters.plugin_paths", dtype, "logits")
    assert len(fused[1]) == len(plain[1]) > 0 or not train
    for gf, gp in zip(fused[1], plain[1], strict=True):
        scaled_close(gf, gp, "adapters.plugin_paths", dtype, "grad")
    with model.disable_adapters(), torch.no_grad():
        base = model(token_batch)["logits"]
    assert not torch.allclose(base.float(), fused[0].float(), atol=1e-3)


def test_plugin_calls_the_fused_op(make_tiny, token_batch, op_calls):
    """``compiled`` runs the op, ``reference`` never does, ``auto`` follows the crossover."""
    model = _houlsby_model(make_tiny, torch.float32, "silu")
    with kernels("compiled"):
        model(token_batch)
    assert op_calls.count("houlsby_adapter") == 4  # after o_proj and down_proj in 2 layers
    op_calls.clear()
    with kernels("reference"):
        model(token_batch)
    assert "houlsby_adapter" not in op_calls
    h = torch.zeros(3, 9, 32)
    expected = 4 if adapters.HOULSBY_ADAPTER.faster(h) else 0
    with kernels("auto"):
        model(token_batch)
    assert op_calls.count("houlsby_adapter") == expected


@pytest.mark.compile
def test_compile_fullgraph_houlsby_model(make_tiny, token_batch):
    torch._dynamo.reset()
    model = _houlsby_model(make_tiny, torch.float32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager = _run(model, token_batch, True)
    graph = _run(compiled, token_batch, True)
    torch.testing.assert_close(graph[0], eager[0])
    for ge, gg in zip(eager[1], graph[1], strict=True):
        torch.testing.assert_close(gg, ge)
    torch._dynamo.reset()
