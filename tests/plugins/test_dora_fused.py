"""DoRA's fused step (plugins/dora.py): the in-place rescale's gradients, what the step keeps
for the backward, and the row norm computed once per weight update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftreg
from peftreg_plugins import dora
from peftreg_plugins.dora import DoraConfig, DoraLinear, QDoraConfig


def _rescale_case(bias: bool, zero: bool, view: bool):
    gen = torch.Generator().manual_seed(4)
    t = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(5, generator=gen, dtype=torch.float64) + 0.5)
    if zero:
        m[2] = 0.0  # that column's pre-scale values cannot be read back from the output
    m.requires_grad_(True)
    norm = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None

    def fn(t, m, *rest):
        fresh = t.clone()
        if view:
            fresh = fresh.view(6, 5)  # a view of another op's output is rescaled out of place
        return dora._rescale(fresh, m, norm, rest[0] if rest else None)

    return fn, (t, m) + ((b,) if bias else ()), norm


@pytest.mark.parametrize(("bias", "zero", "view"), [
    (False, False, False), (True, False, False), (True, True, False), (False, False, True),
    (True, True, True),
], ids=["plain", "bias", "bias-zero-magnitude", "view", "bias-zero-view"])
def test_rescale_gradients_in_float64(bias, zero, view):
    fn, inputs, norm = _rescale_case(bias, zero, view)
    assert torch.autograd.gradcheck(fn, inputs)
    t, m = inputs[0], inputs[1]
    b = inputs[2] if bias else torch.zeros(5, dtype=torch.float64)
    c = m / norm
    expected = (c * t + (1 - c) * b).reshape(fn(*inputs).shape)
    torch.testing.assert_close(fn(*inputs), expected, atol=1e-12, rtol=0)


def _layer(bias: bool = False, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(1)
    base = nn.Linear(24, 16, bias=bias).to(dtype)
    model = nn.Sequential(base)
    adapted = peftreg.adapt(model, DoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = next(m for m in adapted.modules() if isinstance(m, DoraLinear))
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(16, 4, generator=gen))
        layer.lora_magnitude_vector.mul_(torch.rand(16, generator=gen) + 0.5)
    return adapted, layer, base


def test_the_step_keeps_no_rows_by_out_tensor_but_the_output():
    adapted, _, base = _layer(bias=True)
    x = torch.randn(2, 9, 24, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = adapted(x)

    def storage(t):
        return t.untyped_storage().data_ptr()

    own = {storage(x), storage(base.weight), storage(y)}
    assert storage(y) in {storage(t) for t in saved}, "the rescale reads its own output back"
    # Beyond the input, the frozen weight and the output, only vectors and (rows, r) or
    # (r, in) factors are kept: PEFT keeps the base and the LoRA products, (rows, out) each.
    others = [tuple(t.shape) for t in saved if storage(t) not in own]
    assert all(torch.Size(s).numel() < y.numel() // 2 for s in others), others


def test_the_norm_is_computed_once_per_weight_update(monkeypatch):
    adapted, layer, _ = _layer()
    calls = []
    original = DoraLinear.weight_norm

    def counting(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(DoraLinear, "weight_norm", counting)
    looks = []
    nonzero = dora.no_zero_scale
    monkeypatch.setattr(dora, "no_zero_scale", lambda *args: looks.append(1) or nonzero(*args))
    optimizer = torch.optim.SGD(adapted.adapter_parameters("default"), lr=0.1)
    x = torch.randn(3, 24)
    adapted.train()
    first = layer.cached_norm().clone()
    for _ in range(3):  # three micro-batches of one accumulated step
        adapted(x).square().sum().backward()
    assert len(calls) == len(looks) == 1  # the zero-scale check reads values: once as well
    optimizer.step()
    adapted(x)
    assert len(calls) == len(looks) == 2
    assert not torch.equal(layer.cached_norm(), first)
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    dense = (layer.base_view.weight() + layer.scaling * b @ a).norm(dim=1)
    torch.testing.assert_close(layer.cached_norm(), dense, atol=1e-5, rtol=1e-5)


def test_fused_and_hook_paths_agree():
    # The fused step runs when DoRA is alone on the layer; with a partner (or dropout) the
    # host's hooks run: the same numbers, gradients included.
    adapted, layer, base = _layer(bias=True)
    x = torch.randn(5, 24)
    fused = adapted(x)
    fused.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    hooked = layer.adapt_output(x, base(x))
    hooked.square().sum().backward()
    torch.testing.assert_close(hooked, fused, atol=1e-6, rtol=1e-6)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_a_qdora_step_keeps_no_dense_weight(compute):
    if not peftreg.plugin.has_extension():
        pytest.skip("without the compiled NF4 kernels the 4-bit product itself dequantizes")
    model = nn.Sequential(nn.Linear(64, 48, bias=True))
    adapted = peftreg.adapt(model, QDoraConfig(r=4, compute_dtype=compute, target_modules=["0"]))
    layer = next(m for m in adapted.modules() if isinstance(m, DoraLinear))
    assert layer.base_view.quantized
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    x = torch.randn(3, 64, dtype=getattr(torch, compute))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        adapted(x).float().square().sum().backward()
    dense = [tuple(t.shape) for t in saved if t.is_floating_point() and t.numel() >= 48 * 64]
    assert dense == []
    held = [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    held += [entry[1] for entry in (layer._row_sq, layer._norm) if entry is not None]
    assert held and all(t.numel() <= 48 for t in held)
    assert layer.lora_magnitude_vector.grad is not None
