# SPDX-License-Identifier: Apache-2.0
"""Glue between :class:`~peftreg.AdaptedModel` and training frameworks.

Each submodule covers one framework and imports it only when used, so
``import peftreg.integrations`` never pulls in optional packages:

- :mod:`peftreg.integrations.transformers`: Hugging Face ``Trainer`` support
  (``SaveAdapterCallback``, saving a loadable adapter directory into each checkpoint).
- :mod:`peftreg.integrations.distributed`: ``torch.distributed`` helpers (saving once from
  the main process, the parameters DDP synchronises, a 4-bit base FSDP2 can shard).

This module holds what both need: finding the adapted model inside training wrappers.
See docs/integrations.md.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftreg.model import AdaptedModel

__all__ = ["find_adapted_model"]


def find_adapted_model(model: nn.Module) -> AdaptedModel:
    """Return the :class:`~peftreg.AdaptedModel` inside ``model``.

    Looks through the wrappers training code puts around a model: ``torch.compile``
    (``_orig_mod``) and ``DistributedDataParallel`` / ``DataParallel`` (``module``). An FSDP2
    model (``fully_shard``) is the adapted model itself and is returned as is.

    Args:
        model: an adapted model, possibly wrapped.

    Returns:
        The adapted model.

    Raises:
        TypeError: there is no AdaptedModel inside.
    """
    current: Any = model
    for _ in range(8):  # wrappers nest a few levels at most; stop on cycles
        if isinstance(current, AdaptedModel):
            return current
        inner = getattr(current, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(current, "module", None)
        if not isinstance(inner, nn.Module):
            break
        current = inner
    raise TypeError(f"no peftreg AdaptedModel inside {type(model).__name__}")
