"""Base access (issue 13, item 2): reading the base without owning it, and the inject-time
refusal of adapters that hold the base's modules or tensors."""

from __future__ import annotations

import pytest
import torch
from dora_like import BadBaseConfig, BadBaseMethod, DoraLikeConfig, DoraLikeMethod
from torch import nn

import peftreg
from peftreg.aliasing import BaseAliasError
from peftreg.plugin import AdapterHost, BaseAccess, Linear4bit, base_access, host_for
from peftreg.registry import Registry
from peftreg_plugins import family_torch

TARGETS = ["q_proj", "v_proj"]


def _registry(*methods):
    return Registry.for_testing(list(methods), plugins=[family_torch])


def test_dora_like_trains_only_its_own_parameters(make_tiny, tmp_path):
    registry = _registry(DoraLikeMethod())
    base = make_tiny()
    base_count = sum(p.numel() for p in base.parameters())
    model = peftreg.adapt(base, DoraLikeConfig(target_modules=TARGETS), registry=registry)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = DoraLikeMethod().parameter_count(make_tiny(), DoraLikeConfig(
        target_modules=TARGETS), None)
    assert trainable == expected
    assert sum(p.numel() for p in model.parameters()) == base_count + expected
    model.save_adapter(tmp_path)
    saved = peftreg.io.adapter_dir.read_adapter_dir(tmp_path, registry)
    assert all(not key.endswith(("base_layer.weight", ".base.weight")) for key in saved.tensors)
    assert saved.parameter_count == expected


def test_base_access_reads_dense_and_quantized_bases():
    torch.manual_seed(0)
    linear = nn.Linear(64, 8)
    view = base_access(linear)
    assert view.shape == (8, 64) and not view.quantized
    assert torch.equal(view.weight(), linear.weight.detach())
    assert view.weight(torch.float64).dtype == torch.float64
    assert torch.equal(view.bias(), linear.bias.detach())
    assert not view.weight().requires_grad
    q = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    qview = base_access(q)
    assert qview.quantized and qview.shape == (8, 64) and qview.dtype == torch.float32
    assert torch.equal(qview.weight(), q.dequantize(torch.float32))
    # Quantization error is bounded, so the dequantized weight is near the original one.
    rel = (qview.weight() - linear.weight.detach()).norm() / linear.weight.detach().norm()
    assert 0 < float(rel) < 0.2


def test_base_access_follows_a_replaced_base():
    holder = nn.Sequential(nn.Linear(4, 3))
    host = host_for(holder, "0")
    view = base_access(host)
    assert isinstance(view, BaseAccess) and view.shape == (3, 4)
    host.base = nn.Linear(5, 6)
    assert view.shape == (6, 5)


@pytest.mark.parametrize("kind,tensor", [("submodule", "base module"),
                                         ("alias", "shares memory")])
def test_adapter_owning_the_base_is_refused_by_name(make_tiny, kind, tensor):
    registry = _registry(BadBaseMethod())
    model = peftreg.AdaptedModel(make_tiny(), registry=registry)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with pytest.raises(BaseAliasError) as info:
        model.add_adapter("greedy", BadBaseConfig(target_modules=["q_proj"], kind=kind))
    message = str(info.value)
    assert "'greedy'" in message and "layers.0.self_attn.q_proj" in message
    assert tensor in message
    if kind == "alias":
        assert "'rows'" in message and "q_proj.base.weight" in message
    # Refused before anything stayed behind: the model is the base again.
    assert not model.adapters
    assert model.model.state_dict().keys() == before.keys()
    assert not any(isinstance(m, AdapterHost) for m in model.model.modules())
