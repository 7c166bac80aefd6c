# SPDX-License-Identifier: Apache-2.0
"""Sweeps: the same comparison at several values of one choice a user makes.

``--sweep r=4,8,16,32,64`` (any config field of the methods), ``--sweep
targets=attention,attention+mlp,all-linear`` (which layers the adapter reaches, resolved from
the model family's attention and feed-forward roles), or ``--sweep train-size=100,300,1000``
(training examples; the steps stay the same, so small sets are seen several times). Every value
runs every method over the seeds; the report gives the metric with its interval at each value,
so claims such as "r=8 suffices" or "attention and MLP beat attention alone" can be checked on
the user's own task. The baselines do not depend on a method's config, so a config sweep runs
them once, at the first value; a train-size sweep runs them at every value.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from torch import nn

from peftreg.errors import ConfigError, ModelFamilyError
from peftreg.families import ModelFamily

__all__ = ["TARGET_CHOICES", "Sweep", "SweepError", "parse_sweep", "targets_for"]

TARGET_CHOICES = ("attention", "attention+mlp", "all-linear")
TRAIN_SIZE = "train-size"
TARGETS = "targets"
_ATTENTION_ROLES = ("q", "k", "v", "o")
_MLP_ROLES = ("ffn_up", "ffn_gate", "ffn_down")


class SweepError(ConfigError):
    """A ``--sweep`` option that cannot be run (syntax, field or values)."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One swept choice.

    Attributes:
        field: a method config field, ``"targets"`` or ``"train-size"``.
        values: the values, in the order given.
    """

    field: str
    values: tuple[Any, ...]

    @property
    def changes_data(self) -> bool:
        return self.field == TRAIN_SIZE

    def label(self, value: Any) -> str:
        return f"{self.field}={value}"


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sweep(text: str) -> Sweep:
    """``FIELD=V1,V2,...`` to a :class:`Sweep` (numbers and booleans parsed as JSON).

    Raises:
        SweepError: no ``=``, no values, a repeated value, or a bad ``targets`` /
            ``train-size`` value; the message names it.
    """
    field, sep, rest = text.partition("=")
    values = tuple(_value(v.strip()) for v in rest.split(",") if v.strip())
    if not sep or not field.strip() or not values:
        raise SweepError(f"--sweep {text!r}: expected FIELD=V1,V2,... (e.g. r=4,8,16)")
    field = field.strip()
    if len(set(map(str, values))) != len(values):
        raise SweepError(f"--sweep {text!r}: a value appears twice")
    if field == TARGETS and any(v not in TARGET_CHOICES for v in values):
        raise SweepError(f"--sweep {text!r}: targets are {', '.join(TARGET_CHOICES)}")
    if field == TRAIN_SIZE and not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                       for v in values):
        raise SweepError(f"--sweep {text!r}: train sizes are positive integers")
    return Sweep(field, values)


def targets_for(choice: str, model: nn.Module, family: ModelFamily | None) -> list[str] | str:
    """``target_modules`` for a targets choice on ``model``.

    Raises:
        ModelFamilyError: no family plugin names the model's attention / feed-forward layers.
    """
    if choice == "all-linear":
        return "all-linear"
    roles = family.roles if family is not None else {}
    wanted = _ATTENTION_ROLES + (_MLP_ROLES if choice == "attention+mlp" else ())
    names = [roles[r] for r in wanted if r in roles]
    if not any(r in roles for r in _ATTENTION_ROLES):
        raise ModelFamilyError(
            f"--sweep targets={choice}: no family plugin describes the attention layers of "
            f"{type(model).__name__} (its roles q/k/v/o); sweep target_modules by name instead")
    return list(dict.fromkeys(names))
