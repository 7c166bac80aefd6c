# SPDX-License-Identifier: Apache-2.0
"""Converting adapter directories between peftreg's format and Hugging Face PEFT's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from peftreg.errors import AdapterError, AdapterFileError
from peftreg.io.adapter_dir import read_adapter_dir, write_adapter_dir
from peftreg.io.peft_format import (
    codec_for_method,
    guess_task_type,
    is_peft_dir,
    read_peft_dir,
    to_peft,
    write_peft_dir,
)
from peftreg.registry import default_registry

if TYPE_CHECKING:
    from torch import nn

__all__ = ["convert"]


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    to: Literal["peft", "peftreg"],
    model: nn.Module | None = None,
    task_type: str | None = None,
    method: str | None = None,
) -> Path:
    """Convert the adapter in SRC to the other format and write it to DST.

    ``--to peft`` reads a peftreg adapter directory (``adapter.json``) and writes Hugging Face
    PEFT's (``adapter_config.json`` + ``adapter_model.safetensors``), which
    ``PeftModel.from_pretrained(base, DST)`` loads. ``--to peftreg`` does the reverse. Every
    installed method whose plugin gives it a PEFT codec converts. The files are checked as fully
    as a load would check them (tensor names, dtypes, NaN/inf, every PEFT config key) and
    written atomically; other files in DST are left alone.

    A method whose PEFT config records the model's geometry (the codec's ``needs_model``) needs
    the base model to export, and one PEFT loads only with a task type (``needs_task_type``)
    needs ``task_type`` (CAUSAL_LM, SEQ_CLS, ...), guessed from the model's class when a model
    is given.

    Args:
        src: the adapter directory to read.
        dst: the directory to write (created if missing).
        to: the format to write, ``"peft"`` or ``"peftreg"``.
        model: the base model, optional; enables the checks that need it (the model's geometry,
            ``modules_to_save`` modules without tensors) and the exports that need it.
        task_type: PEFT's ``task_type`` for ``to="peft"`` (default: none, or guessed from
            ``model`` for methods that need one).
        method: for ``to="peftreg"``, read the PEFT document as this method's adapter
            (``"qlora"`` for a LORA directory; default: the method that claims it).

    Returns:
        ``dst``.

    Raises:
        AdapterFileError: SRC is not in the other format, or fails a check.
        AdapterError: missing information (task type, model geometry), or a bad ``to``.
        UnsupportedOperationError: the method or a setting has no counterpart in the target
            format.
    """
    src, dst = Path(src), Path(dst)
    registry = default_registry()
    family = registry.describe_model(model) if model is not None else None
    if to == "peft" and method is not None:
        raise AdapterError("method is only used when converting to peftreg (a peftreg "
                           "directory names its method)")
    if to == "peft":
        if is_peft_dir(src):
            raise AdapterFileError(f"{src}: already a PEFT adapter directory")
        saved = read_adapter_dir(src, registry)
        method = saved.config.method
        codec = codec_for_method(registry, method)
        if task_type is None and codec.needs_task_type:
            task_type = guess_task_type(model)
        if codec.needs_model and family is None:
            raise AdapterError(
                f"{src}: converting {method.replace('_', ' ')} to PEFT needs the base model "
                "(PEFT's config records the model's geometry, which a peftreg adapter takes "
                "from the model); pass model=")
        doc, tensors = to_peft(saved.config, saved.tensors, registry=registry, family=family,
                               task_type=task_type)
        return write_peft_dir(dst, doc, tensors)
    if to == "peftreg":
        if not is_peft_dir(src):
            raise AdapterFileError(f"{src}: not a PEFT adapter directory (adapter_config.json "
                                   "without adapter.json)")
        if task_type is not None:
            raise AdapterError("task_type is only used when converting to PEFT")
        peft = read_peft_dir(src, registry, model=model, family=family, method=method)
        plugin = registry.get(peft.config.method)
        return write_adapter_dir(
            dst, adapter_name=peft.adapter_name, config=peft.config, tensors=peft.tensors,
            source=registry.source(plugin.name), targets=list(peft.targets),
            saved_modules=list(peft.config.modules_to_save),
            numerics_version=plugin.numerics_version)
    raise AdapterError(f"unknown target format {to!r}; use 'peft' or 'peftreg'")
