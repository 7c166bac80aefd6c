# SPDX-License-Identifier: Apache-2.0
"""peftreg: one API over parameter-efficient fine-tuning methods, open to plugins.

Typical use::

    import peftreg
    config = peftreg.config_for("lora", r=8, target_modules=["q_proj", "v_proj"])
    model = peftreg.adapt(base_model, config)
"""

from __future__ import annotations

import importlib
import warnings
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
from peftreg.model import AdaptedModel, AdapterSummary, adapt
from peftreg.registry import MethodInfo, Registry, default_registry
from peftreg.version import __version__

# The user API. Plugin authors import from peftreg.plugin (the SDK) instead.
__all__ = [
    "AdaptedModel",
    "AdapterError",
    "AdapterFileError",
    "AdapterSummary",
    "ConfigError",
    "DuplicateMethodError",
    "MethodConfig",
    "MethodInfo",
    "ModelFamilyError",
    "NonFiniteGradientError",
    "PeftregError",
    "PluginError",
    "Registry",
    "TargetNotFoundError",
    "UnknownMethodError",
    "UnsupportedOperationError",
    "__version__",
    "adapt",
    "check_gradients",
    "config_for",
    "default_registry",
    "load",
    "methods",
    "watch_gradients",
]

# Plugin machinery that used to be exported here, and where it lives now. Still importable
# from the top level (with a DeprecationWarning) so plugins written before the SDK keep working.
_MOVED = {
    "AdapterHost": "peftreg.plugin",
    "AdapterSlot": "peftreg.plugin",
    "Capabilities": "peftreg.plugin",
    "InputAdapter": "peftreg.plugin",
    "InputSlot": "peftreg.plugin",
    "LayerAdapter": "peftreg.plugin",
    "ModelFamily": "peftreg.plugin",
    "PEFTMethod": "peftreg.plugin",
    "TargetedConfig": "peftreg.plugin",
    "hookimpl": "peftreg.plugin",
    "host_for": "peftreg.plugin",
    "select_targets": "peftreg.plugin",
    "TrainableCopy": "peftreg.host",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'peftreg' has no attribute {name!r}")
    warnings.warn(f"peftreg.{name} is plugin machinery: import it from {module}",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), name)


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
         registry: Registry | None = None, method: str | None = None) -> AdaptedModel:
    """Wrap ``model`` and load the adapter saved in ``directory`` into it.

    Args:
        model: the base model the adapter was trained on (an ``nn.Module``).
        directory: an adapter directory written by :meth:`AdaptedModel.save_adapter`.
        name: adapter name to use (default: the saved one).
        trainable: keep training it (default: inference only).
        registry: method registry (default: installed plugins).
        method: read a PEFT directory as this method's adapter (``"qlora"`` for a LORA
            directory: see :func:`peftreg.io.load.load_adapter`).
    """
    adapted = model if isinstance(model, AdaptedModel) else AdaptedModel(model, registry=registry)
    adapted.load_adapter(directory, name, trainable=trainable, method=method)
    return adapted
