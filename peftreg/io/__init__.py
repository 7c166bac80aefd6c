# SPDX-License-Identifier: Apache-2.0
"""Reading and writing adapter directories (safetensors + JSON, never pickle).

Layers, each importing only those below it: :mod:`~peftreg.io.load` (into a model) ->
:mod:`~peftreg.io.formats` (which format a directory is in) -> the formats
(:mod:`~peftreg.io.adapter_dir`, :mod:`~peftreg.io.peft_format` with the methods'
:mod:`~peftreg.io.peft_codec`) -> :mod:`~peftreg.io.record` and the file primitives
(:mod:`~peftreg.io.files`, :mod:`~peftreg.io.atomic`, :mod:`~peftreg.io.validate`).
"""

from peftreg.io.adapter_dir import read_adapter_dir, save_adapter
from peftreg.io.load import load_adapter

__all__ = ["load_adapter", "read_adapter_dir", "save_adapter"]
