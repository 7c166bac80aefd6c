# SPDX-License-Identifier: Apache-2.0
"""Shared benchmark plumbing: timing with warm-up and medians, peak memory, tables, JSON.

Timing uses ``torch.utils.benchmark.Timer.blocked_autorange``, which synchronises CUDA, picks a
batch size so each measured block is long enough to time reliably, and reports the median over
blocks (robust to the odd slow run). Results are printed with ``rich`` when it imports, as plain
text otherwise, and written as JSON together with a description of the machine.
"""

from __future__ import annotations

import json
import os
import platform
import sys
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
