# SPDX-License-Identifier: Apache-2.0
"""Hostile and contradicting PEFT directories (issue 12, parts 3 to 7), written by PEFT itself.

Links out of the directory are refused for every file of both formats and for sub-adapters;
hostile regexes are matched in bounded time or refused; a config whose targets contradict its
tensors is refused; unknown keys holding metadata load with one warning while keys that switch
something on are refused; and every refusal says what was looked for and what is there.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is a test extra")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

import tiny_hf  # noqa: E402

import peftreg  # noqa: E402
from peftreg.errors import AdapterFileError, ConfigError, TargetNotFoundError  # noqa: E402
from peftreg.io.adapter_dir import CONFIG_FILE  # noqa: E402
from peftreg.io.peft_format import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE  # noqa: E402
from peftreg_plugins.lora import LoraConfig  # noqa: E402

VOCAB = 96
IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(7))
HOSTILE = r"((\w|\.)+)+!"   # nested quantifiers: exponential backtracking in Python's re
BOUNDED_SECONDS = 20.0       # a hang would run for ever; a bounded match takes milliseconds


def make_llama():
    return tiny_hf.llama(seed=31, vocab_size=VOCAB)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("peft")
    model = peft.get_peft_model(make_llama(), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(directory)
    return directory


@pytest.fixture
def copy(peft_dir, tmp_path):
    target = tmp_path / "adapter"
    shutil.copytree(peft_dir, target)
    return target


def edit_config(directory, **changes):
    doc = json.loads((directory / PEFT_CONFIG_FILE).read_text())
    doc.update(changes)
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps(doc))


def refused(directory, *patterns, error=AdapterFileError):
    with pytest.raises(error) as caught:
        peftreg.load(make_llama(), directory)
    for pattern in patterns:
        assert pattern in str(caught.value), str(caught.value)
    return str(caught.value)


# -- part 3: links --------------------------------------------------------------------------


@pytest.mark.parametrize("name", [PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE])
def test_peft_file_linking_out_of_the_directory_is_refused(copy, tmp_path, name):
    outside = tmp_path / f"elsewhere-{name}"
    shutil.move(copy / name, outside)
    (copy / name).symlink_to(outside)
    message = refused(copy, name, str(outside), "outside the adapter directory")
    assert "refusing to follow" in message


def test_peft_link_inside_the_directory_is_followed(copy, peft_dir):
    shutil.move(copy / PEFT_WEIGHTS_FILE, copy / "weights.bin")
    (copy / PEFT_WEIGHTS_FILE).symlink_to("weights.bin")
    expected = logits(peftreg.load(make_llama(), peft_dir))
    torch.testing.assert_close(logits(peftreg.load(make_llama(), copy)), expected)


def test_sub_adapter_directory_linking_out_is_refused(copy, tmp_path, peft_dir):
    # PEFT's layout: adapter "other" lives in other/ inside the directory.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(peft_dir, elsewhere)
    (copy / "other").symlink_to(elsewhere, target_is_directory=True)
    refused(copy / "other", "sub-adapter directory", str(elsewhere), "outside")
    # A real sub-directory with the same files loads as adapter "other".
    (copy / "other").unlink()
    shutil.copytree(peft_dir, copy / "other")
    model = peftreg.load(make_llama(), copy / "other")
    assert "other" in model.adapters


def test_files_of_a_sub_adapter_linking_out_are_refused(copy, tmp_path, peft_dir):
    shutil.copytree(peft_dir, copy / "other")
    outside = tmp_path / "w.safetensors"
    shutil.move(copy / "other" / PEFT_WEIGHTS_FILE, outside)
    (copy / "other" / PEFT_WEIGHTS_FILE).symlink_to(outside)
    refused(copy / "other", str(outside), "outside the adapter directory")


def test_peftreg_config_linking_out_is_refused(tmp_path):
    model = peftreg.adapt(make_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    directory = model.save_adapter(tmp_path / "adapter")
    outside = tmp_path / "config-elsewhere.json"
    shutil.move(directory / CONFIG_FILE, outside)
    (directory / CONFIG_FILE).symlink_to(outside)
    refused(directory, CONFIG_FILE, str(outside), "outside the adapter directory")


# -- part 4: patterns that hang -------------------------------------------------------------


@pytest.mark.parametrize("key", ["target_modules", "exclude_modules", "layers_pattern",
                                 "rank_pattern", "alpha_pattern"])
def test_hostile_patterns_from_a_file_finish_in_bounded_time(copy, key):
    value = {HOSTILE: 8} if key.endswith("_pattern") and key != "layers_pattern" else HOSTILE
    changes = {key: value}
    if key == "layers_pattern":
        changes["layers_to_transform"] = [0]
    edit_config(copy, **changes)
    start = time.monotonic()
    try:
        peftreg.load(make_llama(), copy)
    except (AdapterFileError, ConfigError, TargetNotFoundError) as exc:
        assert key in str(exc) or "target_modules" in str(exc), str(exc)
    elapsed = time.monotonic() - start
    assert elapsed < BOUNDED_SECONDS, f"matching took {elapsed:.1f} s"


# -- part 5: a config that contradicts its tensors ------------------------------------------


def test_targets_that_select_none_of_the_tensors_are_refused(copy):
    edit_config(copy, target_modules=["nonexistent_proj"])
    message = refused(copy, "target_modules", "nonexistent_proj", "q_proj", "v_proj",
                      "contradicts")
    assert "layers.0.self_attn.q_proj" in message


def test_regex_targets_that_miss_some_tensors_are_refused(copy):
    edit_config(copy, target_modules=r".*\.q_proj")
    refused(copy, "target_modules", "v_proj", "contradicts")


def test_exclusions_that_cover_adapted_modules_are_refused(copy):
    edit_config(copy, exclude_modules=["v_proj"])
    refused(copy, "exclude_modules", "v_proj", "contradicts")


def test_targets_that_cover_the_tensors_load(copy, peft_dir):
    # A superset (PEFT keeps names that matched nothing) and a regex both agree with the file.
    expected = logits(peftreg.load(make_llama(), peft_dir))
    edit_config(copy, target_modules=["q_proj", "v_proj", "nonexistent_proj"])
    torch.testing.assert_close(logits(peftreg.load(make_llama(), copy)), expected)
    edit_config(copy, target_modules=r".*\.(q_proj|v_proj)")
    torch.testing.assert_close(logits(peftreg.load(make_llama(), copy)), expected)


# -- part 6: unknown keys -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["some text", 3, 2.5, None, False, [], {}],
                         ids=["str", "int", "float", "null", "false", "empty-list", "empty-obj"])
def test_unknown_metadata_keys_load_with_one_warning(copy, peft_dir, value):
    edit_config(copy, future_note=value, future_other="x")
    expected = logits(peftreg.load(make_llama(), peft_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peftreg.load(make_llama(), copy)
    ours = [w for w in caught if "does not know" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "future_note" in str(ours[0].message) and "future_other" in str(ours[0].message)
    torch.testing.assert_close(logits(model), expected)


@pytest.mark.parametrize("value", [True, ["q_proj"], {"mode": "fast"}],
                         ids=["true", "list", "object"])
def test_unknown_keys_that_switch_something_on_are_refused(copy, value):
    edit_config(copy, future_feature=value)
    refused(copy, "future_feature", "switches something on")


def test_known_features_peftreg_cannot_reproduce_stay_refused(copy):
    edit_config(copy, use_qalora=True)
    refused(copy, "use_qalora", "QA-LoRA")


# -- part 7: messages that name the problem -------------------------------------------------


def test_empty_directory_names_both_formats(tmp_path):
    refused(tmp_path, "adapter.json", "adapter_config.json", "holds nothing")


def test_directory_with_only_weights_names_both_formats_and_what_is_there(copy):
    (copy / PEFT_CONFIG_FILE).unlink()
    refused(copy, "adapter.json", "adapter_config.json", PEFT_WEIGHTS_FILE)


def test_dangling_weights_link_says_so(copy):
    (copy / PEFT_WEIGHTS_FILE).unlink()
    (copy / PEFT_WEIGHTS_FILE).symlink_to(copy / "gone.safetensors")
    refused(copy, PEFT_WEIGHTS_FILE, "a dangling link to")


def test_directory_in_place_of_the_weights_says_so(copy):
    (copy / PEFT_WEIGHTS_FILE).unlink()
    (copy / PEFT_WEIGHTS_FILE).mkdir()
    refused(copy, PEFT_WEIGHTS_FILE, "is a directory")


def test_missing_peft_type_says_it_is_missing(copy):
    doc = json.loads((copy / PEFT_CONFIG_FILE).read_text())
    del doc["peft_type"]
    (copy / PEFT_CONFIG_FILE).write_text(json.dumps(doc))
    message = refused(copy, "peft_type is missing")
    assert "None" not in message


def test_layers_to_transform_selecting_no_layer_names_the_indices():
    with pytest.raises(TargetNotFoundError) as caught:
        peftreg.adapt(make_llama(), LoraConfig(target_modules=["q_proj"],
                                               layers_to_transform=[5, 7]))
    message = str(caught.value)
    assert "layers_to_transform" in message and "[5, 7]" in message and "[0, 1]" in message


def test_plain_files_still_load(copy):
    # A plain file is read as before (the twin of the link refusals).
    assert not os.path.islink(copy / PEFT_WEIGHTS_FILE)
    peftreg.load(make_llama(), copy)
