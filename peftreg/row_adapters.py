# SPDX-License-Identifier: Apache-2.0
"""Per-row adapters: one batch whose rows use different LoRA adapters (multi-adapter serving).

S-LoRA (Sheng et al. 2023) and Punica (Chen et al. 2023) serve many LoRA adapters over one base
model by batching requests for different adapters together: the base product is shared, and each
row adds its own low-rank update. :meth:`peftreg.AdaptedModel.per_row_adapters` builds one
:class:`RowPlan` for the batch and hands it to every :class:`~peftreg.host.AdapterHost`; each host
then computes its base module once and adds every row's update with one
``peftreg::lora_multi_add`` call (no Python loop over adapters), or the same maths in plain
PyTorch when the kernel mode says so.

The plan turns the row names into index tensors once per batch: layers that hold the same set of
adapters (usually all of them) share one index, built on the first layer that needs it. Adapters
take part through the :class:`LowRankAdapter` protocol (LoRA on Linear layers implements it). A
row whose adapter does not adapt a given layer gets the base output there, exactly as if that
adapter ran alone.

In training mode the same batch trains every row's adapter at once: the plan sorts the rows by
adapter once per batch, and each layer hands them with its adapters' stacked factors to
``peftreg::lora_grouped_add`` (:mod:`peftreg.ops.lora`): one gather, one GEMM per adapter's
contiguous slice, one scatter, and the mirrored GEMMs in its backward, all in C++. Each adapter
gets the gradient of its own rows only: what training it alone on those rows would give, with
the base computed once for the whole batch instead of once per adapter. The split of the rows
reaches the op as a tensor of counts, so a compiled graph takes any split of a batch.

LoRA dropout (training mode, ``lora_dropout > 0``) applies to each row the dropout of its own
adapter, on the low-rank path's input only, as training that adapter alone does: one draw for
the whole batch, compared against each row's own ``p``, and the op gets ``dropout(x)`` as its
input. Adapters with different ``p``, or none, share one batch; rows of adapters without
dropout keep ``x`` exactly. Without any dropout in the batch none of this runs.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from peftreg.errors import UnsupportedOperationError

if TYPE_CHECKING:
    from peftreg.host import AdapterHost

RowNames = tuple[str | None, ...]
Stacks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@runtime_checkable
class LowRankAdapter(Protocol):
    """An adapter that adds ``scaling * B A x`` to its base output (LoRA)."""

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A (r, in), B (out, r), scaling)``, or None when this layer cannot be batched."""
        ...


# Stacked factors per host, owned here rather than stored on the host: rebuilt when a factor
# changes (its version counter moves) or the adapters, dtype or device differ.
_STACKS: weakref.WeakKeyDictionary[Any, tuple[Any, Any, Stacks]] = weakref.WeakKeyDictionary()


def _factors(host: AdapterHost, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    adapter = host.adapters[name]
    found = adapter.low_rank_factors() if isinstance(adapter, LowRankAdapter) else None
    if found is None:
        raise UnsupportedOperationError(
            f"adapter {name!r} on {type(host.base).__name__} cannot be served per row: only "
            "low-rank (LoRA) adapters on Linear layers can")
    return found


def _stacked(host: AdapterHost, names: tuple[str, ...], dtype: torch.dtype,
             device: torch.device) -> Stacks:
    """``(A (n, r_max, in), B (n, out, r_max), scaling (n,))`` of ``names`` on ``host``.

    Lower ranks are zero-padded, which adds exact zeros to the products.
    """
    factors = [_factors(host, name) for name in names]
    stamp = tuple((id(a), a._version, id(b), b._version, float(s)) for a, b, s in factors)
    key = (names, dtype, device)
    cached = _STACKS.get(host)
    if cached is not None and cached[0] == key and cached[1] == stamp:
        return cached[2]
    r_max = max(a.shape[0] for a, _, _ in factors)
    out_f, in_f = factors[0][1].shape[0], factors[0][0].shape[1]
    with torch.no_grad():
        lora_a = torch.zeros(len(names), r_max, in_f, dtype=dtype, device=device)
        # B is stored as (n, r, out) and passed as its (n, out, r) transposed view: the CPU
        # kernel reads B one rank component (a contiguous output row) at a time.
        lora_bt = torch.zeros(len(names), r_max, out_f, dtype=dtype, device=device)
        for k, (a, b, _) in enumerate(factors):
            lora_a[k, : a.shape[0]] = a.to(dtype)
            lora_bt[k, : b.shape[1]] = b.t().to(dtype)
        lora_b = lora_bt.transpose(1, 2)
        scaling = torch.tensor([float(s) for _, _, s in factors], dtype=torch.float32,
                               device=device)
    stacks = (lora_a, lora_b, scaling)
    _STACKS[host] = (key, stamp, stacks)
    return stacks


class RowPlan:
    """The adapter of every row of one batch, as index tensors built once and shared.

    Args:
        names: one adapter name (or None for the base model) per batch element or per row of
            the flattened leading dimensions.
    """

    def __init__(self, names: RowNames) -> None:
        self.names = names
        self._index: dict[tuple[Any, ...], torch.Tensor] = {}
        self._rows: dict[tuple[Any, ...], tuple[torch.Tensor, list[int]]] = {}
        self._groups: dict[tuple[Any, ...],
                           tuple[torch.Tensor, tuple[str, ...], torch.Tensor]] = {}
        self._dropout: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def adapters_on(self, host: AdapterHost) -> tuple[str, ...]:
        """The plan's adapters that ``host`` holds, in first-use order."""
        return tuple(dict.fromkeys(n for n in self.names if n is not None and n in host.adapters))

    def index(self, on_host: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        """Adapter index per row of ``x`` into ``on_host`` (-1: none), shaped ``x.shape[:-1]``.

        Raises:
            UnsupportedOperationError: neither ``x``'s first dimension nor its row count equals
                the number of names.
        """
        lead = tuple(x.shape[:-1])
        key = (on_host, lead, x.device)
        found = self._index.get(key)
        if found is not None:
            return found
        position = {name: k for k, name in enumerate(on_host)}
        index = torch.tensor([position.get(n, -1) if n is not None else -1 for n in self.names],
                             dtype=torch.int64)
        if len(lead) >= 1 and lead[0] == len(self.names):
            index = index.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)
        elif x[..., 0].numel() == len(self.names):
            index = index.reshape(lead)
        else:
            raise UnsupportedOperationError(
                f"per-row adapters: {len(self.names)} adapter names were given but a layer "
                f"received an input of shape {list(x.shape)}: its first dimension (the batch) "
                "or its number of rows must equal the number of names")
        index = index.to(x.device)
        self._index[key] = index
        return index


    def grouped_rows(self, on_host: tuple[str, ...], x: torch.Tensor
                     ) -> tuple[torch.Tensor, list[int]]:
        """The rows of ``x`` (flattened to ``(rows, features)``) that some adapter of
        ``on_host`` takes, ordered by adapter, and how many each adapter takes (built once per
        batch and input shape): one gather brings every adapter's rows together."""
        key = (on_host, tuple(x.shape[:-1]), x.device)
        found = self._rows.get(key)
        if found is None:
            flat = self.index(on_host, x).reshape(-1)
            taken = (flat >= 0).nonzero().squeeze(1)
            order = torch.argsort(flat[taken], stable=True)
            counts = torch.bincount(flat[taken], minlength=len(on_host)).tolist()
            found = (taken[order], counts)
            self._rows[key] = found
        return found

    def trained_groups(self, on_host: tuple[str, ...], x: torch.Tensor
                       ) -> tuple[torch.Tensor, tuple[str, ...], torch.Tensor]:
        """:meth:`grouped_rows` without the adapters that take no row: the rows, the names of
        the adapters that take some, and their counts as an int64 CPU tensor, the op's
        ``counts`` (built once per batch and shape)."""
        key = ("trained", on_host, tuple(x.shape[:-1]), x.device)
        found = self._groups.get(key)
        if found is None:
            rows, counts = self.grouped_rows(on_host, x)
            kept = [(name, n) for name, n in zip(on_host, counts, strict=True) if n > 0]
            found = (rows, tuple(name for name, _ in kept),
                     torch.tensor([n for _, n in kept], dtype=torch.int64))
            self._groups[key] = found
        return found

    def dropout_rows(self, on_host: tuple[str, ...], ps: tuple[float, ...], x: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's dropout probability (its adapter's entry of ``ps``, 0 for rows of no
        adapter of ``on_host``) and keep scale ``1 / (1 - p)``, shaped ``x.shape[:-1]``, the
        scale in float32 (float64 for float64 ``x``): built once per batch and shape."""
        wide = torch.promote_types(x.dtype, torch.float32)
        key = (on_host, ps, tuple(x.shape[:-1]), x.device, wide)
        found = self._dropout.get(key)
        if found is None:
            index = self.index(on_host, x)
            # The last entry serves index -1 (no adapter here): nothing dropped.
            p = torch.tensor([*ps, 0.0], dtype=torch.float32, device=x.device)
            scale = torch.tensor([1.0 / (1.0 - q) for q in ps] + [1.0], dtype=wide,
                                 device=x.device)
            found = (p[index], scale[index])
            self._dropout[key] = found
        return found


def _dropout_ps(host: AdapterHost, on_host: tuple[str, ...]) -> tuple[float, ...]:
    """The dropout probability of each adapter of ``on_host`` as it runs now (0 in eval mode,
    as for an adapter running alone)."""
    ps = []
    for name in on_host:
        adapter = host.adapters[name]
        ps.append(float(getattr(adapter, "dropout_p", 0.0)) if adapter.training else 0.0)
    return tuple(ps)


def _keep_mask(x: torch.Tensor, p_row: torch.Tensor) -> torch.Tensor:
    """Which elements of ``x`` dropout keeps: each with probability ``1 - p`` of its row, from
    torch's generator (``torch.manual_seed`` makes it reproducible). Drawn in float32 whatever
    ``x``'s dtype, so that a 16-bit ``x`` does not coarsen the probability."""
    draw = torch.rand(x.shape, dtype=torch.float32, device=x.device)
    return draw >= p_row.unsqueeze(-1)


def _row_dropout(plan: RowPlan, on_host: tuple[str, ...], ps: tuple[float, ...],
                 x: torch.Tensor) -> torch.Tensor:
    """Inverted dropout of ``x`` with each row's own adapter's ``p``: kept values times
    ``1 / (1 - p)`` (rounded once, as an adapter alone multiplies by that number), dropped ones
    zero. Autograd keeps only the boolean mask for the backward."""
    p_row, scale_row = plan.dropout_rows(on_host, ps, x)
    keep = _keep_mask(x, p_row)
    scaled = (x.to(scale_row.dtype) * scale_row.unsqueeze(-1)).to(x.dtype)
    return torch.where(keep, scaled, torch.zeros((), dtype=x.dtype, device=x.device))


def _trainable_stacks(host: AdapterHost, names: tuple[str, ...], dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A (n, r_max, in), B (n, out, r_max), scaling (n,))`` of ``names``, stacked inside the
    graph so that each adapter's slice of the op's gradient flows back to its own factors.
    Lower ranks are zero-padded (exact zeros in the products; their gradient slice is dropped
    by the padding's backward)."""
    factors = []
    for name in names:
        a, b, scaling = _factors(host, name)
        factors.append((a.to(dtype), b.to(dtype), scaling))
    r_max = max(a.shape[0] for a, _, _ in factors)
    pad = torch.nn.functional.pad
    lora_a = torch.stack([a if a.shape[0] == r_max else pad(a, (0, 0, 0, r_max - a.shape[0]))
                          for a, _, _ in factors])
    lora_b = torch.stack([b if b.shape[1] == r_max else pad(b, (0, r_max - b.shape[1]))
                          for _, b, _ in factors])
    scalings = torch.tensor([float(s) for _, _, s in factors], dtype=torch.float32,
                            device=lora_a.device)
    return lora_a, lora_b, scalings


def _trainable_update(host: AdapterHost, plan: RowPlan, on_host: tuple[str, ...],
                      x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` plus each row's own LoRA update, differentiable in every adapter's factors.

    The plan's rows, sorted by adapter once per batch, go to ``peftreg::lora_grouped_add``
    (one GEMM per adapter slice, and the mirrored GEMMs in its backward, in C++) with the
    factors of the adapters that have rows here; adapters without rows in this batch take no
    part, so they get no gradient at all (an optimizer's weight decay leaves them alone).
    With dropout, the op's input is each row's own dropout of ``x`` (:func:`_row_dropout`)."""
    rows, names, counts = plan.trained_groups(on_host, x)
    if rows.numel() == 0:
        return y
    dtype = _factors(host, names[0])[0].dtype
    lora_a, lora_b, scaling = _trainable_stacks(host, names, dtype)
    from peftreg.ops.lora import LORA_GROUPED_ADD

    x_lora = x.to(dtype)
    ps = _dropout_ps(host, on_host)
    if any(ps):
        x_lora = _row_dropout(plan, on_host, ps, x_lora)
    out, _u = LORA_GROUPED_ADD.run(y.to(dtype), x_lora, lora_a, lora_b, scaling, rows, counts)
    return out.to(y.dtype)


def per_row_forward(host: AdapterHost, plan: RowPlan, x: torch.Tensor, *args: Any,
                    **kwargs: Any) -> Any:
    """``host``'s output with every row's own adapter (or none) applied."""
    if host.merged:
        raise UnsupportedOperationError(
            f"per-row adapters need unmerged weights, but {host.merged} are merged into this "
            "layer; call model.unmerge() first")
    y = host.base(x, *args, **kwargs)
    on_host = plan.adapters_on(host)
    if not on_host:
        return y
    if torch.is_grad_enabled() and any(t.requires_grad for name in on_host
                                       for t in _factors(host, name)[:2]):
        return _trainable_update(host, plan, on_host, x, y)
    lora_a, lora_b, scaling = _stacked(host, on_host, y.dtype, y.device)
    index = plan.index(on_host, x)
    xin = x.to(y.dtype)
    ps = _dropout_ps(host, on_host)
    if any(ps):
        # Training mode without gradients: the dropout an adapter alone applies there too
        # (lora_multi_add reads x only for the low-rank products).
        xin = _row_dropout(plan, on_host, ps, xin)
    from peftreg.ops.adapters import LORA_MULTI_ADD

    with torch.no_grad():
        return LORA_MULTI_ADD.run(y, xin, lora_a, lora_b, scaling, index)
