# SPDX-License-Identifier: Apache-2.0
"""The trainable-parameter-matched budget: every method sized to about the same parameters.

Methods differ by orders of magnitude in what they train at their defaults (IA3 a few thousand
numbers, LoRA r=8 hundreds of thousands), so a comparison at defaults partly compares sizes. With
``--budget params=N`` each method whose plugin names a size field (``PEFTMethod.size_field``:
LoRA's ``r``, prompt tuning's ``num_virtual_tokens``, ...) gets the value whose closed-form
parameter count (``PEFTMethod.parameter_count``, no allocation) is nearest ``N``. A method
without a size field, or without a closed form, runs at its default and says so.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from peftreg.errors import PeftregError
from peftreg.families import ModelFamily
from peftreg.method import PEFTMethod

__all__ = ["MAX_SIZE", "match_parameters"]

#: The largest size value tried (a rank or a number of virtual tokens).
MAX_SIZE = 4096


def match_parameters(method: PEFTMethod[Any], config: Any, model: nn.Module,
                     family: ModelFamily | None, target: int) -> tuple[Any, str]:
    """``config`` with its size field set so the adapter's parameters are nearest ``target``,
    and a note for the report (the value chosen and the count, or why nothing was matched)."""
    field = method.size_field
    if field is None:
        return config, "not size-matched (the method has no size field)"

    def count(value: int) -> float:
        """The count at ``value``; a size the model cannot take (a rank above its width)
        counts as infinitely large, so the search stays below it."""
        try:
            found = method.parameter_count(model, config.replace(**{field: value}), family)
        except PeftregError:
            return math.inf
        return math.inf if found is None else found

    try:
        closed_form = method.parameter_count(model, config.replace(**{field: 1}), family)
    except PeftregError as exc:
        return config, f"not size-matched ({exc})"
    if closed_form is None:
        return config, "not size-matched (no closed-form parameter count)"
    # Counts grow with the size value: find the first value reaching the target by bisection,
    # then take whichever neighbour is nearer.
    low, high = 1, MAX_SIZE
    while low < high:
        mid = (low + high) // 2
        if count(mid) >= target:
            high = mid
        else:
            low = mid + 1
    candidates = [v for v in (low - 1, low) if v >= 1 and count(v) < math.inf]
    if not candidates:
        return config, "not size-matched (no size fits the model)"
    best = min(candidates, key=lambda v: abs(count(v) - target))
    return config.replace(**{field: best}), \
        f"{field}={best} ({int(count(best)):,} params, matched)"
