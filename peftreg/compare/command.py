# SPDX-License-Identifier: Apache-2.0
"""The ``peftreg compare`` command: choose methods, run them over seeds with progress, report."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
from rich.console import Console

from peftreg.compare import report
from peftreg.compare.progress import TerminalProgress, clock, observer_for
from peftreg.compare.runner import RunObserver, base_metrics, plan, run_comparison
from peftreg.compare.runs import MethodResult, RunSettings
from peftreg.compare.stats import interval
from peftreg.compare.sweep import parse_sweep
from peftreg.compare.tasks import build_task
from peftreg.errors import ConfigError, UnknownMethodError
from peftreg.registry import Registry, default_registry

# The default set: the low-rank, quantized, rescaling and input-side families, few enough that
# `make demo` (these, 3 seeds and the baselines) stays near 12 minutes on a 2-core CPU.
# `--methods all` runs every installed one.
DEFAULT_METHODS = ("lora", "qlora", "ia3", "prompt_tuning")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    defaults = RunSettings()
    parser.add_argument("--model", default="minilm",
                        help="minilm: MiniLM-L6 tweet sentiment (default); smollm2: SmolLM2-135M "
                             "tweet language modelling; a task a plugin registers "
                             "(peftreg_register_tasks); or the path of a local pretrained "
                             "encoder directory (transformers format)")
    parser.add_argument("--task", default=None, metavar="csv:PATH",
                        help="classify your own texts: a CSV with a text and a label column")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method names, or 'all' for every installed method "
                             f"(default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--budget", default="steps", metavar="steps|seconds=N|params=N",
                        help="steps: every run takes --steps steps (default); seconds=N: every "
                             "run trains for N seconds of wall clock; params=N: every method "
                             "is sized to about N trainable parameters (its size field: "
                             "LoRA's r, prompt tuning's num_virtual_tokens, ...)")
    parser.add_argument("--seeds", type=int, default=defaults.seeds,
                        help="runs per method (seeds --seed, --seed + 1, ...); intervals need 2+")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the full fine-tuning and head-only rows")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--test-per-class", type=int, default=defaults.test_per_class)
    parser.add_argument("--lr", type=float, default=None,
                        help="one AdamW learning rate for all (default: each method's own)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--format", choices=("table", "markdown"), default="table",
                        help="how to print the results (markdown: a table for a README)")
    parser.add_argument("--sweep", default=None, metavar="FIELD=V1,V2,...",
                        help="run the comparison at each value of a method config field (e.g. "
                             "r=4,8,16), of targets=attention,attention+mlp,all-linear, or of "
                             "train-size=N1,N2,... (training examples)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in OUT/results.json (same settings) and run "
                             "only the missing ones")
    parser.add_argument("--out", type=Path, default=Path("compare-results"),
                        help="folder for results.json and results.png")


def choose_methods(registry: Registry, requested: str | None) -> list[str]:
    """The requested methods (validated), every installed one for ``all``, or the default set
    (those of it that are installed)."""
    if not requested:
        installed = set(registry.names())
        return [m for m in DEFAULT_METHODS if m in installed] or registry.names()
    if requested.strip() == "all":
        return registry.names()
    names = [n.strip() for n in requested.split(",") if n.strip()]
    for name in names:
        registry.get(name)  # raises UnknownMethodError listing what is installed
    if not names:
        raise UnknownMethodError("--methods names no method")
    return names


def parse_budget(text: str) -> tuple[float | None, int | None]:
    """``steps`` to (None, None), ``seconds=N`` to (N, None), ``params=N`` to (None, N).

    Raises:
        ConfigError: anything else, or N not a positive number (a whole one for params).
    """
    if text == "steps":
        return None, None
    kind, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if kind == "seconds" and number > 0:
        return number, None
    if kind == "params" and number >= 1 and number.is_integer():
        return None, int(number)
    raise ConfigError(f"--budget {text!r}: expected 'steps', 'seconds=N' with N > 0 or "
                      "'params=N' with N a whole number >= 1")


class _Numbered:
    """Numbers the runs of consecutive comparisons (one per sweep value) as one sequence."""

    def __init__(self, inner: RunObserver, offset: int, total: int) -> None:
        self.inner, self.offset, self.total = inner, offset, total

    def started(self, index: int, total: int, row: str, seed: int) -> None:
        self.inner.started(self.offset + index, self.total, row, seed)

    def step(self, row: str, seed: int, step: int, loss: float) -> None:
        self.inner.step(row, seed, step, loss)

    def finished(self, index: int, total: int, result: MethodResult) -> None:
        self.inner.finished(self.offset + index, self.total, result)


def run(args: argparse.Namespace, console: Console, registry: Registry | None = None) -> int:
    """Execute ``peftreg compare`` with parsed ``args``."""
    registry = registry or default_registry()
    methods = choose_methods(registry, args.methods)
    budget_seconds, budget_params = parse_budget(args.budget)
    settings = RunSettings(steps=args.steps, batch_size=args.batch_size,
                           max_length=args.max_length, seed=args.seed, seeds=args.seeds,
                           learning_rate=args.lr, test_per_class=args.test_per_class,
                           baselines=not args.no_baselines,
                           budget_seconds=budget_seconds, budget_params=budget_params)
    torch.manual_seed(settings.seed)
    console.print(f"preparing task {args.model!r} for methods: {', '.join(methods)}; "
                  f"{settings.seeds} seed(s)" + ("" if args.no_baselines else
                                                 ", with full fine-tuning and head-only rows"),
                  highlight=False, markup=False)
    sweep = parse_sweep(args.sweep) if args.sweep else None
    values = sweep.values if sweep is not None else (None,)
    # One task, or one per training-set size; the held-out set is the same in all of them.
    sizes = values if sweep is not None and sweep.changes_data else (None,)
    built = {size: build_task(args.model, args.task, text_column=args.text_column,
                              label_column=args.label_column, registry=registry,
                              steps=settings.steps,
                              batch_size=settings.batch_size, max_length=settings.max_length,
                              seed=settings.seed, test_per_class=settings.test_per_class,
                              train_size=size) for size in sizes}
    tasks = {v: built[v] if v in built else built[None] for v in values}
    task = tasks[values[0]]
    json_path, png_path = args.out / "results.json", args.out / "results.png"
    done = []
    if args.resume and json_path.is_file():
        done = report.read_runs(json_path, task.name, settings, sweep)
        console.print(f"resuming: {sum(r.error is None for r in done)} finished runs kept from "
                      f"{json_path}", highlight=False, markup=False)
    total = sum(len(plan(methods, tasks[v], settings, sweep is None or sweep.changes_data
                         or v == values[0])) for v in values)
    started = time.perf_counter()
    observer = observer_for(console, settings.steps)
    base_metric = base_metrics(task, settings)  # the untrained base, scored once
    results: list[MethodResult] = []
    with observer if isinstance(observer, TerminalProgress) else contextlib.nullcontext():
        for v in values:
            shifted = _Numbered(observer, len(results), total)
            _, part = run_comparison(tasks[v], methods, settings, registry, shifted, done,
                                     sweep, v, base_metric)
            results += part
    rows = report.summarize(results)
    base = interval(list(base_metric.values()))
    if args.format == "markdown":
        console.print(report.markdown_table(task.metric, base, rows), highlight=False,
                      markup=False, soft_wrap=True)
    else:
        console.print(report.results_table(task.name, task.metric, base, rows, settings.seeds))
    if sweep is not None:
        console.print(report.sweep_table(sweep, task.metric, rows))
    for line in report.summary_lines(rows, task.metric):
        console.print(line, highlight=False, markup=False)
    report.write_json(json_path, task.name, task.metric, base_metric, settings, methods, results,
                      sweep)
    plotted = report.write_plot(png_path, task.metric, results)
    if sweep is not None:
        report.write_sweep_plot(args.out / "sweep.png", sweep, task.metric, rows)
    console.print(f"wrote {json_path}" + (f" and {png_path}" if plotted else
                                          " (install matplotlib for the plot)"), markup=False)
    console.print(f"total time {clock(time.perf_counter() - started)}")
    return 0 if any(r.error is None for r in results) else 1
