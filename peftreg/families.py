# SPDX-License-Identifier: Apache-2.0
"""What peftreg knows about a model's structure, supplied by family plugins.

The core has no table of architectures. A plugin implementing the
``peftreg_describe_model`` hook recognises a model and returns a :class:`ModelFamily`; methods
that need structure (the output head to leave out of ``"all-linear"``, the transformer blocks
for a layer filter, attention and feed-forward roles for prefix tuning or bottleneck adapters)
read it from there.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """Structural description of one model instance.

    Attributes:
        name: family name, for messages (``"llama"``, ``"bert"``, ``"torch-reference"``).
        layers: module paths of the transformer blocks, in order; index i is layer i.
        output_head: path of the output projection (``lm_head``, a classifier), or ``None``.
        input_embedding: path of the token embedding, or ``None``.
        hidden_size: model width, or ``None`` if unknown.
        num_attention_heads: query heads, or ``None``.
        num_key_value_heads: key/value heads (grouped-query attention), or ``None``.
        roles: relative module names inside one block for structural roles. Known roles:
            ``q``, ``k``, ``v``, ``o`` (attention projections), ``attention`` (the attention
            module), ``ffn_up``, ``ffn_gate``, ``ffn_down``, ``ffn`` (the feed-forward block).
        head_dim: width of one attention head, or ``None``.
        accepts_inputs_embeds: the model's forward takes ``inputs_embeds`` instead of
            ``input_ids`` (needed by prompt tuning).
        kv_prefix: how the model's forward accepts per-layer key/value prefixes (prefix
            tuning): ``"transformers-cache"`` (a ``transformers`` Cache passed as ``cache`` or
            ``past_key_values``), ``"prefix_kv"`` (a list of ``(key, value)`` tensors per layer,
            as :class:`~peftreg.reference_model.ReferenceTransformer` takes), or ``None``.
        is_encoder_decoder: the model has separate encoder and decoder stacks.
    """

    name: str
    layers: tuple[str, ...] = ()
    output_head: str | None = None
    input_embedding: str | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    roles: dict[str, str] = dataclasses.field(default_factory=dict)
    head_dim: int | None = None
    accepts_inputs_embeds: bool = False
    kv_prefix: str | None = None
    is_encoder_decoder: bool = False

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.layers)

    def kv_geometry(self) -> tuple[int, int, int] | None:
        """``(layers, key/value heads, head width)``, what a per-layer key/value prefix needs,
        or ``None`` when the description lacks one of them."""
        heads = self.num_key_value_heads or self.num_attention_heads
        head_dim = self.head_dim or (self.hidden_size // self.num_attention_heads
                                     if self.hidden_size and self.num_attention_heads else None)
        if not (self.num_layers and heads and head_dim):
            return None
        return self.num_layers, int(heads), int(head_dim)

    def layer_index(self, path: str) -> int | None:
        """Index of the block containing module ``path``, or ``None`` if it is outside them."""
        for index, layer in enumerate(self.layers):
            if path == layer or path.startswith(layer + "."):
                return index
        return None

    def role_paths(self, role: str) -> list[str]:
        """Full module paths playing ``role`` in every block (empty if the role is unknown)."""
        rel = self.roles.get(role)
        if rel is None:
            return []
        return [f"{layer}.{rel}" for layer in self.layers]
