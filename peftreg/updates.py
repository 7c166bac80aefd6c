# SPDX-License-Identifier: Apache-2.0
"""An adapter as the dense change it makes to each layer's weights, and that change refitted.

A mergeable adapter changes each layer it adapts by some ``dW`` (and ``db``): whatever its
method, merging it into a copy of the base and subtracting the base gives exactly that. Any
method that can express dense updates (``PEFTMethod.fit_updates``; LoRA does, by truncated SVD)
can then stand in for it: this is how a DoRA, IA3, LoHa, ... adapter is served by a LoRA-only
server. The fit reports its relative error per layer and in total, so nothing is lost silently.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftreg.base_access import dense_linear
from peftreg.config import MethodConfig
from peftreg.errors import UnsupportedOperationError
from peftreg.host import AdapterHost, LayerAdapter, iter_slots

if TYPE_CHECKING:
    from peftreg.model import AdaptedModel

__all__ = ["FittedAdapter", "LayerUpdate", "layer_updates", "relative_errors"]


@dataclasses.dataclass(frozen=True)
class LayerUpdate:
    """The change one adapter makes to one layer (float64, on the CPU).

    Attributes:
        weight: ``W_adapted - W_base``, shape ``(out_features, in_features)``.
        bias: ``b_adapted - b_base``, or ``None`` when the layer has no bias.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class FittedAdapter:
    """Dense updates expressed as one method's adapter.

    Attributes:
        config: the new adapter's config.
        tensors: its tensors under peftreg's saved keys.
        fitted: module path -> the update the new adapter makes (to measure the fit).
    """

    config: MethodConfig
    tensors: dict[str, torch.Tensor]
    fitted: dict[str, LayerUpdate]


def layer_updates(model: AdaptedModel, name: str) -> dict[str, LayerUpdate]:
    """The dense update adapter ``name`` makes to every layer it adapts.

    Each layer's base is copied (dequantized when it is 4-bit), the adapter is merged into the
    copy and unmerged again, and the difference taken in float64; the model is not changed.

    Raises:
        UnsupportedOperationError: the adapter's method is not mergeable (prefix or prompt
            tuning change the inputs, not weights), or it adapts a layer that is not linear.
    """
    record = model.record(name)
    if not record.method.capabilities.mergeable:
        raise UnsupportedOperationError(
            f"adapter {name!r} ({record.method.name}) is not mergeable, so it makes no weight "
            "update that another method could express")
    updates: dict[str, LayerUpdate] = {}
    for path, slot in iter_slots(model.model):
        if not isinstance(slot, AdapterHost) or name not in slot.adapters:
            continue
        base = slot.base
        before = _dense_copy(base, path)
        after = copy.deepcopy(before)
        adapter = slot.adapters[name]
        if not isinstance(adapter, LayerAdapter):
            raise UnsupportedOperationError(f"{path}: adapter {name!r} is not a layer adapter")
        with torch.no_grad():
            adapter.merge_into(after)
            dw = after.weight.double() - before.weight.double()
            db = None if before.bias is None else after.bias.double() - before.bias.double()
            adapter.unmerge_from(after)  # the adapter may keep state between the two
        updates[path] = LayerUpdate(dw.cpu(), None if db is None else db.cpu())
    if not updates:
        raise UnsupportedOperationError(f"adapter {name!r} adapts no layer")
    return updates


def _dense_copy(base: nn.Module, path: str) -> nn.Linear:
    if isinstance(base, nn.Linear):
        return copy.deepcopy(base).requires_grad_(False)
    if getattr(base, "peftreg_linear", False):
        return dense_linear(base)
    raise UnsupportedOperationError(
        f"{path}: a {type(base).__name__}, not a linear layer; only linear layers' updates "
        "can be expressed by another method")


def relative_errors(target: Mapping[str, LayerUpdate], fitted: Mapping[str, LayerUpdate]
                    ) -> dict[str, Any]:
    """``||target - fitted|| / ||target||`` (Frobenius, weight and bias together) per layer and
    over all layers; a layer whose target is zero reports the absolute error."""
    layers: dict[str, float] = {}
    num = den = 0.0
    for path, want in target.items():
        got = fitted[path]
        diff = (want.weight - got.weight).square().sum().item()
        size = want.weight.square().sum().item()
        if want.bias is not None:
            fitted_bias = got.bias if got.bias is not None else torch.zeros_like(want.bias)
            diff += (want.bias - fitted_bias).square().sum().item()
            size += want.bias.square().sum().item()
        layers[path] = math.sqrt(diff / size) if size > 0 else math.sqrt(diff)
        num += diff
        den += size
    return {"total": math.sqrt(num / den) if den > 0 else math.sqrt(num), "layers": layers}
