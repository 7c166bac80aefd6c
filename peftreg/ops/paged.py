# SPDX-License-Identifier: Apache-2.0
"""Typed wrapper over the compiled page pool ``torch.classes.peftreg.PagePool`` (issue 7).

A :class:`PagePool` holds float32 optimizer state in fixed-size pages under a resident-bytes
budget for the fast tier (process memory on the CPU, device memory on CUDA). Pages that do not
fit are moved to a backing tier (a file in ``backing_dir`` on the CPU, pinned host memory on
CUDA) least-recently-used first and brought back when accessed. The maths and the residency
rules live in ``csrc/paged/``; this module only normalizes arguments, owns the default
temporary backing directory and turns the pool's errors into :class:`PagingError`.

Page layout used by :meth:`PagePool.adamw_step`: page ``k`` holds elements
``[k * E, (k + 1) * E)`` of a flat state array, ``E = page_bytes // 8`` float32 values of
``exp_avg`` followed by the same elements of ``exp_avg_sq``. Parameters occupy consecutive
ranges of that array, so small parameters share pages and only the last page has slack.

:meth:`PagePool.adamw8_step` reads the same pages as blockwise 8-bit state instead (codes of
both moments and one float32 absmax per 256 elements; layout in ``csrc/paged/page_pool.h``).

There is no plain-PyTorch fallback: without the compiled extension the pool raises
:class:`~peftreg.ops.ExtensionUnavailableError` saying how to build it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import torch

from peftreg import ops
from peftreg.errors import PeftregError

__all__ = ["PAGE_ALIGN", "PagePool", "PagingError", "page_pool_available"]

#: page_bytes must be a multiple of this (file offsets and cache lines stay aligned).
PAGE_ALIGN: Final[int] = 4096
_ERROR_PREFIX: Final[str] = "peftreg paged:"


class PagingError(PeftregError, RuntimeError):
    """The page pool's backing tier failed (unwritable directory, full disk, failed copy).

    Raised before training when the backing tier cannot be set up, and at the failing step
    otherwise; in that case no state is lost (see ``docs/optim.md``).
    """


def page_pool_available(device: str | torch.device = "cpu") -> bool:
    """Whether a compiled page pool can run on ``device`` in this process."""
    if not ops.has_extension():
        return False
    try:
        torch.classes.peftreg.PagePool  # noqa: B018 (lookup raises when not registered)
    except (AttributeError, RuntimeError):
        return False
    device_type = torch.device(device).type
    return device_type == "cpu" or (device_type == "cuda" and ops.built_with_cuda())


def _require_pool() -> None:
    if not ops.has_extension():
        raise ops.ExtensionUnavailableError(
            "peftreg's page pool (PagedAdamW) needs the compiled extension, which is "
            f"unavailable: {ops.extension_error()}"
        )
    if not page_pool_available("cpu"):
        raise ops.ExtensionUnavailableError(
            "the loaded peftreg extension has no page pool (built from older sources); "
            f"to rebuild, {ops.BUILD_HINT}"
        )


def _translated(exc: RuntimeError) -> Exception:
    message = str(exc).split("\nException raised from", 1)[0].strip()
    if _ERROR_PREFIX in message and ("backing" in message or "pin" in message):
        return PagingError(message)
    return RuntimeError(message)


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class PagePool:
    """Paged float32 state with a fast-tier budget, backed by a compiled pool.

    Args:
        page_bytes: bytes per page, a positive multiple of :data:`PAGE_ALIGN`.
        budget_bytes: most bytes of pages resident in the fast tier (at least one page).
        device: ``"cpu"`` or a CUDA device; pages live there while resident.
        backing_dir: CPU only: existing, writable directory for the backing file. None makes a
            temporary directory that is removed when the pool is closed or the process exits.
            The backing file itself is unlinked as soon as it is created, so it never outlives
            the process, even one that is killed.

    Raises:
        ExtensionUnavailableError: no compiled extension (or one without the pool).
        PagingError: the backing directory is missing or not writable.
        ValueError: bad page_bytes or budget_bytes.
    """

    def __init__(self, *, page_bytes: int, budget_bytes: int,
                 device: str | torch.device = "cpu", backing_dir: str | os.PathLike | None = None,
                 ) -> None:
        _require_pool()
        if page_bytes <= 0 or page_bytes % PAGE_ALIGN:
            raise ValueError(f"page_bytes must be a positive multiple of {PAGE_ALIGN}, "
                             f"got {page_bytes}")
        if budget_bytes < page_bytes:
            raise ValueError(f"budget_bytes ({budget_bytes}) must hold at least one page "
                             f"(page_bytes={page_bytes})")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._cleanup: weakref.finalize | None = None
        if self.device.type == "cuda":
            directory = ""  # the backing tier is pinned host memory: no directory
        elif backing_dir is None:
            directory = tempfile.mkdtemp(prefix="peftreg-paged-")
            # finalize runs at close(), at garbage collection and at interpreter exit.
            self._cleanup = weakref.finalize(self, _remove_tree, directory)
        else:
            directory = str(Path(backing_dir).expanduser())
            if not Path(directory).is_dir():
                raise PagingError(f"{_ERROR_PREFIX} the backing directory '{directory}' does "
                                  "not exist or is not a directory")
        self.backing_dir: Path | None = Path(directory) if directory else None
        try:
            self._pool = torch.classes.peftreg.PagePool(str(self.device), int(page_bytes),
                                                        int(budget_bytes), directory)
        except RuntimeError as exc:
            if self._cleanup is not None:
                self._cleanup()
            raise _translated(exc) from None
        self.page_bytes = int(page_bytes)
        self.budget_bytes = int(budget_bytes)
        self.elements_per_page = self.page_bytes // 8

    def add_pages(self, count: int) -> int:
        """Append ``count`` zero pages and return the id of the first.

        Raises:
            PagingError: the backing tier cannot hold the pages that exceed the budget.
        """
        try:
            return int(self._pool.add_pages(int(count)))
        except RuntimeError as exc:
            raise _translated(exc) from None

    def adamw_step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   offsets: Sequence[int], steps: Sequence[float], *, lr: float, beta1: float,
                   beta2: float, eps: float, weight_decay: float, maximize: bool) -> None:
        """One AdamW update of ``params`` in place with state at ``offsets`` of the flat array.

        Args:
            params: contiguous parameters on the pool's device (fp32, bf16 or fp16).
            grads: their gradients (same dtype and shape).
            offsets: first element of each parameter's state in the flat state array.
            steps: each parameter's step count, already incremented (>= 1).
            lr, beta1, beta2, eps, weight_decay, maximize: as in ``torch.optim.AdamW``.

        Raises:
            PagingError: a page-out failed; the step completed with the pages kept resident.
        """
        try:
            self._pool.adamw_step(list(params), list(grads), [int(o) for o in offsets],
                                  [float(s) for s in steps], float(lr), float(beta1),
                                  float(beta2), float(eps), float(weight_decay), bool(maximize))
        except RuntimeError as exc:
            raise _translated(exc) from None

    def adamw8_step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                    offsets: Sequence[int], steps: Sequence[float], *, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float, maximize: bool) -> None:
        """:meth:`adamw_step` over 8-bit pages (blockwise codes and absmax; the layout is in
        ``csrc/paged/page_pool.h``). Needs :meth:`set_quant_maps`; every offset must be a
        multiple of the block size, 256.

        Raises:
            PagingError: a page-out failed; the step completed with the pages kept resident.
        """
        try:
            self._pool.adamw8_step(list(params), list(grads), [int(o) for o in offsets],
                                   [float(s) for s in steps], float(lr), float(beta1),
                                   float(beta2), float(eps), float(weight_decay), bool(maximize))
        except RuntimeError as exc:
            raise _translated(exc) from None

    def set_quant_maps(self, signed_map: torch.Tensor, unsigned_map: torch.Tensor,
                       kernel: str = "auto") -> None:
        """The sorted 256-value maps of ``exp_avg`` (signed) and ``exp_avg_sq`` (unsigned), and
        the CPU kernel of the 8-bit step: ``"auto"`` (the fastest this CPU runs) or one of
        :meth:`quant8_kernels`. Every kernel gives bit-identical results; naming one is for
        tests and benchmarks."""
        try:
            self._pool.set_quant_maps(signed_map.detach().to("cpu", torch.float32),
                                      unsigned_map.detach().to("cpu", torch.float32),
                                      str(kernel))
        except RuntimeError as exc:
            raise ValueError(str(exc).split("\nException raised from", 1)[0]) from None

    def quant8_kernels(self) -> list[str]:
        """The CPU kernels of the 8-bit step this CPU and build run, slowest first
        (``scalar``, ``avx2-gather``, ``avx2``, ``avx512``; chosen by run-time detection)."""
        return list(self._pool.quant8_kernels())

    def quant8_kernel(self) -> str:
        """The kernel the maps set by :meth:`set_quant_maps` use (``""`` before any)."""
        return str(self._pool.quant8_kernel())

    def quantize8(self, x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Blockwise encoding of ``x`` with the signed or unsigned map, by the same encoder as
        the step: (uint8 codes shaped like ``x``, float32 absmax per 256 elements of the
        flattened ``x``), on the CPU."""
        try:
            codes, absmax = self._pool.quantize8(x.detach().to("cpu", torch.float32), bool(signed))
        except RuntimeError as exc:
            raise _translated(exc) from None
        return codes, absmax

    def read_page(self, page: int) -> torch.Tensor:
        """A float32 copy of page ``page`` (``page_bytes // 4`` values) on the pool's device."""
        try:
            return self._pool.read_page(int(page))
        except RuntimeError as exc:
            raise _translated(exc) from None

    def write_page(self, page: int, values: torch.Tensor) -> None:
        """Overwrite page ``page`` with ``page_bytes // 4`` float32 ``values``."""
        try:
            self._pool.write_page(int(page), values.to(self.device, torch.float32))
        except RuntimeError as exc:
            raise _translated(exc) from None

    def counters(self) -> dict[str, int]:
        """Resident and peak resident bytes, pages and bytes moved out and in, and the layout
        (``num_pages``, ``page_bytes``, ``budget_bytes``)."""
        return {str(k): int(v) for k, v in self._pool.counters().items()}

    def reset_peak(self) -> None:
        """Restart ``peak_resident_bytes`` from the current resident bytes."""
        self._pool.reset_peak()

    def describe(self) -> str:
        """Where the fast and backing tiers are, in words."""
        return str(self._pool.describe())

    def inject_write_failure(self, after: int) -> None:
        """Testing hook: let ``after`` page-outs succeed, then fail each with a simulated ENOSPC
        (a negative value turns the fault off)."""
        self._pool.inject_write_failure(int(after))

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return bool(self._pool.closed())

    def close(self) -> None:
        """Free every page and the backing tier (and the temporary backing directory)."""
        self._pool.close()
        if self._cleanup is not None:
            self._cleanup()
