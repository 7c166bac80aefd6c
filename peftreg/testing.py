# SPDX-License-Identifier: Apache-2.0
"""Conformance checks a method author can run against their plugin, in their own CI.

:func:`check_method` adapts a fresh model with the given config and checks the promises every
method makes through the common API: the adapter starts equal to the base when its paper says
so, training lowers the loss, save and load reproduce outputs exactly, disabling gives the base
outputs, merging (where supported) changes nothing but is not a no-op after training, and the
trainable parameter count equals the method's closed form. ``checks=ALL_CHECKS`` adds the
checks of :mod:`peftreg.conformance`: gradients against float64 finite differences (or the
author's reference), stacking with a LoRA adapter under the stacking contract, fp32 and bf16,
``.to()`` moves, the state-dict round trip, and ``torch.compile`` where the method claims it.

Every failure raises :class:`ConformanceError` naming the method, the check and the measured
amount; nothing here uses ``assert``, so the checks also run under ``python -O``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import nn

from peftreg.config import MethodConfig
from peftreg.conformance import (
    ALL_CHECKS,
    EXTRA_CHECKS,
    ConformanceError,
    Subject,
    fail,
    outputs,
    run_extra_checks,
)
from peftreg.model import AdaptedModel
from peftreg.registry import Registry, default_registry

__all__ = [
    "ALL_CHECKS",
    "EXTRA_CHECKS",
    "ConformanceError",
    "ConformanceReport",
    "assert_close_to_reference",
    "check_method",
]

Batch = Any
Forward = Callable[[nn.Module, Batch], torch.Tensor]


@dataclasses.dataclass
class ConformanceReport:
    """What :func:`check_method` measured.

    Attributes:
        extra: measurements of the extra checks that ran, by check name (for example the
            largest relative gradient error, or which stacking orders merged).
    """

    method: str
    trainable_params: int
    formula_params: int | None
    loss_before: float
    loss_after: float
    max_start_difference: float
    max_merge_difference: float | None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, *,
                              atol: float, rtol: float, what: str) -> None:
    """Raise :class:`ConformanceError` unless ``actual`` is within ``atol + rtol*|expected|``.

    Raises:
        ConformanceError: with ``check="reference"``, naming ``what`` and the largest error.
    """
    try:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    except AssertionError as exc:
        diff = float((actual.double() - expected.double()).abs().max())
        raise ConformanceError(what, "reference", f"{what}: {exc}", measured=diff,
                               limit=atol) from None


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
    checks: Collection[str] = (),
    reference_loss: Forward | None = None,
) -> ConformanceReport:
    """Run the conformance checks for ``config`` and return the measurements.

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
        checks: extra checks to run, from :data:`ALL_CHECKS` (``"gradients"``,
            ``"stacking"``, ``"dtypes"``, ``"moves"``, ``"state_dict"``, ``"compile"``).
        reference_loss: for ``"gradients"``: the loss computed by the author's reference maths
            on the same adapted model; its autograd gradients are the expected ones (without
            it, float64 central finite differences of ``loss`` are).

    Raises:
        ConformanceError: a promise is broken; ``check`` names it and ``measured`` says by
            how much.
    """
    unknown = sorted(set(checks) - set(ALL_CHECKS))
    if unknown:
        raise ValueError(f"unknown conformance checks {unknown}; known: {', '.join(ALL_CHECKS)}")
    registry = registry or default_registry()
    method = registry.method_for(config)
    name = method.name
    base = make_model().eval()
    base_out = outputs(base, batch, forward)

    model = AdaptedModel(make_model(), registry=registry)
    formula = method.parameter_count(model.model, config, model.family)
    model.add_adapter("under_test", config)
    model.eval()
    start_out = outputs(model, batch, forward)
    start_diff = float((start_out - base_out).abs().max())
    if starts_equal and not torch.equal(start_out, base_out):
        fail(name, "starts_equal", "the freshly adapted model differs from the base",
             start_diff, 0.0)

    row = model.summary().rows[0]
    if formula is not None and row.adapter_params != formula:
        fail(name, "parameter_count", f"{row.adapter_params} trainable parameters, the closed "
             f"form says {formula}", row.adapter_params - formula, 0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        fail(name, "trainable", "the adapter has no trainable parameters")
    counted = sum(p.numel() for p in trainable)
    if counted != row.params:
        fail(name, "trainable", f"{counted} parameters have requires_grad but the adapter owns "
             f"{row.params}", counted - row.params, 0)

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
    if not losses[-1] < losses[0]:
        fail(name, "trains", f"loss did not drop ({losses[0]} -> {losses[-1]})",
             losses[-1] - losses[0], 0.0)
    trained_out = outputs(model, batch, forward)
    if torch.equal(trained_out, base_out):
        fail(name, "trains", "training changed nothing")

    with model.disable_adapters():
        disabled_out = outputs(model, batch, forward)
    if not torch.equal(disabled_out, base_out):
        fail(name, "disable", "disabled output differs from the base output",
             float((disabled_out - base_out).abs().max()), 0.0)

    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter(tmp, "under_test")
        reloaded = AdaptedModel(make_model(), registry=registry)
        reloaded.load_adapter(tmp)
        reloaded.eval()
        reloaded_out = outputs(reloaded, batch, forward)
        if not torch.equal(reloaded_out, trained_out):
            fail(name, "save_load", "outputs after save and load differ",
                 float((reloaded_out - trained_out).abs().max()), 0.0)

    merge_diff = None
    if method.capabilities.mergeable:
        model.merge()
        merge_diff = float((outputs(model, batch, forward) - trained_out).abs().max())
        if merge_diff > atol:
            fail(name, "merge", "merged output differs from the unmerged one", merge_diff, atol)
        model.unmerge()
        unmerge_diff = float((outputs(model, batch, forward) - trained_out).abs().max())
        if unmerge_diff > atol:
            fail(name, "merge", "unmerge did not restore the outputs", unmerge_diff, atol)

    subject = Subject(config=config, make_model=make_model, batch=batch, forward=forward,
                      loss=loss, registry=registry, method=method, starts_equal=starts_equal)
    extra = run_extra_checks(subject, checks, reference_loss=reference_loss)
    return ConformanceReport(name, row.params, formula, losses[0], losses[-1],
                             start_diff, merge_diff, extra)
