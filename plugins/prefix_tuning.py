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
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftreg.plugin import (
    CACHE_KEYS,
    PROMPT_KEY,
    AdapterError,
    AdapterFileError,
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
class PrefixTuningConfig(MethodConfig):
    """Config of a prefix-tuning adapter.

    Attributes:
        num_virtual_tokens: prefix length (> 0).
        prefix_projection: produce the prefix with the reparameterisation MLP.
        encoder_hidden_size: the MLP's hidden width (default: ``token_dim``).
        token_dim: width of the prefix embedding fed to the MLP (default: the model's hidden
            size); without projection the prefix width is always the key/value width.
        prefix_init: how a direct prefix starts. ``"activations"`` (the paper's section 5):
            the keys and values the model itself computes for ``num_virtual_tokens`` real
            tokens, so the adapted model starts as if those tokens preceded every input (near
            the base model, not at a random one). ``"random"``: standard normal values.
            ``None`` (the default) takes ``"activations"`` where the model allows it (its family
            names the token embedding and the key/value projections, or it returns a
            ``transformers`` cache) and ``"random"`` otherwise. With ``prefix_projection`` the
            MLP's input embedding starts random either way.
        init_token_ids: the tokens for ``"activations"``, repeated or cut to
            ``num_virtual_tokens``; default: ids drawn uniformly from the vocabulary (with the
            global torch seed).
        modules_to_save: see :class:`peftreg.MethodConfig`.
    """

    method: ClassVar[str] = "prefix_tuning"

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    token_dim: int | None = None
    prefix_init: Literal["activations", "random"] | None = None
    init_token_ids: list[int] | None = None

    def validate(self) -> None:
        super().validate()
        if not 0 < self.num_virtual_tokens <= 65536:
            raise self.error("num_virtual_tokens", "must be in 1..65536", self.num_virtual_tokens)
        for field in ("encoder_hidden_size", "token_dim"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise self.error(field, "must be > 0", value)
        if self.prefix_init not in (None, "activations", "random"):
            raise self.error("prefix_init", "must be 'activations', 'random' or None",
                             self.prefix_init)
        if self.init_token_ids is not None:
            if self.prefix_init == "random" or self.prefix_projection:
                raise self.error("init_token_ids", "used only by prefix_init='activations' "
                                 "without prefix_projection", self.init_token_ids)
            if not self.init_token_ids or any(
                    not isinstance(t, int) or isinstance(t, bool) or t < 0
                    for t in self.init_token_ids):
                raise self.error("init_token_ids", "must be a non-empty list of token ids "
                                 "(integers >= 0)", self.init_token_ids)
        if self.prefix_init == "activations" and self.prefix_projection:
            raise self.error("prefix_init", "'activations' sets the prefix itself, which "
                             "prefix_projection computes from an MLP instead; use one of them",
                             self.prefix_init)


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
    geometry = family.kv_geometry()
    missing = [name for name, value in (("layers, key/value heads or head_dim", geometry),
                                        ("kv_prefix", family.kv_prefix),
                                        ("hidden_size", family.hidden_size)) if not value]
    if geometry is None or missing:
        raise ModelFamilyError(f"prefix tuning cannot adapt a {family.name!r} model: its family "
                               f"description lacks {', '.join(missing)}")
    layers, heads, head_dim = geometry
    return _Geometry(layers, heads, head_dim, int(family.hidden_size),  # type: ignore[arg-type]
                     str(family.kv_prefix))


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


# peftreg's prefix MLP: embedding -> Linear -> tanh -> Linear, as PEFT's.
_PROJECTION = ("embedding", "projection.0.weight", "projection.0.bias", "projection.2.weight",
               "projection.2.bias")


class PrefixTuningPeftCodec(PeftCodec):
    """PEFT's PREFIX_TUNING documents: one ``prompt_embeddings`` tensor holding every layer's
    key and value prefixes (``num_layers x 2 x token_dim`` wide)."""

    peft_type = "PREFIX_TUNING"
    keys = PeftKeys(
        mapped=frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                          "num_attention_heads", "num_layers", "modules_to_save",
                          "prefix_projection"}),
        ignored={"encoder_hidden_size": "width of the projection MLP, which is not saved (the "
                                        "file holds the projected prefix)",
                 "init_weights": "initialisation only"},
    )
    exported_fields = frozenset({"num_virtual_tokens", "prefix_projection",
                                 "encoder_hidden_size", "token_dim", "modules_to_save",
                                 "prefix_init", "init_token_ids"})
    needs_task_type = True
    needs_model = True

    def read(self, ctx: PeftImport, tensors: Mapping[str, torch.Tensor]
             ) -> tuple[dict[str, Any], ModuleTensors]:
        prompt, found = ctx.read_prompt(tensors, "prefix tuning")
        doc = ctx.doc
        token_dim = doc.get("token_dim")
        layers, heads = doc.get("num_layers"), doc.get("num_attention_heads")
        if isinstance(layers, int) and isinstance(token_dim, int) and prompt.dim() == 2 \
                and prompt.shape[1] != layers * 2 * token_dim:
            ctx.tensor_problem(PROMPT_KEY, f"width {prompt.shape[1]} is not num_layers x 2 x "
                               f"token_dim = {layers} x 2 x {token_dim}")
        geometry = ctx.family.kv_geometry() if ctx.family is not None else None
        if ctx.family is not None and geometry is not None:
            g_layers, g_heads, g_head_dim = geometry
            for key, got, want in (("num_layers", layers, g_layers),
                                   ("num_attention_heads", heads, g_heads),
                                   ("token_dim", token_dim, g_heads * g_head_dim)):
                if got is not None and got != want:
                    ctx.config_problem(
                        f"{key} = {got}, but the {ctx.family.name!r} model has {want} "
                        "(num_attention_heads and token_dim count key/value heads)")
        # PEFT saves the prefix itself even with prefix_projection (it runs the MLP before
        # saving), so the file always loads as a direct prefix.
        return {"num_virtual_tokens": doc["num_virtual_tokens"],
                "modules_to_save": found.saved_modules, "prefix_projection": False}, found

    def write(self, ctx: PeftExport) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = ctx.tensors
        if PROMPT_KEY in tensors:
            prompt, owned = tensors[PROMPT_KEY], {PROMPT_KEY}
        elif set(_PROJECTION) <= set(tensors):
            # PEFT keeps no MLP at inference: run it once, as peftreg does in eval mode.
            t = {k: tensors[k] for k in _PROJECTION}
            hidden = torch.tanh(F.linear(t["embedding"], t["projection.0.weight"],
                                         t["projection.0.bias"]))
            prompt = F.linear(hidden, t["projection.2.weight"], t["projection.2.bias"]).detach()
            owned = set(_PROJECTION)
        else:
            raise AdapterFileError(f"prefix tuning adapter lacks its {PROMPT_KEY!r} tensor")
        geometry = ctx.family.kv_geometry() if ctx.family is not None else None
        if geometry is None:
            raise AdapterError(
                "exporting prefix tuning to PEFT needs the base model's layer count and "
                "key/value heads (PEFT's num_layers, num_attention_heads and token_dim), and no "
                "model family describing them was given; pass the base model")
        layers, heads, head_dim = geometry
        if prompt.shape[1] != layers * 2 * heads * head_dim:
            raise AdapterFileError(
                f"prefix of width {prompt.shape[1]} does not fit the model: {layers} layers x 2 "
                f"x {heads} key/value heads x {head_dim} = {layers * 2 * heads * head_dim}")
        out, saved = ctx.prompt_tensors(prompt, owned)
        # Written without projection: the file holds the prefix itself, and PEFT's token_dim
        # is both the MLP's input and the key/value width, which peftreg's projection need not
        # share.
        return {"num_virtual_tokens": int(prompt.shape[0]), "num_transformer_submodules": 1,
                "modules_to_save": saved or None, "token_dim": heads * head_dim,
                "num_attention_heads": heads, "num_layers": layers,
                "encoder_hidden_size": heads * head_dim, "prefix_projection": False,
                "init_weights": None}, out


def _activation_prefix(model: nn.Module, config: PrefixTuningConfig, family: ModelFamily,
                       g: _Geometry) -> torch.Tensor | None:
    """The keys and values the model computes for real tokens, laid out as a direct prefix
    (``n x layers * 2 * kv_width``), or ``None`` when the model does not allow it."""
    embedding = get_module(model, family.input_embedding) if family.input_embedding else None
    vocab = getattr(embedding, "num_embeddings", None)
    if not isinstance(vocab, int):
        return None
    n = config.num_virtual_tokens
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if config.init_token_ids is not None:
        if max(config.init_token_ids) >= vocab:
            raise ConfigError(f"PrefixTuningConfig.init_token_ids: id {max(config.init_token_ids)} "
                              f"is outside the vocabulary of {vocab} tokens")
        ids = torch.tensor(config.init_token_ids, device=device).repeat(n)[:n]
    else:
        ids = torch.randint(0, vocab, (n,), device=device)
    layers = _kv_of_tokens(model, family, ids[None], g)
    if layers is None:
        return None
    # (layers, 2, n, kv_width) -> (n, layers * 2 * kv_width), PrefixEncoder.layer_kv's layout.
    stacked = torch.stack([torch.stack(kv) for kv in layers])
    return stacked.permute(2, 0, 1, 3).reshape(n, g.width)


def _kv_of_tokens(model: nn.Module, family: ModelFamily, ids: torch.Tensor, g: _Geometry
                  ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer ``(key, value)``, each ``(n, kv_width)``, for the tokens ``ids`` (batch 1).

    A model that returns a ``transformers`` cache gives its own keys (rotated and normalised as
    its attention uses them); otherwise the family's ``k`` and ``v`` projections are read.
    """
    was_training = model.training
    captured: dict[str, torch.Tensor] = {}
    paths = [*family.role_paths("k"), *family.role_paths("v")]
    hooks = []
    if len(paths) == 2 * g.layers:
        for path in paths:
            def keep(_m: nn.Module, _i: Any, out: torch.Tensor, path: str = path) -> None:
                captured[path] = out.detach()
            hooks.append(get_module(model, path).register_forward_hook(keep))
    try:
        model.eval()
        with torch.no_grad():
            asks_cache = g.kv_prefix != "prefix_kv" and "use_cache" in inspect.signature(
                model.forward).parameters
            out = model(input_ids=ids, use_cache=True) if asks_cache else model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    cache = getattr(out, "past_key_values", None)
    cache_layers = getattr(cache, "layers", None)
    if cache_layers is not None and len(cache_layers) == g.layers:
        # (1, kv_heads, n, head_dim) -> (n, kv_width)
        return [tuple(t[0].transpose(0, 1).reshape(t.shape[2], -1)  # type: ignore[misc]
                      for t in (layer.keys, layer.values)) for layer in cache_layers]
    if len(captured) != 2 * g.layers:
        return None
    keys, values = paths[: g.layers], paths[g.layers:]
    return [(captured[k][0], captured[v][0]) for k, v in zip(keys, values, strict=True)]


class PrefixTuningMethod(PEFTMethod[PrefixTuningConfig]):
    """Learned key/value prefixes for every attention layer; not mergeable."""

    name: ClassVar[str] = "prefix_tuning"
    config_cls = PrefixTuningConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=False, inference_latency=True)
    suggested_learning_rate: ClassVar[float] = 1e-2
    peft_codec: ClassVar[PeftCodec] = PrefixTuningPeftCodec()
    size_field: ClassVar[str | None] = "num_virtual_tokens"

    def inject(self, model: nn.Module, adapter_name: str, config: PrefixTuningConfig,
               family: ModelFamily | None) -> list[str]:
        geometry = _geometry(family)
        if config.token_dim is not None and not config.prefix_projection:
            raise ConfigError("PrefixTuningConfig.token_dim: only used with "
                                      "prefix_projection=True")
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtype = weight.dtype if weight is not None else torch.float32
        device = weight.device if weight is not None else torch.device("cpu")
        encoder = PrefixEncoder(config, geometry, dtype, device)
        if not config.prefix_projection and config.prefix_init != "random":
            start = _activation_prefix(model, config, family, geometry)  # type: ignore[arg-type]
            if start is not None:
                with torch.no_grad():
                    encoder.prompt_embeddings.copy_(start)
            elif config.prefix_init == "activations":
                raise ModelFamilyError(
                    "PrefixTuningConfig.prefix_init='activations' needs the model's token "
                    f"embedding and key/value projections, and the {family.name!r} family "  # type: ignore[union-attr]
                    "description names neither them nor a cache the model returns; use "
                    "prefix_init='random'")
        slot = InputSlot.attached_to(model)
        slot.adapters[adapter_name] = encoder
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
