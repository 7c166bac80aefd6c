# SPDX-License-Identifier: Apache-2.0
"""PagedAdamW: ``torch.optim.AdamW`` with its moment estimates in a :class:`PagePool` (issue 7).

The update is torch's AdamW (decoupled weight decay, Loshchilov & Hutter 2019, algorithm 2; bias
correction and eps placement as ``torch.optim.AdamW``), computed by one fused pass per page in
the compiled pool. Both moments are float32 whatever the parameter dtype (torch keeps them in
the parameter's dtype), so bf16 parameters get full-precision state.

Every parameter of every group gets a range of the pool's flat state array when it is added;
a memory spike is survived because pages beyond the fast-tier budget move to the backing tier
(a file on the CPU, pinned host memory on CUDA) and come back when their parameter steps.

``state_dict()`` has the same layout as ``torch.optim.AdamW``'s (``step``, ``exp_avg``,
``exp_avg_sq`` per parameter index, float32 moments), read out of the pages wherever they are,
and ``load_state_dict()`` accepts either optimizer's dict.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, Final, overload

import torch
from torch.optim import Optimizer

from peftreg.ops.paged import PAGE_ALIGN, PagePool, PagingError

__all__ = ["DEFAULT_PAGE_BYTES", "PagedAdamW"]

#: 256 KiB: 32768 elements of both moments per page, small enough that a 5% budget of a
#: LoRA-sized state still holds several pages, large enough that the per-page cost vanishes.
DEFAULT_PAGE_BYTES: Final[int] = 256 * 1024
_STATE_KEYS: Final[tuple[str, str]] = ("exp_avg", "exp_avg_sq")
_DTYPES: Final[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)


class PagedAdamW(Optimizer):
    """AdamW whose float32 moment estimates live in pages under a fast-tier memory budget.

    Args:
        params: parameters or parameter groups, as for ``torch.optim.AdamW``; all on one
            device (CPU or one CUDA device), float32, bfloat16 or float16.
        lr, betas, eps, weight_decay, maximize: as ``torch.optim.AdamW`` (same defaults).
        amsgrad: must be False; AMSGrad is not implemented (refused rather than ignored).
        budget_bytes: most bytes of state pages resident in the fast tier. None (and no
            ``budget_fraction``) means unlimited: nothing is ever paged out.
        budget_fraction: the budget as a fraction of the total state size (two float32 values
            per trainable element, rounded up to whole pages), e.g. 0.1. At most one of
            ``budget_bytes`` and ``budget_fraction``. A budget under one page is raised to one.
        page_bytes: bytes per page, a multiple of 4096 (default 256 KiB).
        backing_dir: CPU only: where the backing file goes (default: a temporary directory
            removed at close and at exit).

    Raises:
        ValueError: bad hyperparameters, amsgrad, both budgets, mixed devices or dtypes.
        PagingError: the backing tier cannot be created or cannot hold the state.
        ExtensionUnavailableError: the compiled extension is not built.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        budget_bytes: int | None = None,
        budget_fraction: float | None = None,
        page_bytes: int = DEFAULT_PAGE_BYTES,
        backing_dir: str | os.PathLike | None = None,
    ) -> None:
        if isinstance(lr, torch.Tensor):
            lr = float(lr.item())
        if not lr >= 0.0:
            raise ValueError(f"PagedAdamW: invalid lr {lr}")
        if not eps >= 0.0:
            raise ValueError(f"PagedAdamW: invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"PagedAdamW: invalid betas {betas}; each must be in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"PagedAdamW: invalid weight_decay {weight_decay}")
        if amsgrad:
            raise ValueError("PagedAdamW: amsgrad=True is not supported (its third state, "
                             "max_exp_avg_sq, is not paged); use torch.optim.AdamW for AMSGrad")
        if budget_bytes is not None and budget_fraction is not None:
            raise ValueError("PagedAdamW: give budget_bytes or budget_fraction, not both")
        if budget_fraction is not None and not 0.0 < budget_fraction:
            raise ValueError(f"PagedAdamW: budget_fraction must be > 0, got {budget_fraction}")
        if page_bytes <= 0 or page_bytes % PAGE_ALIGN:
            raise ValueError(f"PagedAdamW: page_bytes must be a positive multiple of "
                             f"{PAGE_ALIGN}, got {page_bytes}")
        self._budget_bytes = budget_bytes
        self._budget_fraction = budget_fraction
        self._page_bytes = int(page_bytes)
        self._backing_dir = backing_dir
        self._pool: PagePool | None = None
        self._offsets: dict[torch.Tensor, int] = {}
        self._total_elements = 0
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "amsgrad": False, "maximize": maximize}
        super().__init__(params, defaults)
        self._create_pool()

    # -- layout ---------------------------------------------------------------------------

    def _check_param(self, p: torch.Tensor) -> None:
        if p.dtype not in _DTYPES:
            raise ValueError(f"PagedAdamW: a parameter of shape {tuple(p.shape)} has dtype "
                             f"{p.dtype}; expected float32, bfloat16 or float16")
        if p.is_sparse:
            raise ValueError("PagedAdamW: sparse parameters are not supported")
        devices = {q.device for q in self._offsets}
        if devices and p.device not in devices:
            raise ValueError(f"PagedAdamW: all parameters must be on one device; got "
                             f"{p.device} and {next(iter(devices))}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``Optimizer.add_param_group``; also gives the new parameters pages of state."""
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._check_param(p)
            self._offsets[p] = self._total_elements
            self._total_elements += p.numel()
        if self._pool is not None:
            self._grow_pool()

    def _pages_needed(self) -> int:
        per_page = self._page_bytes // 8
        return max(1, math.ceil(self._total_elements / per_page))

    def _create_pool(self) -> None:
        device = next(iter(self._offsets)).device if self._offsets else torch.device("cpu")
        state_bytes = self._pages_needed() * self._page_bytes
        if self._budget_fraction is not None:
            budget = int(self._budget_fraction * state_bytes)
        elif self._budget_bytes is not None:
            budget = int(self._budget_bytes)
        else:
            budget = 2**62  # unlimited: every page stays resident, no backing space is taken
        budget = max(budget, self._page_bytes)
        self._pool = PagePool(page_bytes=self._page_bytes, budget_bytes=budget, device=device,
                              backing_dir=self._backing_dir)
        try:
            self._grow_pool()
        except BaseException:
            self._pool.close()
            raise

    def _grow_pool(self) -> None:
        pool = self.pool
        missing = self._pages_needed() - pool.counters()["num_pages"]
        if missing > 0:
            pool.add_pages(missing)

    @property
    def pool(self) -> PagePool:
        """The page pool holding the moment estimates.

        Raises:
            PagingError: the optimizer has no pool (its construction failed part way).
        """
        if self._pool is None:
            raise PagingError("PagedAdamW has no page pool: its construction did not complete")
        return self._pool

    def counters(self) -> dict[str, int]:
        """The pool's counters: ``resident_bytes``, ``peak_resident_bytes``, ``pages_out``,
        ``pages_in``, ``bytes_out``, ``bytes_in``, ``num_pages``, ``page_bytes``,
        ``budget_bytes``."""
        return self.pool.counters()

    def close(self) -> None:
        """Free the pages and the backing tier now (the optimizer is unusable afterwards)."""
        if self._pool is not None:
            self._pool.close()

    # -- the step -------------------------------------------------------------------------

    # The overloads are the base class's: a closure's loss is returned, no closure gives None.
    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW step over every parameter that has a gradient.

        Raises:
            PagingError: the backing tier failed while making room; the step still completed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, offsets, steps, copies = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["step"] += 1
                target = p if p.is_contiguous() else p.contiguous()
                if target is not p:
                    copies.append((p, target))
                params.append(target)
                grads.append(p.grad)
                offsets.append(self._offsets[p])
                steps.append(float(state["step"].item()))
            if not params:
                continue
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            self.pool.adamw_step(params, grads, offsets, steps,
                                 lr=float(lr.item() if isinstance(lr, torch.Tensor) else lr),
                                 beta1=beta1, beta2=beta2, eps=group["eps"],
                                 weight_decay=group["weight_decay"],
                                 maximize=group["maximize"])
            for p, target in copies:
                p.copy_(target)
        return loss

    # -- state in and out of the pages ------------------------------------------------------

    def _pages_of(self, p: torch.Tensor) -> tuple[int, int, int]:
        per_page = self._page_bytes // 8
        start = self._offsets[p]
        end = start + p.numel()
        return start, start // per_page, (end - 1) // per_page if p.numel() else start // per_page

    def _read_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """exp_avg and exp_avg_sq of ``p`` (float32, shaped like ``p``), gathered from pages."""
        per_page = self._page_bytes // 8
        start, first, last = self._pages_of(p)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in _STATE_KEYS}
        for page in range(first, last + 1):
            data = self.pool.read_page(page)
            lo = max(start, page * per_page) - page * per_page
            hi = min(start + p.numel(), (page + 1) * per_page) - page * per_page
            parts["exp_avg"].append(data[lo:hi])
            parts["exp_avg_sq"].append(data[per_page + lo:per_page + hi])
        return {k: torch.cat(v).reshape(p.shape) if v else torch.zeros(p.shape)
                for k, v in parts.items()}

    def _write_state(self, p: torch.Tensor, values: dict[str, torch.Tensor] | None) -> None:
        """Write ``p``'s moments into its pages (zeros when ``values`` is None)."""
        per_page = self._page_bytes // 8
        start, first, last = self._pages_of(p)
        flat = {k: (torch.zeros(p.numel()) if values is None else
                    values[k].detach().reshape(-1).to("cpu", torch.float32))
                for k in _STATE_KEYS}
        for k, v in flat.items():
            if v.numel() != p.numel():
                raise ValueError(f"PagedAdamW.load_state_dict: '{k}' has {v.numel()} elements "
                                 f"but its parameter has {p.numel()}")
        for page in range(first, last + 1):
            data = self.pool.read_page(page).to("cpu")
            lo_abs = max(start, page * per_page)
            hi_abs = min(start + p.numel(), (page + 1) * per_page)
            lo, hi = lo_abs - page * per_page, hi_abs - page * per_page
            data[lo:hi] = flat["exp_avg"][lo_abs - start:hi_abs - start]
            data[per_page + lo:per_page + hi] = flat["exp_avg_sq"][lo_abs - start:hi_abs - start]
            self.pool.write_page(page, data)

    def _index_to_param(self) -> dict[int, torch.Tensor]:
        params = [p for group in self.param_groups for p in group["params"]]
        return dict(enumerate(params))

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.AdamW``'s state-dict layout; moments read from the pages wherever
        they are (float32, on the parameter's device)."""
        out = super().state_dict()
        by_index = self._index_to_param()
        # The packed entries are this optimizer's own state dicts: copy before adding to them,
        # and clone the step counters, which are incremented in place (a dict loaded into
        # another optimizer must not share them with this one).
        out["state"] = {
            index: {**{k: v.clone() if isinstance(v, torch.Tensor) else v
                       for k, v in entry.items()},
                    **{k: v.to(by_index[index].device)
                                for k, v in self._read_state(by_index[index]).items()}}
            for index, entry in out["state"].items()
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict` (or from ``torch.optim.AdamW``).

        The moments go into the pages as float32; parameters without saved state get zero
        moments and restart their step count.

        Raises:
            ValueError: the dict does not match this optimizer's parameter groups, or uses
                AMSGrad.
        """
        state_dict = copy.copy(state_dict)
        saved_state = state_dict.get("state", {})
        moments: dict[int, dict[str, torch.Tensor]] = {}
        rest: dict[int, dict[str, Any]] = {}
        for index, entry in saved_state.items():
            entry = dict(entry)
            if "max_exp_avg_sq" in entry:
                raise ValueError("PagedAdamW.load_state_dict: the dict holds AMSGrad state "
                                 "(max_exp_avg_sq), which PagedAdamW does not support")
            missing = [k for k in _STATE_KEYS if k not in entry]
            if missing:
                raise ValueError(f"PagedAdamW.load_state_dict: state of parameter {index} "
                                 f"lacks {missing}")
            moments[int(index)] = {k: entry.pop(k) for k in _STATE_KEYS}
            # Cloned: step counters are incremented in place and must not stay shared with
            # the optimizer the dict came from.
            rest[index] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                           for k, v in entry.items()}
        state_dict["state"] = rest
        groups = [dict(g) for g in state_dict.get("param_groups", [])]
        for g in groups:
            if g.get("amsgrad", False):
                raise ValueError("PagedAdamW.load_state_dict: the dict was saved with "
                                 "amsgrad=True, which PagedAdamW does not support")
        state_dict["param_groups"] = groups
        super().load_state_dict(state_dict)
        for index, p in self._index_to_param().items():
            self._write_state(p, moments.get(index))
