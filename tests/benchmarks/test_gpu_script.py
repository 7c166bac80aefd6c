# SPDX-License-Identifier: Apache-2.0
"""The prepared GPU run (benchmarks/gpu/run.sh) is wired: its CPU-side steps run here.

No GPU is needed: ``--dry-run`` checks every step's entry point exists and compiles, and
``--cpu-smoke`` runs benchmark steps on the CPU at tiny sizes, so their arguments parse and their
JSON reaches the summary. The output contract (three files under $OUT, a failing step recorded
without stopping the run, the budget) is what a GPU session relies on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"
CUDA_TESTS = [f"cuda-tests-{g}" for g in ("lora", "nf4", "adapters", "ops", "optim")]
GPU_STEPS = ["env", "build", "install", *CUDA_TESTS, "nf4-bandwidth", "qlora", "lora", "nf4",
             "paged", "adapters", "cpu-tests"]


def _run(out: Path, *args: str, timeout: float = 240, **env: str
         ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _statuses(summary: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in summary["steps"]}


def test_list_names_every_step_in_priority_order(tmp_path):
    proc = _run(tmp_path, "--list")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == GPU_STEPS


def test_dry_run_plans_the_gpu_run_and_writes_the_three_files(tmp_path):
    proc = _run(tmp_path, "--dry-run", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["details.tar.gz", "run.log",
                                                         "summary.json"]
    summary = _summary(tmp_path)
    assert _statuses(summary) == dict.fromkeys(GPU_STEPS, "planned")
    commands = {s["name"]: s["command"] for s in summary["steps"]}
    # The GPU plan: CUDA devices, the CUDA test selection, big weights for the bandwidth.
    assert "--device cuda" in commands["qlora"] and "--base nf4" in commands["qlora"]
    for name in CUDA_TESTS:
        assert "PEFTREG_TEST_DEVICE=cuda" in commands[name] and "-k cuda" in commands[name]
    # Together the groups cover tests/ops and tests/optim.
    assert "--ignore=tests/ops/nf4" in commands["cuda-tests-ops"]
    assert "tests/optim" in commands["cuda-tests-optim"]
    assert "16384x16384" in commands["nf4-bandwidth"]
    assert "--internal build" in commands["build"]
    assert summary["ok"] is True


@pytest.mark.slow  # ~30 s on a loaded 2-core machine: two benchmark processes
def test_cpu_smoke_runs_benchmark_steps_and_collects_their_json(tmp_path):
    proc = _run(tmp_path, "--cpu-smoke", "--only", "env,nf4-bandwidth,qlora")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = _summary(tmp_path)
    statuses = _statuses(summary)
    assert statuses["env"] == statuses["nf4-bandwidth"] == statuses["qlora"] == "ok", summary
    assert statuses["build"] == statuses["lora"] == "skipped"
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["env"]["data"]["modules"]["torch"] is True
    bandwidth = steps["nf4-bandwidth"]["data"]["bandwidth"]
    assert bandwidth[0]["shape"] == "64x128" and bandwidth[0]["dequantize_gbps"] > 0
    qlora = steps["qlora"]["data"]
    impls = {r["impl"] for r in qlora["results"]}
    assert {"fused", "reference", "dequant+matmul"} <= impls, impls
    assert {g["goal"] for g in summary["goals"]} >= {
        "dequantize >= 80% of the measured copy bandwidth",
        "fused QLoRA fwd+bwd faster than dequantize-then-matmul"}
    with tarfile.open(tmp_path / "details.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"qlora.json", "qlora.log", "steps.tsv"} <= names
    log = (tmp_path / "run.log").read_text()
    assert "[qlora] " in log and "GPU run summary" in log


@pytest.mark.slow  # one benchmark process after the failed step
def test_a_failing_step_is_recorded_and_the_run_goes_on(tmp_path):
    proc = _run(tmp_path, "--cpu-smoke", "--only", "env,nf4", GPU_RUN_FAIL_STEP="env",
                timeout=120)
    assert proc.returncode == 1
    summary = _summary(tmp_path)
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["env"]["status"] == "failed" and steps["env"]["rc"] == 3
    assert any("injected failure" in line for line in steps["env"]["log_tail"])
    assert steps["nf4"]["status"] == "ok"  # ran after the failure
    assert summary["ok"] is False


def test_steps_past_the_budget_are_skipped_not_started(tmp_path):
    # 15 s leaves less than a step's minimum (20 s after a 10 s reserve): nothing starts.
    proc = _run(tmp_path, "--cpu-smoke", "--only", "env,qlora", "--budget", "15", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = {s["name"]: s for s in _summary(tmp_path)["steps"]}
    assert steps["qlora"]["status"] == "skipped"
    assert steps["qlora"]["command"].startswith("out of time")
