"""Any mergeable adapter served as a LoRA: refitted by truncated SVD, checked against PEFT.

At full rank the exported LoRA reproduces the adapter's outputs to float tolerance (in peftreg
and in ``PeftModel.from_pretrained``); at lower rank the recorded error is the true relative
error of the refit, it falls as the rank grows, and it is the SVD optimum (Eckart-Young).
"""

from __future__ import annotations

import json
import warnings

import pytest
import tiny_hf
import torch

peft = pytest.importorskip("peft", reason="peft is not installed")

import peftreg  # noqa: E402
from peftreg import AdapterError, UnsupportedOperationError  # noqa: E402
from peftreg.cli import main  # noqa: E402
from peftreg.io.peft_format import PEFT_CONFIG_FILE  # noqa: E402
from peftreg.updates import LayerUpdate, layer_updates  # noqa: E402
from peftreg_plugins.houlsby import HoulsbyConfig  # noqa: E402
from peftreg_plugins.ia3 import IA3Config  # noqa: E402
from peftreg_plugins.lora import LoraConfig, LoraMethod  # noqa: E402
from peftreg_plugins.qlora import QLoraConfig  # noqa: E402

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(7))
WIDTH = 32  # tiny_hf.llama's hidden size: rank 64 is full rank for every projection


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def perturbed(config):
    model = peftreg.adapt(tiny_hf.llama(), config)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


SOURCES = {
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"]),
    "lora-r4": lambda: LoraConfig(r=4, target_modules=["q_proj", "o_proj"]),
    "dora": lambda: peftreg.config_for("dora", r=4, target_modules=["q_proj", "down_proj"]),
    "loha": lambda: peftreg.config_for("loha", r=4, target_modules=["v_proj", "up_proj"]),
    "oft": lambda: peftreg.config_for("oft", oft_block_size=8, target_modules=["o_proj"]),
}


@pytest.mark.parametrize("source", SOURCES)
def test_at_full_rank_the_lora_reproduces_the_adapter_in_peftreg_and_peft(tmp_path, source):
    model = perturbed(SOURCES[source]())
    expected = logits(model)
    model.save_adapter(tmp_path / "lora", format="peft", as_method="lora", rank=64)
    doc = json.loads((tmp_path / "lora" / PEFT_CONFIG_FILE).read_text())
    assert doc["peft_type"] == "LORA" and doc["r"] == 64
    record = doc["peftreg_conversion"]
    assert record["from_method"] == model.record("default").method.name
    assert record["relative_error"] < 1e-6
    reload = peftreg.AdaptedModel(tiny_hf.llama())
    reload.load_adapter(tmp_path / "lora")
    torch.testing.assert_close(logits(reload), expected, atol=1e-4, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_hf.llama(), tmp_path / "lora")
    torch.testing.assert_close(logits(theirs), expected, atol=1e-4, rtol=0)


def test_a_4bit_base_gives_the_update_of_its_lora_factors():
    # QLoRA computes in bfloat16 on a 4-bit base, so its logits are not compared at float32
    # tolerance; its update, taken on the dequantized base, is exactly s * B @ A.
    model = perturbed(QLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    state = model.adapter_state_dict("default")
    updates = layer_updates(model, "default")
    assert set(updates) == {p for p in model.record("default").targets}
    for path, update in updates.items():
        a, b = state[f"{path}.lora_A.weight"].double(), state[f"{path}.lora_B.weight"].double()
        torch.testing.assert_close(update.weight, 2.0 * b @ a, atol=1e-5, rtol=0)


def test_lower_rank_errors_are_the_svd_optimum_and_fall_with_rank(tmp_path):
    model = perturbed(IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                feedforward_modules=["down_proj"]))
    updates = layer_updates(model, "default")
    errors = []
    for rank in (1, 4, 16):
        written = model.save_adapter(tmp_path / f"r{rank}", format="peft", as_method="lora",
                                     rank=rank)
        record = json.loads((written / PEFT_CONFIG_FILE).read_text())["peftreg_conversion"]
        for path, update in updates.items():
            s = torch.linalg.svdvals(update.weight)
            optimum = (s[rank:].square().sum() / s.square().sum()).sqrt().item()
            assert record["layer_relative_errors"][path] == pytest.approx(optimum, rel=1e-6,
                                                                          abs=1e-9)
        errors.append(record["relative_error"])
    assert errors[0] > errors[1] > errors[2] > 0


@pytest.mark.parametrize(("out_features", "in_features"), [(32, 32), (7, 19), (19, 3)])
def test_fit_updates_gives_factors_of_the_asked_rank(out_features, in_features):
    generator = torch.Generator().manual_seed(out_features)
    true_rank = min(2, out_features, in_features)
    weight = (torch.randn(out_features, true_rank, generator=generator, dtype=torch.float64)
              @ torch.randn(true_rank, in_features, generator=generator, dtype=torch.float64))
    fitted = LoraMethod().fit_updates({"layer": LayerUpdate(weight, None)}, rank=5)
    assert fitted.tensors["layer.lora_A.weight"].shape == (5, in_features)
    assert fitted.tensors["layer.lora_B.weight"].shape == (out_features, 5)
    assert fitted.config.r == 5 and fitted.config.lora_alpha == 5  # scale 1
    # The update has rank 2: the fit is exact, and the factors' extra rows are (near) zero.
    torch.testing.assert_close(fitted.fitted["layer"].weight, weight, atol=1e-10, rtol=0)
    assert fitted.tensors["layer.lora_A.weight"][true_rank:].abs().max() < 1e-6
    with pytest.raises(peftreg.ConfigError, match="rank must be a positive integer"):
        LoraMethod().fit_updates({"layer": LayerUpdate(weight, None)}, rank=0)


def test_refusals_name_the_problem(tmp_path):
    houlsby = peftreg.adapt(tiny_hf.llama(), HoulsbyConfig())
    with pytest.raises(UnsupportedOperationError, match="not mergeable"):
        houlsby.save_adapter(tmp_path / "h", format="peft", as_method="lora", rank=4)
    lora = perturbed(LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(UnsupportedOperationError, match="cannot express dense weight updates"):
        lora.save_adapter(tmp_path / "i", format="peft", as_method="ia3", rank=4)
    with pytest.raises(AdapterError, match="go together"):
        lora.save_adapter(tmp_path / "j", format="peft", as_method="lora")
    assert not (tmp_path / "h").exists() and not (tmp_path / "i").exists()


def test_the_command_line_refits_with_a_local_model(tmp_path, capsys):
    pytest.importorskip("transformers")
    tiny_hf.llama().save_pretrained(tmp_path / "base")
    model = perturbed(IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=None))
    model.save_adapter(tmp_path / "ia3")
    assert main(["convert", str(tmp_path / "ia3"), str(tmp_path / "out"), "--to", "peft-lora",
                 "--rank", "64", "--model", str(tmp_path / "base")]) == 0
    assert "ia3 as lora of rank 64" in capsys.readouterr().out
    reload = peftreg.AdaptedModel(tiny_hf.llama())
    reload.load_adapter(tmp_path / "out")
    torch.testing.assert_close(logits(reload), logits(model), atol=1e-4, rtol=0)
    assert main(["convert", str(tmp_path / "ia3"), str(tmp_path / "out2"), "--to",
                 "peft-lora"]) == 2
