"""A GGUF-loaded model that transformers marked quantized although its weights are dense."""

from __future__ import annotations

import pytest
import torch

import peftreg
from peftreg.compare.gguf import release_dequantized_gguf
from peftreg_plugins.lora import LoraConfig

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
gguf_quantizer = pytest.importorskip("transformers.quantizers.quantizer_gguf",
                                     reason="this transformers has no GGUF quantizer")

pytestmark = pytest.mark.transformers

VOCAB = 64


def tiny_llama():
    torch.manual_seed(8)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def as_loaded_from_gguf(model):
    """The marks transformers 5.24's legacy GGUF path (Llama) leaves on a model it unpacked:
    the quantizer's own pre- and post-processing, run as from_pretrained runs them."""
    quantizer = gguf_quantizer.GgufHfQuantizer(transformers.GgufConfig())
    quantizer.preprocess_model(model)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model


def trainer(model, tmp_path):
    ids = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(9))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                          max_steps=2, per_device_train_batch_size=2,
                                          disable_tqdm=True, save_strategy="no")
    return transformers.Trainer(model=model, args=args,
                                train_dataset=[{"input_ids": r, "labels": r} for r in ids])


def test_trainer_refuses_the_marked_model_and_trains_it_once_released(tmp_path):
    marked = as_loaded_from_gguf(tiny_llama())
    assert marked.is_quantized
    with pytest.raises(ValueError, match="purely quantized"):
        trainer(peftreg.adapt(marked, LoraConfig(r=2)), tmp_path)

    model = tiny_llama()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert release_dequantized_gguf(as_loaded_from_gguf(model)) is model
    assert not model.is_quantized and getattr(model, "hf_quantizer", None) is None
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    adapted = peftreg.adapt(model, LoraConfig(r=2))
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    trainer(adapted, tmp_path).train()
    assert any(not torch.equal(before[k], v) for k, v in adapted.state_dict().items())


def test_a_model_not_from_gguf_is_untouched():
    model = tiny_llama()
    assert release_dequantized_gguf(model) is model
    assert getattr(model, "hf_quantizer", None) is None


def test_packed_gguf_weights_are_refused_by_name():
    model = as_loaded_from_gguf(tiny_llama())
    model.hf_quantizer.packed_modules = {"model.layers.0.mlp.up_proj": object()}
    with pytest.raises(peftreg.ConfigError, match=r"1 weights packed \(model.layers.0.mlp.up_proj"
                                                  r"\).*GgufConfig\(dequantize=True\)"):
        release_dequantized_gguf(model)
