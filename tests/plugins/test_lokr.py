"""LoKr (plugins/lokr.py): numbers equal to HF PEFT 0.21.2's ``LoKrConfig``, the kit, the count.

Parity as for LoHa (tests/peft_twin.py): logits, merged logits and every gradient agree within
float32 defaults (both build the same ``kron(W1, W2)`` and one ``F.linear``; measured 0).
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
from peftreg_plugins.lokr import KronShapes, LokrConfig, LokrLinear, LokrMethod, factorization

peft = pytest.importorskip("peft", reason="peft is not installed")
from peft.tuners.lokr.layer import factorization as peft_factorization  # noqa: E402

CHECKS = tuple(c for c in ALL_CHECKS if c != "compile")

CASES = [
    # r=4 on 32 = 4 x 8 widths: both factors full.
    pytest.param(tiny_hf.llama, tiny_hf.llama_loss,
                 dict(r=4, alpha=6, target_modules=["q_proj", "k_proj", "down_proj"]),
                 id="llama-full-factors"),
    # r=1 with decompose_both: both factors low-rank.
    pytest.param(tiny_hf.llama, tiny_hf.llama_loss,
                 dict(r=1, decompose_both=True, target_modules="all-linear",
                      rank_pattern={"up_proj": 2}),
                 id="llama-decompose-both"),
    pytest.param(tiny_hf.bert, tiny_hf.bert_loss,
                 dict(r=2, decompose_factor=4, target_modules=["query", "value", "dense"]),
                 id="bert-factor-4"),
    pytest.param(tiny_hf.llama, tiny_hf.llama_loss,
                 dict(r=2, init_weights="lycoris", rank_dropout=0.3, rank_dropout_scale=True,
                      target_modules=["v_proj", "gate_proj"]),
                 id="llama-lycoris-init"),
]


@pytest.mark.parametrize(("make", "loss", "fields"), CASES)
def test_equal_to_peft(make, loss, fields):
    theirs, ours = twins(make, peft.LoKrConfig(**fields), LokrConfig(**fields), scale=0.3)
    compare(theirs, ours, tiny_hf.IDS, loss)
    compare_merged(theirs, ours, tiny_hf.IDS, make)


@pytest.mark.parametrize("factor", [-1, 2, 3, 4, 5, 7, 16, 100])
def test_factorization_is_peft_s(factor):
    for dim in (1, 2, 7, 12, 32, 48, 64, 96, 127, 128, 250, 256, 768, 4096, 11008):
        assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


def test_factorization_examples():
    assert factorization(256) == (16, 16)
    assert factorization(128) == (8, 16)
    assert factorization(127) == (1, 127)
    assert factorization(128, 4) == (4, 32)


def test_full_and_low_rank_choice():
    # out 64 = 8 x 8, in 32 = 4 x 8: W2 is full iff r >= max(8, 8) / 2.
    assert KronShapes.of(64, 32, 4, False, -1).full_w2
    assert not KronShapes.of(64, 32, 3, False, -1).full_w2
    # W1 (8 x 4) is decomposed only with decompose_both and r < max(8, 4) / 2.
    assert KronShapes.of(64, 32, 3, False, -1).full_w1
    assert not KronShapes.of(64, 32, 3, True, -1).full_w1
    assert KronShapes.of(64, 32, 4, True, -1).full_w1


def test_starts_at_the_base_like_peft():
    config = LokrConfig(r=1, decompose_both=True, target_modules=["x"])
    layer = LokrLinear(nn.Linear(32, 64), KronShapes.of(64, 32, 1, True, -1), 1.0, config)
    assert torch.count_nonzero(layer.lokr_w1_a) == 0
    assert torch.count_nonzero(layer.lokr_w2_b) == layer.lokr_w2_b.numel()
    assert torch.count_nonzero(layer.delta_weight()) == 0


def test_conformance_with_all_checks(make_tiny, token_batch):
    config = LokrConfig(r=1, decompose_both=True, target_modules=["q_proj", "v_proj", "down_proj"])
    report = check_method(config, make_tiny, token_batch, lambda m, ids: m(ids)["logits"],
                          lambda m, ids: m(ids, labels=ids)["loss"], steps=6, lr=3e-2,
                          checks=CHECKS)
    assert report.loss_after < report.loss_before
    assert set(report.extra) == set(CHECKS)


def test_conformance_on_hf_bert():
    report = check_method(LokrConfig(r=2, target_modules=["query", "value"],
                                     modules_to_save=["classifier"]),
                          tiny_hf.bert, tiny_hf.IDS, tiny_hf.logits, tiny_hf.bert_loss, steps=6,
                          lr=1e-2)
    assert report.loss_after < report.loss_before


def test_parameter_count_from_the_shapes():
    model = tiny_hf.llama()
    # r=1, decompose_both. 32 = 4 x 8, 16 = 4 x 4, 64 = 8 x 8; W1 low-rank iff 1 < max(a, c)/2.
    config = LokrConfig(r=1, decompose_both=True, target_modules=["q_proj", "k_proj", "up_proj"])
    q = 1 * (4 + 4) + 1 * (8 + 8)    # 32 x 32: W1 4 x 4 (rank 1), W2 8 x 8 (rank 1)
    k = 1 * (4 + 4) + 1 * (4 + 8)    # 16 x 32: W1 4 x 4, W2 4 x 8
    up = 1 * (8 + 4) + 1 * (8 + 8)   # 64 x 32: W1 8 x 4, W2 8 x 8
    family = peftreg.default_registry().describe_model(model)
    expected = 2 * (q + k + up)
    assert LokrMethod().parameter_count(model, config, family) == expected
    adapted = peftreg.adapt(model, config)
    assert sum(p.numel() for p in adapted.adapter_parameters("default")) == expected
    full = LokrConfig(r=8, target_modules=["q_proj"])  # 4 x 4 and 8 x 8, full
    assert LokrMethod().parameter_count(tiny_hf.llama(), full, family) == 2 * (16 + 64)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"decompose_factor": 0}, r"LokrConfig.decompose_factor: must be -1 .* \(got 0\)"),
        ({"decompose_factor": -2}, "LokrConfig.decompose_factor: must be -1"),
        ({"r": 0}, "LokrConfig.r: rank must be > 0"),
        ({"init_weights": "pissa"}, "LokrConfig.init_weights"),
        ({"rank_dropout": 1.5}, "LokrConfig.rank_dropout"),
    ],
    ids=["factor-0", "factor-negative", "rank", "init", "rank-dropout"],
)
def test_bad_config(fields, message):
    with pytest.raises(ConfigError, match=message):
        LokrConfig(target_modules=["q_proj"], **fields)


def test_a_factor_with_no_kronecker_split_names_the_field():
    model = nn.Sequential(nn.Linear(7, 13))
    with pytest.raises(ConfigError, match=r"LokrConfig.decompose_factor: 1 gives no Kronecker "
                       r"split of '0' \(13 x 7\)"):
        peftreg.adapt(model, LokrConfig(decompose_factor=1, target_modules=["0"]))
    assert isinstance(model[0], nn.Linear)  # refused before anything was changed


def test_4096_square_at_rank_8_has_5120_parameters():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    adapted = peftreg.adapt(model, LokrConfig(r=8, target_modules=["0"]))
    (row,) = adapted.summary().rows
    assert row.adapter_params == 5_120 == 64 * 64 + 8 * (64 + 64)  # W1 full, W2 rank 8


@pytest.mark.parametrize("order", [("qlora", "x"), ("x", "qlora")], ids=["qlora-first",
                                                                          "under-test-first"])
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_on_a_4bit_base_stacked_with_qlora(make_tiny, token_batch, kind, order):
    from peftreg_plugins.loha import LohaConfig
    from peftreg_plugins.qlora import QLoraConfig

    targets = ["v_proj", "down_proj"]
    model = peftreg.adapt(make_tiny(), QLoraConfig(r=2, target_modules=targets,
                                                   quantize="targets", compute_dtype="float32"),
                          "qlora")
    config = (LohaConfig if kind == "loha" else LokrConfig)(r=2, target_modules=targets,
                                                            init_weights=False)
    model.add_adapter("x", config)
    with torch.no_grad():
        for p in model.adapter_parameters("qlora"):
            p.normal_(std=0.1)
    model.set_active(list(order))
    with torch.no_grad():
        stacked = model(token_batch)["logits"]
        model.merge()  # the 4-bit layers are densified, then both fold in
        torch.testing.assert_close(model(token_batch)["logits"], stacked, atol=1e-5, rtol=0)
        model.unmerge()
        torch.testing.assert_close(model(token_batch)["logits"], stacked, atol=1e-5, rtol=0)



@pytest.mark.parametrize(
    "fields",
    [dict(r=8, target_modules=["c1", "c2", "c3"]),                       # full W2 (4-D)
     dict(r=1, decompose_both=True, target_modules=["c1", "c2", "c3"])],  # low-rank W1, W2
    ids=["full", "low-rank"])
def test_conv2d_equal_to_peft(fields):
    compare_convs(peft.LoKrConfig(**fields), LokrConfig(**fields))
    ours = peftreg.adapt(TinyConvs(), LokrConfig(**fields))
    count = LokrMethod().parameter_count(TinyConvs(), LokrConfig(**fields), None)
    assert sum(p.numel() for p in ours.adapter_parameters("default")) == count


def test_conv2d_count_from_the_shapes():
    # c1: out 8 = 2 x 4, in 3 = 1 x 3, 3x3 kernel; c2: out 6 = 2 x 3, in 8 / 2 = 4 = 2 x 2;
    # c3: out 4 = 2 x 2, in 6 = 2 x 3, 1x1. At r=8 every factor is full.
    config = LokrConfig(r=8, target_modules=["c1", "c2", "c3"])
    expected = (2 * 1 + 4 * 3 * 9) + (2 * 2 + 3 * 2 * 9) + (2 * 2 + 2 * 3 * 1)
    assert LokrMethod().parameter_count(TinyConvs(), config, None) == expected



@pytest.mark.parametrize("r", [8, 1], ids=["full", "low-rank"])
def test_conv2d_peft_directory_round_trip(tmp_path, r):
    from tolerances import tol

    fields = dict(r=r, decompose_both=True, target_modules=["c1", "c2", "c3"])
    theirs = peft.get_peft_model(TinyConvs(), peft.LoKrConfig(**fields)).eval()
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
