# SPDX-License-Identifier: Apache-2.0
"""Model family plugin for :class:`peftreg.reference_model.ReferenceTransformer`."""

from __future__ import annotations

from torch import nn

from peftreg.plugin import (
    ModelFamily,
    ReferenceTransformer,
    hookimpl,
)

# Relative names inside one block, shared with HF Llama.
LLAMA_ROLES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.o_proj", "attention": "self_attn", "ffn": "mlp",
    "ffn_up": "mlp.up_proj", "ffn_gate": "mlp.gate_proj", "ffn_down": "mlp.down_proj",
}


@hookimpl
def peftreg_describe_model(model: nn.Module) -> ModelFamily | None:
    """Describe a ReferenceTransformer; ``None`` for anything else."""
    if not isinstance(model, ReferenceTransformer):
        return None
    c = model.config
    return ModelFamily(
        name="torch-reference",
        layers=tuple(f"layers.{i}" for i in range(c.num_layers)),
        output_head="lm_head" if c.task == "causal_lm" else "classifier",
        input_embedding="embed_tokens",
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        roles=dict(LLAMA_ROLES),
        head_dim=c.head_dim,
        accepts_inputs_embeds=True,
        kv_prefix="prefix_kv",
    )
