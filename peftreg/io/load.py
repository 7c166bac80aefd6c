# SPDX-License-Identifier: Apache-2.0
"""Putting a saved adapter, in whichever format, into a model: checked, then all or nothing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final

import torch

from peftreg.errors import AdapterError, AdapterFileError
from peftreg.io.formats import read_any
from peftreg.io.record import AdapterDir
from peftreg.io.validate import compare_to_expected

if TYPE_CHECKING:
    from peftreg.model import AdaptedModel, AdapterRecord

__all__ = ["load_adapter"]

# Parameters a config may ask for beyond what its file holds before it is refused unallocated
# (64 MiB of float32): below this, building the adapter to compare shapes costs little.
ALLOCATION_SLACK: Final = 2**24


def load_adapter(
    model: AdaptedModel,
    directory: str | Path,
    name: str | None = None,
    *,
    activate: bool = True,
    trainable: bool = False,
    method: str | None = None,
) -> AdapterRecord:
    """Add the adapter saved in ``directory`` to ``model``.

    The files are fully checked first; then the adapter is created from its config and every
    saved tensor is compared with the new modules (names and shapes). On any mismatch the new
    adapter is removed again and one error lists every problem; the model is left as it was.

    The directory may be in any format of :data:`peftreg.io.formats.FORMATS` (peftreg's own or
    Hugging Face PEFT's); each is checked as fully, with the same rollback.

    Args:
        model: the adapted model to load into.
        directory: an adapter directory written by ``save_adapter`` (or by PEFT).
        name: adapter name to use (default: the saved one).
        activate: make it the active adapter.
        trainable: allow its parameters to train (default: inference only).
        method: read it as this method's adapter, for a PEFT document several methods read
            (``"qlora"`` for a PEFT LORA directory: the base is quantized as QLoRA's defaults
            say, and the LoRA factors go on top). Default: the method the file names.

    Raises:
        AdapterFileError: the directory fails its format's checks, or the tensors do not fit
            the model.
        AdapterError: the name is taken.
    """
    saved = read_any(directory, model.registry, model=model.model, family=model.family,
                     method=method)
    name = name or saved.adapter_name
    if name in model.adapters:
        raise AdapterError(f"an adapter named {name!r} already exists; pass another name")
    _check_size_before_allocating(model, saved)
    record = model.add_adapter(name, saved.config, activate=False, trainable=trainable)
    expected = model.adapter_state_dict(name)
    problems = compare_to_expected(saved.tensors, expected, str(saved.tensor_file))
    if problems:
        model.delete_adapter(name)
        raise AdapterFileError(
            f"adapter in {saved.path} does not fit this model ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(saved.tensors[key].to(dtype=target.dtype, device=target.device))
    if activate:
        model.set_active(name)
    return record


def _check_size_before_allocating(model: AdaptedModel, saved: AdapterDir) -> None:
    """Refuse a config that asks for more adapter parameters than the file holds.

    The tensors are bounded by the file's size, but the config is not: a rank of 10**9 would
    otherwise be allocated by ``add_adapter`` (possibly exhausting memory) before the shape
    comparison could refuse it. The method's closed-form count needs no allocation; a method
    without one (``None``) or whose count fails is left to the shape comparison.
    """
    method = model.registry.method_for(saved.config)
    try:
        needed = method.parameter_count(model.model, saved.config, model.family)
    except Exception:  # the count is advisory; add_adapter reports the real problem
        return
    held = saved.parameter_count
    # Small excesses are left to the shape comparison, whose report names each tensor.
    if isinstance(needed, int) and needed > held + ALLOCATION_SLACK:
        raise AdapterFileError(
            f"{saved.path}: its config asks for {needed} {saved.config.method} parameters in "
            f"this model but {saved.tensor_file.name} holds only {held}; refused before "
            "allocating (a rank or size in the config does not match the saved tensors)"
        )
