"""The conformance kit (issue 13, item 6): every built-in method passes every check, and the
kit fails, naming the check and the amount, on methods that break a promise."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conformance_faults import (
    FaultyConfig,
    FaultyMethod,
    MergeableFaultyConfig,
    MergeableFaultyMethod,
)
from dora_like import DoraLikeConfig, DoraLikeLinear, DoraLikeMethod

import peftreg
from peftreg.registry import Registry
from peftreg.testing import ALL_CHECKS, ConformanceError, check_method
from peftreg_plugins import family_torch
from peftreg_plugins.houlsby import HoulsbyConfig
from peftreg_plugins.ia3 import IA3Config
from peftreg_plugins.lora import LoraConfig, LoraMethod
from peftreg_plugins.prefix_tuning import PrefixTuningConfig
from peftreg_plugins.prompt_tuning import PromptTuningConfig
from peftreg_plugins.qlora import QLoraConfig, quantize_base

ROOT = Path(__file__).resolve().parents[2]


def _forward(model, ids):
    return model(ids)["logits"][:, -ids.shape[1]:]  # prompt tuning adds leading positions


def _loss(model, ids):
    return model(ids, labels=ids)["loss"]


def _quantized(make_tiny, config):
    def make():
        model = make_tiny()
        quantize_base(model, config, peftreg.default_registry().describe_model(model))
        return model

    return make


BUILTINS = {
    "lora": (LoraConfig(r=4, target_modules="all-linear"), True),
    "ia3": (IA3Config(), True),
    "houlsby": (HoulsbyConfig(bottleneck_size=4), True),
    "prompt_tuning": (PromptTuningConfig(num_virtual_tokens=3), False),
    "prefix_tuning": (PrefixTuningConfig(num_virtual_tokens=3), False),
}


@pytest.mark.parametrize("method", list(BUILTINS))
def test_builtin_method_passes_every_check(make_tiny, token_batch, method):
    config, starts_equal = BUILTINS[method]
    report = check_method(config, make_tiny, token_batch, _forward, _loss, steps=4,
                          starts_equal=starts_equal, checks=ALL_CHECKS)
    assert set(report.extra) == set(ALL_CHECKS)
    assert report.extra["gradients"] < 1e-5
    assert report.extra["moves"] < 1e-4
    stacking = report.extra["stacking"]
    assert len(stacking) == 2
    if not peftreg.default_registry().get(method).capabilities.mergeable:
        assert all(v.startswith("refused") for v in stacking.values())
    assert (report.extra["compile"] is None) == (method != "lora")


def test_qlora_passes_every_check(make_tiny, token_batch):
    config = QLoraConfig(r=4, compute_dtype="float32", quantize="targets",
                         target_modules=["q_proj", "v_proj"])
    report = check_method(config, _quantized(make_tiny, config), token_batch, _forward, _loss,
                          steps=4, atol=1e-4, checks=ALL_CHECKS)
    assert report.extra["stacking"] == {"partner first": "merged", "under test first": "merged"}
    assert report.extra["compile"] is not None
    assert report.extra["gradients"] < 1e-5


def _registry(*methods):
    return Registry.for_testing([LoraMethod(), *methods], plugins=[family_torch])


def test_dora_like_plugin_passes_against_its_reference(make_tiny, token_batch):
    registry = _registry(DoraLikeMethod())
    report = check_method(DoraLikeConfig(target_modules=["q_proj", "v_proj"]), make_tiny,
                          token_batch, _forward, _loss, registry=registry, steps=4,
                          checks=ALL_CHECKS, reference_loss=_detached_reference)
    assert report.extra["stacking"]["under test first"] == "merged"
    assert "reads the base weights" in report.extra["stacking"]["partner first"]


def _detached_reference(model, ids):
    """The paper's DoRA gradient: the row norm is a constant (section 4.3)."""
    layers = [m for m in model.modules() if isinstance(m, DoraLikeLinear)]
    before = [m.detach_norm for m in layers]
    for m in layers:
        m.detach_norm = True
    try:
        return _loss(model, ids)
    finally:
        for m, b in zip(layers, before, strict=True):
            m.detach_norm = b


def test_a_non_detached_norm_fails_the_gradient_check(make_tiny, token_batch):
    registry = _registry(DoraLikeMethod())
    config = DoraLikeConfig(target_modules=["q_proj", "v_proj"], detach_norm=False)
    with pytest.raises(ConformanceError) as info:
        check_method(config, make_tiny, token_batch, _forward, _loss, registry=registry,
                     steps=2, checks=["gradients"], reference_loss=_detached_reference)
    assert info.value.check == "gradients" and info.value.measured > info.value.limit
    assert "reference loss" in str(info.value)


def test_a_wrong_backward_fails_the_gradient_check(make_tiny, token_batch):
    registry = _registry(FaultyMethod())
    config = FaultyConfig(target_modules=["v_proj"], fault="gradient")
    with pytest.raises(ConformanceError) as info:
        check_method(config, make_tiny, token_batch, _forward, _loss, registry=registry,
                     steps=2, checks=["gradients"])
    # Twice the true gradient: the error is about the size of the gradient itself.
    assert info.value.check == "gradients" and 0.5 < info.value.measured < 1.5
    assert "finite differences" in str(info.value)
    sound = FaultyConfig(target_modules=["v_proj"])
    check_method(sound, make_tiny, token_batch, _forward, _loss, registry=registry, steps=2,
                 checks=["gradients"])


def test_an_unsaved_tensor_fails_save_and_load(make_tiny, token_batch):
    registry = _registry(FaultyMethod())
    config = FaultyConfig(target_modules=["v_proj"], fault="unsaved")
    with pytest.raises(ConformanceError) as info:
        check_method(config, make_tiny, token_batch, _forward, _loss, registry=registry,
                     steps=2, starts_equal=False)
    assert info.value.check == "save_load" and info.value.measured > 0


def test_an_undeclared_base_read_fails_the_stacking_check(make_tiny, token_batch):
    registry = _registry(MergeableFaultyMethod())
    config = MergeableFaultyConfig(target_modules=["v_proj"], fault="peeks")
    with pytest.raises(ConformanceError) as info:
        check_method(config, make_tiny, token_batch, _forward, _loss, registry=registry,
                     steps=2, starts_equal=False, checks=["stacking"])
    assert info.value.check == "stacking" and info.value.measured > info.value.limit
    assert "partner first" in str(info.value)


def test_unknown_check_names_are_refused(make_tiny, token_batch):
    with pytest.raises(ValueError, match="unknown conformance checks"):
        check_method(LoraConfig(), make_tiny, token_batch, _forward, _loss, checks=["speed"])


@pytest.mark.parametrize("module", ["peftreg/testing.py", "peftreg/conformance.py"])
def test_the_kit_uses_no_bare_assert(module):
    # A bare assert vanishes under python -O, and the check with it.
    tree = ast.parse((ROOT / module).read_text())
    assert not [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]


def test_the_reference_helper_raises_a_named_error():
    from peftreg.testing import assert_close_to_reference

    with pytest.raises(ConformanceError, match="my op") as info:
        assert_close_to_reference(torch.ones(3), torch.zeros(3), atol=1e-3, rtol=0, what="my op")
    assert info.value.measured == 1.0
