# SPDX-License-Identifier: Apache-2.0
"""Converting adapter directories between peftreg's format and Hugging Face PEFT's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from peftreg.errors import AdapterError, AdapterFileError
from peftreg.io.adapter_dir import read_adapter_dir, write_adapter_dir
from peftreg.io.peft_format import (
    guess_task_type,
    is_peft_dir,
    read_peft_dir,
    to_peft,
    write_peft_dir,
)

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
) -> Path:
    """Convert the adapter in SRC to the other format and write it to DST.

    ``--to peft`` reads a peftreg adapter directory (``adapter.json``) and writes Hugging Face
    PEFT's (``adapter_config.json`` + ``adapter_model.safetensors``), which
    ``PeftModel.from_pretrained(base, DST)`` loads. ``--to peftreg`` does the reverse. Methods:
    LoRA, IA3, prompt tuning, prefix tuning. The files are checked as fully as a load would
    check them (tensor names and pairs, dtypes, NaN/inf, every PEFT config key) and written
    atomically; other files in DST are left alone.

    LoRA, IA3 and prompt tuning convert without the base model (names are renamed and the
    config mapped). Exporting prefix tuning to PEFT needs the base model, because PEFT's config
    records the layer count and key/value heads that peftreg reads from the model. Prompt and
    prefix tuning need a PEFT task type (CAUSAL_LM, SEQ_CLS, ...); with a model it is guessed
    from the model's class.

    Args:
        src: the adapter directory to read.
        dst: the directory to write (created if missing).
        to: the format to write, ``"peft"`` or ``"peftreg"``.
        model: the base model, optional; enables the checks that need it (prefix geometry,
            ``modules_to_save`` modules without tensors) and the prefix-tuning export.
        task_type: PEFT's ``task_type`` for ``to="peft"`` (default: none for LoRA and IA3,
            guessed from ``model`` for prompt and prefix tuning).

    Returns:
        ``dst``.

    Raises:
        AdapterFileError: SRC is not in the other format, or fails a check.
        AdapterError: missing information (task type, model geometry), or a bad ``to``.
        UnsupportedOperationError: the method or a setting has no counterpart in the target
            format.
    """
    from peftreg.registry import default_registry

    src, dst = Path(src), Path(dst)
    registry = default_registry()
    family = registry.describe_model(model) if model is not None else None
    if to == "peft":
        if is_peft_dir(src):
            raise AdapterFileError(f"{src}: already a PEFT adapter directory")
        saved = read_adapter_dir(src, registry)
        method = saved.config.method
        if task_type is None and method in ("prefix_tuning", "prompt_tuning"):
            task_type = guess_task_type(model)
        if method == "prefix_tuning" and family is None:
            raise AdapterError(
                f"{src}: converting prefix tuning to PEFT needs the base model: PEFT's config "
                "records num_layers, num_attention_heads (key/value heads) and token_dim, which "
                "a peftreg prefix adapter takes from the model; pass model=")
        doc, tensors = to_peft(saved.config, saved.tensors, family=family, task_type=task_type)
        return write_peft_dir(dst, doc, tensors)
    if to == "peftreg":
        if not is_peft_dir(src):
            raise AdapterFileError(f"{src}: not a PEFT adapter directory (adapter_config.json "
                                   "without adapter.json)")
        if task_type is not None:
            raise AdapterError("task_type is only used when converting to PEFT")
        peft = read_peft_dir(src, registry, model=model, family=family)
        method = peft.config.method
        leaves = {"lora": (".lora_A.weight", ".lora_embedding_A"), "ia3": (".ia3_l",)}
        targets = [key.rsplit(".", 2 if key.endswith(".weight") else 1)[0]
                   for key in peft.tensors if key.endswith(leaves.get(method, ()))]
        return write_adapter_dir(
            dst, adapter_name=peft.adapter_name, config=peft.config, tensors=peft.tensors,
            source=registry.source(method), targets=targets,
            saved_modules=list(peft.config.modules_to_save))
    raise AdapterError(f"unknown target format {to!r}; use 'peft' or 'peftreg'")
