"""Fake methods and entry points for registry tests (pluggy/pytest style monkeypatching)."""

from __future__ import annotations

import dataclasses
import types
from typing import ClassVar

import torch
from torch import nn

from peftreg.plugin import (
    Capabilities,
    LayerAdapter,
    PEFTMethod,
    TargetedConfig,
    hookimpl,
    host_for,
)
from peftreg.targets import select_targets


@dataclasses.dataclass
class ShiftConfig(TargetedConfig):
    """A learned output offset per adapted Linear (BitFit-like); small and mergeable."""

    method: ClassVar[str] = "shift"


class Shift(LayerAdapter):
    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(out_features))

    def adapt_output(self, x, y):
        return y + self.delta

    def merge_into(self, base):
        base.bias += self.delta

    def unmerge_from(self, base):
        base.bias -= self.delta


class ShiftMethod(PEFTMethod):
    """Learned output offsets."""

    name: ClassVar[str] = "shift"
    config_cls = ShiftConfig
    capabilities = Capabilities(mergeable=True)

    def inject(self, model, adapter_name, config, family):
        paths = select_targets(model, config, (nn.Linear,), family)
        for path in paths:
            host = host_for(model, path)
            host.adapters[adapter_name] = Shift(host.base.out_features)
        return paths

    def parameter_count(self, model, config, family):
        return sum(model.get_submodule(p).out_features
                   for p in select_targets(model, config, (nn.Linear,), family))


class FakeDist:
    def __init__(self, name: str, version: str = "1.0") -> None:
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    def __init__(self, name: str, dist: str, target: object | Exception) -> None:
        self.name = name
        self.dist = FakeDist(dist)
        self._target = target

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def plugin_module(name: str, **hooks) -> types.ModuleType:
    """A module-like plugin whose functions are hook implementations."""
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    return module


def methods_plugin(*methods: PEFTMethod, name: str = "plug") -> types.ModuleType:
    return plugin_module(name, peftreg_register_methods=lambda: list(methods))
