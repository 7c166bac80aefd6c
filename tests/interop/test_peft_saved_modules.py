# SPDX-License-Identifier: Apache-2.0
"""PEFT adapters that carry whole layers: ``modules_to_save`` output heads and input
embeddings, and the base-weight copies PEFT adds by itself (``save_embedding_layers``).

Issue 12, part 1. Every file is written by PEFT 0.21 itself from a tiny random-init Llama (tied
and untied embeddings); peftreg must load it with PEFT's logits, merge to the same logits, and
export back to a directory PEFT loads with the same logits. A refusal names one problem, never
two that contradict each other.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is a test extra")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

from safetensors.torch import load_file, save_file  # noqa: E402

import peftreg  # noqa: E402
from peftreg.errors import AdapterFileError  # noqa: E402
from peftreg.io.peft_format import PEFT_WEIGHTS_FILE  # noqa: E402

VOCAB = 96
IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(7))
ATOL = 1e-5  # the bound: fp32, both libraries run the same products


def make_llama(tied: bool, seed: int = 31):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained_peft_model(tied: bool, **lora):
    model = peft.get_peft_model(make_llama(tied), peft.LoraConfig(r=4, **lora))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


TIED = pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
HEADS = pytest.mark.parametrize(
    "saved", [["lm_head"], ["embed_tokens"], ["embed_tokens", "lm_head"]],
    ids=["lm_head", "embed_tokens", "both"])


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
@TIED
@HEADS
def test_modules_to_save_heads_load_merge_and_export(tmp_path, tied, saved):
    peft_model = trained_peft_model(tied, target_modules=["q_proj", "v_proj"],
                                    modules_to_save=saved)
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    keys = set(load_file(tmp_path / "peft" / PEFT_WEIGHTS_FILE))
    for name in saved:  # PEFT's layout: the trained copy under the module's own key
        path = "lm_head" if name == "lm_head" else "model.embed_tokens"
        assert f"base_model.model.{path}.weight" in keys
    base_out = logits(make_llama(tied))
    assert not torch.allclose(expected, base_out, atol=ATOL), "the adapter changes the logits"

    model = peftreg.load(make_llama(tied), tmp_path / "peft")
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)
    with model.disable_adapters():
        torch.testing.assert_close(logits(model), base_out, atol=ATOL, rtol=0)

    model.save_adapter(tmp_path / "back", format="peft")
    reloaded = peft.PeftModel.from_pretrained(make_llama(tied), tmp_path / "back").eval()
    torch.testing.assert_close(logits(reloaded), expected, atol=ATOL, rtol=0)

    model.merge()
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)
    model.unmerge()
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
@TIED
@pytest.mark.parametrize("targets", [["q_proj", "embed_tokens"], ["q_proj", "v_proj"]],
                         ids=["embedding-adapted", "embedding-not-adapted"])
def test_embedding_layers_peft_saves_by_itself_are_dropped_when_unchanged(tmp_path, tied,
                                                                            targets):
    peft_model = trained_peft_model(tied, target_modules=targets)
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path, save_embedding_layers=True)
    copies = [k for k in load_file(tmp_path / PEFT_WEIGHTS_FILE) if "lora_" not in k]
    assert copies, "PEFT wrote base-weight copies of the embedding layers"
    model = peftreg.load(make_llama(tied), tmp_path)
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)
    assert not any("embed_tokens.weight" in k or "lm_head.weight" in k
                   for k in model.adapter_state_dict("default")), "copies are not adapter state"


@TIED
def test_changed_embedding_copy_is_refused_with_one_consistent_message(tmp_path, tied):
    trained_peft_model(tied, target_modules=["q_proj", "v_proj"]).save_pretrained(
        tmp_path, save_embedding_layers=True)
    tensors = load_file(tmp_path / PEFT_WEIGHTS_FILE)
    key = next(k for k in tensors if k.endswith("lm_head.weight"))
    tensors[key] = tensors[key] * 2
    save_file(tensors, tmp_path / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
    with pytest.raises(AdapterFileError) as caught:
        peftreg.load(make_llama(tied), tmp_path)
    message = str(caught.value)
    assert key in message and "differs from the model's own weight" in message
    assert "holds none of its tensors" not in message
    assert "1 problem" in message


@TIED
def test_a_saved_head_with_a_wrong_shape_is_refused_once(tmp_path, tied):
    trained_peft_model(tied, target_modules=["q_proj"], modules_to_save=["lm_head"]
                       ).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / PEFT_WEIGHTS_FILE)
    tensors["base_model.model.lm_head.weight"] = torch.zeros(VOCAB + 4, 32)
    save_file(tensors, tmp_path / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match="lm_head") as caught:
        peftreg.load(make_llama(tied), tmp_path)
    assert "holds none of its tensors" not in str(caught.value)
    assert "differs from the model's own weight" not in str(caught.value)
