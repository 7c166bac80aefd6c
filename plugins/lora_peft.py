# SPDX-License-Identifier: Apache-2.0
"""LoRA in Hugging Face PEFT's format (``peft_type`` LORA), decided key by key from PEFT 0.21.2.

Tensor names are the same in both libraries (``<module path>.lora_A.weight`` and so on, under
PEFT's ``base_model.model.`` prefix), so the codec maps config fields. A PEFT key that changes
the computation in a way peftreg's LoRA does not follow is refused, naming it; DoRA's
``use_dora`` is left to a method that claims it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any, Final

import torch

from peftreg.plugin import (
    ModuleTensors,
    PeftCodec,
    PeftExport,
    PeftImport,
    PeftKeys,
    UnsupportedOperationError,
    is_off,
    is_plain_name,
    pattern_key_from_peft,
)

LINEAR_PAIR: Final = ("lora_A.weight", "lora_B.weight")
EMBEDDING_PAIR: Final = ("lora_embedding_A", "lora_embedding_B")
LEAVES: Final = (*LINEAR_PAIR, *EMBEDDING_PAIR)

KEYS: Final = PeftKeys(
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
        "use_dora": "DoRA rescales the weight by a learned magnitude vector (no installed "
                    "method reads DoRA adapters)",
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
# init_lora_weights values whose initialisation rewrites the base weights.
BASE_REWRITING_INITS: Final = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Those peftreg's LoRA reproduces (the same decomposition of the same base weight).
REPRODUCED_INITS: Final = ("pissa", "olora")
# PEFT 0.21.2's defaults for the LoRA keys peftreg has no counterpart for.
PEFT_DEFAULTS: Final = {
    "fan_in_fan_out": False, "bias": "none", "init_lora_weights": True, "megatron_config": None,
    "megatron_core": "megatron.core", "trainable_token_indices": None, "loftq_config": {},
    "eva_config": None, "corda_config": None, "lora_ga_config": None, "use_dora": False,
    "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False,
    "qalora_group_size": 16, "monteclora_config": None, "layer_replication": None,
    "lora_bias": False, "target_parameters": None, "use_bdlora": None, "arrow_config": None,
    "kasa_config": None, "ensure_weight_tying": False,
}


def check_pairs(ctx: PeftImport, found: ModuleTensors) -> None:
    """Every adapted module has exactly one complete pair of factors of matching rank."""
    for path, parts in found.adapted.items():
        prefix = f"base_model.model.{path}"
        pair = LINEAR_PAIR if any(leaf in parts for leaf in LINEAR_PAIR) else EMBEDDING_PAIR
        other = EMBEDDING_PAIR if pair is LINEAR_PAIR else LINEAR_PAIR
        if any(leaf in parts for leaf in other):
            ctx.tensor_problem(f"{prefix}.{other[0]}", "a module has both linear and embedding "
                               "LoRA factors")
            continue
        missing = [leaf for leaf in pair if leaf not in parts]
        if missing:
            present = next(leaf for leaf in pair if leaf in parts)
            ctx.tensor_problem(f"{prefix}.{missing[0]}", f"missing: {prefix}.{present} has no "
                               "partner, so the update B @ A cannot be formed")
            continue
        a, b = parts[pair[0]], parts[pair[1]]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            ctx.tensor_problem(f"{prefix}.{pair[1]}", f"shape {tuple(b.shape)} does not fit "
                               f"{pair[0]} of shape {tuple(a.shape)} (they must be (out, r) "
                               "and (r, in) with the same rank)")


def lora_fields(ctx: PeftImport) -> dict[str, Any]:
    """The LoRA config fields of a PEFT LORA document (rank, alpha, dropout, patterns)."""
    doc = ctx.doc
    fields: dict[str, Any] = {k: doc[k] for k in ("r", "lora_alpha", "lora_dropout",
                                                   "use_rslora") if k in doc}
    for key in ("rank_pattern", "alpha_pattern"):
        value = doc.get(key) or {}
        if not isinstance(value, dict):
            raise ctx.config_error(f"{key} must be an object, got {value!r}")
        fields[key] = {pattern_key_from_peft(k): v for k, v in value.items()}
    init = doc.get("init_lora_weights")
    if init in REPRODUCED_INITS:
        # PEFT saves the trained factors and re-runs the decomposition on the base it loads
        # onto; peftreg's LoRA does the same, so on the original base the numbers are PEFT's.
        fields["init_lora_weights"] = init
    elif isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        warnings.warn(
            f"{ctx.config_path}: init_lora_weights={init!r} rewrote the base weights when the "
            "adapter was created; it reproduces the trained model only on that rewritten base "
            "(or convert it with PEFT's path_initial_model_for_weight_conversion)",
            UserWarning, stacklevel=5)
    return fields


def lora_body(ctx: PeftExport, found: ModuleTensors) -> dict[str, Any]:
    """PEFT's LORA keys for a peftreg LoRA config (every key PEFT writes, defaults included)."""
    config: Any = ctx.config
    alpha = config.lora_alpha
    body: dict[str, Any] = dict(PEFT_DEFAULTS)
    body.update(ctx.target_fields(found))
    body.update({
        "r": config.r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": config.lora_dropout, "use_rslora": config.use_rslora,
        "layers_to_transform": None, "layers_pattern": None,
    })
    if config.init_lora_weights in REPRODUCED_INITS:
        body["init_lora_weights"] = config.init_lora_weights
    keys = [*config.rank_pattern, *config.alpha_pattern]
    if all(is_plain_name(k) for k in keys):
        body.update(rank_pattern=dict(config.rank_pattern),
                    alpha_pattern=dict(config.alpha_pattern))
        return body
    # Regex keys match differently (PEFT also accepts a dotted prefix), so each adapted
    # module's own rank and alpha are written under its escaped path.
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path in found.adapted:
        r, scale = config.rank_and_scale(path)
        module_alpha = scale * (math.sqrt(r) if config.use_rslora else r)
        if r != config.r:
            ranks[re.escape(path)] = r
        if not math.isclose(module_alpha, config.lora_alpha, rel_tol=1e-12):
            alphas[re.escape(path)] = module_alpha
    body.update(rank_pattern=ranks, alpha_pattern=alphas)
    return body


INIT_LEAVES: Final = ("lora_A_init", "lora_B_init")


def on_original_base(ctx: PeftExport) -> PeftExport:
    """A PiSSA or OLoRA adapter rewritten as a plain LoRA of twice the rank that applies to
    the original base weight ``W`` instead of the residual ``W - s B0 A0`` it was trained on.

    ``W_res + s B A = W + s (B A - B0 A0) = W + s [B, -B0] [A; A0]``: the factors are stacked
    along the rank, the trained ones first, as PEFT 0.21.2's ``subtract_mutated_init`` stacks
    them. The rank doubles, so ``lora_alpha`` doubles too (times ``sqrt(2)`` with rsLoRA) and
    every module keeps its scale; pattern entries follow the same rule.
    """
    config: Any = ctx.config
    factor = math.sqrt(2.0) if config.use_rslora else 2.0
    tensors = dict(ctx.tensors)
    for key in list(tensors):
        for leaf, init_leaf, dim, sign in (("lora_A.weight", "lora_A_init", 0, 1.0),
                                           ("lora_B.weight", "lora_B_init", 1, -1.0)):
            if not key.endswith("." + leaf):
                continue
            init_key = key[: -len(leaf)] + init_leaf
            init = ctx.unsaved.get(init_key)
            if init is None:
                raise UnsupportedOperationError(
                    f"{init_key}: the initial factor of this {config.init_lora_weights} "
                    "adapter is not held, so it cannot be rewritten for the original base "
                    "(create or load the adapter on the original base model first)")
            tensors[key] = torch.cat([tensors[key], sign * init.to(tensors[key].dtype)],
                                     dim=dim)
    converted = dataclasses.replace(
        config, r=2 * config.r, lora_alpha=factor * config.lora_alpha,
        init_lora_weights="kaiming",
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()})
    return dataclasses.replace(ctx, config=converted, tensors=tensors, original_base=False,
                               unsaved={})


class LoraPeftCodec(PeftCodec):
    """PEFT's LORA documents without DoRA, and peftreg LoRA adapters written as them."""

    peft_type = "LORA"
    keys = KEYS
    exported_fields = frozenset({
        "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern",
        "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
        "modules_to_save", "init_lora_weights", "adapter_dtype"})

    def claims(self, doc: Mapping[str, Any]) -> bool:
        return is_off(doc.get("use_dora"))

    def read(self, ctx: PeftImport, tensors: Mapping[str, torch.Tensor]
             ) -> tuple[dict[str, Any], ModuleTensors]:
        drop = () if is_off(ctx.doc.get("velora_config")) else (".lora_velora_embed",)
        found = ctx.read_modules(tensors, LEAVES, drop=drop)
        check_pairs(ctx, found)
        fields = ctx.target_fields(found)
        fields.update(lora_fields(ctx))
        return fields, found

    def write(self, ctx: PeftExport) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if ctx.original_base and getattr(ctx.config, "init_lora_weights",
                                         None) in REPRODUCED_INITS:
            ctx = on_original_base(ctx)
        found = ctx.modules(LEAVES)
        return lora_body(ctx, found), found.tensors
