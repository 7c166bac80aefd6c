"""LoRA+ parameter groups: the learning rate and weight decay of every trainable tensor equal
those HF PEFT's create_loraplus_optimizer gives its twin."""

from __future__ import annotations

import warnings

import pytest
import tiny_hf
import torch

import peftreg
from peftreg import ConfigError
from peftreg_plugins.lora import LoraConfig, create_loraplus_optimizer, loraplus_param_groups

peft = pytest.importorskip("peft")


def _per_tensor(optimizer, names):
    found = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            found[names[id(p)]] = (group["lr"], group["weight_decay"])
    return found


@pytest.mark.parametrize("make", [tiny_hf.llama, tiny_hf.bert], ids=["llama", "bert"])
def test_groups_equal_peft(make):
    targets = ["q_proj", "v_proj", "embed_tokens"] if make is tiny_hf.llama else \
        ["query", "value", "word_embeddings"]
    saved = ["lm_head"] if make is tiny_hf.llama else ["classifier"]
    kwargs = {"lr": 1e-3, "loraplus_lr_ratio": 16.0, "loraplus_lr_embedding": 1e-5,
              "loraplus_weight_decay": 0.01}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft.LoraConfig(
            r=4, target_modules=targets, modules_to_save=saved))
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    their_opt = peft_loraplus(theirs, torch.optim.AdamW, **kwargs)
    ours = peftreg.adapt(make(), LoraConfig(r=4, target_modules=targets, modules_to_save=saved))
    our_opt = create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs)

    def peft_key(name):  # PEFT's parameter name as the saved key both libraries share
        name = name.removeprefix("base_model.model.").replace(".default", "")
        return name.replace(".modules_to_save", "")

    theirs_by_key = _per_tensor(their_opt, {id(p): peft_key(n)
                                            for n, p in theirs.named_parameters()})
    # peftreg's saved keys, found through the storage each saved tensor shares with its
    # parameter.
    saved_key = {t.data_ptr(): k for k, t in ours.adapter_state_dict("default").items()}
    ours_by_key = _per_tensor(our_opt, {id(p): saved_key[p.data_ptr()]
                                        for p in ours.parameters() if p.requires_grad})
    assert ours_by_key == theirs_by_key
    assert {lr for lr, _ in ours_by_key.values()} == {1e-3, 1.6e-2, 1e-5}


def test_b_learns_ratio_times_faster_than_a(make_tiny):
    model = peftreg.adapt(make_tiny(), LoraConfig(r=4, target_modules=["q_proj"]))
    groups = loraplus_param_groups(model, lr=2e-4, loraplus_lr_ratio=8)
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            expected = 1.6e-3 if "lora_B" in name else 2e-4
            assert by_id[id(p)] == pytest.approx(expected), name
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=0.5)
    with pytest.raises(ConfigError, match="must be positive"):
        loraplus_param_groups(model, lr=0.0, loraplus_lr_ratio=4)
