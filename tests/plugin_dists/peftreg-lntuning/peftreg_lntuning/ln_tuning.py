"""LayerNorm tuning (Zhao et al. 2023): train a copy of each chosen normalisation layer.

An outside author's method with a PEFT codec, written from docs/plugins.md: PEFT has the same
method (``LNTuningConfig``, ``peft_type`` LN_TUNING), so its directories load here and this
plugin's adapters export to them. The trainable copy is the module ``ln_tuning_layers`` of the
adapter, which makes the saved keys ``<module path>.ln_tuning_layers.weight`` (and ``.bias``),
exactly PEFT's; the codec is then a table of two leaf names.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from peftreg.plugin import (
    Capabilities,
    LayerAdapter,
    ModelFamily,
    ModuleTensors,
    PeftCodec,
    PeftExport,
    PeftImport,
    PeftKeys,
    PEFTMethod,
    TargetedConfig,
    hookimpl,
    host_for,
    select_targets,
)

LEAVES = ("ln_tuning_layers.weight", "ln_tuning_layers.bias")


@dataclasses.dataclass
class LNTuningConfig(TargetedConfig):
    """Config of a LayerNorm-tuning adapter: ``target_modules`` names the norm layers."""

    method: ClassVar[str] = "ln_tuning"


class LNTuningLayer(LayerAdapter):
    """A trainable copy of one norm layer; its output replaces the base's."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        # A copy, not the base: the base stays frozen and out of the adapter file.
        self.ln_tuning_layers = copy.deepcopy(base)
        self._kept: dict[str, torch.Tensor] = {}

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.ln_tuning_layers(x)

    def merge_into(self, base: nn.Module) -> None:
        for name, param in base.named_parameters(recurse=False):
            self._kept[name] = param.detach().clone()
            param.copy_(getattr(self.ln_tuning_layers, name))

    def unmerge_from(self, base: nn.Module) -> None:
        for name, param in base.named_parameters(recurse=False):
            param.copy_(self._kept.pop(name))


class LNTuningPeftCodec(PeftCodec):
    """PEFT's LN_TUNING documents: the copies' tensors under ``ln_tuning_layers``."""

    peft_type = "LN_TUNING"
    keys = PeftKeys(mapped=frozenset({"target_modules", "exclude_modules", "modules_to_save"}))
    exported_fields = frozenset({"target_modules", "exclude_modules", "modules_to_save",
                                 "layers_to_transform", "layers_pattern"})

    def read(self, ctx: PeftImport, tensors: Mapping[str, torch.Tensor]
             ) -> tuple[dict[str, Any], ModuleTensors]:
        found = ctx.read_modules(tensors, LEAVES)
        return ctx.target_fields(found, layer_filter=False), found

    def write(self, ctx: PeftExport) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        found = ctx.modules(LEAVES)
        return ctx.target_fields(found), found.tensors


class LNTuningMethod(PEFTMethod[LNTuningConfig]):
    """Trainable copies of normalisation layers; mergeable."""

    name: ClassVar[str] = "ln_tuning"
    config_cls = LNTuningConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=True, inference_latency=False)
    api_level: ClassVar[int] = 2  # PEFT codecs came with level 2
    peft_codec: ClassVar[PeftCodec] = LNTuningPeftCodec()

    def inject(self, model: nn.Module, adapter_name: str, config: LNTuningConfig,
               family: ModelFamily | None) -> list[str]:
        paths = select_targets(model, config, (nn.Module,), family)
        for path in paths:
            host = host_for(model, path)
            host.adapters[adapter_name] = LNTuningLayer(host.base)
        return paths

    def parameter_count(self, model: nn.Module, config: LNTuningConfig,
                        family: ModelFamily | None) -> int:
        """The parameters of the chosen norm layers, once each."""
        return sum(p.numel() for path in select_targets(model, config, (nn.Module,), family)
                   for p in model.get_submodule(path).parameters())


@hookimpl
def peftreg_register_methods() -> list[PEFTMethod[Any]]:
    """Provide LayerNorm tuning."""
    return [LNTuningMethod()]
