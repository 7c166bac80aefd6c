# SPDX-License-Identifier: Apache-2.0
"""Per-row adapters: one batch whose rows use different LoRA adapters (multi-adapter serving).

S-LoRA (Sheng et al. 2023) and Punica (Chen et al. 2023) serve many LoRA adapters over one base
model by batching requests for different adapters together: the base product is shared, and each
row adds its own low-rank update. :meth:`peftreg.AdaptedModel.per_row_adapters` switches every
:class:`~peftreg.host.AdapterHost` into that mode; each host then computes its base module once
and adds every row's update with one ``peftreg::lora_multi_add`` call (no Python loop over
adapters), or the same maths in plain PyTorch when the compiled kernel is unavailable.

Adapters take part through :meth:`LayerAdapter.low_rank_factors` (LoRA on Linear layers provides
it). A row whose adapter does not adapt a given layer gets the base output there, exactly as if
that adapter ran alone. The mode is for inference: there is no backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from peftreg.errors import UnsupportedOperationError

if TYPE_CHECKING:
    from peftreg.host import AdapterHost

RowNames = tuple[str | None, ...]


def _stacked(host: AdapterHost, names: tuple[str, ...], dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A (n, r_max, in), B (n, out, r_max), scaling (n,))`` of ``names`` on ``host``.

    Lower ranks are zero-padded, which adds exact zeros to the products. The stacks are cached
    on the host and rebuilt when a factor changes (its version counter moves) or the names,
    dtype or device differ.
    """
    factors = []
    for name in names:
        found = host.adapters[name].low_rank_factors()  # type: ignore[operator]
        if found is None:
            raise UnsupportedOperationError(
                f"adapter {name!r} on {type(host.base).__name__} cannot be served per row: only "
                "low-rank (LoRA) adapters on Linear layers can")
        factors.append(found)
    stamp = tuple((id(a), a._version, id(b), b._version, float(s)) for a, b, s in factors)
    key = (names, dtype, device)
    cached = host._row_stack_cache
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
    host._row_stack_cache = (key, stamp, stacks)
    return stacks


def row_index(names: RowNames, on_host: Sequence[str], x: torch.Tensor) -> torch.Tensor:
    """Adapter index per row of ``x`` into ``on_host`` (-1: none), shaped for lora_multi_add.

    ``names`` has one entry per batch element (``x.shape[0]``) or per row of the flattened
    leading dimensions.
    """
    position = {name: k for k, name in enumerate(on_host)}
    index = torch.tensor([position.get(n, -1) if n is not None else -1 for n in names],
                         dtype=torch.int64)
    lead = x.shape[:-1]
    if len(lead) >= 1 and lead[0] == len(names):
        index = index.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)
    elif x[..., 0].numel() == len(names):
        index = index.reshape(lead)
    else:
        raise UnsupportedOperationError(
            f"per-row adapters: {len(names)} adapter names were given but a layer received an "
            f"input of shape {list(x.shape)}: its first dimension (the batch) or its number of "
            "rows must equal the number of names")
    return index.to(x.device)


def per_row_forward(host: AdapterHost, names: RowNames, x: torch.Tensor, *args: Any,
                    **kwargs: Any) -> Any:
    """``host``'s output with every row's own adapter (or none) applied."""
    if host.training:
        raise UnsupportedOperationError(
            "per-row adapters are for inference: call model.eval() first (the batched "
            "multi-adapter op has no backward; train adapters one at a time)")
    if host.merged:
        raise UnsupportedOperationError(
            f"per-row adapters need unmerged weights, but {host.merged} are merged into this "
            "layer; call model.unmerge() first")
    y = host.base(x, *args, **kwargs)
    on_host = tuple(dict.fromkeys(n for n in names if n is not None and n in host.adapters))
    if not on_host:
        return y
    lora_a, lora_b, scaling = _stacked(host, on_host, y.dtype, y.device)
    index = row_index(names, on_host, x)
    xin = x.to(y.dtype)
    from peftreg.ops.adapters import LORA_MULTI_ADD

    with torch.no_grad():
        return LORA_MULTI_ADD.run(y, xin, lora_a, lora_b, scaling, index)
