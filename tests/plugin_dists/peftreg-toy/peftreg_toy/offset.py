"""Offset tuning: learn one vector added to the output of each targeted Linear layer.

It is the smallest useful method (a cousin of BitFit, Ben Zaken et al. 2022): every adapted
Linear gets ``out_features`` trainable numbers, initialised to zero so the model starts equal to
the base, and merging folds them into the layer's bias.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

import peftreg


@dataclasses.dataclass
class OffsetConfig(peftreg.TargetedConfig):
    """Config of an offset adapter.

    Attributes:
        init_scale: standard deviation of the initial offsets (0 keeps the base model exact).
    """

    method: ClassVar[str] = "offset"

    init_scale: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.init_scale < 0:
            raise self.error("init_scale", "must be >= 0", self.init_scale)


class Offset(peftreg.LayerAdapter):
    """The per-layer part: one vector, added after the base Linear."""

    def __init__(self, base: nn.Linear, init_scale: float) -> None:
        super().__init__()
        self.offset = nn.Parameter(
            torch.randn(base.out_features, dtype=base.weight.dtype) * init_scale)

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.offset

    def merge_into(self, base: nn.Module) -> None:
        if base.bias is None:
            raise peftreg.UnsupportedOperationError("offset needs a bias to merge into")
        base.bias += self.offset

    def unmerge_from(self, base: nn.Module) -> None:
        base.bias -= self.offset


def _defaults(family: peftreg.ModelFamily | None) -> list[str] | None:
    """Without target_modules, adapt the feed-forward output of every block of a known model."""
    return family.role_paths("ffn_down") if family else None


class OffsetMethod(peftreg.PEFTMethod):
    """Learned output offsets on Linear layers."""

    name: ClassVar[str] = "offset"
    config_cls: ClassVar[type[OffsetConfig]] = OffsetConfig
    capabilities: ClassVar[peftreg.Capabilities] = peftreg.Capabilities(mergeable=True)

    def inject(self, model: nn.Module, adapter_name: str, config: OffsetConfig,
               family: peftreg.ModelFamily | None) -> list[str]:
        paths = peftreg.select_targets(model, config, (nn.Linear,), family, _defaults(family))
        for path in paths:
            host = peftreg.host_for(model, path)
            host.adapters[adapter_name] = Offset(host.base, config.init_scale)
        return paths

    def parameter_count(self, model: nn.Module, config: OffsetConfig,
                        family: peftreg.ModelFamily | None) -> int:
        paths = peftreg.select_targets(model, config, (nn.Linear,), family, _defaults(family))
        return sum(model.get_submodule(p).out_features for p in paths)


@peftreg.hookimpl
def peftreg_register_methods() -> list[peftreg.PEFTMethod]:
    return [OffsetMethod()]
