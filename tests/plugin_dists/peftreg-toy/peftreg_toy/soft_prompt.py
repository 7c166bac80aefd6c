"""Soft prompts: learned vectors placed before the input embeddings (an input-side method).

The plugin guide's second example. The model's own forward is not touched: an input adapter
rewrites the call's keyword arguments before each call, replacing ``input_ids`` by
``inputs_embeds`` with ``num_virtual_tokens`` learned rows in front, and ``extend_inputs`` keeps
the attention mask, labels, token types and explicit positions in step with them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from peftreg.plugin import (
    AdapterSlot,
    Capabilities,
    InputAdapter,
    InputSlot,
    MethodConfig,
    ModelFamily,
    ModelFamilyError,
    PEFTMethod,
    cache_length,
    extend_inputs,
    get_module,
    hookimpl,
)


@dataclasses.dataclass
class SoftPromptConfig(MethodConfig):
    """Config of a soft prompt.

    Attributes:
        num_virtual_tokens: number of learned vectors (1..4096).
    """

    method: ClassVar[str] = "soft_prompt"

    num_virtual_tokens: int = 8

    def validate(self) -> None:
        super().validate()
        if not 0 < self.num_virtual_tokens <= 4096:
            raise self.error("num_virtual_tokens", "must be in 1..4096", self.num_virtual_tokens)


class SoftPrompt(InputAdapter):
    """One adapter's virtual tokens and how they enter the model's inputs."""

    def __init__(self, init: torch.Tensor, embedding_path: str) -> None:
        super().__init__()
        self.prompt = nn.Parameter(init)
        self.embedding_path = embedding_path

    def transform_inputs(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        n = self.prompt.shape[0]
        if cache_length(kwargs) > 0:  # a later generation step: the prompt is in the cache
            return extend_inputs(kwargs, n, first_step=False)
        ids = kwargs.pop("input_ids")
        embeds = get_module(model, self.embedding_path)(ids)
        prompt = self.prompt.to(embeds.dtype).expand(embeds.shape[0], -1, -1)
        kwargs["inputs_embeds"] = torch.cat((prompt, embeds), dim=1)
        return extend_inputs(kwargs, n, first_step=True, token_shape=tuple(ids.shape))


def _embedding(model: nn.Module, family: ModelFamily | None) -> tuple[str, nn.Embedding]:
    if family is None or family.input_embedding is None or not family.accepts_inputs_embeds:
        raise ModelFamilyError("soft_prompt needs a model family with an input embedding and a "
                               "forward that accepts inputs_embeds")
    module = get_module(model, family.input_embedding)
    table = module.wrapped() if isinstance(module, AdapterSlot) else module
    if not isinstance(table, nn.Embedding):
        raise ModelFamilyError(f"{family.input_embedding!r} is not an nn.Embedding")
    return family.input_embedding, table


class SoftPromptMethod(PEFTMethod[SoftPromptConfig]):
    """Learned virtual tokens before the input; not mergeable."""

    name: ClassVar[str] = "soft_prompt"
    config_cls = SoftPromptConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=False, inference_latency=True)
    suggested_learning_rate: ClassVar[float] = 3e-2
    api_level: ClassVar[int] = 1

    def inject(self, model: nn.Module, adapter_name: str, config: SoftPromptConfig,
               family: ModelFamily | None) -> list[str]:
        path, table = _embedding(model, family)
        rows = torch.randint(0, table.num_embeddings, (config.num_virtual_tokens,))
        init = table.weight.detach()[rows.to(table.weight.device)].clone()
        InputSlot.attached_to(model).adapters[adapter_name] = SoftPrompt(init, path)
        return [path]

    def parameter_count(self, model: nn.Module, config: SoftPromptConfig,
                        family: ModelFamily | None) -> int:
        return config.num_virtual_tokens * _embedding(model, family)[1].embedding_dim


@hookimpl
def peftreg_register_methods() -> list[PEFTMethod[Any]]:
    return [SoftPromptMethod()]
