# SPDX-License-Identifier: Apache-2.0
"""Model family plugin for Hugging Face ``transformers`` models (Llama-style, BERT-style, GPT-2).

It reads only the model's ``config.model_type`` and module tree, so it imports nothing from
``transformers`` and does nothing when that package is absent.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftreg.plugin import (
    ModelFamily,
    hookimpl,
)

_LLAMA = {
    "layers": "layers",
    "embedding": "embed_tokens",
    "kv_cache": True,
    "roles": {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
        "o": "self_attn.o_proj", "attention": "self_attn", "ffn": "mlp",
        "ffn_up": "mlp.up_proj", "ffn_gate": "mlp.gate_proj", "ffn_down": "mlp.down_proj",
    },
}
_BERT = {
    "layers": "encoder.layer",
    "embedding": "embeddings.word_embeddings",
    "kv_cache": True,
    "roles": {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "o": "attention.output.dense", "attention": "attention",
        "ffn_up": "intermediate.dense", "ffn_down": "output.dense",
    },
}
_GPT2 = {
    "layers": "h",
    "embedding": "wte",
    "kv_cache": True,
    "roles": {
        "qkv": "attn.c_attn", "o": "attn.c_proj", "attention": "attn", "ffn": "mlp",
        "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
    },
}
LAYOUTS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "gpt2": _GPT2,
}


def _find_prefix(model: nn.Module, layers_suffix: str) -> str | None:
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (
            path == layers_suffix or path.endswith("." + layers_suffix)
        ):
            return path[: -len(layers_suffix)]
    return None


@hookimpl
def peftreg_describe_model(model: nn.Module) -> ModelFamily | None:
    """Describe a transformers model whose ``config.model_type`` has a known layout."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    layout = LAYOUTS.get(model_type) if isinstance(model_type, str) else None
    if layout is None:
        return None
    prefix = _find_prefix(model, layout["layers"])
    if prefix is None:
        return None
    layer_list = model.get_submodule(prefix + layout["layers"])
    count = len(list(layer_list.children()))
    paths = {id(m): p for p, m in model.named_modules()}
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    out_module = get_out() if callable(get_out) else None
    if out_module is not None and id(out_module) in paths:
        head = paths[id(out_module)]
    for name in ("score", "classifier", "qa_outputs"):
        if head is None and hasattr(model, name) and isinstance(getattr(model, name), nn.Module):
            head = name
    if head is not None and head.endswith(".dropout"):
        head = None
    kv_heads = getattr(config, "num_key_value_heads", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    return ModelFamily(
        name=str(model_type),
        layers=tuple(f"{prefix}{layout['layers']}.{i}" for i in range(count)),
        output_head=head,
        input_embedding=prefix + layout["embedding"],
        hidden_size=getattr(config, "hidden_size", None) or getattr(config, "n_embd", None),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        roles=dict(layout["roles"]),
        head_dim=getattr(config, "head_dim", None) or (
            (getattr(config, "hidden_size", 0) or 0) // heads if heads else None),
        accepts_inputs_embeds=True,
        kv_prefix="transformers-cache" if layout["kv_cache"] else None,
    )
