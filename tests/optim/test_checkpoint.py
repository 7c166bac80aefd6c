# SPDX-License-Identifier: Apache-2.0
"""Optimizer checkpoints: round trip, clear errors, and atomicity under SIGKILL (issue 7)."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

from peftreg.optim import OptimizerCheckpointError, load_optimizer, save_optimizer
from peftreg.optim.checkpoint import read_optimizer_state, write_optimizer_state


def _state(version: int) -> dict:
    """A state dict whose every value encodes ``version``; ~1 MB so a save takes a while."""
    return {
        "state": {i: {"step": torch.tensor(float(version)),
                      "exp_avg": torch.full((64_000 + i,), float(version)),
                      "exp_avg_sq": torch.full((300,), float(version) * 2)} for i in range(2)},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "version": version,
                          "params": [0, 1]}],
    }


def _version_of(state: dict) -> int:
    """The single version every part of ``state`` encodes (asserts they agree)."""
    version = state["param_groups"][0]["version"]
    for i, entry in state["state"].items():
        assert entry["step"].item() == version
        assert entry["exp_avg"].shape == (64_000 + i,)
        assert torch.all(entry["exp_avg"] == version)
        assert torch.all(entry["exp_avg_sq"] == 2 * version)
    return version


def test_round_trip_of_torch_adamw(tmp_path):
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=0.01)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    save_optimizer(opt, tmp_path / "o.safetensors")
    other = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.5)
    load_optimizer(other, tmp_path / "o.safetensors")
    a, b = opt.state_dict(), other.state_dict()
    assert other.param_groups[0]["lr"] == 0.01 and other.param_groups[0]["betas"] == (0.9, 0.999)
    for i in a["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][key], b["state"][i][key])


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(OptimizerCheckpointError, match="cannot read"):
        read_optimizer_state(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(OptimizerCheckpointError, match=r"junk\.safetensors"):
        read_optimizer_state(tmp_path / "junk.safetensors")
    with pytest.raises(OptimizerCheckpointError, match="cannot store"):
        write_optimizer_state(tmp_path / "x.safetensors",
                              {"state": {}, "param_groups": [{"fn": object()}]})
    assert not (tmp_path / "x.safetensors").exists()


def test_sigkill_during_saves_leaves_old_or_new(tmp_path):
    """A child saves versions 1, 2, 3, ... in a loop; killed at random moments ~25 times, the
    file on disk always loads and is one complete version, never a mixture or a torn file."""
    path = tmp_path / "opt.safetensors"
    write_optimizer_state(path, _state(0))
    states = [_state(v) for v in range(1, 4)]  # built before forking: the child only saves
    rng = random.Random(1234)
    seen = set()
    last = 0
    for attempt in range(25):
        pid = os.fork()
        if pid == 0:  # child: save forever; never returns into pytest
            try:
                k = attempt * 1000
                while True:
                    k += 1
                    state = states[k % 3]
                    state["param_groups"][0]["version"] = k
                    for entry in state["state"].values():
                        entry["step"].fill_(k)
                        entry["exp_avg"].fill_(k)
                        entry["exp_avg_sq"].fill_(2 * k)
                    write_optimizer_state(path, state)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.005, 0.1))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        version = _version_of(read_optimizer_state(path))
        assert version == last or version > attempt * 1000, (version, last)
        seen.add(version)
        last = version
    # Twin: the kills did land between different saves (the file changed several times).
    assert len(seen) > 3, seen


def _killed_save(path, version: int) -> None:
    """Run one save in a child that SIGKILLs itself once the temporary file is written and
    before its rename: what a kill at the worst moment leaves."""
    state = _state(version)
    pid = os.fork()
    if pid == 0:
        try:
            os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
            write_optimizer_state(path, state)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_a_complete_save_removes_what_killed_saves_left(tmp_path):
    from peftreg.io.atomic import stale_temporaries

    path = tmp_path / "opt.safetensors"
    write_optimizer_state(path, _state(1))
    other = tmp_path / "other.safetensors"  # another target's litter is not ours to remove
    for version in (2, 3, 4):
        _killed_save(path, version)
    _killed_save(other, 9)
    mine, theirs = stale_temporaries(path), stale_temporaries(other)
    # Twin: the kills did leave files behind, each one a full checkpoint's worth of bytes.
    assert len(mine) == 3 and len(theirs) == 1, sorted(os.listdir(tmp_path))
    assert all(p.stat().st_size > 500_000 for p in mine)
    unrelated = tmp_path / ".opt.safetensors.notes.tmp"
    unrelated.write_text("not a temporary file of a save")
    assert _version_of(read_optimizer_state(path)) == 1  # the kills lost nothing

    write_optimizer_state(path, _state(5))
    assert stale_temporaries(path) == []
    assert stale_temporaries(other) == theirs and unrelated.exists()
    assert _version_of(read_optimizer_state(path)) == 5
