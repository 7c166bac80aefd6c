# SPDX-License-Identifier: Apache-2.0
"""Peak resident memory of this process over a stretch of code, sampled in a thread.

CPU tensors are not visible to ``tracemalloc`` and ``ru_maxrss`` cannot be reset, so the resident
set size is read from ``/proc/self/statm`` every few milliseconds instead (Linux); elsewhere the
figure is the ``ru_maxrss`` high-water mark, which only grows.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from types import TracebackType

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """Current resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.increase`` (bytes above the start)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, resident_bytes())

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = resident_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def increase(self) -> int:
        """Peak resident bytes minus the bytes at the start."""
        return max(0, self.peak - self.start)
