# SPDX-License-Identifier: Apache-2.0
"""Conformance checks a method author can run against their plugin.

:func:`check_method` adapts a fresh model with the given config and asserts the promises every
method makes through the common API: the adapter starts equal to the base when its paper says
so, training lowers the loss, save and load reproduce outputs exactly, disabling gives the base
outputs, merging (where supported) changes nothing but is not a no-op after training, and the
trainable parameter count equals the method's closed form.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftreg.config import MethodConfig
from peftreg.model import AdaptedModel
from peftreg.registry import Registry, default_registry

Batch = Any
Forward = Callable[[nn.Module, Batch], torch.Tensor]


@dataclasses.dataclass
class ConformanceReport:
    """What :func:`check_method` measured."""

    method: str
    trainable_params: int
    formula_params: int | None
    loss_before: float
    loss_after: float
    max_start_difference: float
    max_merge_difference: float | None


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, *,
                              atol: float, rtol: float, what: str) -> None:
    """``torch.testing.assert_close`` with a message naming what was compared."""
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def _outputs(model: nn.Module, batch: Batch, forward: Forward) -> torch.Tensor:
    with torch.no_grad():
        return forward(model, batch).detach().clone()


def check_method(
    config: MethodConfig,
    make_model: Callable[[], nn.Module],
    batch: Batch,
    forward: Forward,
    loss: Forward,
    *,
    registry: Registry | None = None,
    steps: int = 10,
    lr: float = 1e-2,
    starts_equal: bool = True,
    atol: float = 1e-5,
) -> ConformanceReport:
    """Run every conformance check for ``config`` and return the measurements.

    Args:
        config: the method config under test.
        make_model: builds the same base model (same weights) on every call.
        batch: one input batch, used for training and comparisons.
        forward: returns the output tensor compared between model states.
        loss: returns a scalar loss to minimise.
        registry: where the method comes from (default: installed plugins).
        steps: optimisation steps for the "trains" check.
        lr: AdamW learning rate.
        starts_equal: the method's init makes the adapted model equal to the base exactly.
        atol: tolerance for outputs that should be equal up to rounding (merge).

    Raises:
        AssertionError: a promise is broken; the message says which.
    """
    registry = registry or default_registry()
    method = registry.method_for(config)
    base = make_model().eval()
    base_out = _outputs(base, batch, forward)

    model = AdaptedModel(make_model(), registry=registry)
    formula = method.parameter_count(model.model, config, model.family)
    model.add_adapter("under_test", config)
    model.eval()
    start_out = _outputs(model, batch, forward)
    start_diff = float((start_out - base_out).abs().max())
    if starts_equal:
        assert torch.equal(start_out, base_out), (
            f"{method.name}: the freshly adapted model differs from the base by {start_diff}")

    row = model.summary().rows[0]
    if formula is not None:
        assert row.adapter_params == formula, (
            f"{method.name}: {row.adapter_params} trainable parameters, closed form says "
            f"{formula}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, f"{method.name}: the adapter has no trainable parameters"
    assert sum(p.numel() for p in trainable) == row.params, (
        f"{method.name}: parameters with requires_grad do not match the adapter's own")

    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    losses = []
    for _ in range(steps):
        value = loss(model, batch)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    model.eval()
    assert losses[-1] < losses[0], f"{method.name}: loss did not drop ({losses[0]} -> {losses[-1]})"
    trained_out = _outputs(model, batch, forward)
    assert not torch.equal(trained_out, base_out), f"{method.name}: training changed nothing"

    with model.disable_adapters():
        disabled_out = _outputs(model, batch, forward)
    assert torch.equal(disabled_out, base_out), f"{method.name}: disabled output != base output"

    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter(tmp, "under_test")
        reloaded = AdaptedModel(make_model(), registry=registry)
        reloaded.load_adapter(tmp)
        reloaded.eval()
        assert torch.equal(_outputs(reloaded, batch, forward), trained_out), (
            f"{method.name}: outputs after save and load differ")

    merge_diff = None
    if method.capabilities.mergeable:
        model.merge()
        merged_out = _outputs(model, batch, forward)
        merge_diff = float((merged_out - trained_out).abs().max())
        assert merge_diff <= atol, f"{method.name}: merged output differs by {merge_diff}"
        model.unmerge()
        assert float((_outputs(model, batch, forward) - trained_out).abs().max()) <= atol, (
            f"{method.name}: unmerge did not restore the outputs")

    return ConformanceReport(method.name, row.params, formula, losses[0], losses[-1],
                             start_diff, merge_diff)
