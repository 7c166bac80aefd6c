# SPDX-License-Identifier: Apache-2.0
"""The rows every method is measured against: full fine-tuning and head-only training.

Both run with the same data, steps, seeds and held-out set as the methods. Full fine-tuning
trains every weight of the model (AdamW at :data:`FULL_LEARNING_RATE`, the usual rate for
fine-tuning BERT-sized encoders); head-only training (a linear probe) trains just the task's
new head and leaves the pretrained model frozen. Head-only runs only where the task has a head.
The untrained base model's score is reported beside them.
"""

from __future__ import annotations

import torch

from peftreg.compare.runs import MethodResult, RunSettings, StepCallback, train
from peftreg.compare.tasks import Task

__all__ = ["FULL_FINE_TUNING", "HEAD_ONLY", "baseline_rows", "run_baseline"]

FULL_FINE_TUNING = "full fine-tuning"
HEAD_ONLY = "head only"
FULL_LEARNING_RATE = 5e-5
HEAD_LEARNING_RATE = 2e-3
_DISTRIBUTION = "(baseline)"


def baseline_rows(task: Task) -> list[str]:
    """The baselines that apply to ``task``."""
    return [FULL_FINE_TUNING, *([HEAD_ONLY] if task.modules_to_save else [])]


def _is_head(name: str, task: Task) -> bool:
    return any(name == m or name.startswith(m + ".") or f".{m}." in f".{name}"
               for m in task.modules_to_save)


def run_baseline(row: str, task: Task, settings: RunSettings, seed: int,
                 on_step: StepCallback | None = None) -> MethodResult:
    """Train and measure one baseline at one seed; errors are recorded, not raised."""
    full = row == FULL_FINE_TUNING
    lr = settings.learning_rate or (FULL_LEARNING_RATE if full else HEAD_LEARNING_RATE)
    result = MethodResult(row, _DISTRIBUTION, lr, seed=seed, kind="baseline", mergeable=False,
                          latency_ratio=1.0, latency_ratio_unmerged=1.0)
    try:
        model = task.make_model(seed)
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        for name, p in model.named_parameters():
            p.requires_grad_(full or _is_head(name, task))
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"the task has no head named {task.modules_to_save} to train")
        result.trainable_params = sum(p.numel() for p in {id(p): p for p in params}.values())
        result.trainable_percent = 100 * result.trainable_params / total
        result.adapter_bytes = sum(p.numel() * p.element_size() for p in params)
        general_before = task.general_evaluate(model) if task.general_evaluate else None
        train(result, model, params, task, seed, on_step, settings.budget_seconds)
        with torch.no_grad():
            result.metric = task.evaluate(model)
        if task.general_evaluate is not None and general_before is not None:
            result.general_loss_change = task.general_evaluate(model) - general_before
    except (ValueError, RuntimeError, TypeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return result
