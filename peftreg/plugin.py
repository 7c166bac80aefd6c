# SPDX-License-Identifier: Apache-2.0
"""The plugin SDK: the one module a method or model-family plugin imports from peftreg.

Everything a built-in plugin uses is here, and the built-ins import nothing else from peftreg
(a test reads their imports), so a plugin written from docs/plugins.md can do whatever they do.
Names not listed in ``__all__`` are internals that may change between releases.

The API level (:data:`API_LEVEL`) rises when a name is added here or a promise changes. A
method declares the level it was written for in ``PEFTMethod.api_level``; one that needs more
than this peftreg provides is refused at registration with a message naming its distribution,
and the other plugins keep working.

Groups:
    configs: :class:`MethodConfig`, :class:`TargetedConfig`, :data:`ALL_LINEAR`.
    methods: :class:`PEFTMethod` (generic in its config), :class:`Capabilities`,
        :data:`hookimpl`.
    layer adapters: :class:`LayerAdapter`, :class:`AdapterHost`, :func:`host_for`,
        :class:`BaseAccess` / :func:`base_access` (reading the base without owning it).
    input adapters: :class:`InputAdapter`, :class:`InputSlot`, :data:`CACHE_KEYS`,
        :func:`cache_length`, :func:`extend_inputs`.
    targets and families: :func:`select_targets`, :func:`matches`, :func:`compile_pattern` /
        :func:`pattern_fullmatch` / :class:`UnsafePatternError` (bounded-time regexes),
        :func:`output_head_paths`, :func:`is_linear`, :class:`ModelFamily`,
        :func:`get_module`, :func:`replace_module`, :func:`iter_slots`.
    kernels: the ops :data:`LORA_LINEAR`, :data:`IA3_LINEAR`, :data:`HOULSBY_ADAPTER`
        (``.run(...)`` picks the compiled kernel or plain PyTorch by kernel mode and measured
        crossover), :func:`kernels` / :func:`kernel_mode` / :func:`set_kernel_mode`,
        :func:`has_extension`, and the counter-based dropout :func:`lora_dropout` /
        :func:`new_dropout_seed`.
    quantized bases: :class:`Linear4bit`.
    comparison tasks: :class:`TaskSpec` (hook ``peftreg_register_tasks``) building a
        :class:`Task` for ``peftreg compare --model NAME``.
    dense updates: :class:`LayerUpdate` and :class:`FittedAdapter`, for
        ``PEFTMethod.fit_updates`` (a method that can stand in for any mergeable adapter).
    Hugging Face PEFT's format: :class:`PeftCodec` (set as ``PEFTMethod.peft_codec``),
        :class:`PeftKeys`, the contexts :class:`PeftImport` / :class:`PeftExport` with the
        shared steps, :class:`ModuleTensors`, :data:`TUNER_PREFIX`, :data:`PROMPT_KEY`,
        :func:`is_off`, :func:`is_plain_name`, :func:`pattern_key_from_peft`.
    errors: :class:`PeftregError` and the subclasses a plugin raises.
"""

from __future__ import annotations

from torch import nn

from peftreg.base_access import BaseAccess, access_for, dense_linear, merge_bias, merge_weight
from peftreg.compare.tasks import Task, TaskSpec
from peftreg.config import MethodConfig
from peftreg.errors import (
    AdapterError,
    AdapterFileError,
    ConfigError,
    ModelFamilyError,
    PeftregError,
    TargetNotFoundError,
    UnsupportedOperationError,
)
from peftreg.families import ModelFamily
from peftreg.hookspecs import hookimpl
from peftreg.host import (
    AdapterHost,
    AdapterSlot,
    InputAdapter,
    InputSlot,
    LayerAdapter,
    get_module,
    iter_slots,
    replace_module,
)
from peftreg.io.peft_codec import (
    PROMPT_KEY,
    TUNER_PREFIX,
    ModuleTensors,
    PeftCodec,
    PeftExport,
    PeftImport,
    PeftKeys,
    is_off,
    is_plain_name,
    pattern_key_from_peft,
)
from peftreg.method import API_LEVEL, Capabilities, PEFTMethod
from peftreg.model import host_for
from peftreg.nn import Linear4bit
from peftreg.ops import has_extension, kernel_mode, kernels, set_kernel_mode
from peftreg.ops.adapters import HOULSBY_ADAPTER, IA3_LINEAR
from peftreg.ops.lora import LORA_LINEAR, new_dropout_seed
from peftreg.ops.reference import lora_dropout
from peftreg.patterns import UnsafePatternError, compile_pattern, pattern_fullmatch
from peftreg.reference_model import ReferenceTransformer
from peftreg.sequence import CACHE_KEYS, cache_length, extend_inputs
from peftreg.targets import (
    ALL_LINEAR,
    TargetedConfig,
    is_linear,
    matches,
    output_head_paths,
    select_targets,
)
from peftreg.updates import FittedAdapter, LayerUpdate

#: Names of this module that belong to the SDK (the rest of peftreg is not promised).
__all__ = [
    "ALL_LINEAR",
    "API_LEVEL",
    "CACHE_KEYS",
    "HOULSBY_ADAPTER",
    "IA3_LINEAR",
    "LORA_LINEAR",
    "PROMPT_KEY",
    "TUNER_PREFIX",
    "AdapterError",
    "AdapterFileError",
    "AdapterHost",
    "AdapterSlot",
    "BaseAccess",
    "Capabilities",
    "ConfigError",
    "FittedAdapter",
    "InputAdapter",
    "InputSlot",
    "LayerAdapter",
    "LayerUpdate",
    "Linear4bit",
    "MethodConfig",
    "ModelFamily",
    "ModelFamilyError",
    "ModuleTensors",
    "PEFTMethod",
    "PeftCodec",
    "PeftExport",
    "PeftImport",
    "PeftKeys",
    "PeftregError",
    "ReferenceTransformer",
    "TargetNotFoundError",
    "TargetedConfig",
    "Task",
    "TaskSpec",
    "UnsafePatternError",
    "UnsupportedOperationError",
    "base_access",
    "cache_length",
    "compile_pattern",
    "dense_linear",
    "extend_inputs",
    "get_module",
    "has_extension",
    "hookimpl",
    "host_for",
    "is_linear",
    "is_off",
    "is_plain_name",
    "iter_slots",
    "kernel_mode",
    "kernels",
    "lora_dropout",
    "matches",
    "merge_bias",
    "merge_weight",
    "new_dropout_seed",
    "output_head_paths",
    "pattern_fullmatch",
    "pattern_key_from_peft",
    "replace_module",
    "select_targets",
    "set_kernel_mode",
]


def base_access(host: AdapterHost | nn.Module) -> BaseAccess:
    """A :class:`BaseAccess` for the base module of ``host`` (from :func:`host_for`).

    Keep it on the layer adapter as a plain attribute: it registers nothing, so the base stays
    frozen, uncounted and out of the adapter file, and holding it tells the stacking contract
    that the adapter reads its base at run time. Given a bare module (``host.base``) it reads
    that module; use that only while building (shapes, device, dtype), not to keep.
    """
    return access_for(host)
