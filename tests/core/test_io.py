from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

import peftreg
from peftreg import AdaptedModel, AdapterError, AdapterFileError, UnknownMethodError
from peftreg.io.adapter_dir import CONFIG_FILE, read_adapter_dir
from peftreg.plugin import AdapterHost
from peftreg_plugins.lora import LoraConfig


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)["logits"]


@pytest.fixture
def trained(make_tiny, token_batch):
    model = peftreg.adapt(make_tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                   modules_to_save=["lm_head"]))
    with torch.no_grad():
        for p in model.adapter_parameters("default"):
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def saved(trained, tmp_path):
    return trained.save_adapter(tmp_path / "adapter")


def _meta(directory: Path) -> dict:
    return json.loads((directory / CONFIG_FILE).read_text())


def _rewrite_tensors(directory: Path, tensors: dict, raw: bytes | None = None) -> None:
    """Replace the tensor file (keeping the checksum valid, so deeper checks are reached)."""
    meta = _meta(directory)
    blob = raw if raw is not None else st_save(tensors)
    (directory / meta["tensors"]["file"]).write_bytes(blob)
    meta["tensors"]["sha256"] = hashlib.sha256(blob).hexdigest()
    (directory / CONFIG_FILE).write_text(json.dumps(meta))


def _tensors(directory: Path) -> dict:
    return dict(read_adapter_dir(directory).tensors)


def test_round_trip_gives_identical_outputs(trained, saved, make_tiny, token_batch):
    loaded = peftreg.load(make_tiny(), saved)
    assert torch.equal(_logits(loaded, token_batch), _logits(trained, token_batch))
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded2 = peftreg.load(make_tiny(), saved, name="again", trainable=True)
    assert loaded2.active_adapters == ["again"]
    assert all(p.requires_grad for p in loaded2.adapter_parameters("again"))


def test_directory_contents_and_provenance(saved, trained):
    meta = _meta(saved)
    assert meta["format"] == "peftreg-adapter" and meta["format_version"] == 1
    assert meta["method"] == "lora" and meta["config"]["r"] == 4
    assert meta["plugin"]["distribution"] == "peftreg"
    assert meta["plugin"]["version"] == peftreg.__version__
    assert {p.name for p in saved.iterdir()} == {CONFIG_FILE, meta["tensors"]["file"]}
    info = read_adapter_dir(saved)
    assert info.parameter_count == sum(p.numel() for p in trained.adapter_parameters("default"))
    assert set(info.tensors) == set(trained.adapter_state_dict("default"))
    assert all("default" not in key for key in info.tensors)


def test_resave_replaces_old_tensor_file_and_keeps_other_files(trained, saved):
    (saved / "notes.txt").write_text("mine")
    old = _meta(saved)["tensors"]["file"]
    with torch.no_grad():
        trained.adapter_parameters("default")[0].add_(1.0)
    trained.save_adapter(saved)
    new = _meta(saved)["tensors"]["file"]
    assert new != old and not (saved / old).exists() and (saved / new).exists()
    assert (saved / "notes.txt").read_text() == "mine"


def test_crash_before_config_replace_keeps_previous_save(trained, saved, make_tiny, token_batch,
                                                         monkeypatch):
    before = _logits(peftreg.load(make_tiny(), saved), token_batch)
    with torch.no_grad():
        trained.adapter_parameters("default")[0].add_(1.0)
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith(CONFIG_FILE):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    # An OSError while saving reaches the caller as peftreg's error naming the directory.
    with pytest.raises(AdapterFileError, match=f"{saved}: cannot write the adapter: simulated"):
        trained.save_adapter(saved)
    monkeypatch.setattr(os, "replace", real_replace)
    assert torch.equal(_logits(peftreg.load(make_tiny(), saved), token_batch), before)


def test_save_into_a_file_path_is_refused(trained, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(AdapterFileError, match="exists and is not a directory"):
        trained.save_adapter(target)
    assert target.read_text() == "x"


def test_save_needs_a_name_when_several_are_active(trained, tmp_path):
    trained.add_adapter("other", LoraConfig(target_modules=["k_proj"]), activate=False)
    trained.set_active(["default", "other"])
    with pytest.raises(AdapterError, match="2 adapters are active"):
        trained.save_adapter(tmp_path / "x")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / CONFIG_FILE).unlink(), "looked for adapter.json"),
        (lambda d: (d / CONFIG_FILE).write_text("{not json"), "adapter.json: not valid JSON"),
        (lambda d: (d / CONFIG_FILE).write_text("[]"), "not a peftreg adapter file"),
    ],
    ids=["missing-config", "bad-json", "not-object"],
)
def test_broken_config_file(saved, make_tiny, damage, message):
    damage(saved)
    with pytest.raises(AdapterFileError, match=message):
        peftreg.load(make_tiny(), saved)


def _edit_meta(directory, **changes):
    meta = _meta(directory)
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            meta[section][leaf] = value
        else:
            meta[key] = value
    (directory / CONFIG_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"format_version": 9}, AdapterFileError, "format_version 9 is newer"),
        ({"format_version": "1"}, AdapterFileError, "not a positive integer"),
        ({"method": "frobnicate"}, UnknownMethodError,
         "no installed method is called 'frobnicate'"),
        ({"config__r": 0}, AdapterFileError, r"invalid config: LoraConfig.r: rank must be > 0"),
        ({"config__rank": 4}, AdapterFileError, r"unknown field\(s\) 'rank'"),
        ({"config__format_version": 7}, AdapterFileError, "format_version 7 is newer"),
        ({"tensors__file": "../../etc/passwd"}, AdapterFileError, "is not of the form"),
        ({"tensors__sha256": "0" * 64}, AdapterFileError, "checksum does not match"),
        ({"adapter_name": "../evil"}, AdapterFileError, "not a valid adapter name"),
    ],
    ids=["future", "version-type", "unknown-method", "bad-rank", "unknown-field",
         "future-config", "traversal", "checksum", "evil-name"],
)
def test_bad_metadata(saved, make_tiny, changes, error, message):
    _edit_meta(saved, **changes)
    model = AdaptedModel(make_tiny())
    with pytest.raises(error, match=message):
        model.load_adapter(saved)
    assert model.adapters == {}


def test_peft_directory_gets_a_hint(tmp_path, make_tiny):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterFileError,
                       match=r"PEFT weights file adapter_model\.safetensors is missing"):
        peftreg.load(make_tiny(), tmp_path)


def test_not_a_directory(tmp_path, make_tiny):
    with pytest.raises(AdapterFileError, match="not a directory"):
        peftreg.load(make_tiny(), tmp_path / "missing")


def _truncate(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def _header_too_long(raw: bytes) -> bytes:
    return struct.pack("<Q", 10**9) + raw[8:]


def _bad_header_json(raw: bytes) -> bytes:
    return struct.pack("<Q", 4) + b"{{{{" + raw[8:]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_truncate, "truncated|outside"),
        (_header_too_long, "header claims"),
        (_bad_header_json, "header is not valid JSON"),
        (lambda raw: b"\x01", "too short"),
    ],
    ids=["truncated", "header-too-long", "header-json", "tiny"],
)
def test_corrupt_tensor_file(saved, make_tiny, mutate, message):
    meta = _meta(saved)
    raw = (saved / meta["tensors"]["file"]).read_bytes()
    _rewrite_tensors(saved, {}, raw=mutate(raw))
    with pytest.raises(AdapterFileError, match=message):
        peftreg.load(make_tiny(), saved)


def test_overlapping_tensors_are_refused(saved, make_tiny):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    text = json.dumps(header).encode()
    _rewrite_tensors(saved, {}, raw=struct.pack("<Q", len(text)) + text + bytes(12))
    with pytest.raises(AdapterFileError, match="'a' and 'b' overlap"):
        peftreg.load(make_tiny(), saved)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t, k: t.pop(k), "missing tensor"),
        (lambda t, k: t.__setitem__("layers.0.extra.weight", torch.zeros(2)), "unexpected tensor"),
        (lambda t, k: t.__setitem__(k, torch.zeros(3, 3)),
         r"has shape \(3, 3\), the model expects"),
        (lambda t, k: t.__setitem__(k, torch.full_like(t[k], float("nan"))), "NaN or infinite"),
        (lambda t, k: t.__setitem__(k, t[k].to(torch.int32)), "must be floating point"),
    ],
    ids=["missing", "unexpected", "shape", "nan", "int"],
)
def test_tensor_problems_are_named_and_model_untouched(saved, make_tiny, token_batch, edit,
                                                      message):
    tensors = _tensors(saved)
    key = "layers.0.self_attn.q_proj.lora_A.weight"
    edit(tensors, key)
    _rewrite_tensors(saved, tensors)
    model = AdaptedModel(make_tiny())
    base = _logits(model, token_batch)
    with pytest.raises(AdapterFileError, match=message) as info:
        model.load_adapter(saved)
    assert str(saved) in str(info.value)
    assert model.adapters == {}
    assert not any(isinstance(m, AdapterHost) for m in model.modules())
    assert torch.equal(_logits(model, token_batch), base)


def test_every_mismatch_is_reported_at_once(saved, make_tiny):
    tensors = _tensors(saved)
    tensors.pop("layers.0.self_attn.q_proj.lora_A.weight")
    tensors.pop("layers.1.self_attn.v_proj.lora_B.weight")
    _rewrite_tensors(saved, tensors)
    with pytest.raises(AdapterFileError, match=r"2 problem\(s\)"):
        peftreg.load(make_tiny(), saved)


def test_adapter_for_another_model_shape(saved, tiny_config):
    import dataclasses

    from peftreg.reference_model import ReferenceTransformer

    wider = ReferenceTransformer(dataclasses.replace(tiny_config, hidden_size=48))
    with pytest.raises(AdapterFileError, match="does not fit this model"):
        peftreg.load(wider, saved)


def test_name_taken(saved, trained):
    with pytest.raises(AdapterError, match="already exists"):
        trained.load_adapter(saved)

