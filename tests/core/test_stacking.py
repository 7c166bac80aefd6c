"""The stacking contract (issue 13, item 3), over every ordered pair of layer methods.

Two adapters on the same layers, both active: merging either equals the unmerged outputs, or is
refused with an error saying why and changes nothing. Unmerging restores the unmerged outputs,
and deleting both while merged restores the base. The pairs are LoRA, IA3 (with a scaled
feed-forward input, the input-side case), Houlsby (not mergeable), QLoRA, DoRA and a DoRA-like
test plugin that read their base weights (the non-additive case), and VeRA (projections shared
model-wide).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from dora_like import DoraLikeConfig, DoraLikeMethod

import peftreg
from peftreg.plugin import AdapterHost
from peftreg.registry import Registry
from peftreg_plugins import family_torch
from peftreg_plugins.dora import DoraConfig, DoraMethod
from peftreg_plugins.houlsby import HoulsbyConfig, HoulsbyMethod
from peftreg_plugins.ia3 import IA3Config, IA3Method
from peftreg_plugins.lora import LoraConfig, LoraMethod
from peftreg_plugins.qlora import QLoraConfig, QLoraMethod
from peftreg_plugins.vera import VeraConfig, VeraMethod

TARGETS = ["v_proj", "down_proj"]
ATOL = RTOL = 1e-4

CONFIGS = {
    "lora": lambda: LoraConfig(r=2, target_modules=TARGETS),
    "ia3": lambda: IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"],
                             init_ia3_weights=False),
    "houlsby": lambda: HoulsbyConfig(target_modules=TARGETS, bottleneck_size=4),
    "qlora": lambda: QLoraConfig(r=2, target_modules=TARGETS, quantize="targets",
                                 compute_dtype="float32"),
    "dora_like": lambda: DoraLikeConfig(r=2, target_modules=TARGETS),
    "dora": lambda: DoraConfig(r=2, target_modules=TARGETS),
    "vera": lambda: VeraConfig(r=4, target_modules=TARGETS),
}
PAIRS = list(itertools.product(CONFIGS, repeat=2))


def expected_refusal(first: str, second: str | None) -> str | None:
    """What the contract says about merging ``first`` (then ``second``, if given)."""
    if first == "houlsby" or second == "houlsby":
        return "cannot be merged"
    if first == "ia3" and second is not None:  # scales down_proj's input; the next reads it
        return "transforms the layer's input"
    if second in ("dora_like", "dora"):
        return "reads the base weights"
    return None


@pytest.fixture(scope="module")
def registry():
    methods = [LoraMethod(), IA3Method(), HoulsbyMethod(), QLoraMethod(), DoraLikeMethod(),
               DoraMethod(), VeraMethod()]
    return Registry.for_testing(methods, plugins=[family_torch])


def _out(model, ids):
    with torch.no_grad():
        return model(ids)["logits"].clone()


def _close(a, b):
    return torch.allclose(a, b, atol=ATOL, rtol=RTOL)


def _stack(make_tiny, registry, first, second):
    model = peftreg.AdaptedModel(make_tiny(), registry=registry)
    model.add_adapter("a", CONFIGS[first]())
    model.add_adapter("b", CONFIGS[second]())
    model.set_active(["a", "b"])
    with torch.no_grad():  # trained-looking adapters: LoRA's B and Houlsby's up start at zero
        for name in ("a", "b"):
            for p in model.adapter_parameters(name):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("first,second", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_merge_all_equals_unmerged_or_is_refused(make_tiny, token_batch, registry, first, second):
    model = _stack(make_tiny, registry, first, second)
    with model.disable_adapters():
        base = _out(model, token_batch)
    unmerged = _out(model, token_batch)
    assert not _close(unmerged, base), "the stacked adapters must change the outputs"
    refusal = expected_refusal(first, second)
    if refusal is not None:
        with pytest.raises(peftreg.UnsupportedOperationError, match=refusal):
            model.merge()
        assert model.merged_adapters == []
        assert torch.equal(_out(model, token_batch), unmerged), "a refused merge changed outputs"
        return
    model.merge()
    assert model.merged_adapters == ["a", "b"]
    merged = _out(model, token_batch)
    assert _close(merged, unmerged), float((merged - unmerged).abs().max())
    model.unmerge()
    assert _close(_out(model, token_batch), unmerged)
    with model.disable_adapters():
        assert _close(_out(model, token_batch), base)
    model.merge()
    model.delete_adapter("a")  # while merged: b is unfolded first, then merged again
    assert model.merged_adapters == ["b"]
    model.delete_adapter("b")
    restored = _out(model, token_batch)
    assert _close(restored, base), float((restored - base).abs().max())


@pytest.mark.parametrize("first,second", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_merge_first_alone_keeps_outputs_or_is_refused(make_tiny, token_batch, registry, first,
                                                       second):
    model = _stack(make_tiny, registry, first, second)
    unmerged = _out(model, token_batch)
    refusal = expected_refusal(first, None)
    if refusal is None and first == "ia3":
        refusal = "transforms the layer's input"
    if refusal is None and second in ("dora_like", "dora"):
        refusal = "reads the base weights"
    if refusal is not None:
        with pytest.raises(peftreg.UnsupportedOperationError, match=refusal):
            model.merge(["a"])
        assert model.merged_adapters == []
        assert torch.equal(_out(model, token_batch), unmerged)
        return
    model.merge(["a"])
    assert _close(_out(model, token_batch), unmerged)
    # The second adapter runs unmerged on top of the merged first one; merging it out of order
    # is not possible, and unmerging the first restores the stack.
    model.unmerge(["a"])
    assert model.merged_adapters == []
    assert _close(_out(model, token_batch), unmerged)


def test_merge_out_of_order_is_refused_on_the_layer(make_tiny, token_batch, registry):
    model = _stack(make_tiny, registry, "lora", "lora")
    host = next(m for m in model.model.modules() if isinstance(m, AdapterHost))
    with pytest.raises(peftreg.UnsupportedOperationError, match="comes before it"):
        host.merge("b")
    assert host.merged == []
