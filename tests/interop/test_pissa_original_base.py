"""PiSSA and OLoRA adapters written for the original base, as PEFT's
``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes them: a plain LoRA of
twice the rank that PEFT loads onto the unmodified model with the trained model's outputs."""

from __future__ import annotations

import json
import math

import pytest
import tiny_hf
import torch

import peftreg
from peftreg import AdapterError, UnsupportedOperationError
from peftreg.cli import main
from peftreg_plugins.lora import LoraConfig

peft = pytest.importorskip("peft", reason="peft is not installed")

PEFT_PREFIX = "base_model.model."
MODELS = {"llama": (tiny_hf.llama, ["q_proj", "v_proj", "down_proj"]),
          "bert": (tiny_hf.bert, ["query", "value", "output.dense"])}


def _trained_pair(tmp_path, model, init, **fields):
    """A PEFT PiSSA/OLoRA model (its initial adapter saved first, then its factors moved away
    from the init) and the same adapter in peftreg, holding the same trained factors."""
    build, targets = MODELS[model]
    theirs = peft.get_peft_model(build(), peft.LoraConfig(
        init_lora_weights=init, target_modules=targets, **fields)).eval()
    theirs.save_pretrained(tmp_path / "init")
    ours = peftreg.adapt(build(), LoraConfig(init_lora_weights=init, target_modules=targets,
                                             **fields)).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        trained = {k.removeprefix(PEFT_PREFIX): v
                   for k, v in peft.get_peft_model_state_dict(theirs).items()}
        for key, tensor in ours.adapter_state_dict("default").items():
            tensor.copy_(trained[key])
    return theirs, ours


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("model", ["llama", "bert"])
def test_export_for_the_original_base_equals_peft_conversion(tmp_path, model, init):
    theirs, ours = _trained_pair(tmp_path, model, init, r=4, lora_alpha=8)
    with torch.no_grad():
        expected = tiny_hf.logits(theirs, tiny_hf.IDS)
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(
        tmp_path / "init"))
    ours.save_adapter(tmp_path / "ours", format="peft", original_base=True)
    build, _ = MODELS[model]
    ours_doc = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_doc = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert ours_doc[key] == peft_doc[key], key
    outs = {}
    for name in ("peft", "ours"):
        # Each loads onto an unmodified model: the conversion needs no residual base.
        loaded = peft.PeftModel.from_pretrained(build(), tmp_path / name).eval()
        with torch.no_grad():
            outs[name] = tiny_hf.logits(loaded, tiny_hf.IDS)
    torch.testing.assert_close(outs["ours"], outs["peft"], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs["ours"], expected, atol=1e-5, rtol=0)
    # peftreg loads it too, as a plain LoRA on the unmodified model.
    back = peftreg.load(build(), tmp_path / "ours")
    assert back.record("default").config.init_lora_weights == "kaiming"
    with torch.no_grad():
        torch.testing.assert_close(tiny_hf.logits(back, tiny_hf.IDS), expected, atol=1e-5,
                                   rtol=0)


@pytest.mark.parametrize("fields", [
    {"r": 4, "lora_alpha": 6, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}},
    {"r": 4, "lora_alpha": 6, "use_rslora": True, "rank_pattern": {"v_proj": 2},
     "alpha_pattern": {"q_proj": 3}},
], ids=["patterns", "rslora-patterns"])
def test_patterns_and_rslora_keep_every_module_scale(tmp_path, fields):
    # PEFT refuses this conversion with rsLoRA and patterns; peftreg scales the pattern alphas
    # by sqrt(2) with the global one, which keeps every module's scale.
    theirs, ours = _trained_pair(tmp_path, "llama", "pissa", **fields)
    with torch.no_grad():
        expected = tiny_hf.logits(theirs, tiny_hf.IDS)
    ours.save_adapter(tmp_path / "ours", format="peft", original_base=True)
    doc = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    factor = math.sqrt(2) if fields.get("use_rslora") else 2
    assert doc["r"] == 8 and doc["rank_pattern"] == {"v_proj": 4}
    assert doc["alpha_pattern"] == {"q_proj": pytest.approx(3 * factor)}
    loaded = peft.PeftModel.from_pretrained(tiny_hf.llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(tiny_hf.logits(loaded, tiny_hf.IDS), expected, atol=1e-5,
                                   rtol=0)


def test_a_plain_lora_is_written_unchanged(tmp_path):
    model = peftreg.adapt(tiny_hf.llama(), LoraConfig(target_modules=["q_proj"]))
    model.save_adapter(tmp_path / "plain", format="peft")
    model.save_adapter(tmp_path / "original", format="peft", original_base=True)
    plain = (tmp_path / "plain" / "adapter_config.json").read_text()
    assert (tmp_path / "original" / "adapter_config.json").read_text() == plain


def test_original_base_needs_the_peft_format(tmp_path):
    model = peftreg.adapt(tiny_hf.llama(), LoraConfig(init_lora_weights="pissa",
                                                      target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="original_base"):
        model.save_adapter(tmp_path / "x", original_base=True)


def test_missing_initial_factors_are_named(tmp_path):
    model = peftreg.adapt(tiny_hf.llama(), LoraConfig(init_lora_weights="olora",
                                                      target_modules=["q_proj"]))
    for module in model.modules():
        if hasattr(module, "lora_A_init"):
            del module.lora_A_init
    with pytest.raises(UnsupportedOperationError, match=r"q_proj\.lora_A_init"):
        model.save_adapter(tmp_path / "x", format="peft", original_base=True)


def test_cli_converts_for_the_original_base(tmp_path):
    theirs, ours = _trained_pair(tmp_path, "llama", "pissa", r=4, lora_alpha=8)
    with torch.no_grad():
        expected = tiny_hf.logits(theirs, tiny_hf.IDS)
    ours.save_adapter(tmp_path / "saved")
    tiny_hf.llama().save_pretrained(tmp_path / "base")
    assert main(["convert", str(tmp_path / "saved"), str(tmp_path / "out"), "--to", "peft",
                 "--original-base", "--model", str(tmp_path / "base")]) == 0
    loaded = peft.PeftModel.from_pretrained(tiny_hf.llama(), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(tiny_hf.logits(loaded, tiny_hf.IDS), expected, atol=1e-5,
                                   rtol=0)
