# SPDX-License-Identifier: Apache-2.0
"""Presenting a comparison: live progress, the table, the JSON file and the plot."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from peftreg.compare.runner import MethodResult, RunSettings


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024  # type: ignore[assignment]
    return str(nbytes)


def results_table(task_name: str, metric: str, base_metric: float,
                  results: Sequence[MethodResult]) -> Table:
    """The comparison as a rich table, one row per method."""
    metric_label = "held-out accuracy" if metric == "accuracy" else "held-out loss"
    table = Table(title=f"peftreg compare: {task_name} (base model {metric_label}: "
                        f"{base_metric:.3f})")
    for col, justify in (("method", "left"), ("trainable params", "right"), ("%", "right"),
                         ("ms/step", "right"), ("peak MiB", "right"), ("final loss", "right"),
                         (metric_label, "right"), ("adapter file", "right"),
                         ("merge", "center"), ("latency vs base", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in results:
        if r.error:
            table.add_row(r.method, "[red]failed[/red]", "", "", "", "", r.error[:60], "", "", "")
            continue
        table.add_row(
            r.method, f"{r.trainable_params:,}", f"{r.trainable_percent:.3f}",
            f"{r.step_ms:.0f}", f"{r.peak_memory_mb:.0f}", f"{r.final_loss:.3f}",
            f"{r.metric:.3f}", _size(r.adapter_bytes), "yes" if r.mergeable else "no",
            f"{r.latency_ratio:.2f}x")
    return table


def write_json(path: Path, task_name: str, metric: str, base_metric: float,
               settings: RunSettings, results: Sequence[MethodResult]) -> None:
    """All figures, settings and the environment, for later comparison of runs."""
    document: dict[str, Any] = {
        "task": task_name,
        "metric": metric,
        "base_metric": base_metric,
        "settings": dataclasses.asdict(settings),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "threads": torch.get_num_threads()},
        "results": [dataclasses.asdict(r) for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=True) + "\n")


def write_plot(path: Path, metric: str, results: Sequence[MethodResult]) -> bool:
    """Loss curves and metric against trainable parameters; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    done = [r for r in results if not r.error]
    fig, (curves, scatter) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in done:
        window = max(1, len(r.losses) // 20)
        smooth = [sum(r.losses[max(0, i - window + 1):i + 1]) / len(r.losses[max(0, i - window
                  + 1):i + 1]) for i in range(len(r.losses))]
        curves.plot(range(1, len(smooth) + 1), smooth, label=r.method)
    curves.set_xlabel("step")
    curves.set_ylabel("training loss (moving average)")
    curves.set_title("Training loss")
    curves.legend()
    for r in done:
        scatter.scatter(max(r.trainable_params, 1), r.metric, s=40)
        scatter.annotate(r.method, (max(r.trainable_params, 1), r.metric),
                         textcoords="offset points", xytext=(5, 5))
    scatter.set_xscale("log")
    scatter.set_xlabel("trainable parameters (log scale)")
    scatter.set_ylabel("held-out accuracy" if metric == "accuracy" else "held-out loss")
    scatter.set_title("Quality against size")
    if metric == "accuracy":
        scatter.axhline(1 / 3, color="grey", linestyle=":", label="chance")
        scatter.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def print_summary(console: Console, results: Sequence[MethodResult], metric: str) -> None:
    """One closing line naming the best method."""
    done = [r for r in results if not r.error and not math.isnan(r.metric)]
    if not done:
        return
    best = (max if metric == "accuracy" else min)(done, key=lambda r: r.metric)
    console.print(f"best {metric}: {best.method} ({best.metric:.3f}) with "
                  f"{best.trainable_params:,} trainable parameters")
