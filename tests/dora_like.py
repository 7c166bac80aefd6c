"""A DoRA-like method written against peftreg.plugin only: the non-additive test plugin.

Weight-decomposed low-rank adaptation (Liu et al. 2024, eq. 5): the adapted weight is
``m * (W + s B A) / ||W + s B A||`` with the norm taken per output row and ``m`` initialised to
the row norms of ``W``, so training starts at the base. The output is not base plus a term: it
rescales the base output by a factor that depends on the base weight, which the layer reads
through base access at every call. That makes it the case the stacking contract must handle.

``detach_norm`` follows the paper's section 4.3 (the norm is a constant for the backward);
``detach_norm=False`` is the deliberate bug the conformance kit must catch against a reference.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from peftreg.plugin import (
    BaseAccess,
    Capabilities,
    LayerAdapter,
    Linear4bit,
    ModelFamily,
    PEFTMethod,
    TargetedConfig,
    base_access,
    host_for,
    select_targets,
)


@dataclasses.dataclass
class DoraLikeConfig(TargetedConfig):
    """Config of the DoRA-like test method.

    Attributes:
        r: rank of the directional update.
        alpha: scale numerator (``s = alpha / r``).
        detach_norm: treat the row norm as a constant in the backward (the paper's choice).
    """

    method: ClassVar[str] = "dora_like"

    r: int = 4
    alpha: float = 4.0
    detach_norm: bool = True


class DoraLikeLinear(LayerAdapter):
    """Magnitude ``m`` and direction update ``B A`` for one linear layer."""

    def __init__(self, view: BaseAccess, r: int, scaling: float, detach_norm: bool) -> None:
        super().__init__()
        out_f, in_f = view.shape
        kw: dict[str, Any] = {"device": view.device, "dtype": view.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_f, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.magnitude = nn.Parameter(view.weight(view.dtype).norm(dim=1).clone())
        self.base_view = view  # registers nothing: the base stays the host's
        self.scaling, self.detach_norm = scaling, detach_norm
        self._merged_norm: torch.Tensor | None = None

    def _norm(self, weight: torch.Tensor) -> torch.Tensor:
        norm = (weight + self.scaling * self.lora_B @ self.lora_A).norm(dim=1)
        return norm.detach() if self.detach_norm else norm

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = self.lora_A.dtype
        weight = self.base_view.weight(dtype)
        bias = self.base_view.bias(dtype)
        xd = x.to(dtype)
        direct = y.to(dtype) - (bias if bias is not None else 0)
        direct = direct + self.scaling * (xd @ self.lora_A.T) @ self.lora_B.T
        out = (self.magnitude / self._norm(weight)) * direct
        if bias is not None:
            out = out + bias
        return out.to(y.dtype)

    def merge_into(self, base: nn.Module) -> None:
        w = base.weight
        norm = self._norm(w.float())
        self._merged_norm = norm
        merged = (self.magnitude.float() / norm)[:, None] * (
            w.float() + self.scaling * self.lora_B.float() @ self.lora_A.float())
        w.copy_(merged.to(w.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        w = base.weight
        norm = self._merged_norm
        if norm is None:
            raise RuntimeError("unmerge without merge")
        original = w.float() / (self.magnitude.float() / norm)[:, None]
        original = original - self.scaling * self.lora_B.float() @ self.lora_A.float()
        w.copy_(original.to(w.dtype))
        self._merged_norm = None


class DoraLikeMethod(PEFTMethod[DoraLikeConfig]):
    """DoRA-like weight-decomposed updates (test plugin); mergeable."""

    name: ClassVar[str] = "dora_like"
    config_cls = DoraLikeConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=True)
    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, Linear4bit)

    def inject(self, model: nn.Module, adapter_name: str, config: DoraLikeConfig,
               family: ModelFamily | None) -> list[str]:
        paths = select_targets(model, config, self.supported, family)
        for path in paths:
            host = host_for(model, path)
            host.adapters[adapter_name] = DoraLikeLinear(
                base_access(host), config.r, config.alpha / config.r, config.detach_norm)
        return paths

    def parameter_count(self, model: nn.Module, config: DoraLikeConfig,
                        family: ModelFamily | None) -> int:
        """``r * (in + out) + out`` per adapted layer (factors plus magnitude)."""
        total = 0
        for path in select_targets(model, config, self.supported, family):
            view = base_access(getattr(model.get_submodule(path), "base",
                                       model.get_submodule(path)))
            out_f, in_f = view.shape
            total += config.r * (in_f + out_f) + out_f
        return total


class OwnsBaseLinear(LayerAdapter):
    """The mistake issue 13 measured: the base stored as a submodule of the adapter."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        self.scale = nn.Parameter(torch.ones(()))


class AliasesBaseLinear(LayerAdapter):
    """Another way to own the base: a parameter that is a view of the base weight."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.rows = nn.Parameter(base.weight[:2])


@dataclasses.dataclass
class BadBaseConfig(TargetedConfig):
    """Config of the broken test methods: ``kind`` picks how the base is owned."""

    method: ClassVar[str] = "bad_base"
    kind: str = "submodule"


class BadBaseMethod(PEFTMethod[BadBaseConfig]):
    """Adapters that own their base (for the alias refusal)."""

    name: ClassVar[str] = "bad_base"
    config_cls = BadBaseConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=False)

    def inject(self, model: nn.Module, adapter_name: str, config: BadBaseConfig,
               family: ModelFamily | None) -> list[str]:
        paths = select_targets(model, config, (nn.Linear,), family)
        for path in paths:
            host = host_for(model, path)
            layer = OwnsBaseLinear if config.kind == "submodule" else AliasesBaseLinear
            host.adapters[adapter_name] = layer(host.base)
        return paths
