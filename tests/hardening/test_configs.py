"""Promise 2: configs from JSON give clear errors, and an older format version is migrated.

Every installed method's config is checked the same way: whatever JSON object arrives, the
result is a valid config or a ConfigError naming the class and the field; an unknown method is
an UnknownMethodError listing the installed ones.
"""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftreg
from peftreg import ConfigError, UnknownMethodError, default_registry
from peftreg.io.adapter_dir import CONFIG_FILE, read_adapter_dir
from peftreg.registry import Registry

from ..core._fakes import ShiftConfig, ShiftMethod


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        ({"method": "frobnicate", "r": 4}, UnknownMethodError,
         ["no installed method is called 'frobnicate'", "lora"]),
        ({"r": 4}, ConfigError, ['needs a "method" string', "lora"]),
        ([1, 2], ConfigError, ["must be a JSON object", "list"]),
        ({"method": "lora", "rank": 4}, ConfigError,
         ["LoraConfig", "unknown field(s) 'rank'", "known fields:", "lora_alpha"]),
        ({"method": "lora", "r": "8"}, ConfigError, ["LoraConfig.r", "expected int", "'8'"]),
        ({"method": "lora", "r": True}, ConfigError, ["LoraConfig.r", "expected int"]),
        ({"method": "lora", "r": 4.5}, ConfigError, ["LoraConfig.r", "expected int"]),
        ({"method": "lora", "r": 0}, ConfigError, ["LoraConfig.r", "rank must be > 0"]),
        ({"method": "lora", "lora_dropout": 1.0}, ConfigError,
         ["LoraConfig.lora_dropout", "[0, 1)"]),
        ({"method": "lora", "lora_alpha": float("nan")}, ConfigError,
         ["LoraConfig.lora_alpha", "finite"]),
        ({"method": "lora", "target_modules": [1]}, ConfigError, ["target_modules"]),
        ({"method": "ia3", "bogus": 1}, ConfigError, ["IA3Config", "'bogus'"]),
        ({"method": "houlsby", "reduction_factor": -2}, ConfigError,
         ["HoulsbyConfig.reduction_factor"]),
        ({"method": "prompt_tuning", "num_virtual_tokens": 0}, ConfigError,
         ["PromptTuningConfig.num_virtual_tokens"]),
        ({"method": "lora", "format_version": 99}, ConfigError,
         ["format_version 99 is newer", "upgrade the plugin providing 'lora'"]),
        ({"method": "lora", "format_version": 0}, ConfigError, ["format_version", ">= 1"]),
        ({"method": "lora", "format_version": "1"}, ConfigError, ["format_version"]),
    ],
    ids=["unknown-method", "no-method", "not-object", "unknown-field", "str-for-int",
         "bool-for-int", "float-for-int", "zero-rank", "dropout-range", "nan-alpha",
         "list-item-type", "ia3-unknown", "houlsby-range", "prompt-range", "future-version",
         "version-zero", "version-type"],
)
def test_bad_config_json_gets_a_named_error(registry, data, error, words):
    with pytest.raises(error) as info:
        registry.config_from_dict(json.loads(json.dumps(data)))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_config_for_misspelt_field_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) 'rnak'; known fields: .*\br\b"):
        peftreg.config_for("lora", rnak=4)


def test_every_installed_config_round_trips_through_json(registry):
    for name in registry.names():
        config = registry.get(name).config_cls()
        again = registry.config_from_dict(json.loads(config.to_json()))
        assert again == config and type(again) is type(config), name


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_any_json_for_any_method_is_a_config_or_a_config_error(registry, data):
    name = data.draw(st.sampled_from(registry.names()), label="method")
    cls = registry.get(name).config_cls
    fields = [f.name for f in dataclasses.fields(cls)] + ["format_version", "bogus"]
    body = data.draw(st.dictionaries(st.sampled_from(fields), JSON, max_size=5), label="body")
    try:
        config = registry.config_from_dict({**body, "method": name})
    except ConfigError as exc:
        assert cls.__name__ in str(exc)
        return
    assert registry.config_from_dict(json.loads(config.to_json())) == config


# -- migration ---------------------------------------------------------------------------------


@dataclasses.dataclass
class ShiftConfigV2(ShiftConfig):
    """Version 2 renamed version 1's ``targets`` to ``target_modules``."""

    format_version: ClassVar[int] = 2

    @classmethod
    def migrate(cls, data, from_version):
        data = dict(data)
        if from_version < 2 and "targets" in data:
            data["target_modules"] = data.pop("targets")
        return data


class ShiftMethodV2(ShiftMethod):
    config_cls = ShiftConfigV2


def test_older_config_version_is_migrated_from_an_adapter_file(make_tiny, tmp_path):
    registry = Registry.for_testing([ShiftMethodV2()])
    model = peftreg.AdaptedModel(make_tiny(), registry=registry)
    model.add_adapter("default", ShiftConfigV2(target_modules=["o_proj"]))
    directory = model.save_adapter(tmp_path / "a")
    meta = json.loads((directory / CONFIG_FILE).read_text())
    assert meta["config"]["format_version"] == 2
    # Rewrite it as version 1 wrote it.
    meta["config"]["format_version"] = 1
    meta["config"]["targets"] = meta["config"].pop("target_modules")
    (directory / CONFIG_FILE).write_text(json.dumps(meta))
    saved = read_adapter_dir(directory, registry)
    assert saved.config == ShiftConfigV2(target_modules=["o_proj"])
    # Without the migration the old field would be unknown: the twin that fails.
    meta["config"]["format_version"] = 2
    (directory / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(peftreg.AdapterFileError, match=r"unknown field\(s\) 'targets'"):
        read_adapter_dir(directory, registry)
