# SPDX-License-Identifier: Apache-2.0
"""Prompt tuning (Lester et al. 2021): trainable virtual-token embeddings before the input.

``num_virtual_tokens`` vectors of the model's width are prepended to the input embeddings; the
attention mask (ones), token-level labels (-100, ignored by the loss) and token type ids (zeros)
are extended to match, so the model's outputs gain ``num_virtual_tokens`` leading positions.
Only the prompt trains: ``num_virtual_tokens * hidden_size`` parameters. During generation with a
cache, the prompt is added on the first step only; later steps extend the mask and positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from peftreg.plugin import (
    PROMPT_KEY,
    AdapterFileError,
    AdapterSlot,
    Capabilities,
    ConfigError,
    InputAdapter,
    InputSlot,
    MethodConfig,
    ModelFamily,
    ModelFamilyError,
    ModuleTensors,
    PeftCodec,
    PeftExport,
    PeftImport,
    PeftKeys,
    PEFTMethod,
    cache_length,
    extend_inputs,
    get_module,
    hookimpl,
)


@dataclasses.dataclass
class PromptTuningConfig(MethodConfig):
    """Config of a prompt-tuning adapter.

    Attributes:
        num_virtual_tokens: prompt length (> 0).
        prompt_tuning_init: ``"RANDOM"`` (the default, as PEFT's: normal, scaled like the
            embedding table), ``"SAMPLE_VOCAB"`` (copies of random rows of the embedding table:
            the prompt starts as real tokens; on SmolLM2 it starts no nearer the base and
            trains slower than RANDOM, docs/benchmarks.md),
            ``"TOKENS"`` (the embeddings of ``init_token_ids``, repeated to length) or
            ``"TEXT"`` (the embeddings of ``prompt_tuning_init_text`` tokenized with the local
            tokenizer ``tokenizer_name_or_path``; nothing is downloaded).
        init_token_ids: token ids for ``"TOKENS"``.
        prompt_tuning_init_text: text for ``"TEXT"``.
        tokenizer_name_or_path: a local tokenizer directory for ``"TEXT"``.
        token_dim: embedding width; ``None`` takes the model family's hidden size.
        modules_to_save: see :class:`peftreg.MethodConfig`.
    """

    method: ClassVar[str] = "prompt_tuning"

    num_virtual_tokens: int = 20
    prompt_tuning_init: Literal["RANDOM", "SAMPLE_VOCAB", "TOKENS", "TEXT"] = "RANDOM"
    init_token_ids: list[int] | None = None
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    token_dim: int | None = None

    def validate(self) -> None:
        super().validate()
        if not 0 < self.num_virtual_tokens <= 65536:
            raise self.error("num_virtual_tokens", "must be in 1..65536", self.num_virtual_tokens)
        if self.token_dim is not None and self.token_dim <= 0:
            raise self.error("token_dim", "must be > 0", self.token_dim)
        if self.prompt_tuning_init == "TOKENS":
            if not self.init_token_ids or any(t < 0 for t in self.init_token_ids):
                raise self.error("init_token_ids", "TOKENS init needs non-negative token ids",
                                 self.init_token_ids)
        if self.prompt_tuning_init == "TEXT" and not (
            self.prompt_tuning_init_text and self.tokenizer_name_or_path
        ):
            raise self.error("prompt_tuning_init_text",
                             "TEXT init needs prompt_tuning_init_text and tokenizer_name_or_path")


class PromptEmbedding(InputAdapter):
    """The virtual tokens of one adapter, and how they enter the model's inputs."""

    def __init__(self, init: torch.Tensor, embedding_path: str) -> None:
        super().__init__()
        self.prompt_embeddings = nn.Parameter(init)
        self.embedding_path = embedding_path

    @property
    def num_virtual_tokens(self) -> int:
        """Prompt length."""
        return self.prompt_embeddings.shape[0]

    def transform_inputs(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        n = self.num_virtual_tokens
        if cache_length(kwargs) > 0:
            # A later generation step: the prompt is already in the cache.
            return extend_inputs(kwargs, n, first_step=False)
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise ValueError("prompt tuning needs input_ids or inputs_embeds")
            embeds = get_module(model, self.embedding_path)(input_ids)
        prompts = self.prompt_embeddings.to(embeds.dtype)[None].expand(embeds.shape[0], -1, -1)
        kwargs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
        token_shape = embeds.shape[:2]
        return extend_inputs(kwargs, n, first_step=True, token_shape=token_shape)


def _initial_prompt(config: PromptTuningConfig, table: torch.Tensor) -> torch.Tensor:
    n, width = config.num_virtual_tokens, table.shape[1]
    kind = config.prompt_tuning_init
    if kind == "RANDOM":
        return torch.randn(n, width, dtype=table.dtype, device=table.device) * table.std()
    if kind == "SAMPLE_VOCAB":
        rows = torch.randint(0, table.shape[0], (n,), device=table.device)
        return table[rows].clone()
    if kind == "TOKENS":
        ids = list(config.init_token_ids or [])
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path,
                                                  local_files_only=True)
        ids = tokenizer(config.prompt_tuning_init_text, add_special_tokens=False)["input_ids"]
    if not ids or max(ids) >= table.shape[0]:
        raise ConfigError(
            f"PromptTuningConfig: init token ids must be in 0..{table.shape[0] - 1} (got "
            f"{ids[:8]}{'...' if len(ids) > 8 else ''})")
    ids = (ids * (n // len(ids) + 1))[:n]
    return table[torch.tensor(ids, device=table.device)].clone()


def _embedding(model: nn.Module, family: ModelFamily | None) -> tuple[str, nn.Embedding]:
    if family is None or family.input_embedding is None or not family.accepts_inputs_embeds:
        name = family.name if family else "unknown (no family plugin describes this model)"
        raise ModelFamilyError(
            f"prompt tuning needs the model's input embedding and a forward that accepts "
            f"inputs_embeds; model family {name} does not provide them")
    module = get_module(model, family.input_embedding)
    base = module.wrapped() if isinstance(module, AdapterSlot) else module
    if not isinstance(base, nn.Embedding):
        raise ModelFamilyError(f"{family.input_embedding!r} is a {type(base).__name__}, not an "
                               "nn.Embedding")
    return family.input_embedding, base


class PromptTuningPeftCodec(PeftCodec):
    """PEFT's PROMPT_TUNING documents: one ``prompt_embeddings`` tensor of the virtual tokens."""

    peft_type = "PROMPT_TUNING"
    keys = PeftKeys(
        mapped=frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                          "modules_to_save"}),
        ignored={"num_attention_heads": "informational", "num_layers": "informational",
                 "prompt_tuning_init": "initialisation only",
                 "prompt_tuning_init_text": "initialisation only",
                 "tokenizer_name_or_path": "initialisation only",
                 "tokenizer_kwargs": "initialisation only"},
    )
    exported_fields = frozenset({"num_virtual_tokens", "prompt_tuning_init", "init_token_ids",
                                 "prompt_tuning_init_text", "tokenizer_name_or_path",
                                 "token_dim", "modules_to_save"})
    needs_task_type = True

    def read(self, ctx: PeftImport, tensors: Mapping[str, torch.Tensor]
             ) -> tuple[dict[str, Any], ModuleTensors]:
        prompt, found = ctx.read_prompt(tensors, "prompt tuning")
        token_dim = ctx.doc.get("token_dim")
        if token_dim is not None and prompt.dim() == 2 and prompt.shape[1] != token_dim:
            ctx.tensor_problem(PROMPT_KEY, f"width {prompt.shape[1]} differs from token_dim = "
                               f"{token_dim}")
        return {"num_virtual_tokens": ctx.doc["num_virtual_tokens"],
                "modules_to_save": found.saved_modules,
                "token_dim": int(prompt.shape[1]) if prompt.dim() == 2 else None}, found

    def write(self, ctx: PeftExport) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if PROMPT_KEY not in ctx.tensors:
            raise AdapterFileError(f"prompt tuning adapter lacks its {PROMPT_KEY!r} tensor")
        prompt = ctx.tensors[PROMPT_KEY]
        out, saved = ctx.prompt_tensors(prompt, {PROMPT_KEY})
        family = ctx.family
        return {"num_virtual_tokens": int(prompt.shape[0]), "num_transformer_submodules": 1,
                "modules_to_save": saved or None, "token_dim": int(prompt.shape[1]),
                "num_attention_heads": family.num_attention_heads if family else None,
                "num_layers": family.num_layers if family and family.num_layers else None,
                "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
                "tokenizer_name_or_path": None, "tokenizer_kwargs": None}, out


class PromptTuningMethod(PEFTMethod[PromptTuningConfig]):
    """Trainable virtual tokens prepended to the input; not mergeable."""

    name: ClassVar[str] = "prompt_tuning"
    config_cls = PromptTuningConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=False, inference_latency=True)
    suggested_learning_rate: ClassVar[float] = 3e-2
    peft_codec: ClassVar[PeftCodec] = PromptTuningPeftCodec()
    size_field: ClassVar[str | None] = "num_virtual_tokens"

    def inject(self, model: nn.Module, adapter_name: str, config: PromptTuningConfig,
               family: ModelFamily | None) -> list[str]:
        path, embedding = _embedding(model, family)
        table = embedding.weight.detach()
        if config.token_dim is not None and config.token_dim != table.shape[1]:
            raise ConfigError(
                f"PromptTuningConfig.token_dim: {config.token_dim} does not match the model's "
                f"embedding width {table.shape[1]}")
        slot = InputSlot.attached_to(model)
        slot.adapters[adapter_name] = PromptEmbedding(_initial_prompt(config, table), path)
        return [path]

    def parameter_count(
        self, model: nn.Module, config: PromptTuningConfig, family: ModelFamily | None
    ) -> int:
        """``num_virtual_tokens * hidden_size``."""
        _, embedding = _embedding(model, family)
        return config.num_virtual_tokens * embedding.embedding_dim


@hookimpl
def peftreg_register_methods() -> list[PEFTMethod[Any]]:
    """Provide prompt tuning."""
    return [PromptTuningMethod()]
