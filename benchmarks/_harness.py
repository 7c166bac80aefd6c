# SPDX-License-Identifier: Apache-2.0
"""Shared benchmark plumbing: timing with warm-up and medians, peak memory, tables, JSON.

Timing uses ``torch.utils.benchmark.Timer.blocked_autorange``, which synchronises CUDA, picks a
batch size so each measured block is long enough to time reliably, and reports the median over
blocks (robust to the odd slow run). Results are printed with ``rich`` when it imports, as plain
text otherwise, and written as JSON together with a description of the machine. Candidates
compared with each other are timed side by side (:func:`time_side_by_side`, interleaved rounds).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.benchmark import Timer


@dataclass
class Timing:
    """One measured callable: median and interquartile range in milliseconds."""

    median_ms: float
    iqr_ms: float
    runs: int
    peak_memory_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], device: torch.device, *, warmup: int = 3,
                  min_run_time: float = 0.5) -> Timing:
    """Time ``fn()`` after ``warmup`` untimed calls; on CUDA also record its peak memory."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    measurement = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(
        min_run_time=min_run_time)
    return Timing(median_ms=measurement.median * 1e3, iqr_ms=measurement.iqr * 1e3,
                  runs=len(measurement.times), peak_memory_bytes=peak)


def time_side_by_side(fns: dict[str, Callable[[], object]], device: torch.device, *,
                      min_run_time: float = 0.5, warmup: int = 3) -> dict[str, Timing]:
    """Time several callables interleaved: round after round, each one in turn.

    On a shared machine the load drifts over seconds; timing the candidates one after another
    would fold that drift into their ratio. Here every round times each callable for about
    the same short block, the order rotates between rounds, and each result is the median over
    rounds, so the candidates see the same load.

    Returns:
        name -> :class:`Timing` (per-call median and IQR over rounds).
    """
    names = list(fns)
    per_call: dict[str, float] = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        synchronize(device)
        start = time.perf_counter()
        fns[name]()
        synchronize(device)
        per_call[name] = max(time.perf_counter() - start, 1e-6)
    block = 0.02  # seconds per callable per round
    calls = {n: max(1, int(block / per_call[n])) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    spent, rounds = 0.0, 0
    while spent < min_run_time * len(names) or rounds < 15:
        order = names[rounds % len(names):] + names[:rounds % len(names)]
        for name in order:
            fn, count = fns[name], calls[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(count):
                fn()
            synchronize(device)
            elapsed = time.perf_counter() - start
            spent += elapsed
            times[name].append(elapsed / count)
        rounds += 1
    out = {}
    for name in names:
        ordered = sorted(times[name])
        q1, med, q3 = (ordered[int(f * (len(ordered) - 1))] for f in (0.25, 0.5, 0.75))
        out[name] = Timing(median_ms=med * 1e3, iqr_ms=(q3 - q1) * 1e3, runs=len(ordered))
    return out


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table via rich when available, else aligned plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(str(c))
                  for i, c in enumerate(columns)]
        print(title)
        print("  ".join(str(c).rjust(w) for c, w in zip(columns, widths, strict=True)))
        print("  ".join("-" * w for w in widths))
        for row in rows:
            print("  ".join(str(v).rjust(w) for v, w in zip(row, widths, strict=True)))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    # Pipes and CI logs default to 80 columns, which would wrap every row.
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def fmt_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "-"
    return f"{numerator / denominator:.2f}x"
