"""Runs the adapter-reader fuzz target for a few seconds (skipped without atheris)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .fuzz_adapter_reader import Harness, encode

TARGET = Path(__file__).with_name("fuzz_adapter_reader.py")
SECONDS = int(os.environ.get("PEFTREG_FUZZ_SECONDS", "3"))


def test_harness_accepts_valid_and_garbage_inputs_without_atheris(tmp_path):
    """The harness itself (no fuzzer): seeds read cleanly, junk gives only peftreg errors."""
    from .fuzz_adapter_reader import write_seed_corpus

    assert write_seed_corpus(tmp_path) >= 3
    harness = Harness()
    try:
        for seed in sorted(tmp_path.iterdir()):
            data = seed.read_bytes()
            harness.one(data)
            for cut in (1, 7, len(data) // 2, len(data) - 1):
                harness.one(data[:cut])
            harness.one(encode(b'{"tensors": {}}', data[-64:]))
    finally:
        harness.close()
    assert harness.executions > 12


def test_fuzz_the_reader_for_a_bounded_time(tmp_path):
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    from .fuzz_adapter_reader import write_seed_corpus

    corpus = tmp_path / "corpus"
    write_seed_corpus(corpus)  # here, where torch is already imported
    run = subprocess.run(
        [sys.executable, str(TARGET),
         f"-max_total_time={SECONDS}", "-rss_limit_mb=4096", "-max_len=65536",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=SECONDS + 120)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    done = re.search(r"Done (\d+) runs in (\d+) second", output)
    assert done, output[-2000:]
    print(f"\n[reliability] fuzz executions: {done.group(1)} in {done.group(2)} s")
    assert int(done.group(1)) > 20  # it ran (the count depends on the machine)
