# SPDX-License-Identifier: Apache-2.0
"""Bottleneck adapters (Houlsby et al. 2019).

A small module is inserted after a sub-layer's output projection: the width-``h`` output is
projected down to ``m`` dimensions, passed through a nonlinearity, projected back up, and added
to itself (paper section 2.1, figure 2)::

    h + up(act(down(h)))

Houlsby et al. place one adapter after the attention output projection and one after the
feed-forward block's output projection in every layer (``placement="both"``); Pfeiffer et al.
2021 (AdapterFusion) found one adapter after the feed-forward block enough
(``placement="ffn"``). The up projection starts at zero, so the adapter is the identity and the
adapted model equals the base exactly at the start (the paper's near-identity init; the down
projection is drawn from a zero-mean normal with standard deviation 1e-2, truncated at two
standard deviations, a scale the paper reports training to be robust at).

Each adapted module adds ``2*h*m + m + h`` parameters (two weight matrices and two biases).
The nonlinearity sits between the two projections, so the adapter cannot be folded into the
base weights: it is not mergeable and adds a little computation at inference.

When the compiled extension is built, the whole bottleneck (down projection, activation, up
projection, residual) runs as one ``peftreg::houlsby_adapter`` op whose backward keeps only the
(rows x m) pre-activation; otherwise, or with ``PEFTREG_KERNELS=reference``, plain PyTorch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Final, Literal

import torch
from torch import nn

from peftreg.plugin import (
    HOULSBY_ADAPTER,
    Capabilities,
    LayerAdapter,
    Linear4bit,
    ModelFamily,
    ModelFamilyError,
    PEFTMethod,
    TargetedConfig,
    base_access,
    hookimpl,
    host_for,
    select_targets,
)

NonLinearity = Literal["relu", "gelu", "silu", "tanh"]
_ACTIVATIONS: Final[dict[str, type[nn.Module]]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
}
# Model-family roles after which adapters go, per placement.
PLACEMENT_ROLES: Final[dict[str, tuple[str, ...]]] = {
    "both": ("o", "ffn_down"),
    "ffn": ("ffn_down",),
}
# Near-identity init: down weights ~ N(0, 1e-2^2) truncated at two std (see module docstring).
INIT_STD: Final = 1e-2


@dataclasses.dataclass
class HoulsbyConfig(TargetedConfig):
    """Config of a Houlsby bottleneck adapter.

    Attributes:
        reduction_factor: bottleneck width ``m = h // reduction_factor`` (at least 1), where
            ``h`` is the adapted module's output width (the model's hidden size for the default
            targets); must be > 0.
        bottleneck_size: an explicit ``m`` (> 0) overriding ``reduction_factor``; it must not
            exceed ``h``, which is checked when the adapter is added.
        non_linearity: the activation between the projections: ``"relu"``, ``"gelu"``,
            ``"silu"`` or ``"tanh"``.
        placement: with ``target_modules=None``, where adapters go in every layer: ``"both"``
            (after the attention output projection and after the feed-forward output
            projection, family roles ``o`` and ``ffn_down``; Houlsby et al.) or ``"ffn"`` (after
            the feed-forward output projection only; Pfeiffer et al. 2021). Ignored when
            ``target_modules`` is given.
        target_modules: the Linear layers whose outputs get an adapter (see
            :class:`peftreg.plugin.TargetedConfig`); ``None`` follows ``placement``.
        exclude_modules, layers_to_transform, layers_pattern: see
            :class:`peftreg.plugin.TargetedConfig`.
        modules_to_save: see :class:`peftreg.MethodConfig`.
    """

    method: ClassVar[str] = "houlsby"

    reduction_factor: int = 16
    bottleneck_size: int | None = None
    non_linearity: NonLinearity = "relu"
    placement: Literal["both", "ffn"] = "both"

    def validate(self) -> None:
        super().validate()
        if self.reduction_factor <= 0:
            raise self.error("reduction_factor", "must be > 0", self.reduction_factor)
        if self.bottleneck_size is not None and self.bottleneck_size <= 0:
            raise self.error("bottleneck_size", "must be > 0", self.bottleneck_size)

    def bottleneck_for(self, hidden: int) -> int:
        """The bottleneck width ``m`` for a module of output width ``hidden``."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, hidden // self.reduction_factor)


class HoulsbyAdapter(LayerAdapter):
    """A bottleneck after one Linear layer: ``y + adapter_up(act(adapter_down(y)))``.

    Attributes:
        adapter_down: ``h -> m`` projection with bias.
        act: the nonlinearity.
        adapter_up: ``m -> h`` projection with bias, zero at the start.
    """

    def __init__(self, hidden: int, bottleneck: int, non_linearity: str,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.adapter_down = nn.Linear(hidden, bottleneck, bias=True, **kw)
        self.act = _ACTIVATIONS[non_linearity]()
        self.non_linearity = non_linearity
        self.adapter_up = nn.Linear(bottleneck, hidden, bias=True, **kw)
        with torch.no_grad():
            nn.init.trunc_normal_(self.adapter_down.weight, std=INIT_STD,
                                  a=-2 * INIT_STD, b=2 * INIT_STD)
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def bottleneck(self, h: torch.Tensor) -> torch.Tensor:
        """``up(act(down(h)))``: the adapter's contribution, added to ``h``."""
        dtype = self.adapter_down.weight.dtype
        return self.adapter_up(self.act(self.adapter_down(h.to(dtype))))

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        down, up = self.adapter_down, self.adapter_up
        if y.dtype == down.weight.dtype:
            # The compiled op or plain PyTorch, by kernel mode and measured crossover.
            out, _z = HOULSBY_ADAPTER.run(y, down.weight, down.bias, up.weight, up.bias,
                                          self.non_linearity)
            return out
        return y + self.bottleneck(y).to(y.dtype)


def _default_targets(family: ModelFamily | None, config: HoulsbyConfig) -> list[str]:
    """Full module paths of the family roles for ``config.placement``.

    Full paths, not relative names: BERT's ``output.dense`` is also a suffix of
    ``attention.output.dense``.
    """
    roles = PLACEMENT_ROLES[config.placement]
    if family is None:
        raise ModelFamilyError(
            f"houlsby: HoulsbyConfig.target_modules is not set and no model family plugin "
            f"describes this model, so the modules for placement {config.placement!r} (roles "
            f"{', '.join(roles)}) are unknown; set target_modules explicitly")
    paths: list[str] = []
    for role in roles:
        found = family.role_paths(role)
        if not found:
            raise ModelFamilyError(
                f"houlsby: model family {family.name!r} has no {role!r} role, needed for "
                f"placement {config.placement!r}; set HoulsbyConfig.target_modules explicitly")
        paths.extend(found)
    return paths


def plan(model: nn.Module, config: HoulsbyConfig, family: ModelFamily | None
         ) -> list[tuple[str, int, int]]:
    """Return ``(path, h, m)`` for every module ``config`` adapts, in model order.

    Raises:
        ModelFamilyError: no explicit targets and the family lacks a needed role.
        TargetNotFoundError: the targets match nothing (or a listed name matches no module).
        ConfigError: the bottleneck is wider than a module's output.
    """
    defaults = _default_targets(family, config) if config.target_modules is None else None
    planned = []
    for path in select_targets(model, config, HoulsbyMethod.supported, family, defaults):
        h = base_access(model.get_submodule(path)).out_features
        m = config.bottleneck_for(h)
        if m > h:
            raise config.error(
                "bottleneck_size", f"{m} is larger than the hidden size {h} of module {path!r}",
                config.bottleneck_size)
        planned.append((path, h, m))
    return planned


class HoulsbyMethod(PEFTMethod[HoulsbyConfig]):
    """Bottleneck adapters after attention and feed-forward outputs; not mergeable."""

    name: ClassVar[str] = "houlsby"
    config_cls = HoulsbyConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=False, inference_latency=True)
    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, Linear4bit)
    suggested_learning_rate: ClassVar[float] = 2e-3
    size_field: ClassVar[str | None] = "bottleneck_size"

    def inject(self, model: nn.Module, adapter_name: str, config: HoulsbyConfig,
               family: ModelFamily | None) -> list[str]:
        planned = plan(model, config, family)
        for path, h, m in planned:
            host = host_for(model, path)
            view = base_access(host.base)
            host.adapters[adapter_name] = HoulsbyAdapter(
                h, m, config.non_linearity, device=view.device, dtype=view.dtype)
        return [path for path, _, _ in planned]

    def parameter_count(
        self, model: nn.Module, config: HoulsbyConfig, family: ModelFamily | None
    ) -> int:
        """``sum over adapted modules of 2*h*m + m + h`` (down and up weights and biases)."""
        return sum(2 * h * m + m + h for _, h, m in plan(model, config, family))


@hookimpl
def peftreg_register_methods() -> list[PEFTMethod[Any]]:
    """Provide Houlsby bottleneck adapters."""
    return [HoulsbyMethod()]
