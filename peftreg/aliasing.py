# SPDX-License-Identifier: Apache-2.0
"""The inject-time check that an adapter owns none of the base model's tensors.

An adapter module that holds the base (``self.base_layer = base``) or one of its tensors
(``self.w = base.weight``, or a view of it) makes that tensor part of the adapter: it would be
unfrozen, counted, trained and written into the adapter file. Issue 13 measured such a plugin
training 16,064 parameters instead of 3,776 without a word. :func:`check_no_base_tensors` turns
that into an error at :meth:`AdaptedModel.add_adapter` naming the adapter and the tensor; the
supported way to read the base is :class:`peftreg.base_access.BaseAccess`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from peftreg.errors import AdapterError
from peftreg.host import AdapterSlot, iter_slots


class BaseAliasError(AdapterError):
    """An adapter's parameters or buffers are (or share memory with) the base model's."""


def _storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    return tensor.device.type, tensor.untyped_storage().data_ptr()


def _base_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Every module of the base model: the tree without any slot's ``adapters`` subtree.

    Walked by hand (not ``named_modules``, which deduplicates): a base module that an adapter
    also holds must still be found under its base path.
    """
    yield prefix, module
    for name, child in module.named_children():
        if isinstance(module, AdapterSlot) and child is module.adapters:
            continue
        yield from _base_modules(child, f"{prefix}.{name}" if prefix else name)


def check_no_base_tensors(model: nn.Module, adapter_name: str, method: str) -> None:
    """Raise :class:`BaseAliasError` if adapter ``adapter_name`` holds a base module or tensor.

    Args:
        model: the model after the method's ``inject``.
        adapter_name: the adapter just injected.
        method: its method name (for the message).
    """
    base_modules: dict[int, str] = {}
    base_tensors: dict[tuple[str, int], str] = {}
    for path, module in _base_modules(model):
        base_modules.setdefault(id(module), path)
        for leaf, tensor in (*module.named_parameters(recurse=False),
                             *module.named_buffers(recurse=False)):
            key = _storage_key(tensor)
            if key is not None:
                base_tensors.setdefault(key, f"{path}.{leaf}" if path else leaf)
    for path, slot in iter_slots(model):
        if adapter_name not in slot.adapter_names():
            continue
        where = path or "the model"
        adapter = slot.adapter_module(adapter_name)
        for sub_path, sub in adapter.named_modules():
            if id(sub) in base_modules:
                raise BaseAliasError(
                    f"{method} adapter {adapter_name!r} on {where!r} holds the base module "
                    f"{base_modules[id(sub)] or 'the model'!r} (as {sub_path or 'itself'!r}): the "
                    "base would be trained and saved with the adapter; read it through "
                    "peftreg.plugin.base_access instead")
        for leaf, tensor in (*adapter.named_parameters(), *adapter.named_buffers()):
            key = _storage_key(tensor)
            if key is not None and key in base_tensors:
                raise BaseAliasError(
                    f"{method} adapter {adapter_name!r} on {where!r}: its tensor {leaf!r} "
                    f"shares memory with the base tensor {base_tensors[key]!r}; an adapter must "
                    "own its tensors (read the base through peftreg.plugin.base_access, and "
                    ".clone() what you keep)")
