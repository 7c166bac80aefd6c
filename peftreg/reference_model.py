# SPDX-License-Identifier: Apache-2.0
"""A small Llama-style transformer in plain PyTorch.

It is the model peftreg's tests, examples and benchmarks adapt when ``transformers`` is not
wanted: pre-norm blocks with RMSNorm, grouped-query attention, rotary positions and a gated
feed-forward, with HF Llama's module names (``self_attn.q_proj``, ``mlp.down_proj``, ...) so
configs written for Llama carry over. The ``family_torch`` plugin describes it to the registry.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """Shape of a :class:`ReferenceTransformer`.

    Attributes:
        vocab_size: token vocabulary.
        hidden_size: model width.
        num_layers: transformer blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention when fewer than ``num_heads``).
        intermediate_size: feed-forward width.
        max_positions: longest sequence the rotary table covers.
        task: ``"causal_lm"`` (next-token logits) or ``"classification"`` (``num_labels``
            logits from the mean of the final hidden states).
        num_labels: classes for ``task="classification"``.
    """

    vocab_size: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_positions: int = 256
    task: Literal["causal_lm", "classification"] = "causal_lm"
    num_labels: int = 2

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019)."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = _at_least_fp32(x)
        scale = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (wide * scale).to(x.dtype) * self.weight


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # Widened for 16-bit inputs, kept in float64 (the conformance kit's finite differences).
    return x if x.dtype == torch.float64 else x.float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary positions."""

    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        self.config = config
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, config.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if prefix is not None:
            # Prefix keys/values are learned directly, so they carry no rotary position.
            k = torch.cat((prefix[0].to(k.dtype), k), dim=2)
            v = torch.cat((prefix[1].to(v.dtype), v), dim=2)
        repeat = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim))


class MLP(nn.Module):
    """Gated feed-forward block: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm transformer block."""

    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, prefix)
        return x + self.mlp(self.post_attention_layernorm(x))


class ReferenceTransformer(nn.Module):
    """Llama-style model; see the module docstring.

    ``forward(input_ids, attention_mask=None, labels=None, inputs_embeds=None, prefix_kv=None)``
    returns a dict with ``logits`` and, when ``labels`` are given, ``loss`` (next-token
    cross-entropy ignoring -100 for causal LM, cross-entropy over classes for classification).
    ``inputs_embeds`` replaces ``input_ids``; ``prefix_kv`` holds one ``(key, value)`` pair per
    layer, each of shape (batch, kv_heads, prefix_length, head_dim), attended to by every token;
    ``attention_mask`` then covers the prefix too (or only the tokens, the prefix being visible).
    """

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, config: ReferenceConfig | None = None) -> None:
        super().__init__()
        self.config = config or ReferenceConfig()
        c = self.config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size)
        out = c.vocab_size if c.task == "causal_lm" else c.num_labels
        head = nn.Linear(c.hidden_size, out, bias=c.task == "classification")
        if c.task == "causal_lm":
            self.lm_head = head
        else:
            self.classifier = head
        inv = 1.0 / (10000 ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
        angles = torch.outer(torch.arange(c.max_positions).float(), inv)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def get_output_embeddings(self) -> nn.Module:
        """The output head (HF convention), left out of ``"all-linear"``."""
        return self.lm_head if self.config.task == "causal_lm" else self.classifier

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        t = x.shape[1]
        n = prefix_kv[0][0].shape[2] if prefix_kv else 0
        if prefix_kv is not None and len(prefix_kv) != len(self.layers):
            raise ValueError(f"prefix_kv has {len(prefix_kv)} entries for {len(self.layers)} "
                             "layers")
        rope = (self.rope_cos[:t].to(x.dtype), self.rope_sin[:t].to(x.dtype))
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        visible = torch.ones(t, n, dtype=torch.bool, device=x.device)
        mask = torch.cat((visible, causal), dim=1)[None, None]
        if attention_mask is not None:
            if attention_mask.shape[1] == t and n:
                attention_mask = torch.cat(
                    (attention_mask.new_ones(attention_mask.shape[0], n), attention_mask), dim=1)
            mask = mask & attention_mask[:, None, None, :].bool()
            attention_mask = attention_mask[:, n:]
        for index, layer in enumerate(self.layers):
            x = layer(x, rope, mask, prefix_kv[index] if prefix_kv else None)
        x = self.norm(x)
        out: dict[str, torch.Tensor] = {}
        if self.config.task == "causal_lm":
            logits = self.lm_head(x)
            out["logits"] = logits
            if labels is not None:
                out["loss"] = F.cross_entropy(
                    _at_least_fp32(logits[:, :-1].reshape(-1, logits.shape[-1])),
                    labels[:, 1:].reshape(-1), ignore_index=-100)
        else:
            if attention_mask is not None:
                weights = attention_mask[..., None].to(x.dtype)
                pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1)
            else:
                pooled = x.mean(1)
            logits = self.classifier(pooled)
            out["logits"] = logits
            if labels is not None:
                out["loss"] = F.cross_entropy(_at_least_fp32(logits), labels)
        return out
