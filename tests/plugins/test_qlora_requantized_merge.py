"""Merging QLoRA into its 4-bit base and back: the base stays 4-bit, the error is reported,
unmerge restores the original codes exactly."""

from __future__ import annotations

import pytest
import torch

import peftreg
from peftreg.host import AdapterHost, iter_slots
from peftreg.nn import Linear4bit
from peftreg_plugins.qlora import QLoraConfig


def _adapted(make_tiny):
    torch.manual_seed(0)
    model = peftreg.adapt(make_tiny(), QLoraConfig(r=4, target_modules=["q_proj", "up_proj"],
                                                  compute_dtype="float32"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def _hosts(model):
    return {path: slot for path, slot in iter_slots(model.model)
            if isinstance(slot, AdapterHost) and "default" in slot.adapters}


def _codes(model):
    return {path: {k: v.clone() for k, v in host.base.state_dict().items()}
            for path, host in _hosts(model).items()}


def test_merge_keeps_the_base_4bit_and_reports_the_requantization_error(make_tiny, token_batch):
    model = _adapted(make_tiny)
    with torch.no_grad():
        unmerged = model(token_batch)["logits"]
    exact = {}
    for path, host in _hosts(model).items():
        adapter = host.adapters["default"]
        w = host.base.dequantize(torch.float32).double()
        a, b = adapter.lora_A.weight.double(), adapter.lora_B.weight.double()
        exact[path] = w + adapter.scaling * b @ a
    report = model.merge(keep_quantized=True)
    assert set(report.layers) == set(exact)
    squared_error = squared_norm = 0.0
    for path, host in _hosts(model).items():
        assert isinstance(host.base, Linear4bit)
        error = host.base.dequantize(torch.float32).double() - exact[path]
        assert report.layers[path]["max_abs_error"] == pytest.approx(error.abs().max().item())
        assert report.layers[path]["relative_error"] == pytest.approx(
            (error.norm() / exact[path].norm()).item())
        squared_error += error.square().sum().item()
        squared_norm += exact[path].square().sum().item()
    assert report.relative_error == pytest.approx((squared_error / squared_norm) ** 0.5)
    # NF4's error on a weight of this spread: a few percent, and the outputs stay close.
    assert 0 < report.relative_error < 0.2
    with torch.no_grad():
        merged = model(token_batch)["logits"]
    assert (merged - unmerged).abs().max() < 0.5


def test_unmerge_restores_the_original_codes_exactly(make_tiny, token_batch):
    model = _adapted(make_tiny)
    before = _codes(model)
    with torch.no_grad():
        unmerged = model(token_batch)["logits"]
    model.merge(keep_quantized=True)
    assert any(not torch.equal(before[p]["weight"], h.base.weight)
               for p, h in _hosts(model).items())
    model.unmerge()
    after = _codes(model)
    for path, state in before.items():
        assert state.keys() == after[path].keys()
        for key, value in state.items():
            assert torch.equal(value, after[path][key]), (path, key)
    with torch.no_grad():
        assert torch.equal(model(token_batch)["logits"], unmerged)


def test_the_default_merge_still_makes_the_layer_dense(make_tiny):
    model = _adapted(make_tiny)
    assert model.merge() is None
    assert all(isinstance(h.base, torch.nn.Linear) for h in _hosts(model).values())
