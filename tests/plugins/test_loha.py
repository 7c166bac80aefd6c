"""LoHa (plugins/loha.py): numbers equal to HF PEFT 0.21.2's ``LoHaConfig``, the kit, the count.

Parity: the same tiny random-init Llama and BERT adapted by PEFT and by peftreg, PEFT's tensors
drawn at random and copied over (tests/peft_twin.py); logits, merged logits and the gradient of
every adapter tensor agree within float32 defaults (both compute the same dense update and one
``F.linear``; measured differences are exactly 0).
"""

from __future__ import annotations

import pytest
import tiny_hf
import torch
from peft_twin import TinyConvs, compare, compare_convs, compare_merged, twins
from torch import nn

import peftreg
from peftreg import ConfigError
from peftreg.testing import ALL_CHECKS, check_method
from peftreg_plugins.loha import HadamardProduct, LohaConfig, LohaLinear, LohaMethod

peft = pytest.importorskip("peft", reason="peft is not installed")

CHECKS = tuple(c for c in ALL_CHECKS if c != "compile")  # not claimed compilable

CASES = [
    pytest.param(tiny_hf.llama, tiny_hf.llama_loss,
                 dict(r=4, alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]),
                 id="llama"),
    pytest.param(tiny_hf.llama, tiny_hf.llama_loss,
                 dict(r=2, target_modules="all-linear", rank_pattern={"down_proj": 3},
                      alpha_pattern={"model.layers.1.self_attn.q_proj": 5}),
                 id="llama-all-linear-patterns"),
    pytest.param(tiny_hf.bert, tiny_hf.bert_loss,
                 dict(r=3, alpha=2, target_modules=["query", "value", "output.dense"]),
                 id="bert"),
]


@pytest.mark.parametrize(("make", "loss", "fields"), CASES)
def test_equal_to_peft(make, loss, fields):
    theirs, ours = twins(make, peft.LoHaConfig(**fields), LohaConfig(**fields))
    compare(theirs, ours, tiny_hf.IDS, loss)
    compare_merged(theirs, ours, tiny_hf.IDS, make)


def test_starts_at_the_base_like_peft():
    layer = LohaLinear(nn.Linear(12, 8), r=3, alpha=3.0, rank_dropout=0.0, module_dropout=0.0,
                       init_weights=True)
    assert torch.count_nonzero(layer.hada_w2_b) == 0
    assert all(torch.count_nonzero(p) == p.numel()
               for p in (layer.hada_w1_a, layer.hada_w1_b, layer.hada_w2_a))
    assert torch.count_nonzero(layer.delta_weight()) == 0


def test_conformance_with_all_checks(make_tiny, token_batch):
    config = LohaConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"])
    report = check_method(config, make_tiny, token_batch, lambda m, ids: m(ids)["logits"],
                          lambda m, ids: m(ids, labels=ids)["loss"], steps=6, checks=CHECKS)
    assert report.formula_params == 2 * (2 * 2 * (32 + 32) + 2 * 2 * (32 + 16) + 2 * 2 * (48 + 32))
    assert report.loss_after < report.loss_before
    assert set(report.extra) == set(CHECKS)


def test_conformance_on_hf_llama():
    report = check_method(LohaConfig(r=2), tiny_hf.llama, tiny_hf.IDS, tiny_hf.logits,
                          tiny_hf.llama_loss, steps=6, lr=1e-2)
    assert report.loss_after < report.loss_before


def test_parameter_count_from_the_shapes():
    model = tiny_hf.llama()
    config = LohaConfig(r=4, target_modules="all-linear", rank_pattern={"down_proj": 2})
    h, f, kv = 32, 64, 16  # hidden, feed-forward, key/value width (2 heads of 8)
    per_layer = (2 * 4 * (h + h) * 2 + 2 * 4 * (h + kv) * 2  # q, o; k, v
                 + 2 * 4 * (h + f) * 2 + 2 * 2 * (f + h))    # gate, up; down at rank 2
    family = peftreg.default_registry().describe_model(model)
    assert LohaMethod().parameter_count(model, config, family) == 2 * per_layer
    adapted = peftreg.adapt(model, config)
    assert sum(p.numel() for p in adapted.adapter_parameters("default")) == 2 * per_layer


def test_dropouts_only_in_training():
    torch.manual_seed(0)
    layer = LohaLinear(nn.Linear(16, 16), r=4, alpha=4.0, rank_dropout=0.5, module_dropout=0.0,
                       init_weights=False)
    x = torch.randn(3, 16)
    y = torch.zeros(3, 16)
    layer.eval()
    expected = x @ layer.delta_weight().T
    torch.testing.assert_close(layer.adapt_output(x, y), expected)
    layer.train()
    dropped = layer.adapt_output(x, y)
    zero_cols = (dropped.abs().sum(0) == 0).sum()
    assert 0 < zero_cols < 16  # whole output rows of the update are dropped
    skip = LohaLinear(nn.Linear(16, 16), r=4, alpha=4.0, rank_dropout=0.0, module_dropout=0.99,
                      init_weights=False).train()
    assert torch.equal(skip.adapt_output(x, y), y)  # skipped nearly always


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"r": 0}, r"LohaConfig.r: rank must be > 0 \(got 0\)"),
        ({"alpha": 0}, "LohaConfig.alpha: must be a finite number > 0"),
        ({"rank_dropout": 1.0}, r"LohaConfig.rank_dropout: must be in \[0, 1\)"),
        ({"module_dropout": -0.1}, r"LohaConfig.module_dropout: must be in \[0, 1\)"),
        ({"rank_pattern": {"q_proj": 0}}, "LohaConfig.rank_pattern: rank for 'q_proj'"),
        ({"alpha_pattern": {"q_proj(": 2.0}}, "LohaConfig.alpha_pattern: key"),
    ],
    ids=["rank", "alpha", "rank-dropout", "module-dropout", "rank-pattern", "bad-regex"],
)
def test_bad_config(fields, message):
    with pytest.raises(ConfigError, match=message):
        LohaConfig(target_modules=["q_proj"], **fields)


def test_save_and_load_keep_peft_keys(tmp_path):
    fields = dict(r=2, target_modules=["q_proj"])
    _, ours = twins(tiny_hf.llama, peft.LoHaConfig(**fields), LohaConfig(**fields))
    ours.save_adapter(tmp_path)
    loaded = peftreg.load(tiny_hf.llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(tiny_hf.logits(loaded, tiny_hf.IDS),
                                   tiny_hf.logits(ours, tiny_hf.IDS), atol=0, rtol=0)
    assert sorted(loaded.adapter_state_dict("default")) == [
        f"model.layers.{i}.self_attn.q_proj.hada_w{j}_{s}"
        for i in (0, 1) for j in (1, 2) for s in "ab"]


def test_conv2d_equal_to_peft():
    fields = dict(r=2, alpha=3, target_modules=["c1", "c2", "c3"])
    compare_convs(peft.LoHaConfig(**fields), LohaConfig(**fields))
    # 2 r (out + in / groups * kh * kw) per layer.
    expected = 2 * 2 * ((8 + 3 * 9) + (6 + 4 * 9) + (4 + 6))
    assert LohaMethod().parameter_count(TinyConvs(), LohaConfig(**fields), None) == expected
    ours = peftreg.adapt(TinyConvs(), LohaConfig(**fields))
    assert sum(p.numel() for p in ours.adapter_parameters("default")) == expected


def test_conv2d_peft_directory_round_trip(tmp_path):
    from tolerances import tol

    fields = dict(r=2, alpha=3, target_modules=["c1", "c2", "c3"])
    theirs = peft.get_peft_model(TinyConvs(), peft.LoHaConfig(**fields)).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(2, 3, 9, 9, generator=gen)
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftreg.load(TinyConvs(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **tol("peft_parity", torch.float32))
    ours.save_adapter(tmp_path / "export", format="peft")
    back = peft.PeftModel.from_pretrained(TinyConvs(), tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), **tol("peft_parity", torch.float32))


def test_hadamard_product_gradients_in_float64():
    gen = torch.Generator().manual_seed(4)
    factors = [torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
               for shape in ((5, 2), (2, 7), (5, 2), (2, 7))]
    assert torch.autograd.gradcheck(lambda *f: HadamardProduct.apply(*f, 0.75), factors)


def test_backward_keeps_no_dense_product_of_the_factors():
    # Bytes kept for the backward by one LoHa forward: the factors and the update F.linear
    # needs, not the two dense products w1a @ w1b and w2a @ w2b (a weight's size each).
    layer = nn.Linear(64, 48)
    adapter = LohaLinear(layer, r=2, alpha=2.0, rank_dropout=0.0, module_dropout=0.0,
                         init_weights=False)
    x = torch.randn(3, 64, requires_grad=True)  # as after an adapted layer: dx needs the update
    kept: list[int] = []

    def pack(t):
        kept.append(t.numel())
        return t

    y = layer(x).detach()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        adapter.adapt_output(x, y).sum().backward()
    dense = 48 * 64
    assert sum(n for n in kept if n == dense) == dense  # the update, once
