"""Promise 5: a broken plugin is reported by distribution name and harms nothing else.

Fake distributions (monkeypatch style, as pluggy and pytest test themselves) cover every way a
plugin can misbehave; after each, every built-in method must still adapt a model, and no
plugin may take a built-in name. The real distributions under tests/plugin_dists are checked
end to end in tests/core/test_plugin_dists.py.
"""

from __future__ import annotations

import importlib.metadata as md

import pytest
import torch

from peftreg import AdaptedModel, DuplicateMethodError, PluginError, Registry
from peftreg.discovery import GROUP
from peftreg_plugins.lora import LoraConfig, LoraMethod

from ..core._fakes import FakeEntryPoint, ShiftConfig, ShiftMethod, methods_plugin, plugin_module


def _builtin_entry_points():
    # Only peftreg's own: the test-only distributions (tests/plugin_dists) may be importable too.
    return [ep for ep in md.entry_points(group=GROUP)
            if ep.dist is not None and ep.dist.metadata["Name"] == "peftreg"]


class ExitingEntryPoint(FakeEntryPoint):
    def load(self):
        raise SystemExit(3)


class RaisingName(ShiftMethod):
    @property
    def name(self):
        raise RuntimeError("name lookup exploded")


class FakeLora(LoraMethod):
    """Claims the built-in name."""


def _exit():
    raise SystemExit(3)


def _entry_point(name, dist, target):
    if target is ExitingEntryPoint:
        return ExitingEntryPoint(name, dist, None)
    return FakeEntryPoint(name, dist, target)


BAD_PLUGINS = {
    "import-error": (ImportError("No module named 'missing_dep'"), "missing_dep"),
    "sys-exit-on-import": (ExitingEntryPoint, "SystemExit"),
    "returns-dict": (plugin_module("m", peftreg_register_methods=lambda: {"a": 1}), "got dict"),
    "returns-none": (plugin_module("m", peftreg_register_methods=lambda: None), "got NoneType"),
    "returns-strings": (plugin_module("m", peftreg_register_methods=lambda: ["lora"]),
                        "'lora' is not a PEFTMethod instance"),
    "hook-raises": (plugin_module("m", peftreg_register_methods=lambda: 1 / 0),
                    "ZeroDivisionError"),
    "hook-exits": (plugin_module("m", peftreg_register_methods=_exit), "SystemExit"),
    "name-property-raises": (methods_plugin(RaisingName()), "name lookup exploded"),
    "unknown-hook": (plugin_module("m", peftreg_not_a_hook=lambda: None), "without a spec"),
    "same-name-twice": (methods_plugin(ShiftMethod(), ShiftMethod()),
                        "'shift' is already registered by distribution 'evil-dist'"),
    "replaces-builtin": (methods_plugin(FakeLora()),
                         "'lora' is already registered by built-in distribution 'peftreg'"),
    "garbage-family": (plugin_module("m", peftreg_describe_model=lambda model: "a family"),
                       "must return a ModelFamily or None"),
}


@pytest.mark.parametrize(("target", "reason"), list(BAD_PLUGINS.values()), ids=list(BAD_PLUGINS))
def test_a_bad_plugin_is_reported_by_distribution_and_harms_nothing(make_tiny, token_batch,
                                                                     target, reason):
    evil = _entry_point("evil", "evil-dist", target)
    registry = Registry.from_entry_points([evil, *_builtin_entry_points()], strict=False)
    AdaptedModel(make_tiny(), registry=registry)  # family lookup runs every describe hook
    failures = [f for f in registry.failures if f.dist == "evil-dist"]
    assert failures, registry.failures
    assert any(reason in str(f) for f in failures), [str(f) for f in failures]
    assert all(f.dist != "peftreg" for f in registry.failures)
    # The built-in method under the built-in name, and it works.
    assert type(registry.get("lora")) is LoraMethod
    model = AdaptedModel(make_tiny(), registry=registry)
    model.add_adapter("a", LoraConfig(r=2, target_modules=["q_proj"]))
    assert torch.isfinite(model(token_batch)["logits"]).all()


def test_strict_mode_refuses_the_same_plugins():
    for name, (target, _) in BAD_PLUGINS.items():
        if name == "garbage-family":  # reported when a model is described, not at load time
            continue
        evil = _entry_point("evil", "evil-dist", target)
        with pytest.raises(PluginError, match="evil-dist"):
            Registry.from_entry_points([evil, *_builtin_entry_points()], strict=True)


def test_every_builtin_method_survives_all_bad_plugins_at_once(make_tiny, token_batch):
    evils = [_entry_point(f"evil{i}", f"evil-dist-{i}", target)
             for i, (target, _) in enumerate(BAD_PLUGINS.values())]
    registry = Registry.from_entry_points([*evils, *_builtin_entry_points()], strict=False)
    builtin = Registry.from_entry_points(_builtin_entry_points(), strict=True)
    AdaptedModel(make_tiny(), registry=registry)  # runs the describe-model hooks
    assert {f.dist for f in registry.failures} == {e.dist.metadata["Name"] for e in evils}
    assert set(builtin.names()) <= set(registry.names())
    family = builtin.describe_model(make_tiny())
    for name in builtin.names():
        assert type(registry.get(name)) is type(builtin.get(name)), name
        config = registry.get(name).config_cls()
        model = AdaptedModel(make_tiny(), registry=registry)
        if registry.get(name).parameter_count(model.model, config, family) == 0:
            continue
        model.add_adapter("x", config)
        assert torch.isfinite(model(token_batch)["logits"]).all(), name


def test_two_third_parties_with_one_name_are_both_named():
    first = FakeEntryPoint("a", "dist-a", methods_plugin(ShiftMethod()))
    second = FakeEntryPoint("b", "dist-b", methods_plugin(ShiftMethod()))
    registry = Registry.from_entry_points([second, first], strict=False)
    (failure,) = registry.failures
    assert "'dist-a'" in failure.reason and failure.dist == "dist-b"
    assert registry.source("shift").dist == "dist-a"
    with pytest.raises(DuplicateMethodError):
        Registry.from_entry_points([second, first], strict=True)
    assert ShiftConfig.method == "shift"
