# SPDX-License-Identifier: Apache-2.0
"""benchmarks/bench_bf16_crossover.py runs at a tiny size and records what the crossover needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_writes_ratios_and_cpu_capabilities(tmp_path):
    out = tmp_path / "bf16.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_bf16_crossover.py"), "--features",
         "64", "--rows", "1", "40", "--repeats", "1", "--min-run-time", "0.005", "--threads",
         "1", "--out", str(out)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["cpu"]) >= {"capability", "avx512_bf16"}
    assert {(e["rows"], e["mode"]) for e in data["summary"]} == {
        (1, "fwd"), (1, "fwd+bwd"), (40, "fwd"), (40, "fwd+bwd")}
    for entry in data["summary"]:
        for path in ("bf16 reference", "bf16 native", "bf16 widened", "bf16 row kernel",
                     "bf16 default"):
            assert entry[path]["ratio_low"] > 0
        assert entry["faster_fused_path"] in ("bf16 native", "bf16 widened", "bf16 row kernel")
        assert entry["row_kernel_over_widened"] > 0
