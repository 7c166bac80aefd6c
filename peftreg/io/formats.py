# SPDX-License-Identifier: Apache-2.0
"""The adapter-directory formats peftreg reads, and which one a directory is in.

A new format is one module with a detector and a reader, plus one entry in :data:`FORMATS`.
The list is in order of precedence: a directory holding peftreg's ``adapter.json`` is read as
peftreg's, whatever else it holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Final

from torch import nn

from peftreg.errors import AdapterFileError
from peftreg.families import ModelFamily
from peftreg.io import adapter_dir, peft_format
from peftreg.io.files import is_present
from peftreg.io.record import AdapterDir, no_adapter_message
from peftreg.registry import Registry

__all__ = ["FORMATS", "Format", "detect", "read_any"]

Reader = Callable[[Path, Registry, "nn.Module | None", "ModelFamily | None", "str | None"],
                  AdapterDir]


@dataclasses.dataclass(frozen=True)
class Format:
    """One adapter-directory format.

    Attributes:
        name: what ``peftreg convert --to`` calls it.
        config_file: the file whose presence marks the format.
        description: for messages.
        read: reads and checks a directory of the format (no model touched; with the model,
            the checks that need it run too), as the method named, if one is.
    """

    name: str
    config_file: str
    description: str
    read: Reader

    def holds(self, directory: Path) -> bool:
        """Whether ``directory`` is in this format (a link counts, so the reader can say
        what is wrong with it)."""
        return is_present(directory / self.config_file)


def _as_saved(saved: AdapterDir, method: str | None) -> AdapterDir:
    # peftreg's format names its method: another one cannot be asked for.
    if method is not None and method != saved.config.method:
        raise AdapterFileError(f"{saved.config_file}: a {saved.config.method} adapter, not a "
                               f"{method} one; peftreg's format is read as the method it names")
    return saved


FORMATS: Final = (
    Format("peftreg", adapter_dir.CONFIG_FILE, "peftreg's format",
           lambda d, registry, model, family, method: _as_saved(
               adapter_dir.read_adapter_dir(d, registry), method)),
    Format("peft", peft_format.PEFT_CONFIG_FILE, "Hugging Face PEFT's",
           lambda d, registry, model, family, method: peft_format.read_peft_dir(
               d, registry, model=model, family=family, method=method)),
)


def detect(directory: str | Path) -> Format:
    """The format of ``directory``.

    Raises:
        AdapterFileError: it is not a directory, or holds no format's config file (the message
            lists what was looked for and what is there).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: not a directory")
    for fmt in FORMATS:
        if fmt.holds(directory):
            return fmt
    looked_for = " and ".join(f"{f.config_file} ({f.description})" for f in FORMATS)
    raise AdapterFileError(no_adapter_message(directory, looked_for))


def read_any(directory: str | Path, registry: Registry, *, model: nn.Module | None = None,
             family: ModelFamily | None = None, method: str | None = None) -> AdapterDir:
    """Read the adapter in ``directory``, whichever format it is in; with ``method``, as that
    method's adapter (a PEFT document several methods can read, such as a LORA one that LoRA
    and QLoRA both read)."""
    return detect(directory).read(Path(directory), registry, model, family, method)
