# SPDX-License-Identifier: Apache-2.0
"""Presenting a comparison: rows with intervals, the verdict, results.json and the plot.

``results.json`` (schema ``peftreg-compare``, version 2; docs/compare.md describes every field)
holds the settings, the environment, one entry per run (row and seed) and the summary rows, so
that ``--resume`` can pick up the runs already done and other tools can read the figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from rich.table import Table

from peftreg.compare.baselines import FULL_FINE_TUNING
from peftreg.compare.runs import MethodResult, RunSettings
from peftreg.compare.stats import Interval, interval, rank
from peftreg.compare.sweep import Sweep
from peftreg.errors import PeftregError

__all__ = ["SCHEMA", "SCHEMA_VERSION", "RowSummary", "markdown_table", "read_runs",
           "results_table", "summarize", "sweep_table", "verdict", "write_json", "write_plot",
           "write_sweep_plot"]

SCHEMA = "peftreg-compare"
SCHEMA_VERSION = 2


@dataclasses.dataclass
class RowSummary:
    """One row of the table: a method or baseline over its seeds."""

    row: str
    sweep: str
    kind: str
    distribution: str
    runs: int
    trainable_params: int
    trainable_percent: float
    metric: Interval
    final_loss: Interval
    gap_to_full: float
    step_ms: float
    peak_memory_mb: float
    adapter_bytes: int
    mergeable: bool
    latency_unmerged: float
    latency_merged: float
    notes: str
    errors: list[str]
    forgetting: Interval | None = None


def _median(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else float("nan")


def summarize(results: Sequence[MethodResult]) -> list[RowSummary]:
    """Aggregate runs into rows (in first-seen order), with each row's gap to full
    fine-tuning (its mean metric minus full fine-tuning's)."""
    by_row: dict[tuple[str, str], list[MethodResult]] = {}
    for r in results:
        by_row.setdefault((r.method, r.sweep), []).append(r)
    rows = []
    for (name, sweep), runs in by_row.items():
        ok = [r for r in runs if r.error is None]
        first = ok[0] if ok else runs[0]
        rows.append(RowSummary(
            row=name, sweep=sweep, kind=first.kind, distribution=first.distribution, runs=len(ok),
            trainable_params=first.trainable_params, trainable_percent=first.trainable_percent,
            metric=interval([r.metric for r in ok]),
            final_loss=interval([r.final_loss for r in ok]),
            gap_to_full=float("nan"), step_ms=_median([r.step_ms for r in ok]),
            peak_memory_mb=max((r.peak_memory_mb for r in ok), default=float("nan")),
            adapter_bytes=first.adapter_bytes, mergeable=first.mergeable,
            latency_unmerged=_median([r.latency_ratio_unmerged for r in ok]),
            latency_merged=_median([r.latency_ratio for r in ok]) if first.mergeable
            else float("nan"),
            notes=first.notes, errors=sorted({r.error for r in runs if r.error}),
            forgetting=interval([r.general_loss_change for r in ok])
            if any(not math.isnan(r.general_loss_change) for r in ok) else None))
    # The gap is taken to full fine-tuning at the same sweep value, or to the one full
    # fine-tuning row a config sweep has.
    fulls = {row.sweep: row for row in rows if row.row == FULL_FINE_TUNING and row.runs}
    for row in rows:
        full = fulls.get(row.sweep) or (next(iter(fulls.values())) if len(fulls) == 1 else None)
        if full is not None:
            row.gap_to_full = row.metric.mean - full.metric.mean
    return rows


def _name(r: RowSummary) -> str:
    return f"{r.row} [{r.sweep}]" if r.sweep else r.row


def verdict(rows: Sequence[RowSummary], metric: str) -> tuple[str | None, list[str]]:
    """The clear best method (at a sweep value), or those tied with the best (baselines are
    not ranked)."""
    methods = {_name(r): r.metric for r in rows if r.kind == "method" and r.runs}
    return rank(methods, higher_is_better=metric == "accuracy")


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


_COLUMNS = ("method", "trainable params", "% of model", "ms/step", "peak MiB", "final loss",
            "{metric}", "gap to full FT", "adapter file", "merge", "latency unmerged",
            "latency merged", "notes")


_FORGETTING = "general-text loss change"


def _columns(rows: Sequence[RowSummary]) -> list[str]:
    """The table's columns; the forgetting column only where some row measured it."""
    columns = list(_COLUMNS)
    if any(r.forgetting is not None for r in rows):
        columns.insert(columns.index("gap to full FT") + 1, _FORGETTING)
    return columns


def _cells(r: RowSummary, forgetting: bool = False) -> list[str]:
    cells = _base_cells(r)
    if forgetting:
        where = _COLUMNS.index("gap to full FT") + 1
        cells.insert(where, r.forgetting.format() if r.forgetting is not None and r.runs else "")
    return cells


def _base_cells(r: RowSummary) -> list[str]:
    if not r.runs:
        return [r.row, "failed", "", "", "", "", (r.errors or [""])[0][:60], "", "", "", "",
                "", ""]
    gap = "" if math.isnan(r.gap_to_full) or r.row == FULL_FINE_TUNING else f"{r.gap_to_full:+.3f}"
    merge = "-" if r.kind == "baseline" else ("yes" if r.mergeable else "no")
    name = _name(r) if r.kind == "method" else f"{_name(r)} (baseline)"
    return [name, f"{r.trainable_params:,}", f"{r.trainable_percent:.3f}", f"{r.step_ms:.0f}",
            f"{r.peak_memory_mb:.0f}", r.final_loss.format(), r.metric.format(), gap,
            _size(r.adapter_bytes), merge, _ratio(r.latency_unmerged), _ratio(r.latency_merged),
            r.notes]


def _metric_label(metric: str) -> str:
    return "held-out accuracy" if metric == "accuracy" else "held-out loss"


def results_table(task_name: str, metric: str, base: Interval, rows: Sequence[RowSummary],
                  seeds: int) -> Table:
    """The comparison as a rich table, one row per method or baseline."""
    table = Table(title=f"peftreg compare: {task_name}; mean ± 95% interval over {seeds} "
                        f"seed(s); untrained base {_metric_label(metric)} {base.format()}")
    columns = _columns(rows)
    for col in columns:
        table.add_column(col.format(metric=_metric_label(metric)),
                         justify="left" if col in ("method", "notes") else "right")
    for r in rows:
        # Rich reads "[...]" in a cell as markup: a sweep label ("lora [r=4]") would vanish.
        table.add_row(*(escape(cell) for cell in _cells(r, _FORGETTING in columns)))
    return table


def markdown_table(metric: str, base: Interval, rows: Sequence[RowSummary]) -> str:
    """The same table in Markdown, for a README."""
    columns = _columns(rows)
    header = [c.format(metric=_metric_label(metric)) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(r, _FORGETTING in columns)) + " |" for r in rows]
    base_cells = [""] * len(columns)
    base_cells[0], base_cells[columns.index("{metric}")] = "untrained base", base.format()
    lines.append("| " + " | ".join(base_cells) + " |")
    return "\n".join(lines)


def summary_lines(rows: Sequence[RowSummary], metric: str) -> list[str]:
    """The closing sentences: the verdict and each method's distance to full fine-tuning."""
    winner, tied = verdict(rows, metric)
    by_name = {_name(r): r for r in rows}
    single_seed = any(math.isnan(by_name[t].metric.half_width) for t in tied)
    if len(tied) == 1 or (winner is None and not tied):
        lines = []
    elif single_seed:
        lines = [f"no best {metric} named: one seed gives no intervals (run --seeds 2 or more)"]
    elif winner is not None:
        best = by_name[winner]
        lines = [f"best {metric}: {winner} ({best.metric.format()}); its 95% interval clears "
                 "every other method's"]
    else:
        lines = [f"no clear best {metric}: {', '.join(tied)} are tied within their 95% "
                 f"intervals (best mean: {tied[0]}, {by_name[tied[0]].metric.format()})"]
    for full in (r for r in rows if r.row == FULL_FINE_TUNING and r.runs):
        lines.append(f"{_name(full)}: {full.metric.format()} with "
                     f"{full.trainable_params:,} trainable parameters")
    return lines


def sweep_table(sweep: Sweep, metric: str, rows: Sequence[RowSummary]) -> Table:
    """Methods down, swept values across, the metric with its interval in each cell."""
    table = Table(title=f"{_metric_label(metric)} against {sweep.field} (mean ± 95% interval)")
    table.add_column("method", justify="left")
    labels = [sweep.label(v) for v in sweep.values]
    for value in sweep.values:
        table.add_column(str(value), justify="right")
    cells = {(r.row, r.sweep): r for r in rows}
    for name in dict.fromkeys(r.row for r in rows if r.kind == "method"):
        table.add_row(escape(name), *[cells[(name, label)].metric.format() if (name, label) in cells
                              and cells[(name, label)].runs else "-" for label in labels])
    return table


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend, or None where matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep_plot(path: Path, sweep: Sweep, metric: str, rows: Sequence[RowSummary]) -> bool:
    """The metric against the swept value, one line per method with 95% intervals; False
    when matplotlib is absent."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(figsize=(7, 4.5))
    labels = [sweep.label(v) for v in sweep.values]
    cells = {(r.row, r.sweep): r for r in rows if r.runs}
    for name in dict.fromkeys(r.row for r in rows if r.kind == "method"):
        points = [(i, cells[(name, label)]) for i, label in enumerate(labels)
                  if (name, label) in cells]
        if not points:
            continue
        axes.errorbar([i for i, _ in points], [c.metric.mean for _, c in points],
                      yerr=[0.0 if math.isnan(c.metric.half_width) else c.metric.half_width
                            for _, c in points], marker="o", capsize=4, label=name)
    for full in (r for r in rows if r.row == FULL_FINE_TUNING and r.runs):
        axes.axhline(full.metric.mean, color="grey", linestyle="--",
                     label=f"full fine-tuning [{full.sweep}]" if sweep.changes_data
                     else "full fine-tuning")
    axes.set_xticks(range(len(labels)), [str(v) for v in sweep.values])
    axes.set_xlabel(sweep.field)
    axes.set_ylabel(_metric_label(metric) + " (95% interval)")
    axes.legend(fontsize="small")
    _save(plt, fig, path)
    return True


def _environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor(),
            "threads": torch.get_num_threads()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Interval):
        return {"mean": value.mean, "half_width": value.half_width, "n": value.n}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: Path, task_name: str, metric: str, base_metric: dict[int, float],
               settings: RunSettings, methods: Sequence[str],
               results: Sequence[MethodResult], sweep: Sweep | None = None) -> None:
    """Every figure, the settings and the environment (schema in docs/compare.md)."""
    rows = summarize(results)
    winner, tied = verdict(rows, metric)
    document = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "task": task_name, "metric": metric, "higher_is_better": metric == "accuracy",
        "methods": list(methods),
        "settings": dataclasses.asdict(settings),
        "environment": _environment(),
        "base_metric": {str(k): v for k, v in base_metric.items()},
        "base": _jsonable(interval(list(base_metric.values()))),
        "verdict": {"winner": winner, "tied": tied},
        "sweep": None if sweep is None else {"field": sweep.field,
                                             "values": list(sweep.values)},
        "rows": _jsonable(rows),
        "runs": [dataclasses.asdict(r) for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=True) + "\n")


class ResumeError(PeftregError, ValueError):
    """results.json cannot be resumed from (another schema, task or settings)."""


def read_runs(path: Path, task_name: str, settings: RunSettings,
              sweep: Sweep | None = None) -> list[MethodResult]:
    """The runs of an earlier ``results.json`` made with the same task, settings and sweep
    field (the number of seeds and the swept values may differ: more extend it).

    Raises:
        ResumeError: the file is of another schema, task or settings; the message says which.
    """
    doc = json.loads(path.read_text())
    if doc.get("schema") != SCHEMA or doc.get("schema_version") != SCHEMA_VERSION:
        raise ResumeError(f"{path}: not a {SCHEMA} version {SCHEMA_VERSION} file")
    if doc.get("task") != task_name:
        raise ResumeError(f"{path}: made for task {doc.get('task')!r}, not {task_name!r}")
    ours = dataclasses.asdict(settings)
    theirs = dict(doc.get("settings", {}))
    differ = sorted(k for k in ours if k != "seeds" and theirs.get(k) != ours[k])
    if differ:
        raise ResumeError(f"{path}: made with other settings ({', '.join(differ)}); resume "
                          "with the same options or write to another --out")
    swept = (doc.get("sweep") or {}).get("field")
    if swept != (sweep.field if sweep is not None else None):
        raise ResumeError(f"{path}: made with sweep field {swept!r}, not "
                          f"{sweep.field if sweep is not None else None!r}")
    fields = {f.name for f in dataclasses.fields(MethodResult)}
    return [MethodResult(**{k: v for k, v in run.items() if k in fields})
            for run in doc.get("runs", [])]


def write_plot(path: Path, metric: str, results: Sequence[MethodResult]) -> bool:
    """Mean loss curves, and the metric (with 95% intervals) against trainable parameters;
    False when matplotlib is absent."""
    plt = _pyplot()
    if plt is None:
        return False
    rows = [r for r in summarize(results) if r.runs]
    fig, (curves, scatter) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        runs = [r.losses for r in results
                if r.method == row.row and r.sweep == row.sweep and r.error is None]
        steps = min(len(x) for x in runs)
        mean = [statistics.fmean(x[i] for x in runs) for i in range(steps)]
        window = max(1, steps // 20)
        smooth = [statistics.fmean(mean[max(0, i - window + 1):i + 1]) for i in range(steps)]
        curves.plot(range(1, steps + 1), smooth, label=_name(row),
                    linestyle="--" if row.kind == "baseline" else "-")
    curves.set_xlabel("step")
    curves.set_ylabel("training loss (mean over seeds, moving average)")
    curves.set_title("Training loss")
    curves.legend(fontsize="small")
    for row in rows:
        x = max(row.trainable_params, 1)
        err = 0.0 if math.isnan(row.metric.half_width) else row.metric.half_width
        scatter.errorbar(x, row.metric.mean, yerr=err, fmt="s" if row.kind == "baseline" else "o",
                         capsize=4)
        scatter.annotate(_name(row), (x, row.metric.mean), textcoords="offset points",
                         xytext=(5, 5), fontsize="small")
    scatter.set_xscale("log")
    scatter.set_xlabel("trainable parameters (log scale)")
    scatter.set_ylabel(_metric_label(metric) + " (95% interval)")
    scatter.set_title("Quality against size")
    if metric == "accuracy":
        scatter.axhline(1 / 3, color="grey", linestyle=":", label="chance")
        scatter.legend(fontsize="small")
    _save(plt, fig, path)
    return True
