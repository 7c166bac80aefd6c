"""Offset tuning: learn one vector added to the output of each targeted Linear layer.

It is the smallest useful method (a cousin of BitFit, Ben Zaken et al. 2022): every adapted
Linear gets ``out_features`` trainable numbers, initialised to zero so the model starts equal to
the base, and merging folds them into the layer's bias.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from peftreg.plugin import (
    Capabilities,
    LayerAdapter,
    ModelFamily,
    PEFTMethod,
    TargetedConfig,
    UnsupportedOperationError,
    base_access,
    hookimpl,
    host_for,
    merge_bias,
    select_targets,
)


@dataclasses.dataclass
class OffsetConfig(TargetedConfig):
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


class Offset(LayerAdapter):
    """The per-layer part: one vector, added after the base Linear."""

    def __init__(self, base: nn.Module, init_scale: float) -> None:
        super().__init__()
        view = base_access(base)  # shapes and dtype only; nothing of the base is kept
        self.offset = nn.Parameter(
            torch.randn(view.out_features, dtype=view.dtype, device=view.device) * init_scale)

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.offset.to(y.dtype)

    def merge_into(self, base: nn.Module) -> None:
        bias = merge_bias(base)
        if bias is None:
            raise UnsupportedOperationError("offset needs a bias to merge into")
        bias += self.offset

    def unmerge_from(self, base: nn.Module) -> None:
        bias = merge_bias(base)
        if bias is not None:
            bias -= self.offset


def _defaults(family: ModelFamily | None) -> list[str] | None:
    """Without target_modules, adapt the feed-forward output of every block of a known model."""
    return family.role_paths("ffn_down") if family else None


class OffsetMethod(PEFTMethod[OffsetConfig]):
    """Learned output offsets on Linear layers."""

    name: ClassVar[str] = "offset"
    config_cls = OffsetConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=True)
    api_level: ClassVar[int] = 1  # the peftreg.plugin API level this was written against

    def inject(self, model: nn.Module, adapter_name: str, config: OffsetConfig,
               family: ModelFamily | None) -> list[str]:
        paths = select_targets(model, config, (nn.Linear,), family, _defaults(family))
        for path in paths:
            host = host_for(model, path)
            host.adapters[adapter_name] = Offset(host.base, config.init_scale)
        return paths

    def parameter_count(self, model: nn.Module, config: OffsetConfig,
                        family: ModelFamily | None) -> int:
        paths = select_targets(model, config, (nn.Linear,), family, _defaults(family))
        return sum(base_access(model.get_submodule(p)).out_features for p in paths)


@hookimpl
def peftreg_register_methods() -> list[PEFTMethod[Any]]:
    return [OffsetMethod()]
