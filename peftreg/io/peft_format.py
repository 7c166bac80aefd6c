# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's adapter directory: reading it into peftreg and writing it from peftreg.

Layout (PEFT 0.21; see docs/interop.md)::

    my-adapter/
        adapter_config.json        peft_type, task_type, ... and the method's settings
        adapter_model.safetensors  tensors, metadata {"format": "pt"}
        X/                         adapter "X" (any name but "default"), same two files

This module knows the directory and no method. Each method PEFT also has brings a
:class:`~peftreg.io.peft_codec.PeftCodec` (``PEFTMethod.peft_codec``) that translates its config
keys and tensor names; the codec of a document is the one whose ``peft_type`` matches and that
claims it. What is shared is done here for every method: the files are read and checked as a
peftreg directory is (header, floating point, finite) before any model is touched, the common
and unknown config keys follow one rule (:meth:`~peftreg.io.peft_codec.PeftImport.check_keys`),
and the export is crash-consistent (:func:`write_peft_dir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import torch
from safetensors.torch import save as save_safetensors_bytes

from peftreg.config import MethodConfig
from peftreg.errors import AdapterError, AdapterFileError, PeftregError, UnsupportedOperationError
from peftreg.families import ModelFamily
from peftreg.io.atomic import describe_write_failure, fsync_dir
from peftreg.io.files import checked_subdirectory, is_present, readable_file
from peftreg.io.peft_codec import PeftCodec, PeftExport, PeftImport
from peftreg.io.record import ADAPTER_NAME, MAX_CONFIG_BYTES, AdapterDir, no_adapter_message
from peftreg.io.validate import read_config_document, read_safetensors
from peftreg.registry import Registry, default_registry

if TYPE_CHECKING:
    from torch import nn

    from peftreg.model import AdaptedModel

__all__ = [
    "PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE", "TASK_TYPES", "codec_for_method", "from_peft",
    "guess_task_type", "is_peft_dir", "peft_codecs", "read_peft_dir", "save_peft_adapter",
    "to_peft", "write_peft_dir",
]

PEFT_CONFIG_FILE: Final = "adapter_config.json"
PEFT_WEIGHTS_FILE: Final = "adapter_model.safetensors"
# peftreg's own config file: a directory holding it is peftreg's, whatever else is there.
_PEFTREG_CONFIG_FILE: Final = "adapter.json"
TASK_TYPES: Final = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
                     "FEATURE_EXTRACTION")


def is_peft_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a PEFT adapter: ``adapter_config.json`` and no
    ``adapter.json`` (peftreg's own file wins when both are present)."""
    directory = Path(directory)
    # A config that is a link (even a broken one) still marks a PEFT directory, so that the
    # PEFT reader can say what is wrong with it.
    return is_present(directory / PEFT_CONFIG_FILE) and not (
        directory / _PEFTREG_CONFIG_FILE).exists()


def peft_codecs(registry: Registry) -> list[tuple[str, PeftCodec]]:
    """``(method name, codec)`` of every installed method that reads and writes PEFT's format."""
    found = []
    for name in registry.names():
        codec = getattr(registry.get(name), "peft_codec", None)
        if codec is not None:
            found.append((name, codec))
    return found


def codec_for_method(registry: Registry, method: str) -> PeftCodec:
    """The PEFT codec of ``method``.

    Raises:
        UnsupportedOperationError: the method has none (PEFT has no such method, or its plugin
            does not translate it).
    """
    codec = getattr(registry.get(method), "peft_codec", None)
    if codec is None:
        names = ", ".join(name for name, _ in peft_codecs(registry))
        raise UnsupportedOperationError(
            f"method {method!r} has no Hugging Face PEFT equivalent (the installed methods "
            f"with one: {names}); keep this adapter in peftreg's format")
    return codec


def _codec_for_doc(ctx: PeftImport, registry: Registry, method: str | None
                   ) -> tuple[str, PeftCodec]:
    codecs = peft_codecs(registry)
    types = sorted({codec.peft_type for _, codec in codecs})
    if "peft_type" not in ctx.doc:
        raise ctx.config_error(
            "peft_type is missing: a PEFT adapter config names its method there (the installed "
            f"methods read {', '.join(types)})")
    peft_type = ctx.doc.get("peft_type")
    same_type = [(name, codec) for name, codec in codecs if codec.peft_type == peft_type]
    if not same_type:
        raise ctx.config_error(
            f"peft_type {peft_type!r} is not one peftreg can load: no installed method reads it "
            f"(supported: {', '.join(types)})")
    if method is not None:
        chosen = [(name, codec) for name, codec in same_type if name == method]
        if not chosen:
            readers = ", ".join(repr(name) for name, _ in same_type)
            raise ctx.config_error(
                f"peft_type {peft_type!r} cannot be read as a {method} adapter (the installed "
                f"methods reading it: {readers})")
        return chosen[0]
    # A codec read only on request (QLoRA's LORA documents, which LoRA reads by default).
    same_type = [(n, c) for n, c in same_type if not c.explicit_only] or same_type
    claiming = [(name, codec) for name, codec in same_type if codec.claims(ctx.doc)]
    if len(claiming) > 1:
        raise ctx.config_error(
            f"peft_type {peft_type!r}: the installed methods "
            f"{', '.join(repr(name) for name, _ in claiming)} all claim this config; uninstall "
            "one of their plugins or load the adapter with the method named explicitly")
    # When none claims the document, the first codec of its type reads it: its key table
    # refuses the setting that made the others decline, and says what that setting does.
    return claiming[0] if claiming else same_type[0]


# -- reading ------------------------------------------------------------------------------------


def read_peft_dir(
    directory: str | Path,
    registry: Registry | None = None,
    *,
    model: nn.Module | None = None,
    family: ModelFamily | None = None,
    method: str | None = None,
) -> AdapterDir:
    """Read and check a PEFT adapter directory and translate it to peftreg's config and keys.

    No model is touched. With ``model`` (and its ``family``), the checks that need the model
    run too: prefix geometry, and ``modules_to_save`` modules whose tensors are missing.

    Args:
        directory: the adapter's directory (``X/`` inside a PEFT directory for adapter ``X``).
        registry: where the methods and their codecs come from (default: installed plugins).
        model: the base model the adapter is meant for, if known.
        family: its family description (looked up from ``model`` when not given).
        method: read it as this method's adapter (default: the method whose codec claims the
            document; a codec marked ``explicit_only`` is used only when named here).

    Returns:
        An :class:`~peftreg.io.record.AdapterDir` with peftreg's config and tensor keys;
        ``meta`` is the PEFT config document, ``adapter_name`` is ``X`` for a subdirectory
        ``X/`` of a PEFT directory and ``"default"`` otherwise.

    Raises:
        AdapterFileError: a file is missing or malformed, a tensor is broken, unknown or
            unpaired, or the config uses a PEFT feature peftreg cannot reproduce; the message
            names the file, the tensor or key, and the problem.
    """
    registry = registry or default_registry()
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: not a directory")
    if _is_sub_adapter(directory):
        checked_subdirectory(directory.parent, directory)
    if not is_present(directory / PEFT_CONFIG_FILE):
        raise AdapterFileError(no_adapter_message(
            directory, f"{PEFT_CONFIG_FILE} (Hugging Face PEFT's format)"))
    config_path = readable_file(directory, PEFT_CONFIG_FILE,
                                "the Hugging Face PEFT adapter config")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{config_path}: larger than {MAX_CONFIG_BYTES} bytes")
    weights_path = directory / PEFT_WEIGHTS_FILE
    if not is_present(weights_path) and (directory / "adapter_model.bin").exists():
        raise AdapterFileError(
            f"{directory}: Hugging Face PEFT adapter directory without {PEFT_WEIGHTS_FILE} "
            "(adapter_model.bin is a pickle, which peftreg does not load; re-save it with "
            "PEFT's safe_serialization=True)")
    weights_path = readable_file(directory, PEFT_WEIGHTS_FILE,
                                 "the Hugging Face PEFT weights file")
    tensors, metadata = read_safetensors(weights_path)
    doc = read_config_document(config_path, "Hugging Face PEFT adapter config",
                               MAX_CONFIG_BYTES, _config_text(config_path, metadata))
    if family is None and model is not None:
        family = registry.describe_model(model)
    config, ours, targets = _from_peft(doc, tensors, registry, model, family,
                                       str(config_path), str(weights_path), method)
    return AdapterDir(directory, _adapter_name(directory), config, doc, ours, weights_path,
                      config_path, targets)


def _is_sub_adapter(directory: Path) -> bool:
    """Whether ``directory`` is adapter ``X/`` inside a PEFT directory (judged by the path as
    given, so that a linked ``X`` is checked against the directory it sits in)."""
    parent = directory.absolute().parent
    return (parent / PEFT_CONFIG_FILE).is_file() and bool(ADAPTER_NAME.fullmatch(directory.name))


def _adapter_name(directory: Path) -> str:
    return directory.name if _is_sub_adapter(directory) else "default"


def from_peft(
    doc: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    registry: Registry | None = None,
    model: nn.Module | None = None,
    family: ModelFamily | None = None,
    config_path: str = PEFT_CONFIG_FILE,
    weights_path: str = PEFT_WEIGHTS_FILE,
) -> tuple[MethodConfig, dict[str, torch.Tensor]]:
    """Translate a PEFT config document and its (already validated) tensors to peftreg's.

    Returns:
        The peftreg method config and the tensors under peftreg's saved keys.

    Raises:
        AdapterFileError: see :func:`read_peft_dir`.
    """
    config, ours, _ = _from_peft(doc, tensors, registry or default_registry(), model, family,
                                 config_path, weights_path)
    return config, ours


def _from_peft(doc: dict[str, Any], tensors: dict[str, torch.Tensor], registry: Registry,
               model: nn.Module | None, family: ModelFamily | None, config_path: str,
               weights_path: str, method: str | None = None
               ) -> tuple[MethodConfig, dict[str, torch.Tensor], tuple[str, ...]]:
    ctx = PeftImport(doc, config_path, weights_path, model, family)
    method, codec = _codec_for_doc(ctx, registry, method)
    ctx.check_keys(codec.keys, codec.peft_version)
    fields, found = codec.read(ctx, tensors)
    ctx.raise_problems()
    try:
        config = registry.get(method).config_cls(**fields)
    except (PeftregError, TypeError) as exc:
        raise ctx.config_error(f"cannot be expressed as a peftreg {method} config: {exc}"
                               ) from exc
    return config, found.tensors, tuple(found.adapted)


# -- writing ------------------------------------------------------------------------------------


def guess_task_type(model: nn.Module | None) -> str | None:
    """PEFT's ``task_type`` for a ``transformers`` model, from its class name (``...ForCausalLM``
    gives ``CAUSAL_LM``); ``None`` when the class name says nothing."""
    name = type(model).__name__ if model is not None else ""
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return None


def to_peft(
    config: MethodConfig,
    tensors: dict[str, torch.Tensor],
    *,
    registry: Registry | None = None,
    family: ModelFamily | None = None,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
    original_base: bool = False,
    unsaved: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Translate a peftreg adapter (config and saved tensors) to PEFT's config and tensors.

    Args:
        config: the adapter's method config.
        tensors: its tensors under peftreg's saved keys.
        registry: where the method's codec comes from (default: installed plugins).
        family: the base model's family; prefix tuning needs it (PEFT records the layer count
            and key/value heads); prompt tuning records them when known.
        task_type: PEFT's ``task_type``; prompt and prefix tuning need one.
        base_model_name_or_path, revision: written as given.
        original_base: write the adapter for the base as it was before the adapter's
            initialisation rewrote it (see :attr:`~peftreg.io.peft_codec.PeftExport.
            original_base`).
        unsaved: the adapter's tensors that are not saved (non-persistent buffers), under
            saved keys; the codec may need them for ``original_base``.

    Returns:
        PEFT's ``adapter_config.json`` document and its tensors.

    Raises:
        UnsupportedOperationError: the method or a setting has no PEFT equivalent.
        AdapterError: ``task_type`` is unknown or missing where PEFT needs it, or a needed
            model geometry is unknown.
        AdapterFileError: the tensors do not match the method.
    """
    codec = codec_for_method(registry or default_registry(), config.method)
    if task_type is not None and task_type not in TASK_TYPES:
        raise AdapterError(f"unknown PEFT task_type {task_type!r}; one of {', '.join(TASK_TYPES)}")
    if task_type is None and codec.needs_task_type:
        raise AdapterError(
            f"PEFT loads {config.method.replace('_', ' ')} only with a task_type (it picks the "
            f"model wrapper by it); pass task_type= one of {', '.join(TASK_TYPES)}")
    for field in dataclasses.fields(config):
        if field.name in codec.exported_fields:
            continue
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING
            else dataclasses.MISSING)
        if getattr(config, field.name) != default:
            raise UnsupportedOperationError(
                f"{type(config).__name__}.{field.name} = {getattr(config, field.name)!r} has "
                "no equivalent in PEFT's format")
    doc: dict[str, Any] = {
        "peft_type": codec.peft_type, "task_type": task_type, "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "revision": revision,
        "inference_mode": True, "peft_version": codec.peft_version,
    }
    body, out = codec.write(PeftExport(config, tensors, family, task_type, original_base,
                                       dict(unsaved or {})))
    doc.update(body)
    return doc, out


# Keys of the safetensors metadata that make an export crash-consistent (see write_peft_dir).
_META_CONFIG: Final = "peftreg_adapter_config"
_META_REPLACES: Final = "peftreg_replaces_config_sha256"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _config_text(config_path: Path, metadata: dict[str, str]) -> bytes:
    """The config that belongs with the weights file just read.

    The weights file of a peftreg export carries its config and the checksum of the config
    file it replaced. If ``adapter_config.json`` still has that old checksum, the export was
    interrupted between its two renames: the weights are new and their own config is the right
    one. Any other difference is an edit made after the export, and the file on disk wins.
    """
    data = config_path.read_bytes()
    embedded = metadata.get(_META_CONFIG)
    if embedded is not None and _sha256(data) == metadata.get(_META_REPLACES):
        return embedded.encode()
    return data


def write_peft_dir(directory: str | Path, doc: dict[str, Any],
                   tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``.

    PEFT's two fixed file names cannot be replaced together in one rename, so the weights
    file carries the new config text and the checksum of the config file it replaces (in its
    safetensors metadata, which PEFT ignores). Both files are written in full and synced under
    temporary names, then the weights are moved into place, then the config. A crash before the
    first rename leaves the previous export; a crash between the renames leaves new weights
    next to the old config, which peftreg's reader recognises by that checksum and reads with
    the new config. So peftreg always reads either the previous export or the new one. (PEFT
    itself reads the pair as it finds it; the next export, or this one completing, repairs it.)
    No other file in the directory is touched.

    Returns:
        The directory.

    Raises:
        AdapterFileError: ``directory`` is a file or holds a peftreg adapter (``adapter.json``).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterFileError(f"{directory}: exists and is not a directory")
    if (directory / _PEFTREG_CONFIG_FILE).exists():
        raise AdapterFileError(f"{directory}: holds a peftreg adapter ({_PEFTREG_CONFIG_FILE}); "
                               "export to PEFT's format in another directory")
    try:
        return _write_peft_files(directory, doc, tensors)
    except OSError as exc:
        raise AdapterFileError(
            f"{directory}: cannot write the PEFT adapter: "
            f"{describe_write_failure(directory / PEFT_CONFIG_FILE, exc)}") from exc


def _write_peft_files(directory: Path, doc: dict[str, Any], tensors: dict[str, torch.Tensor]
                      ) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    try:
        replaces = _sha256((directory / PEFT_CONFIG_FILE).read_bytes())
    except OSError:
        replaces = ""
    blob = save_safetensors_bytes(
        {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()},
        metadata={"format": "pt", _META_CONFIG: text.decode(), _META_REPLACES: replaces})
    # Temporary files of an export killed earlier: harmless to readers, removed here.
    for name in (PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE):
        for stale in directory.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
    staged: list[str] = []
    try:
        for name, data in ((PEFT_WEIGHTS_FILE, blob), (PEFT_CONFIG_FILE, text)):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            staged.append(tmp)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(staged[0], directory / PEFT_WEIGHTS_FILE)
        # The weights rename must be on disk before the config's, or after a power cut the
        # new config could sit next to the old weights, which nothing can recognise.
        fsync_dir(directory)
        os.replace(staged[1], directory / PEFT_CONFIG_FILE)
    finally:
        for tmp in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    fsync_dir(directory)
    return directory


def save_peft_adapter(
    model: AdaptedModel,
    directory: str | Path,
    name: str,
    *,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
    original_base: bool = False,
) -> Path:
    """Write adapter ``name`` of ``model`` in PEFT's format, loadable with
    ``PeftModel.from_pretrained(base, path)``.

    Adapter ``default`` is written into ``directory`` itself, any other adapter ``X`` into
    ``directory/X`` (PEFT's layout).

    Args:
        model: the adapted model.
        directory: the PEFT directory.
        name: the adapter to export.
        task_type: PEFT's ``task_type``; for methods that need one (prompt and prefix tuning)
            it is guessed from the model's class (``...ForCausalLM``: ``CAUSAL_LM``) when not
            given.
        base_model_name_or_path, revision: written into the config as given.
        original_base: write it for the base model as it was before the adapter was created
            (an adapter whose initialisation rewrote the base weights: PiSSA, OLoRA).

    Returns:
        The directory holding the adapter's files.

    Raises:
        UnsupportedOperationError: the method or one of its settings has no PEFT equivalent.
        AdapterError: unknown adapter, or no task_type where PEFT needs one.
    """
    record = model.record(name)
    codec = codec_for_method(model.registry, record.method.name)
    if task_type is None and codec.needs_task_type:
        task_type = guess_task_type(model.model)
    tensors = {k: v.detach().to("cpu").contiguous()
               for k, v in model.adapter_state_dict(name).items()}
    unsaved = {k: v.detach().to("cpu").contiguous()
               for k, v in model.adapter_state_dict(name, unsaved=True).items()
               } if original_base else None
    doc, out = to_peft(record.config, tensors, registry=model.registry, family=model.family,
                       task_type=task_type, base_model_name_or_path=base_model_name_or_path,
                       revision=revision, original_base=original_base, unsaved=unsaved)
    target = Path(directory) if name == "default" else Path(directory) / name
    return write_peft_dir(target, doc, out)
