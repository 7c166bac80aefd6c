# SPDX-License-Identifier: Apache-2.0
"""The ``peftreg compare`` command: choose methods, run them with live progress, report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from peftreg.compare import report
from peftreg.compare.runner import RunSettings, run_comparison
from peftreg.compare.tasks import TASKS
from peftreg.errors import UnknownMethodError
from peftreg.registry import Registry, default_registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    defaults = RunSettings()
    parser.add_argument("--model", choices=sorted(TASKS), default="minilm",
                        help="minilm: MiniLM-L6 tweet sentiment (default); smollm2: SmolLM2-135M "
                             "tweet language modelling")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method names (default: every installed method)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--test-per-class", type=int, default=defaults.test_per_class)
    parser.add_argument("--lr", type=float, default=None,
                        help="one AdamW learning rate for all (default: each method's own)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=Path, default=Path("compare-results"),
                        help="folder for results.json and results.png")


def choose_methods(registry: Registry, requested: str | None) -> list[str]:
    """The requested methods (validated) or every installed one."""
    if not requested:
        return registry.names()
    names = [n.strip() for n in requested.split(",") if n.strip()]
    for name in names:
        registry.get(name)  # raises UnknownMethodError listing what is installed
    if not names:
        raise UnknownMethodError("--methods names no method")
    return names


def run(args: argparse.Namespace, console: Console, registry: Registry | None = None) -> int:
    """Execute ``peftreg compare`` with parsed ``args``."""
    registry = registry or default_registry()
    methods = choose_methods(registry, args.methods)
    settings = RunSettings(steps=args.steps, batch_size=args.batch_size,
                           max_length=args.max_length, seed=args.seed, learning_rate=args.lr,
                           test_per_class=args.test_per_class)
    torch.manual_seed(settings.seed)
    console.print(f"preparing task {args.model!r} for methods: {', '.join(methods)}")
    task = TASKS[args.model](steps=settings.steps, batch_size=settings.batch_size,
                             max_length=settings.max_length, seed=settings.seed,
                             test_per_class=settings.test_per_class)
    started = time.perf_counter()
    with Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        bars = {m: progress.add_task(m, total=settings.steps, loss="-") for m in methods}

        def on_step(method: str, step: int, loss: float) -> None:
            progress.update(bars[method], completed=step, loss=f"{loss:.3f}")

        base_metric, results = run_comparison(task, methods, settings, registry,
                                                            on_step)
    console.print(report.results_table(task.name, task.metric, base_metric, results))
    report.print_summary(console, results, task.metric)
    json_path, png_path = args.out / "results.json", args.out / "results.png"
    report.write_json(json_path, task.name, task.metric, base_metric, settings, results)
    plotted = report.write_plot(png_path, task.metric, results)
    console.print(f"wrote {json_path}" + (f" and {png_path}" if plotted else
                                          " (install matplotlib for the plot)"))
    console.print(f"total time {time.perf_counter() - started:.0f} s")
    return 0 if any(r.error is None for r in results) else 1
