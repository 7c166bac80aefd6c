"""PiSSA and OLoRA initialisation of LoRA (``init_lora_weights="pissa"`` / ``"olora"``): the
factors and the rewritten residual base equal HF PEFT's, and so do the trained numbers."""

from __future__ import annotations

import pytest
import tiny_hf
import torch
from torch import nn

import peftreg
from peftreg import ConfigError, UnsupportedOperationError
from peftreg_plugins.dora import DoraConfig
from peftreg_plugins.lora import LoraConfig
from peftreg_plugins.qlora import QLoraConfig, quantize_base

peft = pytest.importorskip("peft", reason="peft is not installed")

PEFT_PREFIX = "base_model.model."
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft(init, **fields):
    return peft.get_peft_model(tiny_hf.llama(), peft.LoraConfig(
        init_lora_weights=init, target_modules=TARGETS, **fields)).eval()


def _ours(init, **fields):
    return peftreg.adapt(tiny_hf.llama(), LoraConfig(init_lora_weights=init,
                                                     target_modules=TARGETS, **fields)).eval()


def _residuals(model, peft_model: bool):
    out = {}
    for name, module in model.named_modules():
        if peft_model and name.endswith("base_layer"):
            out[name.removesuffix(".base_layer")] = module.weight
        elif not peft_model and hasattr(module, "adapters") and isinstance(
                getattr(module, "base", None), nn.Linear):
            out[name] = module.base.weight
    return out


@pytest.mark.parametrize("fields", [{"r": 4, "lora_alpha": 8},
                                    {"r": 3, "lora_alpha": 5, "use_rslora": True}],
                         ids=["plain", "rslora"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_residual_and_training_numbers_equal_peft(init, fields):
    theirs, ours = _peft(init, **fields), _ours(init, **fields)
    state = ours.adapter_state_dict("default")
    saved = {k.removeprefix(PEFT_PREFIX): v
             for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert set(state) == set(saved)
    for key, tensor in state.items():
        torch.testing.assert_close(tensor, saved[key], atol=1e-6, rtol=0,
                                   msg=lambda m, k=key: f"{k}: {m}")
    their_bases, our_bases = _residuals(theirs.base_model.model, True), _residuals(ours.model,
                                                                                   False)
    assert set(their_bases) == set(our_bases) and len(our_bases) == 2 * len(TARGETS)
    for path, weight in our_bases.items():
        torch.testing.assert_close(weight, their_bases[path], atol=1e-6, rtol=0)
    ids = tiny_hf.IDS
    with torch.no_grad():
        # The residual plus the update is the original weight, up to float32 rounding.
        torch.testing.assert_close(tiny_hf.logits(ours, ids), tiny_hf.logits(tiny_hf.llama(), ids),
                                   atol=1e-5, rtol=0)
        gen = torch.Generator().manual_seed(3)
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        saved = {k.removeprefix(PEFT_PREFIX): v
                 for k, v in peft.get_peft_model_state_dict(theirs).items()}
        for key, tensor in state.items():
            tensor.copy_(saved[key])
        expected = tiny_hf.logits(theirs, ids)
        torch.testing.assert_close(tiny_hf.logits(ours, ids), expected, atol=1e-5, rtol=0)
    tiny_hf.llama_loss(theirs, ids).backward()
    tiny_hf.llama_loss(ours, ids).backward()
    their_grads = {n.removeprefix(PEFT_PREFIX).replace(".default", ""): p.grad
                   for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n.replace(".adapters.default", ""): p.grad
                 for n, p in ours.model.named_parameters() if p.requires_grad}
    assert set(their_grads) == set(our_grads)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], atol=1e-5, rtol=0)
    with torch.no_grad():
        theirs.merge_adapter()
        ours.merge()
        torch.testing.assert_close(tiny_hf.logits(ours, ids), tiny_hf.logits(theirs, ids),
                                   atol=1e-5, rtol=0)


def test_a_quantized_target_is_refused_before_any_base_is_rewritten(make_tiny):
    model = make_tiny()
    family = peftreg.default_registry().describe_model(model)
    quantize_base(model, QLoraConfig(quantize="targets", target_modules=["v_proj"]), family)
    before = model.layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.raises(UnsupportedOperationError, match=r"init_lora_weights = 'pissa'.*v_proj"):
        peftreg.adapt(model, LoraConfig(init_lora_weights="pissa",
                                        target_modules=["q_proj", "v_proj"]))
    assert torch.equal(model.layers[0].self_attn.q_proj.weight, before)


@pytest.mark.parametrize("cls", [QLoraConfig, DoraConfig])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_methods_without_base_rewriting_refuse_it(cls, init):
    with pytest.raises(ConfigError, match="init_lora_weights"):
        cls(init_lora_weights=init)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_directories_round_trip_on_the_original_base(tmp_path, init):
    # PEFT saves the trained factors with init_lora_weights and decomposes the base again on
    # loading; peftreg reads and writes the same, so both load onto the original base.
    theirs = _peft(init, r=4, lora_alpha=8)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftreg.load(tiny_hf.llama(), tmp_path / "peft")
    assert ours.record("default").config.init_lora_weights == init
    with torch.no_grad():
        expected = tiny_hf.logits(theirs, tiny_hf.IDS)
        torch.testing.assert_close(tiny_hf.logits(ours, tiny_hf.IDS), expected, atol=1e-5,
                                   rtol=0)
    ours.save_adapter(tmp_path / "ours", format="peft")
    back = peft.PeftModel.from_pretrained(tiny_hf.llama(), tmp_path / "ours").eval()
    assert back.peft_config["default"].init_lora_weights == init
    with torch.no_grad():
        torch.testing.assert_close(tiny_hf.logits(back, tiny_hf.IDS), expected, atol=1e-5,
                                   rtol=0)
