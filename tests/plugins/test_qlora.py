from __future__ import annotations

import pytest
import torch
from tolerances import scaled_close
from torch import nn

import peftreg
from peftreg import ConfigError
from peftreg.nn import Linear4bit
from peftreg.testing import check_method
from peftreg_plugins.qlora import QLoraConfig, QLoraMethod, quantize_base, requantize


def _forward(model, ids):
    return model(ids)["logits"]


def _loss(model, ids):
    return model(ids, labels=ids)["loss"]


def _quantized(make_tiny, config):
    def make():
        model = make_tiny()
        quantize_base(model, config, peftreg.default_registry().describe_model(model))
        return model

    return make


def _linear_weights(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("quantize", ["all-linear", "targets"])
def test_conformance_on_the_quantized_base(make_tiny, token_batch, quantize):
    config = QLoraConfig(r=4, compute_dtype="float32", quantize=quantize,
                         target_modules=["q_proj", "v_proj", "down_proj"])
    report = check_method(config, _quantized(make_tiny, config), token_batch, _forward, _loss,
                          steps=8, atol=1e-4)
    assert report.trainable_params == report.formula_params


def test_parameter_formula(make_tiny, tiny_config):
    c = tiny_config
    kv = c.num_kv_heads * c.head_dim
    expected = c.num_layers * 4 * ((c.hidden_size + c.hidden_size) + (c.hidden_size + kv))
    model = make_tiny()
    family = peftreg.default_registry().describe_model(model)
    config = QLoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    assert QLoraMethod().parameter_count(model, config, family) == expected


def test_all_linear_layers_quantized_except_the_head(make_tiny):
    model = peftreg.adapt(make_tiny(), QLoraConfig(r=2))
    quantized = [p for p, m in model.model.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 2 * 7
    head = model.model.lm_head
    assert isinstance(head, nn.Linear) and not head.weight.requires_grad
    assert model.summary().base_params == sum(p.numel() for p in make_tiny().parameters())


def test_quantized_base_memory_is_about_a_quarter_of_bf16():
    from peftreg.reference_model import ReferenceConfig, ReferenceTransformer

    config = ReferenceConfig(hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2,
                             num_layers=1)
    dense = ReferenceTransformer(config)
    bf16_bytes = sum(m.weight.numel() * 2 for p, m in dense.named_modules()
                     if isinstance(m, nn.Linear) and p != "lm_head")
    model = peftreg.adapt(dense, QLoraConfig(r=2))
    nf4_bytes = sum(m.memory_bytes() for m in model.model.modules() if isinstance(m, Linear4bit))
    ratio = nf4_bytes / bf16_bytes
    # 4.127 bits of 16 is 0.258; each layer's two code tables (1,088 bytes) come on top.
    assert 0.25 < ratio < 0.28, f"4-bit base uses {ratio:.4f} of its bf16 size"


def test_only_adapters_train_with_any_optimizer(make_tiny, token_batch):
    model = peftreg.adapt(make_tiny(), QLoraConfig(r=4, compute_dtype="float32"))
    before = {k: v.clone() for k, v in model.model.state_dict().items() if "adapters" not in k}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(6):
        loss = _loss(model, token_batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bf16_compute_trains(make_tiny, token_batch):
    model = peftreg.adapt(make_tiny(), QLoraConfig(r=4))
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert adapter.lora_A.weight.dtype == torch.bfloat16
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = _loss(model, token_batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(torch.isfinite(torch.tensor(losses)))


def test_merge_with_bf16_compute_in_a_float32_model(make_tiny, token_batch):
    # The merged layer is dense in the model's own dtype (the weight's dtype before
    # quantization), not the bf16 compute dtype: a bf16 nn.Linear would refuse float32 input.
    model = peftreg.adapt(make_tiny(), QLoraConfig(r=4))
    with torch.no_grad():
        for p in model.adapter_parameters("default"):
            p.normal_(std=0.05)
    adapted = _forward(model, token_batch).detach()
    model.merge()
    merged = model.model.layers[0].self_attn.q_proj
    assert merged.base.weight.dtype == torch.float32
    scaled_close(_forward(model, token_batch), adapted, "qlora.merged_vs_unmerged",
                 torch.bfloat16, "merged")
    model.unmerge()
    with model.disable_adapters():
        base = _forward(model, token_batch).detach()
    assert not torch.allclose(base, adapted, atol=1e-2), "the merged adapter changes the output"


def test_merge_and_unload_gives_a_dense_model_and_requantize_reports_error(make_tiny,
                                                                           token_batch):
    model = peftreg.adapt(make_tiny(), QLoraConfig(r=4, compute_dtype="float32"))
    with torch.no_grad():
        for p in model.adapter_parameters("default"):
            p.normal_(std=0.05)
    adapted = _forward(model, token_batch).detach()
    plain = model.merge_and_unload()
    assert not any(isinstance(m, Linear4bit) for m in plain.modules())
    torch.testing.assert_close(_forward(plain, token_batch).detach(), adapted, atol=1e-4,
                               rtol=1e-4)
    errors = requantize(plain)
    assert len(errors) == 14 and all(0.0 < e < 0.2 for e in errors.values()), errors
    assert sum(isinstance(m, Linear4bit) for m in plain.modules()) == 14


def test_save_load_round_trip(make_tiny, token_batch, tmp_path):
    config = QLoraConfig(r=4, compute_dtype="float32")
    model = peftreg.adapt(make_tiny(), config)
    with torch.no_grad():
        for p in model.adapter_parameters("default"):
            p.normal_(std=0.05)
    model.save_adapter(tmp_path / "q")
    loaded = peftreg.load(make_tiny(), tmp_path / "q")
    assert torch.equal(_forward(loaded, token_batch), _forward(model, token_batch))


@pytest.mark.parametrize(("fields", "message"), [
    ({"blocksize": 48}, "blocksize: must be a power of two in 32..4096"),
    ({"blocksize": 8192}, "blocksize"),
    ({"compute_dtype": "float64"}, "compute_dtype"),
    ({"quantize": "everything"}, "quantize"),
])
def test_bad_configs(fields, message):
    with pytest.raises(ConfigError, match=message):
        QLoraConfig(**fields)
