# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's adapter directory: reading it into peftreg and writing it from peftreg.

Layout (PEFT 0.21; see docs/interop.md)::

    my-adapter/
        adapter_config.json        peft_type, task_type, ... and the method's settings
        adapter_model.safetensors  tensors, metadata {"format": "pt"}
        X/                         adapter "X" (any name but "default"), same two files

Tensor names are peftreg's saved keys with a prefix: ``base_model.model.`` for LoRA and IA3
(adapter and saved-module tensors alike); for prompt and prefix tuning the one tensor is
``prompt_embeddings`` and saved modules sit under ``base_model.``.

PEFT loads what it is given without checking it, so this reader checks everything a peftreg
directory gets checked for (header, floating point, finite) and more, before any model is
touched: every tensor must be one the method owns or belong to a ``modules_to_save`` module,
LoRA factors must come in pairs of matching rank, and every config key must be one whose effect
peftreg reproduces. A key that changes the computation and that peftreg cannot follow is
refused, naming the key; a key that only matters while training or initialising is ignored.
Keys this reader has never seen (written by a newer PEFT) are ignored when they hold an "off"
value (null, false, empty, ``"none"``) and refused otherwise.

The per-method tables below are the one place that knows PEFT's closed set of methods: PEFT's
format names methods by its own enum (``peft_type``), so a translator has to.

The module is longer than peftreg's usual 400 lines because it holds both directions of one
translation and PEFT's key tables; the natural split, if it grows, is reading / writing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeGuard

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors_bytes

from peftreg.config import MethodConfig
from peftreg.errors import AdapterError, AdapterFileError, PeftregError, UnsupportedOperationError
from peftreg.io.adapter_dir import CONFIG_FILE as PEFTREG_CONFIG_FILE
from peftreg.io.adapter_dir import MAX_CONFIG_BYTES, AdapterDir, no_adapter_message
from peftreg.io.atomic import describe_write_failure, fsync_dir
from peftreg.io.files import checked_subdirectory, is_present, readable_file
from peftreg.io.validate import DuplicateKeyError, loads_strict, read_safetensors
from peftreg.patterns import UnsafePatternError, compile_pattern

if TYPE_CHECKING:
    from torch import nn

    from peftreg.families import ModelFamily
    from peftreg.model import AdaptedModel
    from peftreg.registry import Registry

__all__ = [
    "PEFT_CONFIG_FILE", "PEFT_FORMAT_VERSION", "PEFT_TYPES", "PEFT_WEIGHTS_FILE",
    "from_peft", "guess_task_type", "is_peft_dir", "read_peft_dir", "save_peft_adapter",
    "to_peft", "write_peft_dir",
]

PEFT_FORMAT_VERSION: Final = "0.21.2"
PEFT_CONFIG_FILE: Final = "adapter_config.json"
PEFT_WEIGHTS_FILE: Final = "adapter_model.safetensors"
# peftreg method name -> PEFT's peft_type.
PEFT_TYPES: Final = {"lora": "LORA", "ia3": "IA3", "prefix_tuning": "PREFIX_TUNING",
                     "prompt_tuning": "PROMPT_TUNING"}
TASK_TYPES: Final = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
                     "FEATURE_EXTRACTION")
_TUNER_PREFIX: Final = "base_model.model."   # LoRA/IA3: every tensor
_PROMPT_PREFIX: Final = "base_model."        # prompt/prefix tuning: saved modules only
_PROMPT_KEY: Final = "prompt_embeddings"
_PROMPT_METHODS: Final = ("prefix_tuning", "prompt_tuning")
# Leaf names of the tensors a method owns; identical in both formats.
_LEAVES: Final = {"lora": ("lora_A.weight", "lora_B.weight", "lora_embedding_A",
                           "lora_embedding_B"),
                  "ia3": ("ia3_l",)}
_LORA_PAIRS: Final = (("lora_A.weight", "lora_B.weight"),
                      ("lora_embedding_A", "lora_embedding_B"))
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Layers whose whole weight PEFT also saves when they are adapted (save_embedding_layers).
_EMBEDDING_NAMES: Final = ("embed_tokens", "lm_head")

_COMMON_KEYS: Final = frozenset({"peft_type", "task_type", "auto_mapping", "peft_version",
                                 "base_model_name_or_path", "revision", "inference_mode"})


@dataclasses.dataclass(frozen=True)
class _Keys:
    """PEFT 0.21.2 config keys of one method: translated, ignored (why), refused unless off."""

    mapped: frozenset[str]
    ignored: dict[str, str]
    refused: dict[str, str]


# Decided field by field from peft 0.21.2's LoraConfig. "Refused" keys are accepted only with
# their off value (null, false, empty, "none").
_LORA_KEYS = _Keys(
    mapped=frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
                      "use_rslora", "modules_to_save", "layers_to_transform", "layers_pattern",
                      "rank_pattern", "alpha_pattern"}),
    ignored={
        "init_lora_weights": "initialisation only (pissa/olora/corda/loftq/lora_ga also rewrite "
                             "the base weights: a warning says so)",
        "loftq_config": "initialisation only", "eva_config": "initialisation only",
        "corda_config": "initialisation only", "lora_ga_config": "initialisation only",
        "megatron_core": "names a module; used only with megatron_config",
        "runtime_config": "runtime only, never saved", "qalora_group_size": "only with use_qalora",
        "velora_config": "changes the backward pass only; its lora_velora_embed buffers are "
                         "dropped",
    },
    refused={
        "fan_in_fan_out": "the base layer stores its weight transposed (GPT-2 Conv1D), which "
                          "peftreg's LoRA does not adapt",
        "bias": "the adapter also trains the base layers' biases, which are not in the file as "
                "LoRA tensors peftreg can place",
        "use_dora": "DoRA rescales the weight by a learned magnitude vector",
        "lora_bias": "LoRA's B factor has a bias",
        "use_qalora": "QA-LoRA pools the input in groups before A",
        "target_parameters": "LoRA on bare nn.Parameters (mixture-of-experts weights)",
        "alora_invocation_tokens": "activated LoRA applies only after the invocation tokens",
        "trainable_token_indices": "extra trainable rows of the embedding table",
        "layer_replication": "the base model's layers are duplicated",
        "megatron_config": "Megatron parallel layers",
        "monteclora_config": "Monte Carlo sampling around the LoRA factors",
        "use_bdlora": "block-diagonal LoRA factors",
        "arrow_config": "routing among several LoRA experts",
        "kasa_config": "KaSA truncates the base weight and adds a singular-value diagonal",
        "ensure_weight_tying": "adapters tied across tied embedding and output layers",
    },
)
_IA3_KEYS = _Keys(
    mapped=frozenset({"target_modules", "feedforward_modules", "exclude_modules",
                      "modules_to_save"}),
    ignored={"init_ia3_weights": "initialisation only"},
    refused={"fan_in_fan_out": "the base layer stores its weight transposed (GPT-2 Conv1D), "
                               "which peftreg's IA3 does not adapt"},
)
_PREFIX_KEYS = _Keys(
    mapped=frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                      "num_attention_heads", "num_layers", "modules_to_save",
                      "prefix_projection"}),
    ignored={"encoder_hidden_size": "width of the projection MLP, which is not saved (the file "
                                    "holds the projected prefix)",
             "init_weights": "initialisation only"},
    refused={},
)
_PROMPT_KEYS = _Keys(
    mapped=frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                      "modules_to_save"}),
    ignored={"num_attention_heads": "informational", "num_layers": "informational",
             "prompt_tuning_init": "initialisation only",
             "prompt_tuning_init_text": "initialisation only",
             "tokenizer_name_or_path": "initialisation only",
             "tokenizer_kwargs": "initialisation only"},
    refused={},
)
_KEYS: Final = {"lora": _LORA_KEYS, "ia3": _IA3_KEYS, "prefix_tuning": _PREFIX_KEYS,
                "prompt_tuning": _PROMPT_KEYS}
# init_lora_weights values whose initialisation rewrites the base weights.
_BASE_REWRITING_INITS: Final = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _off(value: Any) -> bool:
    return value is None or value is False or value == "none" or value in ([], {})


def is_peft_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a PEFT adapter: ``adapter_config.json`` and no
    ``adapter.json`` (peftreg's own file wins when both are present)."""
    directory = Path(directory)
    config = directory / PEFT_CONFIG_FILE
    # A config that is a link (even a broken one) still marks a PEFT directory, so that the
    # PEFT reader can say what is wrong with it.
    return is_present(config) and not (
        directory / PEFTREG_CONFIG_FILE).exists()


# -- reading ------------------------------------------------------------------------------------


def read_peft_dir(
    directory: str | Path,
    registry: Registry | None = None,
    *,
    model: nn.Module | None = None,
    family: ModelFamily | None = None,
) -> AdapterDir:
    """Read and check a PEFT adapter directory and translate it to peftreg's config and keys.

    No model is touched. With ``model`` (and its ``family``), the checks that need the model
    run too: prefix geometry, and ``modules_to_save`` modules whose tensors are missing.

    Args:
        directory: the adapter's directory (``X/`` inside a PEFT directory for adapter ``X``).
        registry: where the method configs come from (default: installed plugins).
        model: the base model the adapter is meant for, if known.
        family: its family description (looked up from ``model`` when not given).

    Returns:
        An :class:`~peftreg.io.adapter_dir.AdapterDir` with peftreg's config and tensor keys;
        ``meta`` is the PEFT config document, ``adapter_name`` is ``X`` for a subdirectory
        ``X/`` of a PEFT directory and ``"default"`` otherwise.

    Raises:
        AdapterFileError: a file is missing or malformed, a tensor is broken, unknown or
            unpaired, or the config uses a PEFT feature peftreg cannot reproduce; the message
            names the file, the tensor or key, and the problem.
    """
    from peftreg.registry import default_registry

    registry = registry or default_registry()
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: not a directory")
    if _is_sub_adapter(directory):
        checked_subdirectory(directory.parent, directory)
    if not is_present(directory / PEFT_CONFIG_FILE):
        raise AdapterFileError(no_adapter_message(directory))
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
    text = _config_text(config_path, metadata)
    try:
        doc = loads_strict(text.decode("utf-8"))
    except DuplicateKeyError as exc:
        raise AdapterFileError(f"{config_path}: key {exc.args[0]!r} appears twice in one "
                               "object") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterFileError(f"{config_path}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise AdapterFileError(f"{config_path}: not a JSON object (Hugging Face PEFT adapter "
                               "config expected)")
    if family is None and model is not None:
        family = registry.describe_model(model)
    config, ours = from_peft(doc, tensors, registry=registry, model=model, family=family,
                             config_path=str(config_path), weights_path=str(weights_path))
    return AdapterDir(directory, _adapter_name(directory), config, doc, ours, weights_path)


def _is_sub_adapter(directory: Path) -> bool:
    """Whether ``directory`` is adapter ``X/`` inside a PEFT directory (judged by the path as
    given, so that a linked ``X`` is checked against the directory it sits in)."""
    from peftreg.model import ADAPTER_NAME

    parent = directory.absolute().parent
    return (parent / PEFT_CONFIG_FILE).is_file() and bool(ADAPTER_NAME.fullmatch(directory.name))


def _adapter_name(directory: Path) -> str:
    return directory.name if _is_sub_adapter(directory) else "default"


@dataclasses.dataclass
class _Import:
    """Working state of one translation: where errors point and what was found."""

    config_path: str
    weights_path: str
    doc: dict[str, Any]
    problems: list[str] = dataclasses.field(default_factory=list)

    def tensor_problem(self, key: str, problem: str) -> None:
        self.problems.append(f"{self.weights_path}: tensor {key!r}: {problem}")

    def refusal(self) -> AdapterFileError:
        return AdapterFileError(f"PEFT adapter refused ({len(self.problems)} problem(s)):\n  "
                                + "\n  ".join(self.problems))

    def raise_problems(self) -> None:
        if self.problems:
            raise self.refusal()

    def config_error(self, problem: str) -> AdapterFileError:
        return AdapterFileError(f"{self.config_path}: {problem}")


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
    from peftreg.registry import default_registry

    registry = registry or default_registry()
    ctx = _Import(config_path, weights_path, doc)
    if "peft_type" not in doc:
        raise ctx.config_error(
            "peft_type is missing: a PEFT adapter config names its method there (peftreg "
            f"loads {', '.join(PEFT_TYPES.values())})")
    peft_type = doc.get("peft_type")
    method = {v: k for k, v in PEFT_TYPES.items()}.get(peft_type)  # type: ignore[arg-type]
    if method is None:
        raise ctx.config_error(
            f"peft_type {peft_type!r} is not one peftreg can load (supported: "
            f"{', '.join(PEFT_TYPES.values())})")
    _check_keys(ctx, method)
    if method in _PROMPT_METHODS:
        fields, ours = _prompt_from_peft(ctx, method, tensors, model, family)
    else:
        fields, ours = _tuner_from_peft(ctx, method, tensors, model)
    ctx.raise_problems()
    try:
        config = registry.get(method).config_cls(**fields)
    except (PeftregError, TypeError) as exc:
        raise ctx.config_error(f"cannot be expressed as a peftreg {method} config: {exc}"
                               ) from exc
    return config, ours


def _switches_on(value: Any) -> bool:
    """Whether an unknown key's value turns a feature on (true, a non-empty list or object)
    rather than recording metadata (a string, a number, null, false, an empty container)."""
    return value is True or (isinstance(value, (list, dict)) and len(value) > 0)


def _check_keys(ctx: _Import, method: str) -> None:
    keys = _KEYS[method]
    refusals = []
    unknown_metadata = []
    for key, value in ctx.doc.items():
        if key in _COMMON_KEYS or key in keys.mapped or key in keys.ignored:
            continue
        if key in keys.refused:
            if not _off(value):
                refusals.append(f"{key} = {value!r}: {keys.refused[key]}")
        elif _switches_on(value):
            refusals.append(
                f"{key} = {value!r}: not a PEFT {PEFT_FORMAT_VERSION} {ctx.doc['peft_type']} "
                f"setting (the file says peft_version {ctx.doc.get('peft_version')!r}), and "
                "its value switches something on that peftreg cannot follow")
        else:
            unknown_metadata.append(key)
    if refusals:
        raise ctx.config_error(
            "uses PEFT features peftreg cannot reproduce, so the adapter is refused:\n  "
            + "\n  ".join(refusals))
    if unknown_metadata:
        # Every PEFT release adds keys; ones holding plain values are taken as metadata, as
        # PEFT itself does with keys it does not know.
        warnings.warn(
            f"{ctx.config_path}: ignoring keys this peftreg does not know (written by PEFT "
            f"{ctx.doc.get('peft_version')!r}; read as metadata, since none switches a "
            f"feature on): {', '.join(sorted(unknown_metadata))}", UserWarning, stacklevel=4)
    init = ctx.doc.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        warnings.warn(
            f"{ctx.config_path}: init_lora_weights={init!r} rewrote the base weights when the "
            "adapter was created; it reproduces the trained model only on that rewritten base "
            "(or convert it with PEFT's path_initial_model_for_weight_conversion)",
            UserWarning, stacklevel=4)


def _entries(value: Any) -> list[str]:
    """A PEFT list-or-null of names, deduplicated in order."""
    return list(dict.fromkeys(value or []))


def _suffix_match(path: str, entry: str) -> bool:
    return path == entry or path.endswith("." + entry)


def _tuner_from_peft(ctx: _Import, method: str, tensors: dict[str, torch.Tensor],
                     model: nn.Module | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    doc = ctx.doc
    drop = (".lora_velora_embed",) if method == "lora" and not _off(doc.get("velora_config")) \
        else ()
    adapted: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    copies: dict[str, torch.Tensor] = {}
    ours: dict[str, torch.Tensor] = {}
    entries = _entries(doc.get("modules_to_save"))
    for key, tensor in tensors.items():
        if not key.startswith(_TUNER_PREFIX):
            ctx.tensor_problem(key, f"unknown tensor: {method} tensors are named "
                               f"'{_TUNER_PREFIX}<module path>.<name>'")
            continue
        rest = key[len(_TUNER_PREFIX):]
        if rest.endswith(drop):
            continue
        leaf = next((leaf for leaf in _LEAVES[method] if rest.endswith("." + leaf)), None)
        if leaf is None:
            # A tensor under a modules_to_save module is that module's trained copy, whatever
            # the module is called (an output head or input embedding included); only the rest
            # can be a base-weight copy PEFT adds for adapted embedding layers.
            module = rest.rpartition(".")[0].removesuffix(".base_layer")
            embedding = module.rpartition(".")[2] in _EMBEDDING_NAMES or ".base_layer." in rest
            if embedding and _saved_owner(rest, entries) is None:
                copies[rest] = tensor
            else:
                others[rest] = tensor
            continue
        adapted.setdefault(rest[: -len(leaf) - 1], {})[leaf] = tensor
        ours[rest] = tensor
    for path, parts in adapted.items():
        (_check_lora_pair if method == "lora" else _check_ia3)(ctx, path, parts)
    for rest, tensor in copies.items():
        if ".base_layer." in rest and rest.split(".base_layer.")[0] not in adapted:
            others[rest] = tensor  # not a copy PEFT makes: a saved module's or unknown
    copies = {k: t for k, t in copies.items() if k not in others}
    _check_base_copies(ctx, copies, model)
    saved = _saved_modules(ctx, _TUNER_PREFIX, others, ours, model, sorted(adapted))
    if not adapted:
        ctx.problems.append(f"{ctx.weights_path}: holds no {method} tensors "
                            f"({', '.join(_LEAVES[method])})")
    fields: dict[str, Any] = {"modules_to_save": saved}
    fields["target_modules"] = _targets(ctx, doc.get("target_modules"), list(adapted), model)
    exclude = doc.get("exclude_modules")
    fields["exclude_modules"] = None if _off(exclude) else exclude
    if method == "lora":
        fields.update(_lora_fields(ctx))
    else:
        ff = doc.get("feedforward_modules")
        if ff is None:
            # PEFT saves its resolved list; without one, the tensors' orientation tells.
            ff = [p for p, t in adapted.items() if t["ia3_l"].dim() == 2
                  and t["ia3_l"].shape[0] == 1 and t["ia3_l"].shape[1] != 1]
        elif isinstance(ff, list):
            # PEFT tests a plain string suffix here; the adapted paths it selects are exact.
            ff = [p for p in adapted if any(p.endswith(e) for e in ff)]
        # peftreg cannot say "no feed-forward module" (None means the family's choice); if the
        # family's choice differs from the file, the (1, in) / (out, 1) shapes differ and the
        # load reports it.
        fields["feedforward_modules"] = ff or None
    if isinstance(fields["target_modules"], str) or method == "ia3":
        # PEFT applies the layer filter only to list targets (and IA3 has none).
        fields.pop("layers_to_transform", None)
        fields.pop("layers_pattern", None)
    return fields, ours


def _check_base_copies(ctx: _Import, copies: dict[str, torch.Tensor],
                       model: nn.Module | None) -> None:
    """PEFT saves whole embedding weights next to the LoRA factors when an embedding layer
    named like ``embed_tokens``/``lm_head`` is adapted (its ``save_embedding_layers``), in case
    the vocabulary was resized. peftreg loads adapters, not base weights: the copies are
    dropped when they equal the model's own weights and refused when they differ."""
    if not copies:
        return
    if model is None:
        warnings.warn(
            f"{ctx.weights_path}: holds copies of base weights ({', '.join(copies)}) that PEFT "
            "saves with adapted embedding layers; they are dropped unchecked (no model given); "
            "they matter only if the vocabulary was resized or trained", UserWarning,
            stacklevel=5)
        return
    modules = dict(_base_modules(model))
    for rest, tensor in copies.items():
        module_path, _, param = rest.rpartition(".")
        module = modules.get(module_path.removesuffix(".base_layer"))
        own = getattr(module, param, None) if module is not None else None
        if not isinstance(own, torch.Tensor):
            ctx.tensor_problem(_TUNER_PREFIX + rest, "a base-weight copy for a parameter the "
                               "model does not have")
        elif own.shape != tensor.shape or not torch.equal(tensor.to(own.dtype), own.cpu()):
            ctx.tensor_problem(_TUNER_PREFIX + rest, "differs from the model's own weight (the "
                               f"vocabulary was resized or trained: {tuple(tensor.shape)} in "
                               f"the file, {tuple(own.shape)} in the model); peftreg loads "
                               "adapters, not base weights")


def _check_lora_pair(ctx: _Import, path: str, parts: dict[str, torch.Tensor]) -> None:
    prefix = _TUNER_PREFIX + path
    pair = next(p for p in _LORA_PAIRS if p[0] in parts or p[1] in parts)
    other = _LORA_PAIRS[1] if pair is _LORA_PAIRS[0] else _LORA_PAIRS[0]
    if any(leaf in parts for leaf in other):
        ctx.tensor_problem(f"{prefix}.{other[0]}", "a module has both linear and embedding "
                           "LoRA factors")
        return
    missing = [leaf for leaf in pair if leaf not in parts]
    if missing:
        present = next(leaf for leaf in pair if leaf in parts)
        ctx.tensor_problem(f"{prefix}.{missing[0]}", f"missing: {prefix}.{present} has no "
                           "partner, so the update B @ A cannot be formed")
        return
    a, b = parts[pair[0]], parts[pair[1]]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        ctx.tensor_problem(f"{prefix}.{pair[1]}", f"shape {tuple(b.shape)} does not fit "
                           f"{pair[0]} of shape {tuple(a.shape)} (they must be (out, r) and "
                           "(r, in) with the same rank)")


def _check_ia3(ctx: _Import, path: str, parts: dict[str, torch.Tensor]) -> None:
    t = parts["ia3_l"]
    if t.dim() != 2 or 1 not in t.shape:
        ctx.tensor_problem(f"{_TUNER_PREFIX}{path}.ia3_l", f"shape {tuple(t.shape)} is neither "
                           "(out_features, 1) nor (1, in_features)")


def _spec_selects(ctx: _Import, field: str, spec: list[str] | str, path: str) -> bool:
    """PEFT's rule for a module list (the path or a dotted suffix) or a regex (whole path)."""
    if isinstance(spec, list):
        return any(_suffix_match(path, entry) for entry in spec)
    try:
        return compile_pattern(spec, field).fullmatch(path) is not None
    except UnsafePatternError as exc:
        raise ctx.config_error(exc.message_for_file()) from exc


def _is_pattern_spec(value: Any) -> TypeGuard[list[str] | str]:
    """A non-empty regex string or non-empty list of names (PEFT's two forms of a spec)."""
    return (isinstance(value, str) and bool(value)) or (
        isinstance(value, list) and bool(value) and all(isinstance(e, str) for e in value))


def _check_targets_cover(ctx: _Import, spec: Any, adapted: list[str]) -> None:
    """The config's targets must select every module the tensors adapt, and its exclusions
    none of them: otherwise the config and the weights contradict each other."""
    if _is_pattern_spec(spec) and spec != "all-linear":
        missed = [p for p in adapted if not _spec_selects(ctx, "target_modules", spec, p)]
        if missed:
            raise ctx.config_error(
                f"target_modules = {spec!r} does not select the modules its tensors adapt: "
                f"{', '.join(missed[:8])}{' ...' if len(missed) > 8 else ''} (the tensors "
                f"in {ctx.weights_path} belong to {', '.join(sorted(adapted)[:8])}); the "
                "config contradicts its weights")
    exclude = ctx.doc.get("exclude_modules")
    if _is_pattern_spec(exclude):
        excluded = [p for p in adapted if _spec_selects(ctx, "exclude_modules", exclude, p)]
        if excluded:
            raise ctx.config_error(
                f"exclude_modules = {exclude!r} excludes modules its tensors adapt: "
                f"{', '.join(excluded[:8])}; the config contradicts its weights")


def _targets(ctx: _Import, spec: Any, adapted: list[str], model: nn.Module | None
             ) -> list[str] | str:
    _check_targets_cover(ctx, spec, adapted)
    if isinstance(spec, str):
        return spec
    if not isinstance(spec, list) or not spec:
        # PEFT always saves its resolved targets; without them, adapt what the file holds.
        return adapted
    # PEFT tolerates names that match nothing (peftreg does not): keep the names that match an
    # adapted module in the file or, with the model at hand, any module of it, so that a
    # module whose tensors are missing from the file is reported rather than skipped.
    names = [p for p, _ in _base_modules(model)] if model is not None else []
    kept = [e for e in _entries(spec) if any(_suffix_match(p, e) for p in [*adapted, *names])]
    return kept or adapted


def _base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peftreg.targets import iter_base_modules

    return list(iter_base_modules(model))


def _lora_fields(ctx: _Import) -> dict[str, Any]:
    doc = ctx.doc
    fields: dict[str, Any] = {}
    for key in ("r", "lora_alpha", "lora_dropout", "use_rslora"):
        if key in doc:
            fields[key] = doc[key]
    layers = doc.get("layers_to_transform")
    fields["layers_to_transform"] = [layers] if isinstance(layers, int) and not isinstance(
        layers, bool) else (layers or None)
    pattern = doc.get("layers_pattern")
    if isinstance(pattern, list):
        pattern = "|".join(f"(?:{p})" for p in pattern) or None
    fields["layers_pattern"] = pattern or None
    for key in ("rank_pattern", "alpha_pattern"):
        value = doc.get(key) or {}
        if not isinstance(value, dict):
            raise ctx.config_error(f"{key} must be an object, got {value!r}")
        fields[key] = {_pattern_key_from_peft(k): v for k, v in value.items()}
    return fields


def _pattern_key_from_peft(key: str) -> str:
    # PEFT matches a rank/alpha pattern key as re.match(rf"(.*\.)?({key})$", path). A plain
    # name means the same in peftreg (the path or a dotted suffix); anything else is rewritten
    # into the regex PEFT effectively uses, which peftreg matches against the whole path.
    return key if _PLAIN_NAME.fullmatch(key) else rf"(?:.*\.)?(?:{key})"


def _saved_owner(key: str, entries: list[str]) -> str | None:
    """The ``modules_to_save`` module path that tensor ``key`` belongs to, if any: PEFT wraps
    every module whose path ends with an entry (a plain string test)."""
    parts = key.split(".")
    ancestors = (".".join(parts[:k]) for k in range(1, len(parts)))
    return next((a for a in ancestors if any(a.endswith(e) for e in entries)), None)


def _saved_modules(ctx: _Import, prefix: str, others: dict[str, torch.Tensor],
                   ours: dict[str, torch.Tensor], model: nn.Module | None,
                   adapted: list[str]) -> list[str]:
    """Assign the tensors that are not adapter tensors to ``modules_to_save`` modules.

    PEFT wraps every module whose path ends with an entry (a plain string test) and saves its
    parameters under the module's own path. Entries PEFT added on its own (``classifier`` and
    ``score`` for SEQ_CLS) may match nothing; they are dropped. Returns exact module paths.
    """
    entries = _entries(ctx.doc.get("modules_to_save"))
    paths: list[str] = []
    for rest, tensor in others.items():
        owner = _saved_owner(rest, entries)
        if owner is None:
            ctx.tensor_problem(prefix + rest, "unknown tensor: neither an adapter tensor nor "
                               f"part of a modules_to_save module (modules_to_save: {entries})")
            continue
        if owner not in paths:
            paths.append(owner)
        ours[rest] = tensor
    if model is not None:
        for entry in entries:
            if any(p.endswith(entry) for p in paths):
                continue
            hits = [p for p, _ in _base_modules(model) if p.endswith(entry) and not any(
                p == a or p.startswith(a + ".") or a.startswith(p + ".") for a in adapted)]
            if hits:
                ctx.problems.append(
                    f"{ctx.weights_path}: modules_to_save entry {entry!r} names module "
                    f"{hits[0]!r} of the model, but the file holds none of its tensors "
                    f"({prefix}{hits[0]}.<parameter>)")
    return paths


def _prompt_from_peft(ctx: _Import, method: str, tensors: dict[str, torch.Tensor],
                      model: nn.Module | None, family: ModelFamily | None
                      ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    doc = ctx.doc
    n = doc.get("num_virtual_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ctx.config_error(f"num_virtual_tokens must be a positive integer, got {n!r}")
    submodules = doc.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise ctx.config_error(
            f"num_transformer_submodules = {submodules}: the prompt is split between an "
            "encoder and a decoder (encoder-decoder models), which peftreg's "
            f"{method.replace('_', ' ')} does not support; only 1 is")
    others = {k[len(_PROMPT_PREFIX):]: t for k, t in tensors.items()
              if k != _PROMPT_KEY and k.startswith(_PROMPT_PREFIX)}
    for key in tensors:
        if key != _PROMPT_KEY and not key.startswith(_PROMPT_PREFIX):
            ctx.tensor_problem(key, f"unknown tensor: {method} files hold {_PROMPT_KEY!r} and "
                               f"modules_to_save tensors under '{_PROMPT_PREFIX}'")
    ours: dict[str, torch.Tensor] = {}
    saved = _saved_modules(ctx, _PROMPT_PREFIX, others, ours, model, [])
    prompt = tensors.get(_PROMPT_KEY)
    if prompt is None:
        ctx.tensor_problem(_PROMPT_KEY, "missing")
        raise ctx.refusal()
    token_dim = doc.get("token_dim")
    if prompt.dim() != 2 or prompt.shape[0] != n:
        ctx.tensor_problem(_PROMPT_KEY, f"shape {tuple(prompt.shape)} does not have "
                           f"num_virtual_tokens = {n} rows")
    ours[_PROMPT_KEY] = prompt
    fields: dict[str, Any] = {"num_virtual_tokens": n, "modules_to_save": saved}
    if method == "prompt_tuning":
        if token_dim is not None and prompt.dim() == 2 and prompt.shape[1] != token_dim:
            ctx.tensor_problem(_PROMPT_KEY, f"width {prompt.shape[1]} differs from token_dim = "
                               f"{token_dim}")
        fields["token_dim"] = int(prompt.shape[1]) if prompt.dim() == 2 else None
        return fields, ours
    # Prefix tuning: PEFT saves the prefix itself even with prefix_projection (it runs the MLP
    # before saving), so the file always loads as a direct prefix.
    fields["prefix_projection"] = False
    layers, heads = doc.get("num_layers"), doc.get("num_attention_heads")
    if isinstance(layers, int) and isinstance(token_dim, int) and prompt.dim() == 2 \
            and prompt.shape[1] != layers * 2 * token_dim:
        ctx.tensor_problem(_PROMPT_KEY, f"width {prompt.shape[1]} is not num_layers x 2 x "
                           f"token_dim = {layers} x 2 x {token_dim}")
    if family is not None:
        geometry = _prefix_geometry(family)
        if geometry is not None:
            g_layers, g_heads, g_head_dim = geometry
            for key, got, want in (("num_layers", layers, g_layers),
                                   ("num_attention_heads", heads, g_heads),
                                   ("token_dim", token_dim, g_heads * g_head_dim)):
                if got is not None and got != want:
                    ctx.problems.append(
                        f"{ctx.config_path}: {key} = {got}, but the {family.name!r} model "
                        f"has {want} (num_attention_heads and token_dim count key/value "
                        "heads)")
    return fields, ours


def _prefix_geometry(family: ModelFamily) -> tuple[int, int, int] | None:
    """``(layers, key/value heads, head_dim)`` of ``family``, or ``None`` if unknown."""
    heads = family.num_key_value_heads or family.num_attention_heads
    head_dim = family.head_dim or (family.hidden_size // family.num_attention_heads
                                   if family.hidden_size and family.num_attention_heads
                                   else None)
    if not (family.num_layers and heads and head_dim):
        return None
    return family.num_layers, int(heads), int(head_dim)


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


# peftreg config fields each exporter translates or may drop (initialisation, storage dtype,
# internals of a projection that is saved materialised); any other field must hold its default.
_EXPORTED_FIELDS: Final = {
    "lora": {"r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern",
             "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
             "modules_to_save", "init_lora_weights", "adapter_dtype"},
    "ia3": {"target_modules", "feedforward_modules", "exclude_modules", "layers_to_transform",
            "layers_pattern", "modules_to_save", "init_ia3_weights"},
    "prefix_tuning": {"num_virtual_tokens", "prefix_projection", "encoder_hidden_size",
                      "token_dim", "modules_to_save"},
    "prompt_tuning": {"num_virtual_tokens", "prompt_tuning_init", "init_token_ids",
                      "prompt_tuning_init_text", "tokenizer_name_or_path", "token_dim",
                      "modules_to_save"},
}
# PEFT 0.21.2's defaults for the LoRA keys peftreg has no counterpart for.
_LORA_DEFAULTS: Final = {
    "fan_in_fan_out": False, "bias": "none", "init_lora_weights": True, "megatron_config": None,
    "megatron_core": "megatron.core", "trainable_token_indices": None, "loftq_config": {},
    "eva_config": None, "corda_config": None, "lora_ga_config": None, "use_dora": False,
    "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False,
    "qalora_group_size": 16, "monteclora_config": None, "layer_replication": None,
    "lora_bias": False, "target_parameters": None, "use_bdlora": None, "arrow_config": None,
    "kasa_config": None, "ensure_weight_tying": False,
}


def to_peft(
    config: MethodConfig,
    tensors: dict[str, torch.Tensor],
    *,
    family: ModelFamily | None = None,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Translate a peftreg adapter (config and saved tensors) to PEFT's config and tensors.

    Args:
        config: the adapter's method config.
        tensors: its tensors under peftreg's saved keys.
        family: the base model's family; prefix tuning needs it (PEFT records the layer count
            and key/value heads); prompt tuning records them when known.
        task_type: PEFT's ``task_type``; prompt and prefix tuning need one.
        base_model_name_or_path, revision: written as given.

    Returns:
        PEFT's ``adapter_config.json`` document and its tensors.

    Raises:
        UnsupportedOperationError: the method or a setting has no PEFT equivalent.
        AdapterError: ``task_type`` is unknown or missing where PEFT needs it, or a needed
            model geometry is unknown.
        AdapterFileError: the tensors do not match the method.
    """
    method = config.method
    peft_type = PEFT_TYPES.get(method)
    if peft_type is None:
        raise UnsupportedOperationError(
            f"method {method!r} has no Hugging Face PEFT equivalent (PEFT's format covers "
            f"{', '.join(PEFT_TYPES)}); keep this adapter in peftreg's format")
    if task_type is not None and task_type not in TASK_TYPES:
        raise AdapterError(f"unknown PEFT task_type {task_type!r}; one of {', '.join(TASK_TYPES)}")
    if task_type is None and method in _PROMPT_METHODS:
        raise AdapterError(
            f"PEFT loads {method.replace('_', ' ')} only with a task_type (it picks the model "
            f"wrapper by it); pass task_type= one of {', '.join(TASK_TYPES)}")
    for field in dataclasses.fields(config):
        if field.name in _EXPORTED_FIELDS[method]:
            continue
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING
            else dataclasses.MISSING)
        if getattr(config, field.name) != default:
            raise UnsupportedOperationError(
                f"{type(config).__name__}.{field.name} = {getattr(config, field.name)!r} has "
                "no equivalent in PEFT's format")
    doc: dict[str, Any] = {
        "peft_type": peft_type, "task_type": task_type, "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "revision": revision,
        "inference_mode": True, "peft_version": PEFT_FORMAT_VERSION,
    }
    if method in _PROMPT_METHODS:
        body, out = _prompt_to_peft(config, tensors, family)
    else:
        body, out = _tuner_to_peft(config, tensors)
    doc.update(body)
    return doc, out


def _split_saved(config: MethodConfig, tensors: dict[str, torch.Tensor], owned: set[str]
                 ) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Saved-module paths and tensors: keys not in ``owned`` under a ``modules_to_save``
    entry (peftreg's rule: the path or a dotted suffix)."""
    paths: list[str] = []
    saved: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in tensors.items():
        if key in owned:
            continue
        parts = key.split(".")
        owner = next((a for a in (".".join(parts[:k]) for k in range(1, len(parts)))
                      if any(_suffix_match(a, e) for e in config.modules_to_save)), None)
        if owner is None:
            unknown.append(key)
            continue
        if owner not in paths:
            paths.append(owner)
        saved[key] = tensor
    if unknown:
        raise AdapterFileError(f"{config.method} adapter holds tensors that are neither its own "
                               f"nor part of a modules_to_save module: {unknown[:10]}")
    return paths, saved


def _tuner_to_peft(config: Any, tensors: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    method = config.method
    owned = {k for k in tensors if any(k.endswith("." + leaf) for leaf in _LEAVES[method])}
    adapted = list(dict.fromkeys(k.rsplit(".", 2 if k.endswith(".weight") else 1)[0]
                                 for k in tensors if k in owned))
    saved_paths, saved = _split_saved(config, tensors, owned)
    spec = config.target_modules
    ff = [p for p in adapted if method == "ia3" and tensors[f"{p}.ia3_l"].shape[0] == 1
          and tensors[f"{p}.ia3_l"].shape[1] != 1]
    # Names and regexes mean the same in both libraries; "all-linear", the family default
    # (None) and the layer filter do not quite, so those are written as the adapted paths. So
    # are IA3's feed-forward modules (PEFT matches them by a plain string suffix), and then
    # the targets too, because PEFT wants feedforward_modules to be a subset of them.
    exact = (spec is None or spec == "all-linear" or config.layers_to_transform is not None
             or bool(ff))
    body: dict[str, Any] = {
        "target_modules": adapted if exact else spec,
        "exclude_modules": None if exact else config.exclude_modules,
        "modules_to_save": saved_paths or None,
    }
    if method == "lora":
        body.update(_LORA_DEFAULTS)
        alpha = config.lora_alpha
        body.update({
            "r": config.r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "lora_dropout": config.lora_dropout, "use_rslora": config.use_rslora,
            "layers_to_transform": None, "layers_pattern": None,
        })
        body.update(_patterns_to_peft(config, tensors, adapted))
    else:
        body.update({"feedforward_modules": ff, "fan_in_fan_out": False,
                     "init_ia3_weights": True})
    out = {_TUNER_PREFIX + k: t for k, t in tensors.items() if k in owned}
    out.update({_TUNER_PREFIX + k: t for k, t in saved.items()})
    return body, out


def _patterns_to_peft(config: Any, tensors: dict[str, torch.Tensor], adapted: list[str]
                      ) -> dict[str, dict[str, Any]]:
    keys = [*config.rank_pattern, *config.alpha_pattern]
    if all(_PLAIN_NAME.fullmatch(k) for k in keys):
        return {"rank_pattern": dict(config.rank_pattern),
                "alpha_pattern": dict(config.alpha_pattern)}
    # Regex keys match differently (PEFT also accepts a dotted prefix), so each adapted
    # module's own rank and alpha are written under its escaped path.
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path in adapted:
        r, scale = config.rank_and_scale(path)
        alpha = scale * (math.sqrt(r) if config.use_rslora else r)
        if r != config.r:
            ranks[re.escape(path)] = r
        if not math.isclose(alpha, config.lora_alpha, rel_tol=1e-12):
            alphas[re.escape(path)] = alpha
    return {"rank_pattern": ranks, "alpha_pattern": alphas}


def _prompt_to_peft(config: Any, tensors: dict[str, torch.Tensor], family: ModelFamily | None
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    method = config.method
    projection = ("embedding", "projection.0.weight", "projection.0.bias",
                  "projection.2.weight", "projection.2.bias")
    owned = {_PROMPT_KEY} if _PROMPT_KEY in tensors else set(projection) & set(tensors)
    saved_paths, saved = _split_saved(config, tensors, owned)
    if _PROMPT_KEY in tensors:
        prompt = tensors[_PROMPT_KEY]
    elif method == "prefix_tuning" and owned == set(projection):
        # PEFT keeps no MLP at inference: run it once, as peftreg does in eval mode.
        t = {k: tensors[k] for k in projection}
        hidden = torch.tanh(F.linear(t["embedding"], t["projection.0.weight"],
                                     t["projection.0.bias"]))
        prompt = F.linear(hidden, t["projection.2.weight"], t["projection.2.bias"]).detach()
    else:
        raise AdapterFileError(f"{method} adapter lacks its {_PROMPT_KEY!r} tensor")
    geometry = _prefix_geometry(family) if family is not None else None
    out = {_PROMPT_KEY: prompt.contiguous()}
    out.update({_PROMPT_PREFIX + k: t for k, t in saved.items()})
    body: dict[str, Any] = {"num_virtual_tokens": int(prompt.shape[0]),
                            "num_transformer_submodules": 1,
                            "modules_to_save": saved_paths or None}
    if method == "prompt_tuning":
        body.update({
            "token_dim": int(prompt.shape[1]),
            "num_attention_heads": family.num_attention_heads if family else None,
            "num_layers": family.num_layers if family and family.num_layers else None,
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
        })
        return body, out
    if geometry is None:
        raise AdapterError(
            "exporting prefix tuning to PEFT needs the base model's layer count and key/value "
            "heads (PEFT's num_layers, num_attention_heads and token_dim), and no model family "
            "describing them was given; pass the base model")
    layers, heads, head_dim = geometry
    if prompt.shape[1] != layers * 2 * heads * head_dim:
        raise AdapterFileError(
            f"prefix of width {prompt.shape[1]} does not fit the model: {layers} layers x 2 x "
            f"{heads} key/value heads x {head_dim} = {layers * 2 * heads * head_dim}")
    # Written without projection: the file holds the prefix itself, and PEFT's token_dim is
    # both the MLP's input and the key/value width, which peftreg's projection need not share.
    body.update({"token_dim": heads * head_dim, "num_attention_heads": heads,
                 "num_layers": layers, "encoder_hidden_size": heads * head_dim,
                 "prefix_projection": False, "init_weights": None})
    return body, out


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
    if (directory / PEFTREG_CONFIG_FILE).exists():
        raise AdapterFileError(f"{directory}: holds a peftreg adapter ({PEFTREG_CONFIG_FILE}); "
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
) -> Path:
    """Write adapter ``name`` of ``model`` in PEFT's format, loadable with
    ``PeftModel.from_pretrained(base, path)``.

    Adapter ``default`` is written into ``directory`` itself, any other adapter ``X`` into
    ``directory/X`` (PEFT's layout).

    Args:
        model: the adapted model.
        directory: the PEFT directory.
        name: the adapter to export.
        task_type: PEFT's ``task_type``; for prompt and prefix tuning it is guessed from the
            model's class (``...ForCausalLM``: ``CAUSAL_LM``) when not given.
        base_model_name_or_path, revision: written into the config as given.

    Returns:
        The directory holding the adapter's files.

    Raises:
        UnsupportedOperationError: the method or one of its settings has no PEFT equivalent.
        AdapterError: unknown adapter, or no task_type where PEFT needs one.
    """
    record = model.record(name)
    if task_type is None and record.method.name in _PROMPT_METHODS:
        task_type = guess_task_type(model.model)
    tensors = {k: v.detach().to("cpu").contiguous()
               for k, v in model.adapter_state_dict(name).items()}
    doc, out = to_peft(record.config, tensors, family=model.family, task_type=task_type,
                       base_model_name_or_path=base_model_name_or_path, revision=revision)
    target = Path(directory) if name == "default" else Path(directory) / name
    return write_peft_dir(target, doc, out)
