"""Promise 4: a process killed at any moment during a save leaves the old or the new adapter.

A forked child saves two different adapters (different configs and weights) into one
directory, alternately, without pause; the parent SIGKILLs it after a random delay, then reads
the directory. It must hold exactly one of the two adapters, config and every tensor bit for
bit. Repeated many times, for peftreg's own format and for the PEFT export.

The child is forked from the test process (torch already imported, one intra-op thread) so
each round costs milliseconds instead of an interpreter start-up. Bounded by ``KILLS`` and by
``PEFTREG_KILL_SECONDS`` (default 4 s per format).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import sys
import time

import pytest
import torch
from safetensors import safe_open

import peftreg
from peftreg.io import peft_format
from peftreg.io.adapter_dir import read_adapter_dir
from peftreg.io.peft_format import PEFT_CONFIG_FILE, read_peft_dir
from peftreg_plugins.lora import LoraConfig

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                                reason="needs fork() (POSIX, not macOS's fork-unsafe libs)")

KILLS = int(os.environ.get("PEFTREG_KILLS", "100"))
SECONDS = float(os.environ.get("PEFTREG_KILL_SECONDS", "4"))


def _two_adapters(make_tiny):
    """Two models each holding adapter ``default``, with different configs and weights."""
    models = []
    for seed, config in ((1, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
                         (2, LoraConfig(r=2, lora_alpha=3.0, target_modules=["q_proj"]))):
        model = peftreg.adapt(make_tiny(), config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.adapter_parameters("default"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        models.append(model)
    return models


def _save_forever(models, directory, fmt, start) -> None:
    """The child: alternate saves until killed. Never returns."""
    status = 0
    try:
        i = start
        while True:
            models[i % 2].save_adapter(directory, "default", format=fmt)
            i += 1
    except BaseException:  # the parent reports any exit that is not its SIGKILL
        status = 1
    finally:
        os._exit(status)


def _matches(saved, model) -> bool:
    expected = model.adapter_state_dict("default")
    return (saved.config == model.record("default").config
            and saved.tensors.keys() == expected.keys()
            and all(torch.equal(saved.tensors[k], expected[k]) for k in expected))


def _kill_loop(models, directory, fmt, read):
    """Run the kill rounds; return (kills, kills that cut a write short, kills that left a PEFT
    export between its two renames)."""
    models[0].save_adapter(directory, "default", format=fmt)
    start = time.perf_counter()
    models[1].save_adapter(directory, "default", format=fmt)
    one_save = time.perf_counter() - start
    rng = random.Random(1234)
    kills = interrupted = between = 0
    previous: set[str] = set()
    deadline = time.monotonic() + SECONDS
    while kills < KILLS and time.monotonic() < deadline:
        pid = os.fork()
        if pid == 0:
            _save_forever(models, directory, fmt, rng.randrange(2))
        time.sleep(rng.uniform(0, 4 * one_save))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"the saving child exited on its own (status {status}) before the kill")
        kills += 1
        # Temporary or unreferenced files that were not there after the previous kill: this
        # kill cut a write short (a completed save removes all of them).
        leftovers = {p.name for p in directory.iterdir() if p.name.endswith(".tmp")}
        tensor_files = {p.name for p in directory.glob("adapter.*.safetensors")}
        if len(tensor_files) > 1:
            leftovers |= tensor_files
        interrupted += bool(leftovers - previous)
        previous = leftovers
        between += _between_renames(directory)
        saved = read(directory)
        assert _matches(saved, models[0]) or _matches(saved, models[1]), (
            f"after kill {kills} the directory holds neither adapter: "
            f"{sorted(os.listdir(directory))}")
    return kills, interrupted, between


def _between_renames(directory) -> bool:
    """A PEFT export cut between its renames: new weights beside the config they replace."""
    weights = directory / peft_format.PEFT_WEIGHTS_FILE
    if not weights.exists():
        return False
    with safe_open(weights, "pt") as handle:
        meta = handle.metadata() or {}
    config = (directory / PEFT_CONFIG_FILE).read_bytes()
    return (meta.get("peftreg_replaces_config_sha256") == hashlib.sha256(config).hexdigest()
            and meta.get("peftreg_adapter_config", "").encode() != config)


@pytest.mark.parametrize("fmt", ["peftreg", "peft"])
def test_killed_saves_leave_the_old_or_the_new_adapter(make_tiny, tmp_path, token_batch, fmt):
    models = _two_adapters(make_tiny)
    directory = tmp_path / "adapter"
    read = read_adapter_dir if fmt == "peftreg" else read_peft_dir
    kills, interrupted, between = _kill_loop(models, directory, fmt, read)
    print(f"\n[reliability] {fmt} saves: {kills} kills survived; {interrupted} cut a write "
          f"short, {between} fell between the PEFT renames")
    assert kills >= min(KILLS, 10)
    # The kill windows really fell inside saves, not only between them.
    assert interrupted >= 1
    # What is left loads into a fresh model and gives one of the two adapters' outputs.
    loaded = peftreg.load(make_tiny(), directory)
    with torch.no_grad():
        out = loaded(token_batch)["logits"]
        assert any(torch.equal(out, m(token_batch)["logits"]) for m in models)
    # The next complete save cleans up whatever the kills left.
    models[0].save_adapter(directory, "default", format=fmt)
    names = {p.name for p in directory.iterdir()}
    if fmt == "peftreg":
        assert len(names) == 2 and "adapter.json" in names, names
    else:
        assert names == {PEFT_CONFIG_FILE, peft_format.PEFT_WEIGHTS_FILE}, names


def test_peft_export_interrupted_between_its_renames_reads_as_the_new_one(make_tiny, tmp_path,
                                                                        monkeypatch):
    """The one state a kill rarely hits: new weights next to the old config."""
    old, new = _two_adapters(make_tiny)
    old.save_adapter(tmp_path, "default", format="peft")
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(peft_format.os, "replace", crash_on_second)
    with contextlib.suppress(KeyboardInterrupt):
        new.save_adapter(tmp_path, "default", format="peft")
    monkeypatch.setattr(peft_format.os, "replace", real_replace)
    assert str(calls[1]).endswith(PEFT_CONFIG_FILE)
    saved = read_peft_dir(tmp_path)
    assert _matches(saved, new) and not _matches(saved, old)


def test_peft_config_edited_after_export_wins(make_tiny, tmp_path):
    """Only the exact interrupted state uses the embedded config: a hand edit is honoured."""
    model, _ = _two_adapters(make_tiny)
    model.save_adapter(tmp_path, "default", format="peft")
    path = tmp_path / PEFT_CONFIG_FILE
    doc = json.loads(path.read_text())
    doc["lora_alpha"] = 16
    path.write_text(json.dumps(doc))
    assert read_peft_dir(tmp_path).config.lora_alpha == 16
