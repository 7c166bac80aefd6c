# SPDX-License-Identifier: Apache-2.0
"""Showing a comparison while it runs: live bars on a terminal, plain lines in a pipe or log.

Rich's bars redraw in place, which a log file or CI output cannot show, so a comparison piped
elsewhere printed nothing for minutes. :class:`LineProgress` writes one line when each run
starts and one when it ends, with the elapsed time and an estimate of what is left (the mean
time of the runs so far times the runs to go).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from peftreg.compare.runs import MethodResult

__all__ = ["LineProgress", "TerminalProgress", "clock", "observer_for"]


def clock(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``)."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class LineProgress:
    """One line per run started and finished (for pipes, logs and CI)."""

    def __init__(self, console: Console, now: Callable[[], float] | None = None) -> None:
        self.console = console
        self._now = now or time.perf_counter
        self._begin = self._now()
        self._run_started = self._begin
        self._durations: list[float] = []

    def started(self, index: int, total: int, row: str, seed: int) -> None:
        self._run_started = self._now()
        self.console.print(f"[{index}/{total}] {row} seed {seed}: started "
                           f"(elapsed {clock(self._run_started - self._begin)})",
                           highlight=False, markup=False, soft_wrap=True)

    def step(self, row: str, seed: int, step: int, loss: float) -> None:
        return None

    def finished(self, index: int, total: int, result: MethodResult) -> None:
        now = self._now()
        self._durations.append(now - self._run_started)
        left = (total - index) * sum(self._durations) / len(self._durations)
        outcome = (f"failed: {result.error}" if result.error else
                   f"metric {result.metric:.3f}, final loss {result.final_loss:.3f}")
        self.console.print(f"[{index}/{total}] {_label(result)} seed {result.seed}: done in "
                           f"{clock(now - self._run_started)}, {outcome}; elapsed "
                           f"{clock(now - self._begin)}, about {clock(left)} left",
                           highlight=False, markup=False, soft_wrap=True)


class TerminalProgress:
    """Live bars: one for the whole comparison, one for the current run."""

    def __init__(self, console: Console, steps: int) -> None:
        self.steps = steps
        self.bars = Progress(TextColumn("{task.description:<28}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                             TimeElapsedColumn(), console=console, transient=False)
        self._overall: TaskID | None = None
        self._current: TaskID | None = None

    def __enter__(self) -> TerminalProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.__exit__(None, None, None)

    def started(self, index: int, total: int, row: str, seed: int) -> None:
        if self._overall is None:
            self._overall = self.bars.add_task("all runs", total=total, info="")
        self.bars.update(self._overall, completed=index - 1)
        if self._current is not None:
            self.bars.remove_task(self._current)
        self._current = self.bars.add_task(escape(f"{row} seed {seed}"), total=self.steps,
                                           info="")

    def step(self, row: str, seed: int, step: int, loss: float) -> None:
        if self._current is not None:
            self.bars.update(self._current, completed=step, info=f"loss {loss:.3f}")

    def finished(self, index: int, total: int, result: MethodResult) -> None:
        if self._overall is not None:
            self.bars.update(self._overall, completed=index)
        if self._current is not None:
            self.bars.remove_task(self._current)
            self._current = None
        outcome = result.error or f"{result.metric:.3f}"
        self.bars.console.print(f"{_label(result)} seed {result.seed}: {outcome}",
                                highlight=False, markup=False)


def _label(result: MethodResult) -> str:
    """The run's row as the tables name it: with its sweep value, if any."""
    return f"{result.method} [{result.sweep}]" if result.sweep else result.method


def observer_for(console: Console, steps: int) -> LineProgress | TerminalProgress:
    """Bars on a terminal, lines anywhere else."""
    return TerminalProgress(console, steps) if console.is_terminal else LineProgress(console)
