# SPDX-License-Identifier: Apache-2.0
"""Means, 95% intervals over seeds, and naming a winner only when the intervals allow it.

Each method runs once per seed; its rows report the mean and a 95% confidence interval of the
mean from Student's t distribution with ``n - 1`` degrees of freedom (``n`` seeds). With one
seed there is no interval (its half-width is NaN) and no winner is named.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence

__all__ = ["Interval", "interval", "rank"]

# Two-sided 95% quantiles of Student's t, t(0.975, df), df = 1..30 (standard tables); above 30
# the normal quantile 1.96 is within 2% of the exact value.
_T975: tuple[float, ...] = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean over seeds with its 95% interval ``[low, high]``.

    Attributes:
        mean: the mean of the values.
        half_width: half the interval's width (NaN with fewer than two values).
        n: how many values.
    """

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def format(self, digits: int = 3) -> str:
        """``0.612 ± 0.021``, or just the mean with one value."""
        if math.isnan(self.half_width):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def interval(values: Sequence[float]) -> Interval:
    """Mean and 95% t-interval of ``values`` (NaN values are left out)."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return Interval(float("nan"), float("nan"), 0)
    mean = statistics.fmean(kept)
    if len(kept) < 2:
        return Interval(mean, float("nan"), len(kept))
    df = len(kept) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    return Interval(mean, t * statistics.stdev(kept) / math.sqrt(len(kept)), len(kept))


def rank(intervals: dict[str, Interval], higher_is_better: bool) -> tuple[str | None, list[str]]:
    """The clear winner, or the names tied with the best.

    The best mean wins only when its interval clears every other interval (no overlap);
    otherwise every name whose interval overlaps the best one's is tied with it.

    Returns:
        ``(winner, [])`` or ``(None, tied names, best mean first)``; ``(None, [])`` without
        intervals to compare.
    """
    scored = {k: v for k, v in intervals.items() if not math.isnan(v.mean)}
    if not scored:
        return None, []
    order = sorted(scored, key=lambda k: scored[k].mean, reverse=higher_is_better)
    best = scored[order[0]]
    if len(order) == 1:
        return (order[0], []) if not math.isnan(best.half_width) else (None, order)
    if any(math.isnan(scored[k].half_width) for k in order):
        return None, order
    if higher_is_better:
        tied = [k for k in order if scored[k].high >= best.low]
    else:
        tied = [k for k in order if scored[k].low <= best.high]
    return (order[0], []) if tied == [order[0]] else (None, tied)
