# SPDX-License-Identifier: Apache-2.0
"""The peftreg adapter directory: ``adapter.json`` plus one safetensors file.

Layout (see docs/format.md)::

    my-adapter/
        adapter.json                      method, config, provenance, tensor file and its sha256
        adapter.<sha256[:16]>.safetensors the adapter's tensors only

Saving is atomic without locking: the tensor file gets a content-derived name and is fully
written and synced before ``adapter.json`` is replaced in one ``os.replace``. A crash at any
moment leaves ``adapter.json`` naming either the old tensor file (still present, it is deleted
only afterwards) or the new one (complete). Loading verifies the checksum, so a damaged tensor
file is refused instead of loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as save_safetensors_bytes

from peftreg.config import MethodConfig
from peftreg.discovery import PluginSource
from peftreg.errors import AdapterFileError, PeftregError, UnknownMethodError
from peftreg.io.atomic import atomic_write, describe_write_failure
from peftreg.io.files import is_present, readable_file
from peftreg.io.record import ADAPTER_NAME, MAX_CONFIG_BYTES, AdapterDir, no_adapter_message
from peftreg.io.validate import read_bounded, read_config_document, read_safetensors
from peftreg.registry import Registry, default_registry
from peftreg.version import __version__

if TYPE_CHECKING:
    from peftreg.model import AdaptedModel

CONFIG_FILE = "adapter.json"
FORMAT = "peftreg-adapter"
FORMAT_VERSION = 1
TENSOR_FILE = re.compile(r"adapter\.[0-9a-f]{16}\.safetensors")


def save_adapter(model: AdaptedModel, directory: str | Path, name: str) -> Path:
    """Write adapter ``name`` of ``model`` to ``directory`` atomically.

    Other files in the directory are left alone; a previous save of an adapter there is
    replaced only once the new one is complete.

    Returns:
        The directory path.

    Raises:
        AdapterError: ``name`` is not an adapter of ``model``.
        AdapterFileError: ``directory`` cannot be written (it is a file, lies below one, or
            the system refuses); the message names the directory and the cause.
    """
    record = model.record(name)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in
               model.adapter_state_dict(name).items()}
    return write_adapter_dir(directory, adapter_name=name, config=record.config,
                             tensors=tensors, source=model.registry.source(record.method.name),
                             targets=record.targets, saved_modules=record.saved_modules,
                             numerics_version=record.method.numerics_version)


def write_adapter_dir(
    directory: str | Path,
    *,
    adapter_name: str,
    config: MethodConfig,
    tensors: dict[str, torch.Tensor],
    source: PluginSource,
    targets: list[str],
    saved_modules: list[str],
    numerics_version: int | None = None,
) -> Path:
    """Write an adapter directory from its parts, atomically (what :func:`save_adapter` does
    once it has taken the parts from a model; converters call it without a model).

    Args:
        directory: where to write.
        adapter_name: the name recorded in ``adapter.json``.
        config: the method config (its ``method`` names the method).
        tensors: the adapter's tensors under their saved keys (on the CPU, contiguous).
        source: the plugin that provides the method (``Registry.source``).
        targets: adapted module paths (informational).
        saved_modules: module paths saved whole.
        numerics_version: the method's ``numerics_version`` (recorded with the plugin's
            distribution and version; omitted when not known).

    Returns:
        The directory path.

    Raises:
        AdapterFileError: ``directory`` cannot be written (it is a file, lies below one, or
            the system refuses); the message names the directory and the cause.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterFileError(f"{directory}: exists and is not a directory")
    try:
        return _write_adapter_files(directory, adapter_name=adapter_name, config=config,
                                    tensors=tensors, source=source, targets=targets,
                                    saved_modules=saved_modules,
                                    numerics_version=numerics_version)
    except OSError as exc:
        raise AdapterFileError(f"{directory}: cannot write the adapter: "
                               f"{describe_write_failure(directory / CONFIG_FILE, exc)}") from exc


def _write_adapter_files(
    directory: Path,
    *,
    adapter_name: str,
    config: MethodConfig,
    tensors: dict[str, torch.Tensor],
    source: PluginSource,
    targets: list[str],
    saved_modules: list[str],
    numerics_version: int | None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    blob = save_safetensors_bytes(tensors, metadata={"format": "pt", "peftreg_method":
                                                     config.method})
    digest = hashlib.sha256(blob).hexdigest()
    tensor_name = f"adapter.{digest[:16]}.safetensors"
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_name": adapter_name,
        "method": config.method,
        "plugin": {"distribution": source.dist, "version": source.version,
                   "entry_point": source.entry_point,
                   **({} if numerics_version is None else
                      {"numerics_version": numerics_version})},
        "peftreg_version": __version__,
        "config": config.to_dict(),
        "targets": list(targets),
        "saved_modules": list(saved_modules),
        "tensors": {"file": tensor_name, "sha256": digest, "count": len(tensors),
                    "parameters": sum(t.numel() for t in tensors.values())},
    }
    atomic_write(directory / tensor_name, blob)
    atomic_write(directory / CONFIG_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    # Only now is the previous tensor file unreferenced. Tensor files of saves killed before
    # their config rename were never referenced; they go too, so kills leave no litter.
    for other in directory.glob("adapter.*.safetensors"):
        if other.name != tensor_name and TENSOR_FILE.fullmatch(other.name):
            with contextlib.suppress(OSError):
                other.unlink()
    for stale in directory.glob(".adapter*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    return directory


def read_adapter_dir(directory: str | Path, registry: Registry | None = None) -> AdapterDir:
    """Read and check an adapter directory without touching any model.

    Raises:
        AdapterFileError: anything missing, malformed, from a future format, failing its
            checksum, or holding invalid tensors; the message names the file and the problem.
        UnknownMethodError: the method it names is not installed.
    """
    registry = registry or default_registry()
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: not a directory")
    if not is_present(config_path):
        raise AdapterFileError(no_adapter_message(directory, f"{CONFIG_FILE} (peftreg's format)"))
    config_path = readable_file(directory, CONFIG_FILE, "the adapter config")
    meta = read_config_document(config_path, "peftreg adapter file", MAX_CONFIG_BYTES)
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{config_path}: not a peftreg adapter file "
                               f"(\"format\" must be {FORMAT!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise AdapterFileError(f"{config_path}: format_version {version!r} is not a positive "
                               "integer")
    if version > FORMAT_VERSION:
        raise AdapterFileError(f"{config_path}: format_version {version} is newer than this "
                               f"peftreg reads ({FORMAT_VERSION}); upgrade peftreg")
    method_name = meta.get("method")
    if not isinstance(method_name, str):
        raise AdapterFileError(f"{config_path}: \"method\" is missing or not a string")
    try:
        method = registry.get(method_name)
    except UnknownMethodError as exc:
        raise UnknownMethodError(f"{config_path}: {exc}") from exc
    try:
        config = method.config_cls.from_dict(meta.get("config"))  # type: ignore[arg-type]
    except PeftregError as exc:
        raise AdapterFileError(f"{config_path}: invalid config: {exc}") from exc
    adapter_name = meta.get("adapter_name", "default")
    # The name later becomes a directory name (PEFT export) and a module key: same rule as
    # AdaptedModel.add_adapter, checked here so the error names the file.
    if not isinstance(adapter_name, str) or ADAPTER_NAME.fullmatch(adapter_name) is None:
        raise AdapterFileError(f"{config_path}: adapter_name {adapter_name!r} is not a valid "
                               "adapter name (letters, digits, '_' and '-', at most 64, not "
                               "starting with a digit or '-')")
    tensors_meta = meta.get("tensors")
    if not isinstance(tensors_meta, dict):
        raise AdapterFileError(f"{config_path}: \"tensors\" entry is missing")
    tensor_name, digest = tensors_meta.get("file"), tensors_meta.get("sha256")
    # The file name is matched exactly, so a hostile config cannot point outside the directory.
    if not isinstance(tensor_name, str) or not TENSOR_FILE.fullmatch(tensor_name):
        raise AdapterFileError(f"{config_path}: tensor file name {tensor_name!r} is not of the "
                               "form adapter.<16 hex digits>.safetensors")
    # The name is plain, but a shared directory can hold links: it must not lead elsewhere.
    tensor_path = readable_file(directory, tensor_name, f"the tensor file {CONFIG_FILE} names")
    data = read_bounded(tensor_path)
    if hashlib.sha256(data).hexdigest() != digest:
        raise AdapterFileError(f"{tensor_path}: checksum does not match {CONFIG_FILE} (the file "
                               "is damaged or was replaced)")
    tensors, _ = read_safetensors(tensor_path, data)
    _warn_on_numerics_change(config_path, meta, method)
    targets = meta.get("targets")
    return AdapterDir(directory, adapter_name, config, meta, tensors, tensor_path, config_path,
                      tuple(targets) if isinstance(targets, list) else ())


class NumericsVersionWarning(UserWarning):
    """A saved adapter was written by a plugin release whose numerics differ from the
    installed one: it loads, but its outputs need not match what was measured when saved."""


def _warn_on_numerics_change(config_path: Path, meta: dict[str, Any], method: Any) -> None:
    plugin = meta.get("plugin")
    saved = plugin.get("numerics_version") if isinstance(plugin, dict) else None
    if not isinstance(saved, int) or isinstance(saved, bool):
        return  # written before numerics versions were recorded
    current = getattr(method, "numerics_version", 1)
    if saved != current:
        dist = plugin.get("distribution", "?") if isinstance(plugin, dict) else "?"
        warnings.warn(
            f"{config_path}: saved by {dist} with numerics version {saved} of method "
            f"{method.name!r}; the installed plugin has numerics version {current}, so outputs "
            "are not comparable with those measured at save time", NumericsVersionWarning,
            stacklevel=3)
