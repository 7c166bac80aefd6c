"""Saves that cannot write raise peftreg's errors naming the target and the cause, never an
OSError naming a temporary file (issue 12, part 9)."""

from __future__ import annotations

import errno
import os
import tempfile

import pytest
import torch

import peftreg
from peftreg.errors import AdapterFileError
from peftreg.optim import OptimizerCheckpointError
from peftreg.optim.checkpoint import write_optimizer_state
from peftreg.reference_model import ReferenceTransformer
from peftreg_plugins.lora import LoraConfig

STATE = {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}


def save_optimizer_to(target):
    write_optimizer_state(target, STATE)


def save_adapter_to(target):
    torch.manual_seed(0)
    peftreg.adapt(ReferenceTransformer(), LoraConfig(r=2)).save_adapter(target)


def save_peft_to(target):
    torch.manual_seed(0)
    peftreg.adapt(ReferenceTransformer(), LoraConfig(r=2)).save_adapter(target, format="peft")


SAVES = {"optimizer": (save_optimizer_to, OptimizerCheckpointError, "opt.safetensors"),
         "adapter": (save_adapter_to, AdapterFileError, "adapter-dir"),
         "peft": (save_peft_to, AdapterFileError, "peft-dir")}
KINDS = pytest.mark.parametrize("kind", list(SAVES))


def refused(kind, target, *words):
    save, error, _ = SAVES[kind]
    with pytest.raises(error) as info:
        save(target)
    message = str(info.value)
    assert not isinstance(info.value, OSError)
    assert str(target) in message and ".tmp" not in message, message
    for word in words:
        assert word in message, message
    return message


@KINDS
def test_a_target_below_a_regular_file(tmp_path, kind):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused(kind, blocker / "sub" / SAVES[kind][2], f"{blocker} is a file, not a directory")


@KINDS
def test_no_permission_to_write(tmp_path, kind, monkeypatch):
    # Tests run as root here, and root writes into read-only directories: simulate the refusal
    # where the save makes its temporary file, as the system reports it.
    def denied(*args, dir=None, prefix="", suffix="", **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied",
                              os.path.join(dir, f"{prefix}abcdefgh{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    target = tmp_path / SAVES[kind][2]
    # The optimizer file goes in its parent; the adapter's files go in the adapter directory.
    where = target.parent if kind == "optimizer" else target
    refused(kind, target, f"no permission to write in {where}")


@KINDS
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories; the monkeypatched twin of "
                           "this test covers the message")
def test_a_read_only_directory(tmp_path, kind):
    folder = tmp_path / "ro"
    folder.mkdir()
    target = folder / SAVES[kind][2]
    if kind == "adapter":
        target.mkdir()
        folder = target
    folder.chmod(0o500)
    try:
        refused(kind, target, "no permission to write in")
    finally:
        folder.chmod(0o700)


def test_an_optimizer_target_that_is_a_directory(tmp_path):
    target = tmp_path / "opt.safetensors"
    target.mkdir()
    refused("optimizer", target, "it is a directory")
    assert list(tmp_path.iterdir()) == [target] and not any(target.iterdir())


def test_an_adapter_config_that_is_a_directory(tmp_path):
    target = tmp_path / "adapter-dir"
    (target / "adapter.json").mkdir(parents=True)
    refused("adapter", target, f"{target / 'adapter.json'} is a directory")


def test_the_twin_saves_that_can_write_succeed(tmp_path):
    save_optimizer_to(tmp_path / "opt.safetensors")
    save_adapter_to(tmp_path / "adapter-dir")
    assert (tmp_path / "opt.safetensors").is_file()
    assert (tmp_path / "adapter-dir" / "adapter.json").is_file()
