# SPDX-License-Identifier: Apache-2.0
"""Prefix tuning (Li & Liang 2021): learned key/value prefixes for every attention layer.

Each layer's attention sees ``num_virtual_tokens`` extra keys and values before the real ones.
The prefixes are either trained directly (``num_virtual_tokens * num_layers * 2 * kv_width``
parameters, ``kv_width = num_key_value_heads * head_dim``) or, with ``prefix_projection``, produced
by the paper's reparameterisation: a small embedding passed through an MLP
(``Linear(token_dim, encoder_hidden_size) -> tanh -> Linear(encoder_hidden_size,
num_layers * 2 * kv_width)``), which trains more stably. In evaluation mode the projected prefix is
computed once and reused, so inference never runs the MLP.

The prefixes reach the model through its key/value cache (``transformers`` models) or its
``prefix_kv`` argument (the reference transformer), as the model family says. The attention mask
and explicit positions are extended accordingly; during generation with a cache the prefix is
inserted on the first step only.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from peftreg.plugin import (
    CACHE_KEYS,
    Capabilities,
    ConfigError,
    InputAdapter,
    InputSlot,
    MethodConfig,
    ModelFamily,
    ModelFamilyError,
    PEFTMethod,
    cache_length,
    extend_inputs,
    hookimpl,
)


@dataclasses.dataclass
class PrefixTuningConfig(MethodConfig):
    """Config of a prefix-tuning adapter.

    Attributes:
        num_virtual_tokens: prefix length (> 0).
        prefix_projection: produce the prefix with the reparameterisation MLP.
        encoder_hidden_size: the MLP's hidden width (default: ``token_dim``).
        token_dim: width of the prefix embedding fed to the MLP (default: the model's hidden
            size); without projection the prefix width is always the key/value width.
        modules_to_save: see :class:`peftreg.MethodConfig`.
    """

    method: ClassVar[str] = "prefix_tuning"

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    token_dim: int | None = None

    def validate(self) -> None:
        super().validate()
        if not 0 < self.num_virtual_tokens <= 65536:
            raise self.error("num_virtual_tokens", "must be in 1..65536", self.num_virtual_tokens)
        for field in ("encoder_hidden_size", "token_dim"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise self.error(field, "must be > 0", value)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    kv_prefix: str

    @property
    def width(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim


def _geometry(family: ModelFamily | None) -> _Geometry:
    if family is None:
        raise ModelFamilyError("prefix tuning needs the model's layer count, key/value heads and "
                               "head width, and no family plugin describes this model")
    heads = family.num_key_value_heads or family.num_attention_heads
    head_dim = family.head_dim or (
        family.hidden_size // family.num_attention_heads
        if family.hidden_size and family.num_attention_heads else None)
    missing = [name for name, value in (("layers", family.num_layers), ("key/value heads", heads),
                                        ("head_dim", head_dim), ("kv_prefix", family.kv_prefix),
                                        ("hidden_size", family.hidden_size)) if not value]
    if missing:
        raise ModelFamilyError(f"prefix tuning cannot adapt a {family.name!r} model: its family "
                               f"description lacks {', '.join(missing)}")
    return _Geometry(family.num_layers, int(heads), int(head_dim),  # type: ignore[arg-type]
                     int(family.hidden_size), str(family.kv_prefix))  # type: ignore[arg-type]


class PrefixEncoder(InputAdapter):
    """One adapter's prefixes for all layers, and how they enter the model's call."""

    def __init__(self, config: PrefixTuningConfig, geometry: _Geometry, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.geometry = geometry
        n = config.num_virtual_tokens
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        if config.prefix_projection:
            token_dim = config.token_dim or geometry.hidden
            hidden = config.encoder_hidden_size or token_dim
            self.embedding = nn.Parameter(torch.randn(n, token_dim, **kw))
            self.projection = nn.Sequential(nn.Linear(token_dim, hidden, **kw), nn.Tanh(),
                                            nn.Linear(hidden, geometry.width, **kw))
        else:
            self.prompt_embeddings = nn.Parameter(torch.randn(n, geometry.width, **kw))
        self._frozen_prefix: torch.Tensor | None = None

    def train(self, mode: bool = True) -> PrefixEncoder:
        self._frozen_prefix = None
        return super().train(mode)

    def prefix(self) -> torch.Tensor:
        """The prefix of every layer, shape (num_virtual_tokens, layers * 2 * kv_width)."""
        if not hasattr(self, "projection"):
            return self.prompt_embeddings
        if self.training or torch.is_grad_enabled():
            return self.projection(self.embedding)
        if self._frozen_prefix is None:
            # Inference: run the reparameterisation once and reuse its result.
            self._frozen_prefix = self.projection(self.embedding).detach()
        return self._frozen_prefix

    def layer_kv(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key, value)`` of shape (batch, kv_heads, n, head_dim)."""
        g = self.geometry
        prefix = self.prefix().to(dtype)
        n = prefix.shape[0]
        kv = prefix.view(n, g.layers, 2, g.kv_heads, g.head_dim).permute(1, 2, 3, 0, 4)
        kv = kv.unsqueeze(2).expand(g.layers, 2, batch, g.kv_heads, n, g.head_dim)
        return [(kv[i, 0], kv[i, 1]) for i in range(g.layers)]

    def transform_inputs(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        n = (self.embedding if hasattr(self, "projection") else self.prompt_embeddings).shape[0]
        if kwargs.get("use_cache") is False:
            # The caller wants no cache: any cache passed in is the prefix-holding cache a
            # previous call returned (generation feeds it back), not a real one.
            for key in CACHE_KEYS:
                kwargs.pop(key, None)
        if cache_length(kwargs) > 0:
            return extend_inputs(kwargs, n, first_step=False)
        reference = kwargs.get("inputs_embeds")
        if reference is None:
            reference = kwargs.get("input_ids")
        if reference is None:
            raise ValueError("prefix tuning needs input_ids or inputs_embeds")
        batch = reference.shape[0]
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                     torch.float32)
        layers = self.layer_kv(batch, dtype)
        if self.geometry.kv_prefix == "prefix_kv":
            kwargs["prefix_kv"] = layers
        else:
            _fill_transformers_cache(model, kwargs, layers)
        return extend_inputs(kwargs, n, first_step=False)


def _fill_transformers_cache(model: nn.Module, kwargs: dict[str, Any],
                             layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    from transformers import DynamicCache

    key = next((k for k in CACHE_KEYS if kwargs.get(k) is not None), None)
    if key is None:
        # Task heads often forward **kwargs to the base model; its signature names the cache.
        # ``cache`` is transformers' name since 5.x (``past_key_values`` is deprecated, to be
        # removed in 5.40); the old name is used only for a model that names nothing else.
        params = {**inspect.signature(model.forward).parameters,
                  **inspect.signature(getattr(model, "base_model", model).forward).parameters}
        key = next((k for k in CACHE_KEYS if k in params), CACHE_KEYS[0])
        kwargs[key] = DynamicCache(config=getattr(model, "config", None))
    cache = kwargs[key]
    for index, (k, v) in enumerate(layers):
        cache.update(k, v, index)


class PrefixTuningMethod(PEFTMethod[PrefixTuningConfig]):
    """Learned key/value prefixes for every attention layer; not mergeable."""

    name: ClassVar[str] = "prefix_tuning"
    config_cls = PrefixTuningConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=False, inference_latency=True)
    suggested_learning_rate: ClassVar[float] = 1e-2

    def inject(self, model: nn.Module, adapter_name: str, config: PrefixTuningConfig,
               family: ModelFamily | None) -> list[str]:
        geometry = _geometry(family)
        if config.token_dim is not None and not config.prefix_projection:
            raise ConfigError("PrefixTuningConfig.token_dim: only used with "
                                      "prefix_projection=True")
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtype = weight.dtype if weight is not None else torch.float32
        device = weight.device if weight is not None else torch.device("cpu")
        slot = InputSlot.attached_to(model)
        slot.adapters[adapter_name] = PrefixEncoder(config, geometry, dtype, device)
        return list(family.layers)  # type: ignore[union-attr]  # _geometry checked it

    def parameter_count(
        self, model: nn.Module, config: PrefixTuningConfig, family: ModelFamily | None
    ) -> int:
        """Without projection ``n * L * 2 * kv_width``; with it
        ``n * t + (t * e + e) + (e * L * 2 * kv_width + L * 2 * kv_width)``."""
        g = _geometry(family)
        n = config.num_virtual_tokens
        if not config.prefix_projection:
            return n * g.width
        t = config.token_dim or g.hidden
        e = config.encoder_hidden_size or t
        return n * t + (t * e + e) + (e * g.width + g.width)


@hookimpl
def peftreg_register_methods() -> list[PEFTMethod[Any]]:
    """Provide prefix tuning."""
    return [PrefixTuningMethod()]
