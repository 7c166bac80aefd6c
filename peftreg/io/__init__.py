# SPDX-License-Identifier: Apache-2.0
"""Reading and writing adapter directories (safetensors + JSON, never pickle)."""

from peftreg.io.adapter_dir import load_adapter, read_adapter_dir, save_adapter

__all__ = ["load_adapter", "read_adapter_dir", "save_adapter"]
