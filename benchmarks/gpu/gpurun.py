# SPDX-License-Identifier: Apache-2.0
"""Helpers of benchmarks/gpu/run.sh: the machine report, a no-pip install shim, the summary.

Standard library only at import time (torch is imported inside ``env`` and guarded), so the
summary still gets written when torch or the extension is what broke.

    python benchmarks/gpu/gpurun.py env --out FILE
    python benchmarks/gpu/gpurun.py cuda-home
    python benchmarks/gpu/gpurun.py arch-list
    python benchmarks/gpu/gpurun.py shim DIR
    python benchmarks/gpu/gpurun.py summary --work DIR --out FILE [--print]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: Modules the run uses; the report says which import (bitsandbytes and torchao are optional).
MODULES = ["torch", "pluggy", "safetensors", "rich", "pytest", "pytest_timeout", "hypothesis",
           "peft", "transformers", "bitsandbytes", "torchao", "re2", "ninja", "setuptools"]


def _run(cmd: list[str], timeout: float = 30) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"<{type(exc).__name__}: {exc}>"
    return (proc.stdout + proc.stderr).strip()


def _valid_cuda_home(path: str | None) -> bool:
    return bool(path) and (Path(path) / "include" / "cuda_runtime_api.h").is_file() and (
        Path(path) / "bin" / "nvcc").is_file()


def cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME if valid, else nvcc's own TOP (the nvcc on PATH may be
    a wrapper, which makes torch's guess wrong), else torch's guess, else /usr/local/cuda."""
    candidates: list[str | None] = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = _run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull])
        match = re.search(r"^#\$ TOP=(.+)$", out, re.MULTILINE)
        if match:
            candidates.append(str(Path(match.group(1).strip()).resolve()))
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        candidates.append(CUDA_HOME)
    except Exception:  # torch missing or broken: the other candidates still count
        pass
    candidates.append("/usr/local/cuda")
    return next((c for c in candidates if _valid_cuda_home(c)), None)


def arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST for the visible GPU (compile for it alone: faster builds), or 9.0."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}.{minor}"
    except Exception:  # no usable torch/GPU: the lent machines are Hopper
        pass
    return "9.0"


def env_report() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0], "executable": sys.executable,
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "modules": {m: importlib.util.find_spec(m) is not None for m in MODULES},
        "cuda_home": cuda_home(), "nvcc": shutil.which("nvcc"),
        "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                            "clocks.max.sm,clocks.max.mem", "--format=csv,noheader"])
        if shutil.which("nvidia-smi") else None,
    }
    if info["nvcc"]:
        info["nvcc_version"] = _run([info["nvcc"], "--version"]).splitlines()[-1:]
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                           "memory_bytes": props.total_memory,
                           "multiprocessors": props.multi_processor_count,
                           "l2_bytes": getattr(props, "L2_cache_size", None)}
    except Exception as exc:  # the report must exist even when torch is what is broken
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    for dist in ("torch", "peft", "transformers"):
        try:
            from importlib.metadata import version

            info.setdefault("versions", {})[dist] = version(dist)
        except Exception:
            info.setdefault("versions", {})[dist] = None
    return info


def write_shim(folder: Path) -> None:
    """Make peftreg importable without pip: ``peftreg_plugins`` (plugins/) as a link, and a
    dist-info with pyproject's entry points, so plugin discovery finds the built-in methods.
    Put ``folder`` and the checkout root on PYTHONPATH."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "peftreg_plugins"
    if not link.exists():
        link.symlink_to(ROOT / "plugins", target_is_directory=True)
    info = folder / f"peftreg-{project['version']}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: peftreg\nVersion: {project['version']}\n")
    lines = []
    for group, entries in project.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in entries.items()]
    scripts = project.get("scripts", {})
    if scripts:
        lines.append("[console_scripts]")
        lines += [f"{name} = {target}" for name, target in scripts.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def _junit(path: Path) -> dict[str, Any] | None:
    """Counts and failures of a pytest junit file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[dict[str, str]] = []
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                               "kind": tag, "message": (node.get("message") or "")[:500]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def _goals(name: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for g in data.get("bandwidth", []) or []:
        found.append({"step": name, **g})
    for g in data.get("goals", []) or []:
        # bench_nf4 lists its CPU-era goals on every run; keep those it could measure.
        if not name.startswith("nf4") or g.get("met") is not None:
            found.append({"step": name, **g})
    return found


def summary(work: Path) -> dict[str, Any]:
    steps = []
    tsv = work / "steps.tsv"
    lines = tsv.read_text().splitlines() if tsv.is_file() else []
    for line in lines:
        name, status, rc, seconds, limit, command = (line.split("\t") + [""] * 6)[:6]
        step: dict[str, Any] = {"name": name, "status": status, "rc": int(rc or 0),
                                "seconds": int(seconds or 0), "limit_s": int(limit or 0),
                                "command": command}
        log = work / f"{name}.log"
        if status not in ("ok", "planned") and log.is_file():
            step["log_tail"] = log.read_text(errors="replace").splitlines()[-40:]
        data_path = work / f"{name}.json"
        if data_path.is_file():
            try:
                step["data"] = json.loads(data_path.read_text())
            except ValueError as exc:
                step["data_error"] = str(exc)
        junit = _junit(work / f"{name}.xml")
        if junit is not None:
            step["tests"] = junit
            collected = re.findall(r"(\d+)(?:/\d+)? tests? collected",
                                   log.read_text(errors="replace") if log.is_file() else "")
            if collected:
                junit["collected"] = int(collected[-1])
        steps.append(step)
    goals = [g for s in steps for g in _goals(s["name"], s.get("data") or {})]
    return {"steps": steps, "goals": goals,
            "ok": bool(steps) and all(s["status"] in ("ok", "planned", "skipped")
                                      for s in steps)}


def print_summary(result: dict[str, Any]) -> None:
    print("\nGPU run summary")
    print(f"{'step':24} {'status':10} {'rc':>4} {'s':>5} {'limit':>6}  detail")
    for s in result["steps"]:
        detail = ""
        if "tests" in s:
            t = s["tests"]
            detail = (f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                      f"{t['skipped']} skipped")
            if not t["tests"] and "collected" in t:
                detail = f"{t['collected']} collected (not run)"
        elif s["status"] not in ("ok", "planned") and s.get("log_tail"):
            detail = s["log_tail"][-1][:90]
        elif s["status"] == "skipped":
            detail = s["command"][:90]
        print(f"{s['name']:24} {s['status']:10} {s['rc']:>4} {s['seconds']:>5} "
              f"{s['limit_s']:>6}  {detail}")
    for g in result["goals"]:
        met = {True: "met", False: "NOT met", None: "not measured"}[g.get("met")]
        where = g.get("shape", "")
        ratio = g.get("fraction_of_copy", g.get("ratio"))
        value = "-" if ratio is None else f"{ratio:.2f}"
        print(f"goal [{g['step']}] {g['goal']} {where} {g.get('dtype', '')}: {value} ({met})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env")
    env.add_argument("--out", type=Path, required=True)
    sub.add_parser("cuda-home")
    sub.add_parser("arch-list")
    shim = sub.add_parser("shim")
    shim.add_argument("folder", type=Path)
    summ = sub.add_parser("summary")
    summ.add_argument("--work", type=Path, required=True)
    summ.add_argument("--out", type=Path, required=True)
    summ.add_argument("--print", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "env":
        report = env_report()
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return 0
    if args.command == "cuda-home":
        home = cuda_home()
        print(home or "")
        return 0 if home else 1
    if args.command == "arch-list":
        print(arch_list())
        return 0
    if args.command == "shim":
        write_shim(args.folder)
        return 0
    result = summary(args.work)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)  # a run killed mid-write still leaves the last whole summary
    if args.print:
        print_summary(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
