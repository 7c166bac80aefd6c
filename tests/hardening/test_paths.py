"""Promise 3: names that reach the file system cannot escape the target directory.

Adapter names become directory names (PEFT export writes adapter ``X`` to ``DIR/X``) and
module keys; the tensor file named in ``adapter.json`` is opened inside the adapter directory.
Hostile values of each are refused, and nothing is written outside the directory.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import peftreg
from peftreg import AdaptedModel, AdapterError, AdapterFileError
from peftreg.io.adapter_dir import CONFIG_FILE, read_adapter_dir
from peftreg_plugins.lora import LoraConfig

HOSTILE_NAMES = {
    "parent": "..", "dot": ".", "traversal": "../escape", "deep-traversal": "a/../../escape",
    "absolute": "/var/escape", "backslash": "..\\escape", "slash": "a/b", "empty": "",
    "nul": "a\x00b", "newline": "a\nb", "space": "a b", "dot-inside": "a.b", "tilde": "~",
    "leading-dash": "-rf", "leading-digit": "1a", "unicode-lookalike": "\u0430dapter",
    "fullwidth-slash": "a\uff0fb", "too-long": "a" * 65, "not-a-string": 7,
}
GOOD_NAMES = ["a", "_x", "Adapter-2", "a" * 64]


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", list(HOSTILE_NAMES.values()), ids=list(HOSTILE_NAMES))
def test_hostile_adapter_names_are_refused_everywhere(make_tiny, tmp_path, name):
    model = AdaptedModel(make_tiny())
    with pytest.raises(AdapterError, match="invalid adapter name"):
        model.add_adapter(name, LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.adapters == {}
    # As the saved name inside a downloaded adapter.json, for load and for inspection alike.
    source = peftreg.adapt(make_tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
    directory = source.save_adapter(tmp_path / "inside" / "adapter")
    meta = json.loads((directory / CONFIG_FILE).read_text())
    meta["adapter_name"] = name
    (directory / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="not a valid adapter name") as info:
        read_adapter_dir(directory)
    assert str(directory / CONFIG_FILE) in str(info.value)
    with pytest.raises(AdapterFileError):
        peftreg.load(make_tiny(), directory)
    assert _files(tmp_path) == sorted(["inside", "inside/adapter", "inside/adapter/adapter.json",
                                       f"inside/adapter/{meta['tensors']['file']}"])


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_work_and_peft_export_stays_inside(make_tiny, tmp_path, name):
    model = AdaptedModel(make_tiny())
    model.add_adapter(name, LoraConfig(r=2, target_modules=["q_proj"]))
    target = model.save_adapter(tmp_path / "peft", name, format="peft")
    assert target.resolve().parent == (tmp_path / "peft").resolve()
    assert all(str(p.resolve()).startswith(str(tmp_path.resolve())) for p in tmp_path.rglob("*"))


@pytest.mark.parametrize(
    "file",
    ["../outside.safetensors", "/etc/passwd", "adapter.0123456789abcdef.safetensors/../../x",
     "adapter.0123456789ABCDEF.safetensors", "adapter.0123456789abcdef.safetensors\n",
     "sub/adapter.0123456789abcdef.safetensors", 12],
    ids=["parent", "absolute", "dotdot-suffix", "uppercase", "newline", "subdir", "number"])
def test_tensor_file_name_must_be_a_plain_name_inside(make_tiny, tmp_path, file):
    source = peftreg.adapt(make_tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
    directory = source.save_adapter(tmp_path / "adapter")
    meta = json.loads((directory / CONFIG_FILE).read_text())
    meta["tensors"]["file"] = file
    (directory / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="is not of the form"):
        read_adapter_dir(directory)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_tensor_file_that_is_a_link_out_of_the_directory_is_refused(make_tiny, tmp_path):
    """A shared repository can hold symlinks: the named file must not lead elsewhere."""
    source = peftreg.adapt(make_tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
    directory = source.save_adapter(tmp_path / "adapter")
    meta = json.loads((directory / CONFIG_FILE).read_text())
    tensor = directory / meta["tensors"]["file"]
    outside = tmp_path / "secret.safetensors"
    tensor.rename(outside)
    tensor.symlink_to(outside)
    with pytest.raises(AdapterFileError, match="outside the adapter directory"):
        read_adapter_dir(directory)
    # A link inside the directory is harmless and still loads.
    tensor.unlink()
    (directory / "real.bin").write_bytes(outside.read_bytes())
    tensor.symlink_to("real.bin")
    assert read_adapter_dir(directory).tensors.keys() == source.adapter_state_dict("default").keys()


def test_saving_through_a_planted_link_replaces_the_link_not_its_target(make_tiny, tmp_path):
    """Atomic replace renames over a planted ``adapter.json`` link instead of writing through
    it, so a file outside the directory is never overwritten."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / CONFIG_FILE).symlink_to(victim)
    model = peftreg.adapt(make_tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_adapter(directory)
    assert victim.read_text() == "keep me"
    assert not (directory / CONFIG_FILE).is_symlink()
    loaded = peftreg.load(make_tiny(), directory)
    key = "layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(loaded.adapter_state_dict("default")[key],
                       model.adapter_state_dict("default")[key])
