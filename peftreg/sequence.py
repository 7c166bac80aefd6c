# SPDX-License-Identifier: Apache-2.0
"""Keeping a model's call arguments consistent when virtual positions are added.

Prompt tuning adds positions to the input; prefix tuning adds them to the key/value cache. Either
way the attention mask must cover them, and positions passed explicitly (``position_ids``,
``cache_position``, as ``transformers``' generation does) must count them, so that a model run
with and without a generation cache sees the same sequence.
"""

from __future__ import annotations

from typing import Any

import torch

CACHE_KEYS = ("cache", "past_key_values")


def cache_length(kwargs: dict[str, Any]) -> int:
    """Entries already in the key/value cache passed in ``kwargs`` (0 when there is none)."""
    for key in CACHE_KEYS:
        cache = kwargs.get(key)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (list, tuple)) and cache:
            return int(cache[0][0].shape[-2])
    return 0


def extend_inputs(
    kwargs: dict[str, Any],
    n: int,
    *,
    first_step: bool,
    token_shape: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Account for ``n`` virtual positions placed before the tokens.

    Args:
        kwargs: the model's keyword arguments (changed in place and returned).
        n: number of virtual positions.
        first_step: the virtual positions are added to the input in this call (prompt tuning's
            first call): token-level labels get ``n`` leading -100s, token type ids ``n``
            leading zeros, and explicit positions gain the virtual ones. Otherwise (prefix
            tuning, or later generation steps) explicit positions are shifted by ``n``.
        token_shape: (batch, tokens) of the real input, to recognise token-level labels.

    Returns:
        ``kwargs``.
    """
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat((mask.new_ones(mask.shape[0], n), mask), dim=1)
    for key in ("position_ids", "cache_position"):
        positions = kwargs.get(key)
        if positions is None:
            continue
        if first_step:
            lead = torch.arange(n, device=positions.device, dtype=positions.dtype)
            lead = lead.expand(*positions.shape[:-1], n)
            kwargs[key] = torch.cat((lead, positions + n), dim=-1)
        else:
            kwargs[key] = positions + n
    if first_step:
        labels = kwargs.get("labels")
        if labels is not None and token_shape is not None and tuple(labels.shape) == tuple(
            token_shape
        ):
            kwargs["labels"] = torch.cat((labels.new_full((labels.shape[0], n), -100), labels),
                                         dim=1)
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = torch.cat((types.new_zeros(types.shape[0], n), types), dim=1)
    return kwargs
