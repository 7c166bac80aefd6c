from __future__ import annotations

import pytest
from torch import nn

import peftreg
from peftreg import PluginError, Registry, UnknownMethodError
from peftreg.plugin import Capabilities, ModelFamily, PEFTMethod

from ._fakes import FakeEntryPoint, ShiftConfig, ShiftMethod, methods_plugin, plugin_module


class OtherShift(ShiftMethod):
    """A second implementation claiming the same name."""


def _registry(*eps, strict=None):
    return Registry.from_entry_points(list(eps), strict=strict)


def test_plugin_method_is_registered_with_its_distribution():
    registry = _registry(FakeEntryPoint("shift", "peftreg-shift", methods_plugin(ShiftMethod())))
    assert registry.names() == ["shift"]
    (info,) = registry.infos()
    assert (info.dist, info.version, info.builtin) == ("peftreg-shift", "1.0", False)
    assert info.capabilities.mergeable
    assert registry.failures == []


def test_import_failure_is_reported_and_others_still_load():
    registry = _registry(
        FakeEntryPoint("broken", "peftreg-broken", ImportError("No module named 'missing_dep'")),
        FakeEntryPoint("shift", "peftreg-shift", methods_plugin(ShiftMethod())),
    )
    assert registry.names() == ["shift"]
    (failure,) = registry.failures
    assert failure.dist == "peftreg-broken" and failure.entry_point == "broken"
    assert "ImportError" in failure.reason and "missing_dep" in failure.reason


def test_strict_mode_raises_on_the_first_failure():
    with pytest.raises(PluginError, match="peftreg-broken"):
        _registry(FakeEntryPoint("broken", "peftreg-broken", RuntimeError("boom")), strict=True)


def test_strict_mode_from_environment(monkeypatch):
    monkeypatch.setenv("PEFTREG_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="boom"):
        _registry(FakeEntryPoint("broken", "peftreg-broken", RuntimeError("boom")))


@pytest.mark.parametrize(
    ("returned", "reason"),
    [
        ("lora", "must return a list of PEFTMethod, got str"),
        ([object()], "is not a PEFTMethod instance"),
        (None, "must return a list of PEFTMethod, got NoneType"),
    ],
    ids=["string", "object", "none"],
)
def test_garbage_from_register_hook_is_reported(returned, reason):
    garbage = plugin_module("garbage", peftreg_register_methods=lambda: returned)
    registry = _registry(
        FakeEntryPoint("garbage", "peftreg-garbage", garbage),
        FakeEntryPoint("shift", "peftreg-shift", methods_plugin(ShiftMethod())),
    )
    assert registry.names() == ["shift"]
    (failure,) = registry.failures
    assert failure.dist == "peftreg-garbage" and reason in failure.reason


def test_register_hook_raising_is_reported():
    def explode():
        raise ValueError("cannot build method")

    registry = _registry(FakeEntryPoint("x", "peftreg-x", plugin_module(
        "x", peftreg_register_methods=explode)))
    assert registry.names() == []
    assert "ValueError: cannot build method" in registry.failures[0].reason


def test_method_with_mismatched_config_is_refused():
    class Mismatch(ShiftMethod):
        name = "not_shift"

    registry = _registry(FakeEntryPoint("m", "peftreg-m", methods_plugin(Mismatch())))
    assert registry.names() == []
    assert "config class ShiftConfig says method 'shift'" in registry.failures[0].reason


@pytest.mark.parametrize("third_party_first", [True, False], ids=["3rd-first", "builtin-first"])
def test_third_party_cannot_replace_a_builtin(third_party_first):
    builtin = FakeEntryPoint("shift", "peftreg", methods_plugin(ShiftMethod(), name="b"))
    intruder = FakeEntryPoint("evil", "peftreg-evil", methods_plugin(OtherShift(), name="e"))
    eps = [intruder, builtin] if third_party_first else [builtin, intruder]
    registry = _registry(*eps)
    assert type(registry.get("shift")) is ShiftMethod
    assert registry.source("shift").dist == "peftreg"
    (failure,) = registry.failures
    assert failure.dist == "peftreg-evil"
    assert "already registered by built-in distribution 'peftreg'" in failure.reason


def test_duplicate_between_third_parties_names_both():
    a = FakeEntryPoint("a", "peftreg-a", methods_plugin(ShiftMethod(), name="a"))
    b = FakeEntryPoint("b", "peftreg-b", methods_plugin(OtherShift(), name="b"))
    registry = _registry(b, a)
    assert registry.source("shift").dist == "peftreg-a"
    assert "'peftreg-a'" in registry.failures[0].reason
    assert "'peftreg-b'" in registry.failures[0].reason


def test_hook_without_spec_is_reported():
    bad = plugin_module("bad", peftreg_make_coffee=lambda: None)
    registry = _registry(FakeEntryPoint("bad", "peftreg-bad", bad),
                         FakeEntryPoint("shift", "peftreg-shift", methods_plugin(ShiftMethod())))
    assert registry.names() == ["shift"]
    assert "peftreg_make_coffee" in registry.failures[0].reason


def test_hook_with_wrong_arguments_is_reported():
    bad = plugin_module("bad", peftreg_describe_model=lambda module, extra: None)
    registry = _registry(FakeEntryPoint("bad", "peftreg-bad", bad))
    assert "failed to load" in registry.failures[0].reason


def test_block_list(monkeypatch):
    monkeypatch.setenv("PEFTREG_BLOCK_PLUGINS", "peftreg-shift")
    registry = _registry(FakeEntryPoint("shift", "peftreg-shift", methods_plugin(ShiftMethod())))
    assert registry.names() == [] and registry.failures == []


def test_unknown_method_lists_installed_and_failures():
    registry = _registry(
        FakeEntryPoint("shift", "peftreg-shift", methods_plugin(ShiftMethod())),
        FakeEntryPoint("broken", "peftreg-broken", ImportError("gone")),
    )
    with pytest.raises(UnknownMethodError, match=r"'lorax'; installed: shift; plugin failures: "
                                                 r"plugin 'broken' from peftreg-broken"):
        registry.get("lorax")


def test_describe_model_prefers_third_party_and_survives_errors():
    seen = []

    def builtin_describe(model):
        seen.append("builtin")
        return ModelFamily(name="builtin")

    def third_describe(model):
        seen.append("third")
        return ModelFamily(name="third") if isinstance(model, nn.Linear) else None

    def raising(model):
        raise KeyError("oops")

    registry = _registry(
        FakeEntryPoint("b", "peftreg", plugin_module("b", peftreg_describe_model=builtin_describe)),
        FakeEntryPoint("t", "peftreg-fam",
                       plugin_module("t", peftreg_describe_model=third_describe)),
        FakeEntryPoint("r", "peftreg-raise", plugin_module("r", peftreg_describe_model=raising)),
    )
    assert registry.describe_model(nn.Linear(2, 2)).name == "third"
    assert registry.describe_model(nn.ReLU()).name == "builtin"
    assert any(f.dist == "peftreg-raise" and "KeyError" in f.reason for f in registry.failures)


def test_describe_model_garbage_is_reported():
    registry = _registry(FakeEntryPoint("g", "peftreg-g", plugin_module(
        "g", peftreg_describe_model=lambda model: "llama")))
    assert registry.describe_model(nn.ReLU()) is None
    assert "must return a ModelFamily or None, got str" in registry.failures[0].reason


def test_for_testing_registry_and_config_mismatch():
    registry = Registry.for_testing([ShiftMethod()])
    assert registry.method_for(ShiftConfig(target_modules=["x"])).name == "shift"

    class Impostor(PEFTMethod):
        name = "lora"
        config_cls = ShiftConfig
        capabilities = Capabilities(mergeable=False)

        def inject(self, model, adapter_name, config, family):
            return []

    with pytest.raises(PluginError):
        Registry.for_testing([Impostor()])


def test_builtin_plugins_load_from_entry_points():
    registry = Registry.from_entry_points()
    assert "lora" in registry.names()
    source = registry.source("lora")
    assert source.builtin and source.entry_point == "lora"
    assert peftreg.methods()[0].name in registry.names()
