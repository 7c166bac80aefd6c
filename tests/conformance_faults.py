"""Deliberately broken methods: each must make one conformance check fail, by name.

They are written against peftreg.plugin only, as a third-party author would.
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
    host_for,
    select_targets,
)


class _DoubledBackward(torch.autograd.Function):
    """``x * s`` whose backward reports twice the true gradient for ``s``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, s = ctx.saved_tensors
        grad_s = (grad * x).reshape(-1, s.numel()).sum(0)
        return grad * s, 2 * grad_s


class ScaleLinear(LayerAdapter):
    """An output scale with one of four faults (``fault``), or none."""

    def __init__(self, base: nn.Module, fault: str) -> None:
        super().__init__()
        width = base.out_features
        self.scale = nn.Parameter(torch.ones(width, dtype=base.weight.dtype))
        self.fault = fault
        # "unsaved": a random part of the output kept in a non-persistent buffer, so a saved and
        # reloaded adapter computes something else.
        self.register_buffer("jitter", torch.randn(width, dtype=base.weight.dtype) * 0.1,
                             persistent=False)
        # "peeks": keeps the base weight out of sight of the stacking contract (in a list, so
        # it is neither registered nor a BaseAccess) and reads it in the forward.
        self._peek = [base]

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fault == "gradient":
            return _DoubledBackward.apply(y, self.scale)
        if self.fault == "unsaved":
            return y * (self.scale + self.jitter)
        if self.fault == "peeks":
            w = self._peek[0].weight
            norm = w.norm(dim=1) / w.norm(dim=1).mean()
            return y * self.scale / norm
        return y * self.scale

    def merge_into(self, base: nn.Module) -> None:
        s = self.scale
        if self.fault == "peeks":
            w = base.weight
            s = s / (w.norm(dim=1) / w.norm(dim=1).mean())
        base.weight.mul_(s[:, None])
        if base.bias is not None:
            base.bias.mul_(s)

    def unmerge_from(self, base: nn.Module) -> None:
        # Exact inverse when this adapter is alone on the layer (the kit's own merge check).
        w = base.weight
        s = self.scale
        if self.fault == "peeks":
            s = s / (w.norm(dim=1) / w.norm(dim=1).mean())
        base.weight.div_(s[:, None])
        if base.bias is not None:
            base.bias.div_(s)


@dataclasses.dataclass
class FaultyConfig(TargetedConfig):
    """``fault``: ``"none"``, ``"gradient"``, ``"unsaved"`` or ``"peeks"``."""

    method: ClassVar[str] = "faulty"
    fault: str = "none"


class FaultyMethod(PEFTMethod[FaultyConfig]):
    """Output scales with a chosen fault (test plugin)."""

    name: ClassVar[str] = "faulty"
    config_cls = FaultyConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=False)

    def inject(self, model: nn.Module, adapter_name: str, config: FaultyConfig,
               family: ModelFamily | None) -> list[str]:
        paths = select_targets(model, config, (nn.Linear,), family)
        for path in paths:
            host = host_for(model, path)
            host.adapters[adapter_name] = ScaleLinear(host.base, config.fault)
        return paths


class MergeableFaultyMethod(FaultyMethod):
    """The same, claiming to merge (for the stacking fault)."""

    name: ClassVar[str] = "faulty_mergeable"
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=True)


@dataclasses.dataclass
class MergeableFaultyConfig(FaultyConfig):
    method: ClassVar[str] = "faulty_mergeable"


MergeableFaultyMethod.config_cls = MergeableFaultyConfig
