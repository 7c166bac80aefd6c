# SPDX-License-Identifier: Apache-2.0
"""Opt-in checks that name the adapter and layer behind a non-finite gradient.

A NaN in one LoRA factor spreads to the whole model within a step or two, after which nothing
says where it began. These checks look at each adapter parameter's gradient as it is computed
and report the first bad one by adapter, layer path and parameter name::

    with peftreg.diagnostics.watch_gradients(model) as watch:
        for batch in data:
            loss = model(**batch).loss
            loss.backward()   # raises NonFiniteGradientError naming adapter, layer, step
            ...

They cost one ``isfinite`` reduction per adapter parameter per backward pass, so they are off
unless asked for. Only gradients of adapter parameters are checked (base weights are frozen).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import torch

from peftreg.errors import PeftregError
from peftreg.host import iter_slots

if TYPE_CHECKING:
    from peftreg.model import AdaptedModel

OnError = Literal["raise", "warn", "record"]


class NonFiniteGradientError(PeftregError, FloatingPointError):
    """A gradient of an adapter parameter holds NaN or infinite values."""


@dataclasses.dataclass(frozen=True)
class NonFiniteGradient:
    """One adapter parameter whose gradient was not finite.

    Attributes:
        adapter: adapter name.
        layer: path of the adapted module inside the base model.
        parameter: parameter name inside that adapter's module (``lora_A.weight``).
        nan: number of NaN values.
        inf: number of infinite values.
        step: 1-based backward pass of this parameter (counted by :class:`GradientWatch`;
            ``None`` for a one-off :func:`find_nonfinite_gradients`).
    """

    adapter: str
    layer: str
    parameter: str
    nan: int
    inf: int
    step: int | None = None

    def __str__(self) -> str:
        counts = " and ".join(f"{n} {kind}" for n, kind in ((self.nan, "NaN"), (self.inf, "inf"))
                              if n) or "no"
        when = f" at step {self.step}" if self.step is not None else ""
        return (f"adapter {self.adapter!r} layer {self.layer!r} parameter {self.parameter}: "
                f"{counts} values in gradient{when}")


def adapter_parameters(
    model: AdaptedModel, adapters: list[str] | None = None
) -> Iterator[tuple[str, str, str, torch.nn.Parameter]]:
    """Yield ``(adapter, layer path, parameter name, parameter)`` for every adapter parameter.

    Args:
        model: the adapted model.
        adapters: restrict to these adapter names (default: all).
    """
    wanted = set(model.adapters) if adapters is None else set(adapters)
    for path, slot in iter_slots(model.model):
        for name in slot.adapter_names():
            if name not in wanted:
                continue
            for pname, param in slot.adapter_module(name).named_parameters():
                yield name, path, pname, param


def _finding(adapter: str, layer: str, parameter: str, grad: torch.Tensor,
             step: int | None) -> NonFiniteGradient | None:
    # One reduction in the common, all-finite case; the counts only when something is wrong.
    if bool(torch.isfinite(grad).all()):
        return None
    return NonFiniteGradient(adapter, layer, parameter, int(torch.isnan(grad).sum()),
                             int(torch.isinf(grad).sum()), step)


def find_nonfinite_gradients(model: AdaptedModel,
                             adapters: list[str] | None = None) -> list[NonFiniteGradient]:
    """Every adapter parameter whose current ``.grad`` holds NaN or inf (after ``backward``)."""
    found = []
    for adapter, layer, pname, param in adapter_parameters(model, adapters):
        if param.grad is not None:
            bad = _finding(adapter, layer, pname, param.grad, None)
            if bad is not None:
                found.append(bad)
    return found


def check_gradients(model: AdaptedModel, adapters: list[str] | None = None) -> None:
    """Raise if any adapter parameter's ``.grad`` is not finite.

    Raises:
        NonFiniteGradientError: listing every bad parameter by adapter, layer and name.
    """
    found = find_nonfinite_gradients(model, adapters)
    if found:
        raise NonFiniteGradientError(_message(found))


def _message(found: list[NonFiniteGradient]) -> str:
    if len(found) == 1:
        return str(found[0])
    return f"{len(found)} adapter parameters have non-finite gradients:\n  " + "\n  ".join(
        map(str, found))


class GradientWatch:
    """Checks each adapter parameter's gradient during ``backward`` (see :func:`watch_gradients`).

    Attributes:
        findings: every non-finite gradient seen (also when ``on_error="raise"``).
        steps: backward passes seen per ``(adapter, layer, parameter)``.
    """

    def __init__(self, model: AdaptedModel, *, adapters: list[str] | None = None,
                 on_error: OnError = "raise") -> None:
        if on_error not in ("raise", "warn", "record"):
            raise ValueError(f"on_error must be 'raise', 'warn' or 'record', got {on_error!r}")
        self._model = model
        self._adapters = adapters
        self._on_error = on_error
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.findings: list[NonFiniteGradient] = []
        self.steps: dict[tuple[str, str, str], int] = {}

    def _hook(self, key: tuple[str, str, str]) -> Callable[[torch.Tensor], None]:
        def check(grad: torch.Tensor) -> None:
            step = self.steps.get(key, 0) + 1
            self.steps[key] = step
            bad = _finding(*key, grad, step)
            if bad is None:
                return
            self.findings.append(bad)
            if self._on_error == "raise":
                raise NonFiniteGradientError(str(bad))
            if self._on_error == "warn":
                warnings.warn(str(bad), RuntimeWarning, stacklevel=2)
        return check

    def start(self) -> GradientWatch:
        """Register the hooks on every adapter parameter that requires grad."""
        self.stop()
        for adapter, layer, pname, param in adapter_parameters(self._model, self._adapters):
            if param.requires_grad:
                self._handles.append(param.register_hook(self._hook((adapter, layer, pname))))
        return self

    def stop(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> GradientWatch:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def watch_gradients(model: AdaptedModel, *, adapters: list[str] | None = None,
                    on_error: OnError = "raise") -> GradientWatch:
    """Check every adapter gradient as ``backward`` computes it.

    Use as a context manager (hooks removed on exit) or call ``.start()`` / ``.stop()``.
    Parameters that do not require grad when it starts (inactive or frozen adapters) are not
    watched.

    Args:
        model: the adapted model.
        adapters: restrict to these adapter names (default: all).
        on_error: ``"raise"`` a :class:`NonFiniteGradientError` out of ``backward``, ``"warn"``
            with a ``RuntimeWarning``, or only ``"record"`` in ``findings``.

    Returns:
        The (not yet started) :class:`GradientWatch`.
    """
    return GradientWatch(model, adapters=adapters, on_error=on_error)
