# SPDX-License-Identifier: Apache-2.0
"""Atomic optimizer checkpoints: one safetensors file holding the state dict (issue 7).

Tensors of ``optimizer.state_dict()`` are stored as ``state.<index>.<key>``; everything else
(parameter groups, non-tensor state entries, format and version) is JSON in the safetensors
metadata under ``peftreg_optimizer``. One file means one ``os.replace``: the bytes go to a
temporary file in the same directory, are fsynced, and replace the target in one step (the
helper of :mod:`peftreg.io.adapter_dir`), so a crash at any moment leaves the previous
checkpoint or the new one, never a mixture. A complete save also deletes the temporary files
that earlier saves to the same path left when they were killed (:mod:`peftreg.io.atomic`), so
kills leave no litter. Works for any optimizer; for :class:`PagedAdamW` the moments are read
out of the pages, wherever they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Final

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from peftreg.errors import PeftregError
from peftreg.io.atomic import atomic_write, describe_write_failure, remove_stale_temporaries
from peftreg.io.validate import parse_header

__all__ = ["FORMAT", "FORMAT_VERSION", "OptimizerCheckpointError", "load_optimizer",
           "read_optimizer_state", "save_optimizer", "write_optimizer_state"]

FORMAT: Final[str] = "peftreg-optimizer"
FORMAT_VERSION: Final[int] = 1
_META_KEY: Final[str] = "peftreg_optimizer"


class OptimizerCheckpointError(PeftregError, ValueError):
    """An optimizer checkpoint cannot be written or read; the message names the file."""


def _jsonable(value: Any, where: str) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise OptimizerCheckpointError(f"{where} is a tensor of shape "
                                           f"{tuple(value.shape)}; only scalars fit the JSON part")
        return value.item()
    if isinstance(value, tuple | list):
        return [_jsonable(v, where) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise OptimizerCheckpointError(f"{where} has a value of type {type(value).__name__} that "
                                   "an optimizer checkpoint cannot store")


def write_optimizer_state(path: str | os.PathLike, state_dict: dict[str, Any]) -> Path:
    """Write an optimizer state dict to ``path`` atomically.

    Returns:
        The path written.

    Raises:
        OptimizerCheckpointError: the dict holds values that cannot be stored, or ``path``
            cannot be written (a directory, below a regular file, a missing or read-only
            directory); the message names ``path`` and the cause.
    """
    path = Path(path)
    if path.is_dir():
        raise OptimizerCheckpointError(f"{path}: cannot write the optimizer checkpoint: it is a "
                                       "directory (a checkpoint is one file; name a file in it)")
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict.get("state", {}).items():
        plain: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                # clone: safetensors refuses tensors that share storage with each other
                tensors[f"state.{index}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                plain[key] = _jsonable(value, f"state[{index}][{key!r}]")
        state_meta[str(index)] = plain
    groups = [{key: _jsonable(value, f"param_groups[{i}][{key!r}]") for key, value in g.items()}
              for i, g in enumerate(state_dict.get("param_groups", []))]
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "param_groups": groups,
            "state": state_meta}
    data = save_safetensors_bytes(tensors, metadata={_META_KEY: json.dumps(meta)})
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise OptimizerCheckpointError(f"{path}: cannot write the optimizer checkpoint: "
                                       f"{describe_write_failure(path, exc)}") from exc
    remove_stale_temporaries(path)
    return path


def read_optimizer_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state dict written by :func:`write_optimizer_state` (tensors on the CPU).

    Raises:
        OptimizerCheckpointError: the file is missing, not such a checkpoint, or damaged.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OptimizerCheckpointError(f"{path}: cannot read the optimizer checkpoint: "
                                       f"{exc}") from exc
    try:
        _, metadata = parse_header(data, str(path))
        tensors = load_safetensors_bytes(data)
    except Exception as exc:  # the readers' error types vary
        raise OptimizerCheckpointError(f"{path}: not a readable optimizer checkpoint: "
                                       f"{exc}") from exc
    try:
        meta = json.loads((metadata or {})[_META_KEY])
    except (KeyError, ValueError) as exc:
        raise OptimizerCheckpointError(f"{path}: safetensors file without peftreg optimizer "
                                       "metadata") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise OptimizerCheckpointError(
            f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
            f"expected {FORMAT!r} version {FORMAT_VERSION}")
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    groups = []
    for g in meta["param_groups"]:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_optimizer(optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> Path:
    """Checkpoint ``optimizer.state_dict()`` to ``path`` atomically (see the module doc).

    An optimizer with a ``checkpoint_state_dict()`` method (``PagedAdamW``: its quantized
    layout when ``state_bits=8``) is saved through that instead, so the file resumes exactly.
    """
    state = getattr(optimizer, "checkpoint_state_dict", optimizer.state_dict)()
    return write_optimizer_state(path, state)


def load_optimizer(optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Load a checkpoint written by :func:`save_optimizer` into ``optimizer``.

    Raises:
        OptimizerCheckpointError: unreadable file, or one that does not fit ``optimizer``.
    """
    state_dict = read_optimizer_state(path)
    try:
        optimizer.load_state_dict(state_dict)
    except (ValueError, KeyError) as exc:
        raise OptimizerCheckpointError(f"{path}: does not fit this optimizer: {exc}") from exc
