"""The plugin SDK (issue 13, item 1): one module for plugins, an API level, provenance."""

from __future__ import annotations

import ast
import json
import re
import warnings
from pathlib import Path

import pytest

import peftreg
import peftreg.plugin as sdk
from peftreg import discovery
from peftreg.discovery import PluginSource
from peftreg.io.adapter_dir import NumericsVersionWarning, read_adapter_dir
from peftreg.registry import Registry
from peftreg_plugins import family_torch
from peftreg_plugins.lora import LoraConfig, LoraMethod

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


def _peftreg_imports(path: Path) -> list[tuple[int, str]]:
    """Every ``peftreg`` module a file imports (at any depth, lazy imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, m) for m in modules if m == "peftreg" or m.startswith("peftreg.")]
    return found


def test_builtin_plugins_import_only_the_sdk():
    files = sorted(PLUGINS.glob("*.py"))
    assert len(files) >= 8
    offending = [f"{f.name}:{line}: {module}" for f in files
                 for line, module in _peftreg_imports(f) if module != "peftreg.plugin"]
    assert offending == [], "built-in plugins must import peftreg only through peftreg.plugin"


def _words_in_code(path: Path) -> set[str]:
    """Identifiers and string constants of a module's code (docstrings and comments left out,
    since those may mention methods as examples)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    words: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            words.update(re.findall(r"[a-z0-9_]+", node.value.lower()))
        elif isinstance(node, ast.Name):
            words.add(node.id.lower())
        elif isinstance(node, ast.Attribute):
            words.add(node.attr.lower())
    return words


def test_the_io_layer_names_no_method():
    # PEFT's per-method knowledge lives in the plugins' codecs; the core's io knows none.
    methods = {"lora", "qlora", "ia3", "houlsby", "prefix_tuning", "prompt_tuning", "dora"}
    io = Path(sdk.__file__).parent / "io"
    found = {f.name: sorted(w for w in _words_in_code(f)
                            if w in methods or w.startswith(("lora_", "ia3_")))
             for f in sorted(io.glob("*.py"))}
    assert {name: words for name, words in found.items() if words} == {}


def test_the_import_rule_catches_an_internal_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from peftreg.sequence import extend_inputs\n")
    assert _peftreg_imports(bad) == [(2, "peftreg.sequence")]


def test_every_sdk_name_exists_and_is_documented():
    assert len(set(sdk.__all__)) == len(sdk.__all__)
    for name in sdk.__all__:
        value = getattr(sdk, name)
        if callable(value):
            assert (getattr(value, "__doc__", None) or "").strip(), f"{name} has no docstring"
    assert isinstance(sdk.API_LEVEL, int) and sdk.API_LEVEL >= 1


class _FutureLora(LoraMethod):
    api_level = sdk.API_LEVEL + 1


def _registry_with(methods, dist="peftreg-future"):
    pm = discovery.new_plugin_manager()

    class Provider:
        @staticmethod
        @sdk.hookimpl
        def peftreg_register_methods():
            return list(methods)

    pm.register(Provider(), name="future")
    pm.register(family_torch, name="family")
    sources = {"future": PluginSource(dist, "9.9", "future"),
               "family": PluginSource("peftreg", "0", "family")}
    return Registry(pm, sources)


def test_a_plugin_needing_a_newer_api_level_is_reported_by_name():
    registry = _registry_with([_FutureLora()])
    assert "lora" not in registry.names()
    (failure,) = registry.failures
    text = str(failure)
    assert "peftreg-future" in text and "9.9" in text
    assert f"API level {sdk.API_LEVEL + 1}" in text and f"provides level {sdk.API_LEVEL}" in text


def test_a_plugin_at_the_current_level_registers():
    class Current(LoraMethod):
        api_level = sdk.API_LEVEL

    registry = _registry_with([Current()])
    assert registry.names() == ["lora"] and registry.failures == []


def test_saved_adapter_records_distribution_version_and_numerics(make_tiny, tmp_path):
    model = peftreg.adapt(make_tiny(), LoraConfig(target_modules=["q_proj"]))
    model.save_adapter(tmp_path)
    plugin = json.loads((tmp_path / "adapter.json").read_text())["plugin"]
    source = model.registry.source("lora")
    assert plugin["distribution"] == source.dist == "peftreg"
    assert plugin["version"] == source.version
    assert plugin["numerics_version"] == LoraMethod.numerics_version == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_adapter_dir(tmp_path)  # same numerics: no warning


def test_loading_under_another_numerics_version_warns(make_tiny, tmp_path):
    model = peftreg.adapt(make_tiny(), LoraConfig(target_modules=["q_proj"]))
    model.save_adapter(tmp_path)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    meta["plugin"]["numerics_version"] = 7
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    with pytest.warns(NumericsVersionWarning, match="numerics version 7.*has numerics version 1"):
        read_adapter_dir(tmp_path)


def test_no_override_is_silenced():
    # PEFTMethod is generic in its config, so a method's inject(config: MyConfig) is a valid
    # override; an ignore comment would hide a real signature mismatch.
    root = PLUGINS.parent
    hits = [f"{path.relative_to(root)}:{n}" for folder in ("peftreg", "plugins")
            for path in sorted((root / folder).rglob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if "ignore[override]" in line]
    assert hits == []


def test_top_level_is_the_user_api():
    machinery = {"AdapterHost", "AdapterSlot", "LayerAdapter", "InputAdapter", "InputSlot",
                 "PEFTMethod", "Capabilities", "hookimpl", "host_for", "select_targets",
                 "TargetedConfig", "ModelFamily", "TrainableCopy"}
    assert not machinery & set(peftreg.__all__)
    assert {"adapt", "load", "config_for", "methods", "AdaptedModel"} <= set(peftreg.__all__)
    # Plugins written before the SDK keep working, told where the name lives now.
    with pytest.warns(DeprecationWarning, match="import it from peftreg.plugin"):
        assert peftreg.PEFTMethod is sdk.PEFTMethod
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        _ = peftreg.nonsense
