from __future__ import annotations

import dataclasses
import json
from typing import ClassVar, Literal

import pytest

from peftreg import ConfigError, MethodConfig
from peftreg.plugin import TargetedConfig


@dataclasses.dataclass
class DemoConfig(TargetedConfig):
    method: ClassVar[str] = "demo"
    format_version: ClassVar[int] = 2

    rank: int = 4
    scale: float = 1.0
    mode: Literal["a", "b"] = "a"
    flags: dict[str, int] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        if self.rank <= 0:
            raise self.error("rank", "must be > 0", self.rank)

    @classmethod
    def migrate(cls, data, from_version):
        data = dict(data)
        if from_version == 1 and "r" in data:
            data["rank"] = data.pop("r")
        return data


def test_round_trip_preserves_every_field():
    config = DemoConfig(rank=3, scale=2, mode="b", target_modules=["q", "v"],
                        flags={"x": 1}, modules_to_save=["head"])
    data = json.loads(config.to_json())
    assert data["method"] == "demo" and data["format_version"] == 2
    again = DemoConfig.from_json(config.to_json())
    assert again == config
    assert isinstance(again.scale, float)


def test_int_is_accepted_for_float_but_bool_is_not_int():
    assert DemoConfig(scale=3).scale == 3.0
    with pytest.raises(ConfigError, match=r"DemoConfig.rank: expected int \(got True\)"):
        DemoConfig(rank=True)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rank", 0, r"DemoConfig.rank: must be > 0 \(got 0\)"),
        ("rank", "4", r"DemoConfig.rank: expected int"),
        ("mode", "c", r"DemoConfig.mode: expected one of 'a', 'b'"),
        ("flags", {"x": "y"}, r"DemoConfig.flags: expected a mapping of str to int"),
        ("target_modules", [], r"target_modules: must not be an empty list"),
        ("target_modules", "(", r"target_modules: invalid regular expression"),
        ("exclude_modules", "all-linear", r"only valid for target_modules"),
        ("layers_to_transform", [-1], r"layers_to_transform: indices must be >= 0"),
        ("modules_to_save", [""], r"modules_to_save: names must be non-empty"),
    ],
    ids=lambda v: str(v)[:20],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        DemoConfig(**{field: value})


def test_unknown_key_is_named_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) 'rnak'.*known fields: .*rank"):
        DemoConfig.from_dict({"method": "demo", "rnak": 4})


def test_future_version_is_refused():
    with pytest.raises(ConfigError, match="format_version 3 is newer"):
        DemoConfig.from_dict({"method": "demo", "format_version": 3})


def test_older_version_is_migrated():
    config = DemoConfig.from_dict({"method": "demo", "format_version": 1, "r": 7})
    assert config.rank == 7


def test_wrong_method_is_refused():
    with pytest.raises(ConfigError, match="for method 'lora', not 'demo'"):
        DemoConfig.from_dict({"method": "lora"})


def test_invalid_json_and_non_object():
    with pytest.raises(ConfigError, match="invalid JSON"):
        DemoConfig.from_json("{")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        DemoConfig.from_json("[1]")


def test_replace_revalidates():
    with pytest.raises(ConfigError, match="rank"):
        DemoConfig().replace(rank=-2)


def test_base_config_has_no_method_specific_fields():
    assert [f.name for f in dataclasses.fields(MethodConfig)] == ["modules_to_save"]
