"""OFT (plugins/oft.py): numbers equal to HF PEFT 0.21.2's ``OFTConfig``, the kit, the count.

Parity as for LoHa (tests/peft_twin.py). Both rotate the layer input block by block with the
same Cayley(-Neumann) blocks; gradients differ by float32 rounding only (measured at most
1e-9), merged logits by at most 1.1e-7 (peftreg folds ``W R^T`` in float64, PEFT in float32).
"""

from __future__ import annotations

import pytest
import tiny_hf
import torch
from peft_twin import compare, compare_merged, twins
from torch import nn

import peftreg
from peftreg import ConfigError, UnsupportedOperationError
from peftreg.testing import ALL_CHECKS, check_method
from peftreg_plugins.lora import LoraConfig
from peftreg_plugins.oft import OftConfig, OftLinear, OftMethod

peft = pytest.importorskip("peft", reason="peft is not installed")

CHECKS = tuple(c for c in ALL_CHECKS if c != "compile")

CASES = [
    pytest.param(tiny_hf.llama, tiny_hf.llama_loss,
                 dict(oft_block_size=8, target_modules="all-linear"), id="llama-neumann"),
    pytest.param(tiny_hf.llama, tiny_hf.llama_loss,
                 dict(oft_block_size=8, use_cayley_neumann=False,
                      target_modules=["q_proj", "down_proj"]), id="llama-exact-cayley"),
    pytest.param(tiny_hf.llama, tiny_hf.llama_loss,
                 dict(r=4, oft_block_size=0, num_cayley_neumann_terms=3,
                      target_modules=["k_proj", "up_proj"]), id="llama-r-3-terms"),
    pytest.param(tiny_hf.bert, tiny_hf.bert_loss,
                 dict(r=4, oft_block_size=0, block_share=True, target_modules=["query", "value"]),
                 id="bert-block-share"),
    pytest.param(tiny_hf.bert, tiny_hf.bert_loss,
                 dict(oft_block_size=4, coft=True, eps=0.05,
                      target_modules=["query", "output.dense"]), id="bert-coft"),
    pytest.param(tiny_hf.llama, tiny_hf.llama_loss,
                 dict(oft_block_size=8, target_modules=["embed_tokens", "v_proj"]),
                 id="llama-embedding"),
    pytest.param(tiny_hf.bert, tiny_hf.bert_loss,
                 dict(r=2, oft_block_size=0, block_share=True, use_cayley_neumann=False,
                      target_modules=["word_embeddings"]), id="bert-embedding-shared-exact"),
]


@pytest.mark.parametrize(("make", "loss", "fields"), CASES)
def test_equal_to_peft(make, loss, fields):
    theirs, ours = twins(make, peft.OFTConfig(**fields), OftConfig(**fields), scale=0.1)
    compare(theirs, ours, tiny_hf.IDS, loss)
    compare_merged(theirs, ours, tiny_hf.IDS, make)


def _layer(**fields):
    config = OftConfig(target_modules=["x"], **{"oft_block_size": 4, **fields})
    base = nn.Linear(12, 5)
    return base, OftLinear(base, 12 // 4, 4, config)


def test_exact_cayley_is_orthogonal_and_merges_as_w_r_transposed():
    base, layer = _layer(use_cayley_neumann=False, init_weights=False)
    rot = layer.rotation()
    torch.testing.assert_close(rot @ rot.T, torch.eye(12), atol=1e-6, rtol=0)
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer.adapt_input(x), x @ rot)
    expected = base.weight.detach() @ rot.T
    original = base.weight.detach().clone()
    with torch.no_grad():
        layer.merge_into(base)
        torch.testing.assert_close(base.weight, expected)
        layer.unmerge_from(base)
    torch.testing.assert_close(base.weight.detach(), original, atol=1e-6, rtol=0)


def test_neumann_series_is_the_cayley_of_minus_q_to_first_order():
    _, exact = _layer(use_cayley_neumann=False)
    _, series = _layer(num_cayley_neumann_terms=12)
    with torch.no_grad():
        exact.oft_R.weight.normal_(std=0.01)
        series.oft_R.weight.copy_(exact.oft_R.weight)
    # (I + Q)(I - Q)^-1 == ((I - Q)(I + Q)^-1)^T for skew-symmetric Q: PEFT's two modes are
    # transposes of each other.
    torch.testing.assert_close(series.blocks(), exact.blocks().transpose(-2, -1), atol=1e-6,
                               rtol=0)


def test_exact_cayley_on_a_bfloat16_layer():
    config = OftConfig(target_modules=["x"], oft_block_size=4, use_cayley_neumann=False,
                       init_weights=False)
    base = nn.Linear(12, 5).to(torch.bfloat16)
    layer = OftLinear(base, 3, 4, config)
    x = torch.randn(2, 12, dtype=torch.bfloat16)
    out = layer.adapt_input(x)
    assert out.dtype == torch.bfloat16
    expected = x.float() @ layer.rotation(torch.float32)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_starts_at_identity():
    _, layer = _layer()
    x = torch.randn(2, 12)
    assert torch.equal(layer.adapt_input(x), x)


def test_module_dropout_replaces_blocks_by_identity_in_training():
    _, layer = _layer(module_dropout=0.5, init_weights=False)
    x = torch.randn(2, 12)
    layer.eval()
    torch.testing.assert_close(layer.adapt_input(x), x @ layer.rotation())
    layer.train()
    out = layer.adapt_input(x).view(2, 3, 4)
    kept = [torch.equal(out[:, i], x.view(2, 3, 4)[:, i]) for i in range(3)]
    assert sum(kept) == 1  # floor(0.5 * 3) blocks are the identity


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], ["embed_tokens"]],
                         ids=["linear", "embedding"])
def test_conformance_with_all_checks(make_tiny, token_batch, targets):
    config = OftConfig(oft_block_size=8, target_modules=targets)
    report = check_method(config, make_tiny, token_batch, lambda m, ids: m(ids)["logits"],
                          lambda m, ids: m(ids, labels=ids)["loss"], steps=6, lr=3e-2,
                          checks=CHECKS)
    assert report.loss_after < report.loss_before
    assert set(report.extra) == set(CHECKS)


def test_conformance_on_hf_llama():
    report = check_method(OftConfig(oft_block_size=16), tiny_hf.llama, tiny_hf.IDS,
                          tiny_hf.logits, tiny_hf.llama_loss, steps=6, lr=3e-2)
    assert report.loss_after < report.loss_before


def test_parameter_count_from_the_shapes():
    model = tiny_hf.llama()
    family = peftreg.default_registry().describe_model(model)
    # q, o, gate, up read width 32, down 64: with block 8, 4 or 8 blocks of 8 * 7 / 2 = 28.
    config = OftConfig(oft_block_size=8, target_modules=["q_proj", "down_proj"])
    expected = 2 * (4 * 28 + 8 * 28)
    assert OftMethod().parameter_count(model, config, family) == expected
    adapted = peftreg.adapt(model, config)
    assert sum(p.numel() for p in adapted.adapter_parameters("default")) == expected
    shared = OftConfig(r=4, oft_block_size=0, block_share=True,
                       target_modules=["q_proj", "down_proj"])
    # r=4: blocks of 8 on q (28 numbers), of 16 on down (120 numbers), one per layer.
    assert OftMethod().parameter_count(tiny_hf.llama(), shared, family) == 2 * (28 + 120)
    # An embedding rotates its width (32): 4 blocks of 8.
    table = OftConfig(oft_block_size=8, target_modules=["embed_tokens"])
    assert OftMethod().parameter_count(tiny_hf.llama(), table, family) == 4 * 28


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"r": 4, "oft_block_size": 8}, "OftConfig.oft_block_size: set exactly one of r and"),
        ({"r": 0, "oft_block_size": 0}, "OftConfig.oft_block_size: set exactly one of r and"),
        ({"oft_block_size": 1}, "OftConfig.oft_block_size: a block of size 1"),
        ({"oft_block_size": -4}, "OftConfig.oft_block_size: must be >= 0"),
        ({"num_cayley_neumann_terms": 1}, "OftConfig.num_cayley_neumann_terms: must be >= 2"),
        ({"eps": 0.0}, "OftConfig.eps: must be a finite number > 0"),
        ({"module_dropout": 1.0}, r"OftConfig.module_dropout: must be in \[0, 1\)"),
    ],
    ids=["both", "neither", "size-1", "negative", "terms", "eps", "dropout"],
)
def test_bad_config(fields, message):
    with pytest.raises(ConfigError, match=message):
        OftConfig(target_modules=["q_proj"], **fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"oft_block_size": 12}, r"OftConfig.oft_block_size: must divide the input width 32 of "
                                 r"'model.layers.0.self_attn.q_proj' .*\(got 12\)"),
        ({"oft_block_size": 64}, "OftConfig.oft_block_size: must divide the input width 32"),
        ({"r": 3, "oft_block_size": 0}, "OftConfig.r: must divide the input width 32"),
        ({"r": 32, "oft_block_size": 0}, "OftConfig.r: gives blocks of size 1"),
    ],
    ids=["block-12", "block-too-big", "r-3", "r-full-width"],
)
def test_a_size_that_does_not_divide_the_width_names_the_field(fields, message):
    model = tiny_hf.llama()
    with pytest.raises(ConfigError, match=message):
        peftreg.adapt(model, OftConfig(target_modules=["q_proj"], **fields))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # nothing changed


def test_stacking_follows_the_contract_for_an_input_transform():
    model = peftreg.adapt(tiny_hf.llama(), OftConfig(oft_block_size=8, init_weights=False,
                                                     target_modules=["q_proj"]), "oft")
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for p in model.adapter_parameters("lora"):
            p.normal_(std=0.1)
    model.set_active(["oft", "lora"])
    with torch.no_grad():
        stacked = tiny_hf.logits(model, tiny_hf.IDS)
    # OFT transforms the input every later adapter reads (LoRA's update sees x R too): merging
    # it while LoRA follows unmerged would hide the rotation from LoRA, so it is refused.
    with pytest.raises(UnsupportedOperationError):
        model.merge(["oft"])
    assert model.merged_adapters == []
    model.set_active(["lora", "oft"])
    with torch.no_grad():
        before = tiny_hf.logits(model, tiny_hf.IDS)
        model.merge()
        torch.testing.assert_close(tiny_hf.logits(model, tiny_hf.IDS), before, atol=1e-5, rtol=0)
    model.unmerge()
    # Unmerged, both orders compute base(x R) + s B A (x R): input transforms run first.
    torch.testing.assert_close(stacked, before, atol=1e-6, rtol=0)


def test_on_a_4bit_base_stacked_with_qlora(make_tiny, token_batch):
    from peftreg_plugins.qlora import QLoraConfig

    targets = ["v_proj", "down_proj"]
    model = peftreg.adapt(make_tiny(), QLoraConfig(r=2, target_modules=targets,
                                                   quantize="targets", compute_dtype="float32"),
                          "qlora")
    model.add_adapter("oft", OftConfig(oft_block_size=8, target_modules=targets,
                                       init_weights=False))
    with torch.no_grad():
        for p in model.adapter_parameters("qlora"):
            p.normal_(std=0.1)
    model.set_active(["oft", "qlora"])
    with pytest.raises(UnsupportedOperationError):  # QLoRA reads the rotated input
        model.merge()
    model.set_active(["qlora", "oft"])
    with torch.no_grad():
        stacked = model(token_batch)["logits"]
        model.merge()  # densified, QLoRA's update added, then W R^T
        torch.testing.assert_close(model(token_batch)["logits"], stacked, atol=1e-5, rtol=0)
        model.unmerge()
        torch.testing.assert_close(model(token_batch)["logits"], stacked, atol=1e-5, rtol=0)
