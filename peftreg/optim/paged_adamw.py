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

``state_bits=8`` (issue 17) stores both moments blockwise in 8 bits instead (the dynamic maps of
:mod:`peftreg.optim.quant8`: 256 elements per block, one float32 absmax per block and moment):
about 2.03 bytes of state per element instead of 8. The step decodes a block, updates it in
float32 exactly as the 32-bit step does, updates the parameter from those float32 moments and
encodes them again. ``state_dict()`` still gives torch's layout (decoded float32 moments);
``state_dict(quantized=True)`` gives the codes and absmax themselves, which resume exactly.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, Final, overload

import torch
from torch.optim import Optimizer

from peftreg.errors import ConfigError
from peftreg.ops.paged import PAGE_ALIGN, PagePool, PagingError
from peftreg.optim.quant8 import BLOCK, MAP_NAME, dequantize_blockwise, dynamic_map

__all__ = ["DEFAULT_PAGE_BYTES", "PagedAdamW"]

#: 256 KiB: 32768 elements of both moments per page, small enough that a 5% budget of a
#: LoRA-sized state still holds several pages, large enough that the per-page cost vanishes.
DEFAULT_PAGE_BYTES: Final[int] = 256 * 1024
_STATE_KEYS: Final[tuple[str, str]] = ("exp_avg", "exp_avg_sq")
_DTYPES: Final[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)
# Bytes of one 8-bit block in a page: both moments' codes and their two float32 absmax
# (kQuantBlockBytes in csrc/paged/page_pool.h).
_BLOCK_BYTES: Final[int] = 2 * BLOCK + 2 * 4
_CODE_KEYS: Final[tuple[str, ...]] = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes",
                                      "exp_avg_sq_absmax")


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
            per trainable element, or about 2.03 bytes with ``state_bits=8``, rounded up to
            whole pages), e.g. 0.1. At most one of
            ``budget_bytes`` and ``budget_fraction``. A budget under one page is raised to one.
        page_bytes: bytes per page, a multiple of 4096 (default 256 KiB).
        backing_dir: CPU only: where the backing file goes (default: a temporary directory
            removed at close and at exit).
        state_bits: 32 (float32 moments, the default) or 8 (blockwise 8-bit moments, see the
            module doc; each parameter's state then starts on a 256-element block).

    Raises:
        ValueError: bad hyperparameters, amsgrad, both budgets, mixed devices or dtypes.
        ConfigError: ``state_bits`` is neither 32 nor 8 (a ValueError).
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
        state_bits: int = 32,
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
        if state_bits not in (32, 8):
            raise ConfigError(f"PagedAdamW: state_bits must be 32 or 8, got {state_bits!r}")
        if state_bits == 8 and page_bytes < _BLOCK_BYTES:
            raise ConfigError(f"PagedAdamW: page_bytes {page_bytes} cannot hold one 8-bit block "
                              f"({_BLOCK_BYTES} bytes)")
        self._state_bits = int(state_bits)
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
            if self._state_bits == 8:
                # Blocks must not straddle parameters: a block has one absmax and one update.
                self._total_elements = -(-self._total_elements // BLOCK) * BLOCK
            self._offsets[p] = self._total_elements
            self._total_elements += p.numel()
        if self._pool is not None:
            self._grow_pool()

    @property
    def state_bits(self) -> int:
        """32 (float32 moments) or 8 (blockwise 8-bit moments)."""
        return self._state_bits

    def _per_page(self) -> int:
        """State elements per page (both moments of each)."""
        if self._state_bits == 8:
            return (self._page_bytes // _BLOCK_BYTES) * BLOCK
        return self._page_bytes // 8

    def _pages_needed(self) -> int:
        return max(1, math.ceil(self._total_elements / self._per_page()))

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
        self._qmaps = (dynamic_map(signed=True), dynamic_map(signed=False))
        try:
            if self._state_bits == 8:
                self._pool.set_quant_maps(*self._qmaps)
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
            params, grads, offsets, counters, copies = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                counters.append(state["step"])
                target = p if p.is_contiguous() else p.contiguous()
                if target is not p:
                    copies.append((p, target))
                params.append(target)
                grads.append(p.grad)
                offsets.append(self._offsets[p])
            if not params:
                continue
            # One increment and one read for every counter: per parameter, `+= 1` and `.item()`
            # were most of the step's Python time (192 LoRA tensors: about 1 ms).
            torch._foreach_add_(counters, 1.0)
            steps = torch.cat([c.reshape(1).cpu() for c in counters]).tolist()
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            update = self.pool.adamw8_step if self._state_bits == 8 else self.pool.adamw_step
            update(params, grads, offsets, steps,
                   lr=float(lr.item() if isinstance(lr, torch.Tensor) else lr),
                   beta1=beta1, beta2=beta2, eps=group["eps"],
                   weight_decay=group["weight_decay"], maximize=group["maximize"])
            for p, target in copies:
                p.copy_(target)
        return loss

    # -- state in and out of the pages ------------------------------------------------------

    def _pages_of(self, p: torch.Tensor) -> range:
        per_page = self._per_page()
        start = self._offsets[p]
        last = (start + p.numel() - 1) // per_page if p.numel() else start // per_page
        return range(start // per_page, last + 1)

    def _slices(self, p: torch.Tensor, page: int) -> tuple[int, int, int, int]:
        """(lo, hi) of ``p``'s elements within ``page`` and (lo, hi) within ``p``."""
        per_page = self._per_page()
        start = self._offsets[p]
        lo_abs = max(start, page * per_page)
        hi_abs = min(start + p.numel(), (page + 1) * per_page)
        return lo_abs - page * per_page, hi_abs - page * per_page, lo_abs - start, hi_abs - start

    def _code_views(self, data: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of an 8-bit page (float32 tensor of page_bytes / 4) by _CODE_KEYS."""
        per_page = self._per_page()
        blocks = per_page // BLOCK
        raw = data.view(torch.uint8)
        first = per_page // 2  # float index of the first absmax: after 2 * per_page code bytes
        return {"exp_avg_codes": raw[:per_page], "exp_avg_sq_codes": raw[per_page:2 * per_page],
                "exp_avg_absmax": data[first:first + blocks],
                "exp_avg_sq_absmax": data[first + blocks:first + 2 * blocks]}

    def _read_codes(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The codes (uint8, shaped like ``p``) and absmax (float32, one per block) of ``p``."""
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in _CODE_KEYS}
        for page in self._pages_of(p):
            if not p.numel():
                break
            views = self._code_views(self.pool.read_page(page))
            lo, hi, _, _ = self._slices(p, page)
            for key in ("exp_avg_codes", "exp_avg_sq_codes"):
                parts[key].append(views[key][lo:hi])
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                parts[key].append(views[key][lo // BLOCK:-(-hi // BLOCK)])
        device = p.device
        out = {k: torch.cat(v).to(device) if v else
               torch.zeros(0, dtype=torch.uint8 if k.endswith("codes") else torch.float32,
                           device=device) for k, v in parts.items()}
        for key in ("exp_avg_codes", "exp_avg_sq_codes"):
            out[key] = out[key].reshape(p.shape)
        return out

    def _write_codes(self, p: torch.Tensor, codes: dict[str, torch.Tensor]) -> None:
        blocks = -(-p.numel() // BLOCK)
        flat = {}
        for key in _CODE_KEYS:
            value = codes[key].detach().reshape(-1).to("cpu")
            want = (p.numel(), torch.uint8) if key.endswith("codes") else (blocks, torch.float32)
            if (value.numel(), value.dtype) != want:
                raise ValueError(f"PagedAdamW.load_state_dict: '{key}' has {value.numel()} "
                                 f"{value.dtype} values; its parameter of {p.numel()} elements "
                                 f"needs {want[0]} {want[1]}")
            flat[key] = value
        for page in self._pages_of(p):
            if not p.numel():
                break
            data = self.pool.read_page(page).to("cpu")
            views = self._code_views(data)
            lo, hi, plo, phi = self._slices(p, page)
            for key in ("exp_avg_codes", "exp_avg_sq_codes"):
                views[key][lo:hi] = flat[key][plo:phi]
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                views[key][lo // BLOCK:-(-hi // BLOCK)] = \
                    flat[key][plo // BLOCK:-(-phi // BLOCK)]
            self.pool.write_page(page, data)

    def _dequantize(self, codes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        signed, unsigned = self._qmaps
        return {"exp_avg": dequantize_blockwise(codes["exp_avg_codes"], codes["exp_avg_absmax"],
                                                signed),
                "exp_avg_sq": dequantize_blockwise(codes["exp_avg_sq_codes"],
                                                   codes["exp_avg_sq_absmax"], unsigned)}

    def _read_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """exp_avg and exp_avg_sq of ``p`` (float32, shaped like ``p``), gathered from pages
        (decoded when they are 8-bit)."""
        if self._state_bits == 8:
            return self._dequantize(self._read_codes(p))
        per_page = self._per_page()
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in _STATE_KEYS}
        for page in self._pages_of(p):
            if not p.numel():
                break
            data = self.pool.read_page(page)
            lo, hi, _, _ = self._slices(p, page)
            parts["exp_avg"].append(data[lo:hi])
            parts["exp_avg_sq"].append(data[per_page + lo:per_page + hi])
        return {k: torch.cat(v).reshape(p.shape) if v else torch.zeros(p.shape)
                for k, v in parts.items()}

    def _write_state(self, p: torch.Tensor, values: dict[str, torch.Tensor] | None) -> None:
        """Write ``p``'s float32 moments into its pages (zeros when ``values`` is None),
        encoded when the pages are 8-bit."""
        flat = {k: (torch.zeros(p.numel()) if values is None else
                    values[k].detach().reshape(-1).to("cpu", torch.float32))
                for k in _STATE_KEYS}
        for k, v in flat.items():
            if v.numel() != p.numel():
                raise ValueError(f"PagedAdamW.load_state_dict: '{k}' has {v.numel()} elements "
                                 f"but its parameter has {p.numel()}")
        if self._state_bits == 8:
            m_codes, m_absmax = self.pool.quantize8(flat["exp_avg"], signed=True)
            v_codes, v_absmax = self.pool.quantize8(flat["exp_avg_sq"], signed=False)
            self._write_codes(p, {"exp_avg_codes": m_codes, "exp_avg_absmax": m_absmax,
                                  "exp_avg_sq_codes": v_codes, "exp_avg_sq_absmax": v_absmax})
            return
        per_page = self._per_page()
        for page in self._pages_of(p):
            if not p.numel():
                break
            data = self.pool.read_page(page).to("cpu")
            lo, hi, plo, phi = self._slices(p, page)
            data[lo:hi] = flat["exp_avg"][plo:phi]
            data[per_page + lo:per_page + hi] = flat["exp_avg_sq"][plo:phi]
            self.pool.write_page(page, data)

    def _index_to_param(self) -> dict[int, torch.Tensor]:
        params = [p for group in self.param_groups for p in group["params"]]
        return dict(enumerate(params))

    def state_dict(self, quantized: bool = False) -> dict[str, Any]:
        """``torch.optim.AdamW``'s state-dict layout; moments read from the pages wherever
        they are (float32, on the parameter's device; decoded when ``state_bits=8``).

        Args:
            quantized: ``state_bits=8`` only: this optimizer's own layout instead, the stored
                codes and absmax themselves (``exp_avg_codes`` uint8 shaped like the
                parameter, ``exp_avg_absmax`` float32 per 256 elements, the same for
                ``exp_avg_sq``, plus ``quant_map`` and ``quant_block``), which
                :meth:`load_state_dict` restores exactly.

        Raises:
            ConfigError: ``quantized=True`` with 32-bit states (a ValueError).
        """
        if quantized and self._state_bits != 8:
            raise ConfigError("PagedAdamW.state_dict(quantized=True): this optimizer keeps "
                              "float32 states (state_bits=32); there is nothing quantized")
        out = super().state_dict()
        by_index = self._index_to_param()

        def moments(p: torch.Tensor) -> dict[str, Any]:
            if quantized:
                return {**self._read_codes(p), "quant_map": MAP_NAME, "quant_block": BLOCK}
            return {k: v.to(p.device) for k, v in self._read_state(p).items()}

        # The packed entries are this optimizer's own state dicts: copy before adding to them,
        # and clone the step counters, which are incremented in place (a dict loaded into
        # another optimizer must not share them with this one).
        out["state"] = {
            index: {**{k: v.clone() if isinstance(v, torch.Tensor) else v
                       for k, v in entry.items()},
                    **moments(by_index[index])}
            for index, entry in out["state"].items()
        }
        return out

    def checkpoint_state_dict(self) -> dict[str, Any]:
        """The state dict :func:`~peftreg.optim.save_optimizer` stores: the quantized layout
        with ``state_bits=8`` (exact and 4x smaller), torch's layout otherwise."""
        return self.state_dict(quantized=self._state_bits == 8)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict` in either layout (or from ``torch.optim.AdamW``).

        Float32 moments are encoded when ``state_bits=8``; the quantized layout is copied into
        8-bit pages as is (an exact resume) and decoded into 32-bit ones. Parameters without
        saved state get zero moments and restart their step count.

        Raises:
            ValueError: the dict does not match this optimizer's parameter groups, uses
                AMSGrad, or holds codes of another map or block size.
        """
        state_dict = copy.copy(state_dict)
        saved_state = state_dict.get("state", {})
        moments: dict[int, dict[str, torch.Tensor]] = {}
        codes: dict[int, dict[str, torch.Tensor]] = {}
        rest: dict[int, dict[str, Any]] = {}
        for index, entry in saved_state.items():
            entry = dict(entry)
            if "max_exp_avg_sq" in entry:
                raise ValueError("PagedAdamW.load_state_dict: the dict holds AMSGrad state "
                                 "(max_exp_avg_sq), which PagedAdamW does not support")
            if "exp_avg_codes" in entry:
                quant_map, block = entry.pop("quant_map", None), entry.pop("quant_block", None)
                if quant_map != MAP_NAME or block != BLOCK:
                    raise ValueError(f"PagedAdamW.load_state_dict: state of parameter {index} "
                                     f"is quantized with map {quant_map!r} and block {block!r}; "
                                     f"this version reads {MAP_NAME!r} with block {BLOCK}")
                keys: tuple[str, ...] = _CODE_KEYS
            else:
                keys = _STATE_KEYS
            missing = [k for k in keys if k not in entry]
            if missing:
                raise ValueError(f"PagedAdamW.load_state_dict: state of parameter {index} "
                                 f"lacks {missing}")
            target = codes if keys is _CODE_KEYS else moments
            target[int(index)] = {k: entry.pop(k) for k in keys}
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
            if index in codes and self._state_bits == 8:
                self._write_codes(p, codes[index])
            elif index in codes:
                self._write_state(p, self._dequantize(codes[index]))
            else:
                self._write_state(p, moments.get(index))
