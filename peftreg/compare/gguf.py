# SPDX-License-Identifier: Apache-2.0
"""A model transformers loaded from a GGUF file, made trainable when its weights are dense.

transformers 5.24 marks every model it loads from GGUF as quantized (``is_quantized``, a
``hf_quantizer`` whose ``is_trainable`` is false), also when it unpacked every weight into
ordinary float tensors, as its legacy GGUF loader does for Llama (SmolLM2). ``Trainer`` then
refuses the model, with or without adapters. When no module kept packed GGUF blocks the mark
is stale, and the quantizer's own ``remove_quantization_config`` takes it off.
"""

from __future__ import annotations

from torch import nn

from peftreg.errors import ConfigError

__all__ = ["release_dequantized_gguf"]


def release_dequantized_gguf(model: nn.Module) -> nn.Module:
    """Take transformers' quantized mark off a GGUF-loaded model whose weights are all dense.

    A model not loaded from GGUF is returned untouched.

    Args:
        model: a ``transformers`` model, usually just returned by ``from_pretrained(...,
            gguf_file=...)``.

    Returns:
        ``model`` itself.

    Raises:
        ConfigError: some modules still hold packed GGUF blocks (transformers' GGUF kernels
            were used), so the weights are not plain tensors adapters can train over.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "gguf":
        return model
    packed = sorted(getattr(quantizer, "packed_modules", None) or {})
    packed += sorted(f"{name} ({p.dtype})" for name, p in model.named_parameters()
                     if not p.is_floating_point())
    if packed:
        raise ConfigError(
            f"the GGUF model keeps {len(packed)} weights packed ({', '.join(packed[:3])}"
            f"{', ...' if len(packed) > 3 else ''}); load it with "
            "quantization_config=GgufConfig(dequantize=True) to train adapters over dense weights")
    quantizer.remove_quantization_config(model)
    return model
