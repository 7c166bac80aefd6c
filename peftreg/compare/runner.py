# SPDX-License-Identifier: Apache-2.0
"""Training and measuring each method under identical conditions, once per seed.

Every run gets a fresh copy of the same pretrained model, the same held-out set, and for its
seed the same head initialisation, adapter initialisation and batch order as every other row
of that seed; AdamW uses the method's suggested learning rate (or one rate for all). Besides the
methods, the baselines run under the same conditions (:mod:`peftreg.compare.baselines`). A run
that fails is reported with its error and the others still run.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from peftreg.compare.baselines import baseline_rows, run_baseline
from peftreg.compare.budget import match_parameters
from peftreg.compare.hardware import cpu_compute_dtype
from peftreg.compare.runs import MethodResult, RunSettings, StepCallback, train
from peftreg.compare.sweep import TARGETS, Sweep, SweepError, targets_for
from peftreg.compare.tasks import Task
from peftreg.errors import PeftregError
from peftreg.io.adapter_dir import read_adapter_dir
from peftreg.model import AdaptedModel
from peftreg.registry import Registry


class RunObserver(Protocol):
    """What the command shows while runs go (terminal bars or plain log lines)."""

    def started(self, index: int, total: int, row: str, seed: int) -> None: ...

    def step(self, row: str, seed: int, step: int, loss: float) -> None: ...

    def finished(self, index: int, total: int, result: MethodResult) -> None: ...


def _forward_ms(model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    return 1000 * (time.perf_counter() - start)


def latency_ratio(model: AdaptedModel, inputs: dict[str, torch.Tensor], repeats: int) -> float:
    """Median forward time of the adapted model over that of its base, measured alternately
    on the same model object (adapters disabled for the base) so drift affects both alike."""
    adapted_ms, base_ms = [], []
    _forward_ms(model, inputs)
    for _ in range(repeats):
        with model.disable_adapters():
            base_ms.append(_forward_ms(model, inputs))
        adapted_ms.append(_forward_ms(model, inputs))
    return statistics.median(adapted_ms) / statistics.median(base_ms)


def warm_up(task: Task, seed: int, steps: int = 2) -> None:
    """Run a few training steps of the base model so the first run is not timed cold."""
    model = task.make_model(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    for batch, _ in zip(task.train_batches(seed), range(steps), strict=False):
        task.loss(model, batch).backward()
        for p in params:
            p.grad = None


def method_config(name: str, task: Task, registry: Registry) -> tuple[Any, str]:
    """The method's default config for ``task`` (its head trained alongside), and a note on
    any choice made for this machine."""
    config = registry.get(name).config_cls(modules_to_save=list(task.modules_to_save))
    note = ""
    if getattr(config, "compute_dtype", None) in ("bfloat16", "float16"):
        chosen, why = cpu_compute_dtype(config.compute_dtype)
        if chosen != config.compute_dtype:
            config = config.replace(compute_dtype=chosen)
            note = f"{chosen} compute ({why})"
    return config, note


def _swept(config: Any, sweep: Sweep, value: Any, model: AdaptedModel) -> Any:
    """``config`` with the swept field set to ``value``."""
    field = "target_modules" if sweep.field == TARGETS else sweep.field
    if field not in {f.name for f in dataclasses.fields(config)}:
        raise SweepError(f"{type(config).__name__} has no field {field!r} to sweep")
    if sweep.field == TARGETS:
        value = targets_for(value, model.model, model.family)
    return config.replace(**{field: value})


def run_method(name: str, task: Task, settings: RunSettings, registry: Registry, seed: int,
               on_step: StepCallback | None = None, sweep: Sweep | None = None,
               value: Any = None) -> MethodResult:
    """Fine-tune and measure one method at one seed (at one value of a sweep); errors are
    recorded, not raised."""
    method = registry.get(name)
    lr = settings.learning_rate or method.suggested_learning_rate
    result = MethodResult(name, registry.source(name).dist, lr, seed=seed,
                          mergeable=method.capabilities.mergeable,
                          sweep=sweep.label(value) if sweep is not None else "")
    try:
        config, result.notes = method_config(name, task, registry)
        model = AdaptedModel(task.make_model(seed), registry=registry)
        if sweep is not None and not sweep.changes_data:
            config = _swept(config, sweep, value, model)
        if settings.budget_params is not None:
            config, matched = match_parameters(method, config, model.model, model.family,
                                               settings.budget_params)
            result.notes = "; ".join(n for n in (result.notes, matched) if n)
        torch.manual_seed(seed)
        model.add_adapter("compare", config)
        summary = model.summary()
        result.trainable_params = summary.rows[0].params
        result.trainable_percent = summary.percent(summary.rows[0])
        if task.general_evaluate is not None:
            with model.disable_adapters():
                general_before = task.general_evaluate(model)
        train(result, model, [p for p in model.parameters() if p.requires_grad], task, seed,
              on_step, settings.budget_seconds)
        result.metric = task.evaluate(model)
        if task.general_evaluate is not None:
            result.general_loss_change = task.general_evaluate(model) - general_before
        with tempfile.TemporaryDirectory() as tmp:
            model.save_adapter(tmp, "compare")
            result.adapter_bytes = read_adapter_dir(tmp, registry).size_on_disk
        result.latency_ratio_unmerged = latency_ratio(model, task.latency_inputs,
                                                      settings.latency_repeats)
        if result.mergeable:
            model.merge()
            result.latency_ratio = latency_ratio(model, task.latency_inputs,
                                                 settings.latency_repeats)
        else:
            result.latency_ratio = result.latency_ratio_unmerged
    except (PeftregError, ValueError, RuntimeError, TypeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return result


def base_metrics(task: Task, settings: RunSettings) -> dict[int, float]:
    """The untrained base model's held-out metric at each seed (its new head differs)."""
    return {seed: task.evaluate(task.make_model(seed).eval()) for seed in settings.seed_list()}


def plan(methods: Sequence[str], task: Task, settings: RunSettings, with_baselines: bool = True
         ) -> list[tuple[str, int]]:
    """Every (row, seed) of the comparison, seed-major so partial results cover every row."""
    rows = [*methods, *(baseline_rows(task) if settings.baselines and with_baselines else [])]
    return [(row, seed) for seed in settings.seed_list() for row in rows]


def run_comparison(task: Task, methods: Sequence[str], settings: RunSettings,
                   registry: Registry, observer: RunObserver | None = None,
                   done: Iterable[MethodResult] = (), sweep: Sweep | None = None,
                   value: Any = None, base_metric: dict[int, float] | None = None
                   ) -> tuple[dict[int, float], list[MethodResult]]:
    """Run every method (and baseline) of the comparison at every seed.

    Args:
        task: the task.
        methods: method names.
        settings: shared settings.
        registry: where the methods come from.
        observer: told when each run starts, steps and finishes.
        done: results of an earlier run with the same settings (``--resume``); their
            (row, seed, sweep value) triples are not run again.
        sweep, value: the swept choice and the value of it this comparison runs at (the
            task is already built for a train-size value). A config sweep runs the baselines
            only at its first value, since they do not depend on it.
        base_metric: the untrained base's metric per seed, if already scored (a sweep
            scores it once for all its values).

    Returns:
        The untrained base model's metric per seed, and every result in plan order.
    """
    label = sweep.label(value) if sweep is not None else ""
    kept = {(r.method, r.seed): r for r in done if r.error is None and r.sweep == label}
    if base_metric is None:
        base_metric = base_metrics(task, settings)
    baselines = sweep is None or sweep.changes_data or value == sweep.values[0]
    todo = plan(methods, task, settings, baselines)
    if any(key not in kept for key in todo):
        warm_up(task, settings.seed)
    results = []
    on_step = observer.step if observer is not None else None
    for index, (row, seed) in enumerate(todo, start=1):
        if (row, seed) in kept:
            results.append(kept[(row, seed)])
            continue
        if observer is not None:
            observer.started(index, len(todo), f"{row} [{label}]" if label else row, seed)
        if row in methods:
            result = run_method(row, task, settings, registry, seed, on_step, sweep, value)
        else:
            result = run_baseline(row, task, settings, seed, on_step)
            result.sweep = label
        results.append(result)
        if observer is not None:
            observer.finished(index, len(todo), result)
    return base_metric, results
