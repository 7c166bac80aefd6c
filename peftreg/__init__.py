# SPDX-License-Identifier: Apache-2.0
"""peftreg: one API over parameter-efficient fine-tuning methods, open to plugins.

Typical use::

    import peftreg
    config = peftreg.config_for("lora", r=8, target_modules=["q_proj", "v_proj"])
    model = peftreg.adapt(base_model, config)
"""

from __future__ import annotations

from typing import Any

from peftreg.config import MethodConfig
from peftreg.diagnostics import NonFiniteGradientError, check_gradients, watch_gradients
from peftreg.errors import (
    AdapterError,
    AdapterFileError,
    ConfigError,
    DuplicateMethodError,
    ModelFamilyError,
    PeftregError,
    PluginError,
    TargetNotFoundError,
    UnknownMethodError,
    UnsupportedOperationError,
)
from peftreg.families import ModelFamily
from peftreg.hookspecs import hookimpl
from peftreg.host import (
    AdapterHost,
    AdapterSlot,
    InputAdapter,
    InputSlot,
    LayerAdapter,
    TrainableCopy,
)
from peftreg.method import Capabilities, PEFTMethod
from peftreg.model import AdaptedModel, AdapterSummary, adapt, host_for
from peftreg.registry import MethodInfo, Registry, default_registry
from peftreg.targets import TargetedConfig, select_targets

__version__ = "0.1.0"

__all__ = [
    "AdaptedModel",
    "AdapterError",
    "AdapterFileError",
    "AdapterHost",
    "AdapterSlot",
    "AdapterSummary",
    "Capabilities",
    "ConfigError",
    "DuplicateMethodError",
    "InputAdapter",
    "InputSlot",
    "LayerAdapter",
    "MethodConfig",
    "MethodInfo",
    "ModelFamily",
    "ModelFamilyError",
    "NonFiniteGradientError",
    "PEFTMethod",
    "PeftregError",
    "PluginError",
    "Registry",
    "TargetNotFoundError",
    "TargetedConfig",
    "TrainableCopy",
    "UnknownMethodError",
    "UnsupportedOperationError",
    "__version__",
    "adapt",
    "check_gradients",
    "config_for",
    "default_registry",
    "hookimpl",
    "host_for",
    "load",
    "methods",
    "select_targets",
    "watch_gradients",
]


def methods() -> list[MethodInfo]:
    """Every installed method with its capabilities and the distribution providing it."""
    return default_registry().infos()


def config_for(method: str, **fields: Any) -> MethodConfig:
    """Build the config of installed method ``method`` without importing its plugin.

    Example: ``peftreg.config_for("lora", r=16, target_modules="all-linear")``.
    """
    # Through from_dict so a misspelt field is a ConfigError listing the known ones.
    return default_registry().get(method).config_cls.from_dict({**fields, "method": method})


def load(model: Any, directory: Any, name: str | None = None, *, trainable: bool = False,
         registry: Registry | None = None) -> AdaptedModel:
    """Wrap ``model`` and load the adapter saved in ``directory`` into it.

    Args:
        model: the base model the adapter was trained on (an ``nn.Module``).
        directory: an adapter directory written by :meth:`AdaptedModel.save_adapter`.
        name: adapter name to use (default: the saved one).
        trainable: keep training it (default: inference only).
        registry: method registry (default: installed plugins).
    """
    adapted = model if isinstance(model, AdaptedModel) else AdaptedModel(model, registry=registry)
    adapted.load_adapter(directory, name, trainable=trainable)
    return adapted
