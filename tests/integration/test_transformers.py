from __future__ import annotations

import pytest
import tiny_hf
import torch

import peftreg
from peftreg.testing import check_method
from peftreg_plugins.lora import LoraConfig

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def make_llama():
    return tiny_hf.llama(seed=11)


def make_bert():
    return tiny_hf.bert(seed=12)


IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
LABELS = torch.tensor([0, 2])


def llama_forward(model, ids):
    return model(input_ids=ids).logits


def llama_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def bert_forward(model, ids):
    return model(input_ids=ids).logits


def bert_loss(model, ids):
    return model(input_ids=ids, labels=LABELS).loss


def test_families_are_described():
    registry = peftreg.default_registry()
    llama = registry.describe_model(make_llama())
    assert llama.name == "llama" and llama.layers == ("model.layers.0", "model.layers.1")
    assert llama.output_head == "lm_head" and llama.num_key_value_heads == 2
    bert = registry.describe_model(make_bert())
    assert bert.name == "bert" and bert.layers[1] == "bert.encoder.layer.1"
    assert bert.output_head == "classifier" and bert.roles["q"] == "attention.self.query"


@pytest.mark.parametrize(
    ("make", "forward", "loss", "config"),
    [
        (make_llama, llama_forward, llama_loss, LoraConfig(r=4)),
        (make_llama, llama_forward, llama_loss, LoraConfig(r=2, target_modules="all-linear")),
        (make_bert, bert_forward, bert_loss, LoraConfig(r=4, modules_to_save=["classifier"])),
    ],
    ids=["llama-default-targets", "llama-all-linear", "bert-with-head"],
)
def test_lora_conformance(make, forward, loss, config):
    report = check_method(config, make, IDS, forward, loss, steps=6, lr=2e-2)
    assert report.loss_after < report.loss_before


def test_default_targets_follow_the_family():
    model = peftreg.adapt(make_bert(), LoraConfig(r=2))
    targets = model.adapters["default"].targets
    assert targets == [f"bert.encoder.layer.{i}.attention.self.{n}" for i in range(2)
                       for n in ("query", "value")]


def test_all_linear_skips_the_lm_head():
    model = peftreg.adapt(make_llama(), LoraConfig(r=2, target_modules="all-linear"))
    assert "lm_head" not in model.adapters["default"].targets
    assert len(model.adapters["default"].targets) == 2 * 7


def test_generate_still_works():
    model = peftreg.adapt(make_llama(), LoraConfig(r=2))
    out = model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
