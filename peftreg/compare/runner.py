# SPDX-License-Identifier: Apache-2.0
"""Training and measuring each method under identical conditions.

Every method gets a fresh copy of the same pretrained model, its own default config (plus the
task's trainable head), the same batches in the same order, the same seed and AdamW with the
method's suggested learning rate (or one rate for all, if given). A method that fails is
reported with its error and the others still run.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from peftreg.compare.memory import PeakMemory
from peftreg.compare.tasks import Task
from peftreg.errors import PeftregError
from peftreg.io.adapter_dir import read_adapter_dir
from peftreg.model import AdaptedModel
from peftreg.registry import Registry

ProgressCallback = Callable[[str, int, float], None]


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Knobs shared by every method of a comparison.

    Attributes:
        steps: optimisation steps per method.
        batch_size: examples per step.
        max_length: tokens per example (padded/truncated).
        seed: seeds data order, head init and adapter init.
        learning_rate: one AdamW rate for all methods; ``None`` uses each method's
            ``suggested_learning_rate``.
        test_per_class: held-out examples per class.
        latency_repeats: timed forward passes for the latency ratio.
    """

    steps: int = 80
    batch_size: int = 16
    max_length: int = 48
    seed: int = 0
    learning_rate: float | None = None
    test_per_class: int = 100
    latency_repeats: int = 5


@dataclasses.dataclass
class MethodResult:
    """One row of the comparison (times and memory vary between runs; the rest is seeded)."""

    method: str
    distribution: str
    learning_rate: float
    trainable_params: int = 0
    trainable_percent: float = 0.0
    step_ms: float = 0.0
    peak_memory_mb: float = 0.0
    final_loss: float = float("nan")
    losses: list[float] = dataclasses.field(default_factory=list)
    metric: float = float("nan")
    adapter_bytes: int = 0
    mergeable: bool = False
    latency_ratio: float = float("nan")
    error: str | None = None


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


def warm_up(task: Task, steps: int = 2) -> None:
    """Run a few training steps of the base model so the first method is not timed cold."""
    model = task.make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    for batch, _ in zip(task.train_batches(), range(steps), strict=False):
        task.loss(model, batch).backward()
        for p in params:
            p.grad = None


def run_method(name: str, task: Task, settings: RunSettings, registry: Registry,
               on_step: ProgressCallback | None = None) -> MethodResult:
    """Fine-tune and measure one method; errors are recorded in the result, not raised."""
    method = registry.get(name)
    lr = settings.learning_rate or method.suggested_learning_rate
    result = MethodResult(name, registry.source(name).dist, lr,
                          mergeable=method.capabilities.mergeable)
    try:
        _train_and_measure(result, method.config_cls(modules_to_save=list(task.modules_to_save)),
                           task, settings, registry, on_step)
    except (PeftregError, ValueError, RuntimeError, TypeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return result


def _train_and_measure(result: MethodResult, config: object, task: Task,
                       settings: RunSettings, registry: Registry,
                       on_step: ProgressCallback | None) -> None:
    model = AdaptedModel(task.make_model(), registry=registry)
    torch.manual_seed(settings.seed)
    model.add_adapter("compare", config)  # type: ignore[arg-type]
    row = model.summary().rows[0]
    result.trainable_params = row.params
    result.trainable_percent = model.summary().percent(row)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=result.learning_rate)
    model.train()
    torch.manual_seed(settings.seed)  # dropout masks
    with PeakMemory() as peak:
        start = time.perf_counter()
        for step, batch in enumerate(task.train_batches()):
            loss = task.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            result.losses.append(loss.item())
            if on_step is not None:
                on_step(result.method, step + 1, result.losses[-1])
        elapsed = time.perf_counter() - start
    result.step_ms = 1000 * elapsed / max(len(result.losses), 1)
    result.peak_memory_mb = peak.increase / 2**20
    result.final_loss = statistics.fmean(result.losses[-10:])
    model.eval()
    result.metric = task.evaluate(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter(tmp, "compare")
        result.adapter_bytes = read_adapter_dir(tmp, registry).size_on_disk
    if result.mergeable:
        model.merge()
    result.latency_ratio = latency_ratio(model, task.latency_inputs, settings.latency_repeats)


def run_comparison(task: Task, methods: Sequence[str], settings: RunSettings,
                   registry: Registry, on_step: ProgressCallback | None = None
                   ) -> tuple[float, list[MethodResult]]:
    """Run every method of ``methods`` on ``task``.

    Returns:
        The base model's metric and one result per method.
    """
    base = task.make_model().eval()
    base_metric = task.evaluate(base)
    del base
    warm_up(task)
    results = [run_method(name, task, settings, registry, on_step) for name in methods]
    return base_metric, results
