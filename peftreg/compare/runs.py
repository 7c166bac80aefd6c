# SPDX-License-Identifier: Apache-2.0
"""What one run of a comparison is: its settings, its result record, and the training loop
that methods and baselines share."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from peftreg.compare.memory import PeakMemory
from peftreg.compare.tasks import Task

__all__ = ["MethodResult", "RunSettings", "StepCallback", "train"]

StepCallback = Callable[[str, int, int, float], None]   # row, seed, step, loss


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Knobs shared by every run of a comparison.

    Attributes:
        steps: optimisation steps per run.
        batch_size: examples per step.
        max_length: tokens per example (padded/truncated).
        seed: the first seed; the data split also follows it.
        seeds: runs per method, with seeds ``seed, seed + 1, ...``.
        learning_rate: one AdamW rate for all methods; ``None`` uses each method's
            ``suggested_learning_rate``.
        test_per_class: held-out examples per class (334 gives 1,002 tweets: a single run's
            accuracy then has a sampling error of at most about 0.016).
        latency_repeats: timed forward passes for the latency ratios.
        baselines: run full fine-tuning and head-only training as rows too.
        budget_seconds: with a time budget, every run trains for this many seconds of wall
            clock instead of ``steps`` steps (methods differ in step time, so they then differ
            in steps); ``None``: the step budget.
        budget_params: size every method with a size field to about this many trainable
            adapter parameters (:mod:`peftreg.compare.budget`); ``None``: their defaults.
    """

    steps: int = 60
    batch_size: int = 16
    max_length: int = 40
    seed: int = 0
    seeds: int = 3
    learning_rate: float | None = None
    test_per_class: int = 334
    latency_repeats: int = 5
    baselines: bool = True
    budget_seconds: float | None = None
    budget_params: int | None = None

    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


@dataclasses.dataclass
class MethodResult:
    """One run: one row (method or baseline) at one seed. Times and memory vary between
    runs; the rest is seeded."""

    method: str
    distribution: str
    learning_rate: float
    seed: int = 0
    kind: str = "method"          # "method", or "baseline" for full fine-tuning and head-only
    trainable_params: int = 0
    trainable_percent: float = 0.0
    step_ms: float = 0.0
    peak_memory_mb: float = 0.0
    final_loss: float = float("nan")
    losses: list[float] = dataclasses.field(default_factory=list)
    metric: float = float("nan")
    adapter_bytes: int = 0
    mergeable: bool = False
    latency_ratio: float = float("nan")           # merged where the method can merge
    latency_ratio_unmerged: float = float("nan")
    notes: str = ""
    sweep: str = ""               # "field=value" in a sweep
    # Language-modelling tasks: held-out loss on general text after training minus before.
    general_loss_change: float = float("nan")
    error: str | None = None


def train(result: MethodResult, model: nn.Module, params: list[torch.nn.Parameter], task: Task,
          seed: int, on_step: StepCallback | None, budget_seconds: float | None = None) -> None:
    """AdamW over ``params`` on the seed's batches (the task's steps, or as many as fit in
    ``budget_seconds``); fills losses, step time and peak memory."""
    optimizer = torch.optim.AdamW(params, lr=result.learning_rate)
    model.train()
    torch.manual_seed(seed)  # dropout masks
    with PeakMemory() as peak:
        start = time.perf_counter()
        batches = task.train_batches(seed) if budget_seconds is None else \
            task.train_batches(seed, 10**9)
        for step, batch in enumerate(batches):
            if budget_seconds is not None and step and time.perf_counter() - start >= \
                    budget_seconds:
                break
            loss = task.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            result.losses.append(loss.item())
            if on_step is not None:
                on_step(result.method, seed, step + 1, result.losses[-1])
        elapsed = time.perf_counter() - start
    result.step_ms = 1000 * elapsed / max(len(result.losses), 1)
    result.peak_memory_mb = peak.increase / 2**20
    result.final_loss = statistics.fmean(result.losses[-10:])
    model.eval()
