# SPDX-License-Identifier: Apache-2.0
"""PEFT codecs: how a method plugin translates its adapters to and from Hugging Face PEFT's files.

The core (:mod:`peftreg.io.peft_format`) owns the directory: its file names, reading and checking
``adapter_config.json`` and ``adapter_model.safetensors``, the crash-consistent two-file write,
and the rules every method shares (the common config keys, what an unknown key means, which
tensors belong to ``modules_to_save`` modules, what a target list selects). A method that PEFT
also has sets ``PEFTMethod.peft_codec`` to a :class:`PeftCodec`, which owns what only that method
knows: its ``peft_type``, its config keys and their meaning, its tensor names.

The codec works on a context. :class:`PeftImport` holds the PEFT document being read and
collects problems (so a refusal lists them all); :class:`PeftExport` holds the peftreg config and
tensors being written. Both offer the shared steps as methods, so a codec for a method that
adapts modules (PEFT's "tuners": LoRA, IA3, LoHa, ...) is a table of leaf names plus the few
fields that differ, and one for an input-side method (prompt or prefix tuning) reads one tensor.
"""

from __future__ import annotations

import abc
import dataclasses
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Final, TypeGuard

import torch
from torch import nn

from peftreg.config import MethodConfig
from peftreg.errors import AdapterFileError
from peftreg.families import ModelFamily
from peftreg.patterns import UnsafePatternError, compile_pattern
from peftreg.targets import iter_base_modules

__all__ = [
    "COMMON_KEYS", "PROMPT_KEY", "PROMPT_PREFIX", "TUNER_PREFIX", "ModuleTensors", "PeftCodec",
    "PeftExport", "PeftImport", "PeftKeys", "is_off",
]

#: Where PEFT puts the tensors of a tuner (every tensor of LoRA, IA3, ... is under it).
TUNER_PREFIX: Final = "base_model.model."
#: Where prompt and prefix tuning files put ``modules_to_save`` tensors.
PROMPT_PREFIX: Final = "base_model."
#: The one tensor of a prompt or prefix tuning file.
PROMPT_KEY: Final = "prompt_embeddings"
#: Config keys every PEFT method writes; none changes what the adapter computes.
COMMON_KEYS: Final = frozenset({"peft_type", "task_type", "auto_mapping", "peft_version",
                                "base_model_name_or_path", "revision", "inference_mode",
                                # peftreg's record of a refit (peftreg.io.refit), metadata only
                                "peftreg_conversion"})
# Layers whose whole weight PEFT also saves when they are adapted (save_embedding_layers).
_EMBEDDING_NAMES: Final = ("embed_tokens", "lm_head")


def is_off(value: Any) -> bool:
    """Whether a PEFT config value means "feature off": null, false, ``"none"`` or empty."""
    return value is None or value is False or value == "none" or value in ([], {})


def _switches_on(value: Any) -> bool:
    """Whether an unknown key's value turns a feature on (true, a non-empty list or object)
    rather than recording metadata (a string, a number, null, false, an empty container)."""
    return value is True or (isinstance(value, (list, dict)) and len(value) > 0)


def _suffix_match(path: str, entry: str) -> bool:
    return path == entry or path.endswith("." + entry)


def _is_pattern_spec(value: Any) -> TypeGuard[list[str] | str]:
    """A non-empty regex string or non-empty list of names (PEFT's two forms of a spec)."""
    return (isinstance(value, str) and bool(value)) or (
        isinstance(value, list) and bool(value) and all(isinstance(e, str) for e in value))


@dataclasses.dataclass(frozen=True)
class PeftKeys:
    """The config keys of one PEFT method, each decided once.

    Attributes:
        mapped: keys the codec translates into the peftreg config.
        ignored: keys that matter only while training or initialising, with the reason.
        refused: keys that change the computation in a way the method does not reproduce,
            with what they do; a file is refused when one holds anything but its off value.

    A key in none of the three (written by a newer PEFT) is read as metadata when its value
    is plain and refused when it switches something on.
    """

    mapped: frozenset[str]
    ignored: Mapping[str, str] = dataclasses.field(default_factory=dict)
    refused: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ModuleTensors:
    """A tuner file's tensors, sorted by the core.

    Attributes:
        adapted: module path -> leaf name -> tensor, for the method's own tensors.
        tensors: every tensor the adapter keeps, under peftreg's saved keys (adapter tensors
            and ``modules_to_save`` tensors).
        saved_modules: exact paths of the ``modules_to_save`` modules found.
    """

    adapted: dict[str, dict[str, torch.Tensor]]
    tensors: dict[str, torch.Tensor]
    saved_modules: list[str]


@dataclasses.dataclass
class PeftImport:
    """One PEFT document being read: where errors point, what was found, the model if known.

    Problems with tensors are collected (:meth:`tensor_problem`) so that one refusal lists
    them all; problems with the config end the read at once (``raise ctx.config_error(...)``).
    """

    doc: dict[str, Any]
    config_path: str
    weights_path: str
    model: nn.Module | None = None
    family: ModelFamily | None = None
    problems: list[str] = dataclasses.field(default_factory=list)

    # -- reporting --------------------------------------------------------------------------

    def tensor_problem(self, key: str, problem: str) -> None:
        """Record a problem with tensor ``key`` of the weights file."""
        self.problems.append(f"{self.weights_path}: tensor {key!r}: {problem}")

    def file_problem(self, problem: str) -> None:
        """Record a problem with the adapter as a whole (names the weights file)."""
        self.problems.append(f"{self.weights_path}: {problem}")

    def config_problem(self, problem: str) -> None:
        """Record a problem with the config that should be listed with the tensor problems."""
        self.problems.append(f"{self.config_path}: {problem}")

    def config_error(self, problem: str) -> AdapterFileError:
        """The error for a config that cannot be read on (raise it)."""
        return AdapterFileError(f"{self.config_path}: {problem}")

    def refusal(self) -> AdapterFileError:
        """The error listing every problem recorded so far."""
        return AdapterFileError(f"PEFT adapter refused ({len(self.problems)} problem(s)):\n  "
                                + "\n  ".join(self.problems))

    def raise_problems(self) -> None:
        """Raise :meth:`refusal` if any problem was recorded."""
        if self.problems:
            raise self.refusal()

    # -- config keys ------------------------------------------------------------------------

    def check_keys(self, keys: PeftKeys, peft_version: str) -> None:
        """Refuse a document using a feature ``keys`` refuses or that this peftreg does not
        know; warn once about unknown keys holding plain values (kept as metadata)."""
        refusals = []
        unknown_metadata = []
        for key, value in self.doc.items():
            if key in COMMON_KEYS or key in keys.mapped or key in keys.ignored:
                continue
            if key in keys.refused:
                if not is_off(value):
                    refusals.append(f"{key} = {value!r}: {keys.refused[key]}")
            elif _switches_on(value):
                refusals.append(
                    f"{key} = {value!r}: not a PEFT {peft_version} {self.doc['peft_type']} "
                    f"setting (the file says peft_version {self.doc.get('peft_version')!r}), "
                    "and its value switches something on that peftreg cannot follow")
            else:
                unknown_metadata.append(key)
        if refusals:
            raise self.config_error(
                "uses PEFT features peftreg cannot reproduce, so the adapter is refused:\n  "
                + "\n  ".join(refusals))
        if unknown_metadata:
            # Every PEFT release adds keys; ones holding plain values are taken as metadata,
            # as PEFT itself does with keys it does not know.
            warnings.warn(
                f"{self.config_path}: ignoring keys this peftreg does not know (written by "
                f"PEFT {self.doc.get('peft_version')!r}; read as metadata, since none switches "
                f"a feature on): {', '.join(sorted(unknown_metadata))}", UserWarning,
                stacklevel=5)

    def entries(self, key: str) -> list[str]:
        """A PEFT list-or-null of names (``modules_to_save``, ...), deduplicated in order."""
        return list(dict.fromkeys(self.doc.get(key) or []))

    # -- tuners: tensors under base_model.model.<module path>.<leaf> ------------------------

    def read_modules(self, tensors: Mapping[str, torch.Tensor], leaves: Iterable[str], *,
                     drop: tuple[str, ...] = ()) -> ModuleTensors:
        """Sort a tuner file's tensors into the method's own (ending in one of ``leaves``),
        ``modules_to_save`` tensors and PEFT's copies of adapted embedding weights (dropped
        when they equal the model's, refused otherwise); anything else is a problem.

        Args:
            tensors: the file's tensors by PEFT key.
            leaves: the leaf names the method's tensors end with (``"lora_A.weight"``).
            drop: key endings to skip silently (buffers PEFT saves that do not affect the
                outputs).
        """
        leaves = tuple(leaves)
        adapted: dict[str, dict[str, torch.Tensor]] = {}
        others: dict[str, torch.Tensor] = {}
        copies: dict[str, torch.Tensor] = {}
        ours: dict[str, torch.Tensor] = {}
        entries = self.entries("modules_to_save")
        for key, tensor in tensors.items():
            if not key.startswith(TUNER_PREFIX):
                self.tensor_problem(key, f"unknown tensor: {self.doc.get('peft_type')} tensors "
                                    f"are named '{TUNER_PREFIX}<module path>.<name>'")
                continue
            rest = key[len(TUNER_PREFIX):]
            if drop and rest.endswith(drop):
                continue
            leaf = next((leaf for leaf in leaves if rest.endswith("." + leaf)), None)
            if leaf is None:
                # A tensor under a modules_to_save module is that module's trained copy,
                # whatever the module is called (an output head included); only the rest can
                # be a base-weight copy PEFT adds for adapted embedding layers.
                module = rest.rpartition(".")[0].removesuffix(".base_layer")
                embedding = module.rpartition(".")[2] in _EMBEDDING_NAMES or (
                    ".base_layer." in rest)
                if embedding and _saved_owner(rest, entries) is None:
                    copies[rest] = tensor
                else:
                    others[rest] = tensor
                continue
            adapted.setdefault(rest[: -len(leaf) - 1], {})[leaf] = tensor
            ours[rest] = tensor
        for rest, tensor in copies.items():
            if ".base_layer." in rest and rest.split(".base_layer.")[0] not in adapted:
                others[rest] = tensor  # not a copy PEFT makes: a saved module's or unknown
        self._check_base_copies({k: t for k, t in copies.items() if k not in others})
        saved = self.saved_modules(TUNER_PREFIX, others, ours, sorted(adapted))
        if not adapted:
            self.file_problem(f"holds no {self.doc.get('peft_type')} tensors "
                              f"({', '.join(leaves)})")
        return ModuleTensors(adapted, ours, saved)

    def target_fields(self, found: ModuleTensors, *, layer_filter: bool = True
                      ) -> dict[str, Any]:
        """The fields of :class:`~peftreg.plugin.TargetedConfig` a tuner file determines:
        ``target_modules``, ``exclude_modules``, ``modules_to_save`` and (with
        ``layer_filter``, for methods whose PEFT config has them) ``layers_to_transform`` and
        ``layers_pattern``. The targets must select every module the tensors adapt."""
        adapted = list(found.adapted)
        spec = self.doc.get("target_modules")
        fields: dict[str, Any] = {
            "modules_to_save": found.saved_modules,
            "target_modules": self._targets(spec, adapted),
            "exclude_modules": None if is_off(self.doc.get("exclude_modules"))
            else self.doc.get("exclude_modules"),
        }
        # PEFT applies the layer filter only to a list of targets.
        if layer_filter and not isinstance(fields["target_modules"], str):
            layers = self.doc.get("layers_to_transform")
            fields["layers_to_transform"] = [layers] if isinstance(layers, int) and not \
                isinstance(layers, bool) else (layers or None)
            pattern = self.doc.get("layers_pattern")
            if isinstance(pattern, list):
                pattern = "|".join(f"(?:{p})" for p in pattern) or None
            fields["layers_pattern"] = pattern or None
        return fields

    def base_modules(self) -> list[tuple[str, nn.Module]]:
        """``(path, module)`` of the model's base modules (empty without a model)."""
        return list(iter_base_modules(self.model)) if self.model is not None else []

    def _targets(self, spec: Any, adapted: list[str]) -> list[str] | str:
        self._check_targets_cover(spec, adapted)
        if isinstance(spec, str):
            return spec
        if not isinstance(spec, list) or not spec:
            # PEFT always saves its resolved targets; without them, adapt what the file holds.
            return adapted
        # PEFT tolerates names that match nothing (peftreg does not): keep the names that
        # match an adapted module in the file or, with the model at hand, any module of it,
        # so that a module whose tensors are missing from the file is reported, not skipped.
        names = [p for p, _ in self.base_modules()]
        kept = [e for e in self.entries("target_modules")
                if any(_suffix_match(p, e) for p in [*adapted, *names])]
        return kept or adapted

    def _spec_selects(self, field: str, spec: list[str] | str, path: str) -> bool:
        """PEFT's rule for a module list (the path or a dotted suffix) or a regex (the whole
        path)."""
        if isinstance(spec, list):
            return any(_suffix_match(path, entry) for entry in spec)
        try:
            return compile_pattern(spec, field).fullmatch(path) is not None
        except UnsafePatternError as exc:
            raise self.config_error(exc.message_for_file()) from exc

    def _check_targets_cover(self, spec: Any, adapted: list[str]) -> None:
        """The config's targets must select every module the tensors adapt, and its
        exclusions none of them: otherwise the config and the weights contradict each other."""
        if _is_pattern_spec(spec) and spec != "all-linear":
            missed = [p for p in adapted if not self._spec_selects("target_modules", spec, p)]
            if missed:
                raise self.config_error(
                    f"target_modules = {spec!r} does not select the modules its tensors adapt: "
                    f"{', '.join(missed[:8])}{' ...' if len(missed) > 8 else ''} (the tensors "
                    f"in {self.weights_path} belong to {', '.join(sorted(adapted)[:8])}); the "
                    "config contradicts its weights")
        exclude = self.doc.get("exclude_modules")
        if _is_pattern_spec(exclude):
            excluded = [p for p in adapted
                        if self._spec_selects("exclude_modules", exclude, p)]
            if excluded:
                raise self.config_error(
                    f"exclude_modules = {exclude!r} excludes modules its tensors adapt: "
                    f"{', '.join(excluded[:8])}; the config contradicts its weights")

    def _check_base_copies(self, copies: dict[str, torch.Tensor]) -> None:
        """PEFT saves whole embedding weights next to the adapter when an embedding layer named
        like ``embed_tokens``/``lm_head`` is adapted (its ``save_embedding_layers``), in case
        the vocabulary was resized. peftreg loads adapters, not base weights: the copies are
        dropped when they equal the model's own weights and refused when they differ."""
        if not copies:
            return
        if self.model is None:
            warnings.warn(
                f"{self.weights_path}: holds copies of base weights ({', '.join(copies)}) that "
                "PEFT saves with adapted embedding layers; they are dropped unchecked (no model "
                "given); they matter only if the vocabulary was resized or trained",
                UserWarning, stacklevel=6)
            return
        modules = dict(self.base_modules())
        for rest, tensor in copies.items():
            module_path, _, param = rest.rpartition(".")
            module = modules.get(module_path.removesuffix(".base_layer"))
            own = getattr(module, param, None) if module is not None else None
            if not isinstance(own, torch.Tensor):
                self.tensor_problem(TUNER_PREFIX + rest, "a base-weight copy for a parameter "
                                    "the model does not have")
            elif own.shape != tensor.shape or not torch.equal(tensor.to(own.dtype), own.cpu()):
                self.tensor_problem(
                    TUNER_PREFIX + rest, "differs from the model's own weight (the vocabulary "
                    f"was resized or trained: {tuple(tensor.shape)} in the file, "
                    f"{tuple(own.shape)} in the model); peftreg loads adapters, not base weights")

    # -- modules_to_save --------------------------------------------------------------------

    def saved_modules(self, prefix: str, others: Mapping[str, torch.Tensor],
                      ours: dict[str, torch.Tensor], adapted: list[str]) -> list[str]:
        """Assign tensors that are not adapter tensors to ``modules_to_save`` modules.

        PEFT wraps every module whose path ends with an entry (a plain string test) and saves
        its parameters under the module's own path. Entries PEFT added on its own
        (``classifier`` and ``score`` for SEQ_CLS) may match nothing; they are dropped. The
        tensors found are added to ``ours`` (without ``prefix``).

        Returns:
            The exact module paths.
        """
        entries = self.entries("modules_to_save")
        paths: list[str] = []
        for rest, tensor in others.items():
            owner = _saved_owner(rest, entries)
            if owner is None:
                self.tensor_problem(prefix + rest, "unknown tensor: neither an adapter tensor "
                                    f"nor part of a modules_to_save module (modules_to_save: "
                                    f"{entries})")
                continue
            if owner not in paths:
                paths.append(owner)
            ours[rest] = tensor
        for entry in entries if self.model is not None else []:
            if any(p.endswith(entry) for p in paths):
                continue
            hits = [p for p, _ in self.base_modules() if p.endswith(entry) and not any(
                p == a or p.startswith(a + ".") or a.startswith(p + ".") for a in adapted)]
            if hits:
                self.file_problem(
                    f"modules_to_save entry {entry!r} names module {hits[0]!r} of the model, "
                    f"but the file holds none of its tensors ({prefix}{hits[0]}.<parameter>)")
        return paths

    # -- input-side methods: one prompt_embeddings tensor -----------------------------------

    def read_prompt(self, tensors: Mapping[str, torch.Tensor], what: str
                    ) -> tuple[torch.Tensor, ModuleTensors]:
        """Check a prompt or prefix tuning file and return its ``prompt_embeddings`` tensor
        (``num_virtual_tokens`` rows) and its ``modules_to_save`` tensors.

        Args:
            tensors: the file's tensors by PEFT key.
            what: the method, for messages (``"prompt tuning"``).
        """
        n = self.doc.get("num_virtual_tokens")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise self.config_error(f"num_virtual_tokens must be a positive integer, got {n!r}")
        submodules = self.doc.get("num_transformer_submodules") or 1
        if submodules != 1:
            raise self.config_error(
                f"num_transformer_submodules = {submodules}: the prompt is split between an "
                f"encoder and a decoder (encoder-decoder models), which peftreg's {what} "
                "does not support; only 1 is")
        others = {k[len(PROMPT_PREFIX):]: t for k, t in tensors.items()
                  if k != PROMPT_KEY and k.startswith(PROMPT_PREFIX)}
        for key in tensors:
            if key != PROMPT_KEY and not key.startswith(PROMPT_PREFIX):
                self.tensor_problem(key, f"unknown tensor: {what} files hold {PROMPT_KEY!r} "
                                    f"and modules_to_save tensors under '{PROMPT_PREFIX}'")
        ours: dict[str, torch.Tensor] = {}
        saved = self.saved_modules(PROMPT_PREFIX, others, ours, [])
        prompt = tensors.get(PROMPT_KEY)
        if prompt is None:
            self.tensor_problem(PROMPT_KEY, "missing")
            raise self.refusal()
        if prompt.dim() != 2 or prompt.shape[0] != n:
            self.tensor_problem(PROMPT_KEY, f"shape {tuple(prompt.shape)} does not have "
                                f"num_virtual_tokens = {n} rows")
        ours[PROMPT_KEY] = prompt
        return prompt, ModuleTensors({}, ours, saved)


def _saved_owner(key: str, entries: list[str]) -> str | None:
    """The ``modules_to_save`` module path that tensor ``key`` belongs to, if any: PEFT wraps
    every module whose path ends with an entry (a plain string test)."""
    parts = key.split(".")
    ancestors = (".".join(parts[:k]) for k in range(1, len(parts)))
    return next((a for a in ancestors if any(a.endswith(e) for e in entries)), None)


@dataclasses.dataclass
class PeftExport:
    """One peftreg adapter being written in PEFT's format.

    Attributes:
        config: the adapter's method config.
        tensors: its tensors under peftreg's saved keys (on the CPU).
        family: the base model's family, if known (prefix tuning needs its geometry).
        task_type: PEFT's ``task_type`` being written.
        original_base: write the adapter so that it applies to the base model as it was
            before the adapter was created. Only a method whose initialisation rewrites the
            base weights (LoRA's PiSSA and OLoRA) has anything to do; the others write the
            same either way.
        unsaved: tensors the adapter holds but does not save (its non-persistent buffers,
            under saved keys), given with ``original_base``.
    """

    config: MethodConfig
    tensors: dict[str, torch.Tensor]
    family: ModelFamily | None = None
    task_type: str | None = None
    original_base: bool = False
    unsaved: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def split_saved(self, owned: set[str]) -> tuple[list[str], dict[str, torch.Tensor]]:
        """``modules_to_save`` paths and tensors: the keys not in ``owned`` under an entry
        (peftreg's rule: the path or a dotted suffix). Any other key is an error."""
        paths: list[str] = []
        saved: dict[str, torch.Tensor] = {}
        unknown = []
        for key, tensor in self.tensors.items():
            if key in owned:
                continue
            parts = key.split(".")
            owner = next((a for a in (".".join(parts[:k]) for k in range(1, len(parts)))
                          if any(_suffix_match(a, e) for e in self.config.modules_to_save)),
                         None)
            if owner is None:
                unknown.append(key)
                continue
            if owner not in paths:
                paths.append(owner)
            saved[key] = tensor
        if unknown:
            raise AdapterFileError(f"{self.config.method} adapter holds tensors that are "
                                   "neither its own nor part of a modules_to_save module: "
                                   f"{unknown[:10]}")
        return paths, saved

    def modules(self, leaves: Iterable[str]) -> ModuleTensors:
        """The adapter's tensors sorted as a tuner's: ``adapted`` (module path -> leaf ->
        tensor, for keys ending in one of ``leaves``), ``tensors`` (every tensor under PEFT's
        key) and the ``modules_to_save`` paths."""
        leaves = tuple(leaves)
        adapted: dict[str, dict[str, torch.Tensor]] = {}
        owned: set[str] = set()
        for key, tensor in self.tensors.items():
            leaf = next((leaf for leaf in leaves if key.endswith("." + leaf)), None)
            if leaf is not None:
                adapted.setdefault(key[: -len(leaf) - 1], {})[leaf] = tensor
                owned.add(key)
        saved_paths, _ = self.split_saved(owned)
        out = {TUNER_PREFIX + k: t for k, t in self.tensors.items()}
        return ModuleTensors(adapted, out, saved_paths)

    def target_fields(self, found: ModuleTensors, *, exact: bool = False) -> dict[str, Any]:
        """``target_modules``, ``exclude_modules`` and ``modules_to_save`` for PEFT's config.

        Names and regexes mean the same in both libraries; ``"all-linear"``, the family's
        default (``None``) and the layer filter do not quite, so those (or any case the codec
        asks for with ``exact``) are written as the adapted paths."""
        config: Any = self.config
        spec = config.target_modules
        exact = exact or spec is None or spec == "all-linear" or (
            getattr(config, "layers_to_transform", None) is not None)
        return {"target_modules": list(found.adapted) if exact else spec,
                "exclude_modules": None if exact else config.exclude_modules,
                "modules_to_save": found.saved_modules or None}

    def prompt_tensors(self, prompt: torch.Tensor, owned: set[str]
                       ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The tensors of a prompt or prefix tuning file (``prompt_embeddings`` and the
        ``modules_to_save`` tensors under ``base_model.``) and the saved-module paths."""
        saved_paths, saved = self.split_saved(owned)
        out = {PROMPT_KEY: prompt.contiguous()}
        out.update({PROMPT_PREFIX + k: t for k, t in saved.items()})
        return out, saved_paths


class PeftCodec(abc.ABC):
    """A method's translation to and from Hugging Face PEFT's adapter format.

    Set an instance as ``PEFTMethod.peft_codec``. The core reads the files, checks the tensors
    (header, dtype, finite) and the shared config keys, then calls :meth:`read`; for an export
    it checks that every config field outside :attr:`exported_fields` holds its default, then
    calls :meth:`write` and writes the files.

    Attributes:
        peft_type: PEFT's name of the method (``"LORA"``); several codecs may share one and
            tell their documents apart with :meth:`claims` (LoRA and DoRA both write LORA).
        peft_version: the PEFT release whose keys :attr:`keys` was decided against.
        keys: the method's config keys (see :class:`PeftKeys`).
        exported_fields: the peftreg config fields :meth:`write` translates or may drop
            (initialisation settings, a storage dtype); an export with any other field away
            from its default is refused, naming it.
        needs_task_type: PEFT loads the method only with a ``task_type`` (prompt and prefix
            tuning pick PEFT's model wrapper by it).
        needs_model: the export needs the base model's family (prefix tuning records the
            model's layer count and heads).
        explicit_only: read a document only when the load names this method (QLoRA reads
            LoRA's LORA documents onto a base it quantizes, when asked to).
    """

    peft_type: ClassVar[str]
    peft_version: ClassVar[str] = "0.21.2"
    keys: ClassVar[PeftKeys]
    exported_fields: ClassVar[frozenset[str]]
    needs_task_type: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False
    explicit_only: ClassVar[bool] = False

    def claims(self, doc: Mapping[str, Any]) -> bool:
        """Whether this codec reads ``doc`` (a document whose ``peft_type`` is
        :attr:`peft_type`). The default claims all of them."""
        return True

    @abc.abstractmethod
    def read(self, ctx: PeftImport, tensors: Mapping[str, torch.Tensor]
             ) -> tuple[dict[str, Any], ModuleTensors]:
        """Translate ``ctx.doc`` and ``tensors`` (by PEFT key, already checked as tensors).

        Record tensor problems on ``ctx`` and raise ``ctx.config_error(...)`` for a config
        that cannot be read; the core raises the collected problems afterwards.

        Returns:
            The keyword arguments of the method's config class, and the tensors under
            peftreg's saved keys (with the adapted module paths in ``adapted``).
        """

    @abc.abstractmethod
    def write(self, ctx: PeftExport) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Translate ``ctx.config`` and ``ctx.tensors``.

        Returns:
            The method's part of ``adapter_config.json`` (the core adds the common keys) and
            the tensors by PEFT key.

        Raises:
            UnsupportedOperationError: a setting has no PEFT equivalent.
            AdapterError: information PEFT's format needs is missing.
        """


_PLAIN_NAME: Final = re.compile(r"[A-Za-z0-9_-]+")


def pattern_key_from_peft(key: str) -> str:
    """A PEFT ``rank_pattern``/``alpha_pattern`` key as a peftreg pattern key.

    PEFT matches such a key as ``re.match(rf"(.*\\.)?({key})$", path)``. A plain name means the
    same in peftreg (the path or a dotted suffix); anything else is rewritten into the regex PEFT
    effectively uses, which peftreg matches against the whole path.
    """
    return key if _PLAIN_NAME.fullmatch(key) else rf"(?:.*\.)?(?:{key})"


def is_plain_name(key: str) -> bool:
    """Whether a pattern key is a plain module name (it then means the same in PEFT)."""
    return _PLAIN_NAME.fullmatch(key) is not None
