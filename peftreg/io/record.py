# SPDX-License-Identifier: Apache-2.0
"""What every adapter-directory format reads into, and the rules all formats share.

A format module (:mod:`peftreg.io.adapter_dir`, :mod:`peftreg.io.peft_format`) reads its files
into an :class:`AdapterDir`; :mod:`peftreg.io.formats` picks the format of a directory and
:mod:`peftreg.io.load` puts the result into a model. Nothing here reads a file's contents.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Final

import torch

from peftreg.config import MethodConfig

__all__ = ["ADAPTER_NAME", "MAX_CONFIG_BYTES", "AdapterDir", "no_adapter_message"]

#: Adapter names: they become directory names (PEFT's layout) and module keys.
ADAPTER_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
#: The largest config document any format reads (configs are small; this bounds a hostile one).
MAX_CONFIG_BYTES: Final = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class AdapterDir:
    """The parsed, checked contents of an adapter directory (without a model).

    Attributes:
        path: the directory.
        adapter_name: the name it was saved under.
        config: the validated method config.
        meta: the whole config document as the format stores it.
        tensors: the adapter's tensors by peftreg's saved key.
        tensor_file: path of the safetensors file.
        config_file: path of the config document.
        targets: the adapted module paths, where the format records or implies them.
    """

    path: Path
    adapter_name: str
    config: MethodConfig
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tensor_file: Path
    config_file: Path
    targets: tuple[str, ...] = ()

    @property
    def parameter_count(self) -> int:
        """Elements in all tensors."""
        return sum(t.numel() for t in self.tensors.values())

    @property
    def size_on_disk(self) -> int:
        """Bytes of the config document plus the tensor file."""
        return self.config_file.stat().st_size + self.tensor_file.stat().st_size


def no_adapter_message(directory: Path, looked_for: str) -> str:
    """The error for a directory without the config file(s) in ``looked_for``: what was looked
    for, and what is there instead."""
    try:
        names = sorted(p.name for p in directory.iterdir())
    except OSError:
        names = []
    there = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return (f"{directory}: no adapter found: looked for {looked_for}; the directory holds "
            f"{there or 'nothing'}")
