from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
from torch import nn

from peftreg import TargetNotFoundError
from peftreg.plugin import ModelFamily, TargetedConfig
from peftreg.targets import layer_index, select_targets


@dataclasses.dataclass
class Spec(TargetedConfig):
    method: ClassVar[str] = "spec"


def _select(model, family=None, default=None, **fields):
    return select_targets(model, Spec(**fields), (nn.Linear,), family, default)


def test_exact_and_suffix_names(make_tiny):
    model = make_tiny()
    paths = _select(model, target_modules=["q_proj", "layers.1.self_attn.v_proj"])
    assert paths == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj",
                     "layers.1.self_attn.v_proj"]


def test_regex_matches_whole_path(make_tiny):
    paths = _select(make_tiny(), target_modules=r".*\.(k|o)_proj")
    assert paths == [f"layers.{i}.self_attn.{n}_proj" for i in range(2) for n in "ko"]
    # A regex must match the whole path, not a part of it.
    with pytest.raises(TargetNotFoundError):
        _select(make_tiny(), target_modules=r"k_proj")


def test_all_linear_excludes_output_head(make_tiny):
    paths = _select(make_tiny(), target_modules="all-linear")
    assert "lm_head" not in paths
    assert len(paths) == 2 * 7


def test_exclude_and_layer_filter(make_tiny):
    paths = _select(make_tiny(), target_modules="all-linear", exclude_modules=["mlp.up_proj"],
                    layers_to_transform=[1])
    assert all(p.startswith("layers.1.") for p in paths)
    assert "layers.1.mlp.up_proj" not in paths and len(paths) == 6


def test_layer_index_from_family_or_pattern():
    family = ModelFamily(name="f", layers=("enc.blocks.0", "enc.blocks.1"))
    assert layer_index("enc.blocks.1.attn", family, None) == 1
    assert layer_index("enc.other", family, None) is None
    assert layer_index("model.layers.12.mlp", None, None) == 12
    assert layer_index("stack.7.ffn", None, "stack") == 7


def test_missing_name_lists_candidates(make_tiny):
    with pytest.raises(TargetNotFoundError) as info:
        _select(make_tiny(), target_modules=["q_proj", "query"])
    text = str(info.value)
    assert "['query']" in text and "layers.0.self_attn.q_proj" in text and "down_proj" in text


def test_unsupported_type_is_named(make_tiny):
    with pytest.raises(TargetNotFoundError,
                       match=r"unsupported types: input_layernorm \(RMSNorm\)"):
        _select(make_tiny(), target_modules=["input_layernorm"])


def test_no_targets_and_no_default(make_tiny):
    with pytest.raises(TargetNotFoundError, match="target_modules is not set"):
        _select(make_tiny())
    assert _select(make_tiny(), default=["o_proj"]) == [
        "layers.0.self_attn.o_proj", "layers.1.self_attn.o_proj"]


def test_filter_removing_everything_is_an_error(make_tiny):
    with pytest.raises(TargetNotFoundError, match=r"layers_to_transform = \[5\] selects no layer"):
        _select(make_tiny(), target_modules=["q_proj"], layers_to_transform=[5])
