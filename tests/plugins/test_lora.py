from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import peftreg
from peftreg import ConfigError, ops
from peftreg.ops import kernels
from peftreg.testing import check_method
from peftreg_plugins.lora import LoraConfig, LoraEmbedding, LoraLinear, LoraMethod


def _lm_forward(model, ids):
    return model(ids)["logits"]


def _lm_loss(model, ids):
    return model(ids, labels=ids)["loss"]


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        LoraConfig(r=2, lora_alpha=16, target_modules="all-linear", use_rslora=True),
        LoraConfig(r=3, target_modules=["embed_tokens", "o_proj"], init_lora_weights="gaussian"),
        LoraConfig(r=2, target_modules=["down_proj"], modules_to_save=["lm_head"]),
    ],
    ids=["qv", "all-linear-rslora", "embedding", "with-head"],
)
def test_conformance(config, make_tiny, token_batch):
    report = check_method(config, make_tiny, token_batch, _lm_forward, _lm_loss, steps=8)
    assert report.formula_params is not None
    assert report.loss_after < report.loss_before
    assert report.max_merge_difference is not None and report.max_merge_difference < 1e-5


def test_4096_square_at_rank_16_has_131072_parameters():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    adapted = peftreg.adapt(model, LoraConfig(r=16, target_modules=["0"]))
    (row,) = adapted.summary().rows
    assert row.adapter_params == 131_072 == 16 * (4096 + 4096)


def test_parameter_formula_independently(make_tiny):
    model = make_tiny()
    config = LoraConfig(r=4, target_modules="all-linear", rank_pattern={"down_proj": 2})
    h, i, kv = 32, 48, 2 * 8
    per_layer = (4 * (h + h) + 4 * (h + kv) * 2 + 4 * (h + h)  # q, k, v, o
                 + 4 * (h + i) * 2 + 2 * (i + h))              # gate, up, down (rank 2)
    assert LoraMethod().parameter_count(model, config, _family(model)) == 2 * per_layer


def test_scaling_and_patterns(make_tiny):
    model = peftreg.adapt(make_tiny(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 2.0}))
    q0 = model.model.layers[0].self_attn.q_proj.adapters["default"]
    q1 = model.model.layers[1].self_attn.q_proj.adapters["default"]
    v0 = model.model.layers[0].self_attn.v_proj.adapters["default"]
    assert (q0.r, q0.scaling) == (4, 2.0)
    assert (q1.r, q1.scaling) == (2, 4.0)
    assert v0.scaling == 0.5
    rs = LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["x"])
    assert rs.rank_and_scale("x")[1] == pytest.approx(8 / math.sqrt(16))


def test_init_b_zero_a_random():
    base = nn.Linear(64, 32)
    kaiming = LoraLinear(base, 8, 1.0, 0.0, "kaiming", None)
    gauss = LoraLinear(base, 8, 1.0, 0.0, "gaussian", None)
    assert torch.count_nonzero(kaiming.lora_B.weight) == 0
    assert torch.count_nonzero(kaiming.lora_A.weight) == kaiming.lora_A.weight.numel()
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) bound is 1/sqrt(fan_in)
    assert float(kaiming.lora_A.weight.detach().abs().max()) <= bound
    std = float(gauss.lora_A.weight.detach().std())
    assert 0.8 / 8 < std < 1.2 / 8, std


def test_merge_matches_dense_update():
    base = nn.Linear(20, 12)
    adapter = LoraLinear(base, 3, 0.7, 0.0, "kaiming", None)
    nn.init.normal_(adapter.lora_B.weight)
    expected = base.weight.detach() + 0.7 * adapter.lora_B.weight @ adapter.lora_A.weight
    original = base.weight.detach().clone()
    with torch.no_grad():
        adapter.merge_into(base)
    torch.testing.assert_close(base.weight.detach(), expected.detach())
    with torch.no_grad():
        adapter.unmerge_from(base)
    torch.testing.assert_close(base.weight.detach(), original, atol=1e-6, rtol=0)


def test_embedding_adapter_math():
    base = nn.Embedding(10, 6, padding_idx=0)
    adapter = LoraEmbedding(base, 2, 1.5, None)
    nn.init.normal_(adapter.lora_embedding_A)
    ids = torch.tensor([[0, 3, 9]])
    table = base.weight + 1.5 * (adapter.lora_embedding_B @ adapter.lora_embedding_A).T
    got = adapter.adapt_output(ids, base(ids))
    # padding_idx only stops gradients; the padding row's output is updated like any other,
    # which keeps the forward consistent with merging the dense table.
    torch.testing.assert_close(got, table[ids])


def test_dropout_only_in_training(make_tiny, token_batch):
    model = peftreg.adapt(make_tiny(), LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"]))
    with torch.no_grad():
        for p in model.adapter_parameters("default"):
            p.normal_()
    model.train()
    a, b = _lm_forward(model, token_batch), _lm_forward(model, token_batch)
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(_lm_forward(model, token_batch), _lm_forward(model, token_batch))


def test_float32_adapters_on_a_bf16_base(make_tiny, token_batch):
    model = peftreg.adapt(make_tiny().to(torch.bfloat16),
                          LoraConfig(r=4, target_modules=["q_proj"], adapter_dtype="float32"))
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert adapter.lora_A.weight.dtype == torch.float32
    out = _lm_forward(model, token_batch)
    assert out.dtype == torch.bfloat16
    _lm_loss(model, token_batch).backward()
    assert adapter.lora_A.weight.grad is None or adapter.lora_A.weight.grad.dtype == torch.float32
    assert adapter.lora_B.weight.grad is not None


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["dropout=0", "dropout=0.3"])
def test_compiled_and_plain_paths_agree(make_tiny, token_batch, dropout):
    if not ops.has_extension():
        pytest.skip(f"compiled extension not built: {ops.extension_error()}")
    config = LoraConfig(r=4, lora_dropout=dropout, target_modules="all-linear")
    results = []
    for mode in ("compiled", "reference"):
        model = peftreg.adapt(make_tiny(), config)
        with torch.no_grad():
            for p in model.adapter_parameters("default"):
                p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
        torch.manual_seed(5)
        with kernels(mode):
            loss = _lm_loss(model, token_batch)
            loss.backward()
        grads = [p.grad.clone() for p in model.adapter_parameters("default")]
        results.append((loss.detach(), grads))
    (loss_c, grads_c), (loss_r, grads_r) = results
    torch.testing.assert_close(loss_c, loss_r, atol=1e-5, rtol=1e-5)
    for gc, gr in zip(grads_c, grads_r, strict=True):
        torch.testing.assert_close(gc, gr, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"r": 0}, r"LoraConfig.r: rank must be > 0 \(got 0\)"),
        ({"lora_alpha": -1}, "lora_alpha: must be a finite number > 0"),
        ({"lora_dropout": 1.0}, r"lora_dropout: must be in \[0, 1\)"),
        ({"init_lora_weights": "zeros"}, "init_lora_weights: expected one of"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern: rank for 'q' must be > 0"),
        ({"adapter_dtype": "float64"}, "adapter_dtype"),
    ],
    ids=["rank", "alpha", "dropout", "init", "rank-pattern", "dtype"],
)
def test_bad_config(fields, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**fields)


def _family(model):
    return peftreg.default_registry().describe_model(model)
