from __future__ import annotations

import pytest
import torch
from torch import nn

import peftreg
from peftreg import (
    AdaptedModel,
    AdapterError,
    ConfigError,
    Registry,
    TargetNotFoundError,
    UnknownMethodError,
    UnsupportedOperationError,
)
from peftreg.host import TrainableCopy
from peftreg.plugin import AdapterHost, Capabilities
from peftreg_plugins.lora import LoraConfig, LoraMethod

from ._fakes import ShiftConfig, ShiftMethod


class NoMerge(ShiftMethod):
    """Shift, declared not mergeable."""

    capabilities = Capabilities(mergeable=False, inference_latency=True)


@pytest.fixture
def registry():
    return Registry.for_testing([LoraMethod(), ShiftMethod()])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)["logits"]


def _train_a_bit(model, ids, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        loss = model(ids, labels=ids)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_adapt_freezes_base_and_trains_only_the_active_adapter(make_tiny, registry, token_batch):
    model = AdaptedModel(make_tiny(), registry=registry)
    model.add_adapter("a", LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("b", ShiftConfig(target_modules=["v_proj"]), activate=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.a." in n for n in trainable)
    model.set_active("b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)
    assert model.active_adapters == ["b"]


def test_switching_changes_outputs_and_two_methods_coexist(make_tiny, registry, token_batch):
    model = AdaptedModel(make_tiny(), registry=registry)
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    _train_a_bit(model, token_batch)
    model.add_adapter("shift", ShiftConfig(target_modules=["v_proj", "o_proj"]))
    _train_a_bit(model, token_batch)
    with model.disable_adapters():
        base = _logits(model, token_batch)
    model.set_active("lora")
    out_lora = _logits(model, token_batch)
    model.set_active("shift")
    out_shift = _logits(model, token_batch)
    model.set_active(["lora", "shift"])
    out_both = _logits(model, token_batch)
    assert not torch.equal(out_lora, base) and not torch.equal(out_shift, base)
    assert not torch.equal(out_both, out_lora) and not torch.equal(out_both, out_shift)
    # v_proj holds both methods in one host.
    host = model.model.layers[0].self_attn.v_proj
    assert isinstance(host, AdapterHost) and set(host.adapters) == {"lora", "shift"}


def test_disable_gives_base_outputs_exactly(make_tiny, registry, token_batch):
    base = _logits(make_tiny(), token_batch)
    model = peftreg.adapt(make_tiny(), LoraConfig(target_modules="all-linear"), registry=registry)
    _train_a_bit(model, token_batch)
    assert not torch.equal(_logits(model, token_batch), base)
    with model.disable_adapters():
        assert torch.equal(_logits(model, token_batch), base)
    assert not torch.equal(_logits(model, token_batch), base)


def test_delete_restores_the_original_modules(make_tiny, registry, token_batch):
    plain = make_tiny()
    base = _logits(plain, token_batch)
    model = AdaptedModel(make_tiny(), registry=registry)
    model.add_adapter("a", LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("b", ShiftConfig(target_modules=["q_proj"]))
    model.delete_adapter("a")
    assert isinstance(model.model.layers[0].self_attn.q_proj, AdapterHost)
    model.delete_adapter("b")
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert model.adapters == {} and model.active_adapters == []
    assert torch.equal(_logits(model, token_batch), base)
    assert set(model.model.state_dict()) == set(plain.state_dict())


def test_merge_unmerge_and_merge_and_unload(make_tiny, registry, token_batch):
    model = peftreg.adapt(make_tiny(), LoraConfig(r=4, target_modules="all-linear"),
                          registry=registry)
    _train_a_bit(model, token_batch)
    trained = _logits(model, token_batch)
    model.merge()
    assert model.merged_adapters == ["default"]
    torch.testing.assert_close(_logits(model, token_batch), trained, atol=1e-5, rtol=1e-5)
    with model.disable_adapters():  # unmerges for the block, then merges back
        base = _logits(model, token_batch)
    assert model.merged_adapters == ["default"]
    model.unmerge()
    with model.disable_adapters():
        torch.testing.assert_close(_logits(model, token_batch), base, atol=0, rtol=0)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterHost) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, token_batch), trained, atol=1e-5, rtol=1e-5)


def test_merge_of_unmergeable_method_is_a_clear_error(make_tiny, token_batch):
    registry = Registry.for_testing([NoMerge()])
    model = peftreg.adapt(make_tiny(), ShiftConfig(target_modules=["o_proj"]), "side",
                          registry=registry)
    with pytest.raises(UnsupportedOperationError, match=r"'side' uses method 'shift'.*cannot be "
                                                        r"merged"):
        model.merge()
    assert model.merged_adapters == []


def test_modules_to_save_are_per_adapter(make_tiny, registry, token_batch):
    model = AdaptedModel(make_tiny(), registry=registry)
    model.add_adapter("a", LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = model.model.lm_head
    assert isinstance(head, TrainableCopy)
    assert head.adapters["a"].weight.requires_grad and not head.original.weight.requires_grad
    _train_a_bit(model, token_batch)
    assert not torch.equal(head.adapters["a"].weight, head.original.weight)
    model.add_adapter("b", ShiftConfig(target_modules=["q_proj"]), activate=True)
    # Adapter b has no head copy: the original head is used and stays frozen.
    assert head.unwrap() is head.original
    state = model.adapter_state_dict("a")
    assert "lm_head.weight" in state and "layers.0.self_attn.q_proj.lora_A.weight" in state
    summary = model.summary()
    row = summary.rows[0]
    assert row.saved_module_params == head.original.weight.numel()
    assert "lm_head" in model.adapters["a"].saved_modules


def test_modules_to_save_overlapping_targets_is_refused(make_tiny, registry):
    model = AdaptedModel(make_tiny(), registry=registry)
    with pytest.raises(ConfigError, match="overlaps adapted modules"):
        model.add_adapter("a", LoraConfig(target_modules=["q_proj"], modules_to_save=["self_attn"]))
    # The failed add left nothing behind.
    assert model.adapters == {}
    assert not any(isinstance(m, (AdapterHost, TrainableCopy)) for m in model.modules())


def test_missing_modules_to_save(make_tiny, registry):
    model = AdaptedModel(make_tiny(), registry=registry)
    with pytest.raises(TargetNotFoundError, match="modules_to_save entry 'classifier'"):
        model.add_adapter("a", LoraConfig(target_modules=["q_proj"],
                                          modules_to_save=["classifier"]))


def test_summary_counts_and_percent(make_tiny, registry):
    model = AdaptedModel(make_tiny(), registry=registry)
    model.add_adapter("a", LoraConfig(r=2, target_modules=["q_proj"]))
    summary = model.summary()
    (row,) = summary.rows
    expected = 2 * 2 * (32 + 32)
    assert row.adapter_params == expected
    assert summary.base_params == sum(p.numel() for p in make_tiny().parameters())
    assert summary.percent(row) == pytest.approx(100 * expected / summary.base_params)
    assert "a" in str(summary) and f"{expected:,}" in str(summary)


@pytest.mark.parametrize("name", ["", "a.b", "../x", "a/b", "x" * 65, "1abc", 3],
                         ids=["empty", "dot", "traversal", "slash", "long", "digit", "int"])
def test_bad_adapter_names(make_tiny, registry, name):
    model = AdaptedModel(make_tiny(), registry=registry)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        model.add_adapter(name, LoraConfig(target_modules=["q_proj"]))


def test_name_errors_and_unknown_adapters(make_tiny, registry):
    model = peftreg.adapt(make_tiny(), LoraConfig(target_modules=["q_proj"]), registry=registry)
    with pytest.raises(AdapterError, match="already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="no adapter named 'nope'; adapters: default"):
        model.set_active("nope")
    with pytest.raises(AdapterError, match="no adapter named"):
        model.delete_adapter("nope")


def test_unknown_method_config(make_tiny):
    model = AdaptedModel(make_tiny(), registry=Registry.for_testing([ShiftMethod()]))
    with pytest.raises(UnknownMethodError, match="no installed method is called 'lora'"):
        model.add_adapter("a", LoraConfig(target_modules=["q_proj"]))


def test_failed_injection_leaves_model_untouched(make_tiny, registry, token_batch):
    model = AdaptedModel(make_tiny(), registry=registry)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with pytest.raises(TargetNotFoundError):
        model.add_adapter("a", LoraConfig(target_modules=["q_proj", "nonexistent"]))
    assert model.adapters == {}
    after = model.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_attribute_fallthrough_and_repr(make_tiny, registry):
    model = peftreg.adapt(make_tiny(), LoraConfig(target_modules=["q_proj"]), registry=registry)
    assert model.config.hidden_size == 32
    assert "active=['default']" in repr(model)
    with pytest.raises(AttributeError):
        _ = model.no_such_attribute


def test_wrapping_twice_is_refused(make_tiny, registry):
    model = peftreg.adapt(make_tiny(), LoraConfig(target_modules=["q_proj"]), registry=registry)
    with pytest.raises(AdapterError, match="already an AdaptedModel"):
        AdaptedModel(model, registry=registry)


def test_deepcopy_and_pickle(make_tiny, registry, token_batch):
    import copy
    import pickle

    model = peftreg.adapt(make_tiny(), LoraConfig(target_modules=["q_proj"]), registry=registry)
    with torch.no_grad():
        for p in model.adapter_parameters("default"):
            p.normal_()
    clone = copy.deepcopy(model)
    assert clone.registry is model.registry
    assert torch.equal(_logits(clone, token_batch), _logits(model, token_batch))
    clone.delete_adapter("default")
    assert model.adapters and not clone.adapters
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(_logits(restored, token_batch), _logits(model, token_batch))
    assert restored.active_adapters == ["default"]
