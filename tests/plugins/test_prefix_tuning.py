from __future__ import annotations

import pytest
import torch
from torch import nn

import peftreg
from peftreg import ConfigError, ModelFamilyError
from peftreg.testing import check_method
from peftreg_plugins.lora import LoraConfig
from peftreg_plugins.prefix_tuning import PrefixTuningConfig, PrefixTuningMethod


def _forward(model, ids):
    return model(ids)["logits"]


def _loss(model, ids):
    return model(ids, labels=ids)["loss"]


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "projection"])
def test_conformance(make_tiny, token_batch, projection):
    config = PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=projection,
                                encoder_hidden_size=16)
    report = check_method(config, make_tiny, token_batch, _forward, _loss, starts_equal=False,
                          lr=0.05)
    assert report.formula_params == report.trainable_params


def test_parameter_count_formula(make_tiny, tiny_config):
    model = make_tiny()
    layers, kv_width = tiny_config.num_layers, tiny_config.num_kv_heads * tiny_config.head_dim
    direct = PrefixTuningConfig(num_virtual_tokens=6)
    family = _family(model)
    assert PrefixTuningMethod().parameter_count(model, direct, family) == 6 * layers * 2 * kv_width
    projected = PrefixTuningConfig(num_virtual_tokens=6, prefix_projection=True,
                                   encoder_hidden_size=10)
    t, e, out = tiny_config.hidden_size, 10, layers * 2 * kv_width
    assert PrefixTuningMethod().parameter_count(model, projected, _family(model)) == (
        6 * t + t * e + e + e * out + out)


def test_prefix_reaches_every_layer_as_keys_and_values(make_tiny, token_batch, tiny_config):
    model = peftreg.adapt(make_tiny(), PrefixTuningConfig(num_virtual_tokens=2))
    encoder = model.model.peftreg_input_adapters.adapters["default"]
    prefix = encoder.prompt_embeddings.detach()
    c = tiny_config
    kv = prefix.view(2, c.num_layers, 2, c.num_kv_heads, c.head_dim)
    manual = [(kv[:, i, 0].permute(1, 0, 2)[None].expand(3, -1, -1, -1),
               kv[:, i, 1].permute(1, 0, 2)[None].expand(3, -1, -1, -1))
              for i in range(c.num_layers)]
    expected = make_tiny()(token_batch, prefix_kv=manual)["logits"]
    torch.testing.assert_close(_forward(model, token_batch), expected)


def test_projection_is_computed_once_for_inference(make_tiny, token_batch):
    model = peftreg.adapt(make_tiny(), PrefixTuningConfig(num_virtual_tokens=3,
                                                          prefix_projection=True))
    encoder = model.model.peftreg_input_adapters.adapters["default"]
    calls = []
    encoder.projection.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    with torch.no_grad():
        first = _forward(model, token_batch)
        second = _forward(model, token_batch)
    assert len(calls) == 1 and torch.equal(first, second)
    model.train()
    _loss(model, token_batch).backward()
    assert len(calls) == 2 and encoder.embedding.grad is not None


def test_padding_mask_covers_the_prefix(make_tiny, token_batch):
    model = peftreg.adapt(make_tiny(), PrefixTuningConfig(num_virtual_tokens=2))
    mask = torch.ones_like(token_batch)
    mask[1, -3:] = 0
    out = model(token_batch, attention_mask=mask)["logits"]
    # Padding positions at the end do not influence the real ones.
    alone = model(token_batch[1:, :-3])["logits"]
    torch.testing.assert_close(out[1:, :-3], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_virtual_tokens": 0}, r"num_virtual_tokens: must be in 1\.\.65536"),
        ({"encoder_hidden_size": 0}, "encoder_hidden_size: must be > 0"),
        ({"prefix_projection": "yes"}, "prefix_projection: expected bool"),
    ],
    ids=["zero-tokens", "hidden", "type"],
)
def test_bad_configs(fields, message):
    with pytest.raises(ConfigError, match=message):
        PrefixTuningConfig(**fields)


def test_token_dim_without_projection(make_tiny):
    with pytest.raises(ConfigError, match="only used with prefix_projection"):
        peftreg.adapt(make_tiny(), PrefixTuningConfig(token_dim=8))


def test_model_without_family():
    with pytest.raises(ModelFamilyError, match="no family plugin describes this model"):
        peftreg.adapt(nn.Sequential(nn.Linear(3, 3)), PrefixTuningConfig())


def test_two_methods_switch(make_tiny, token_batch):
    model = peftreg.adapt(make_tiny(), PrefixTuningConfig(num_virtual_tokens=2), "prefix")
    model.add_adapter("lora", LoraConfig(target_modules=["v_proj"]))
    with torch.no_grad():
        for p in model.adapter_parameters("lora"):
            p.normal_()
    lora_out = _forward(model, token_batch)
    model.set_active("prefix")
    prefix_out = _forward(model, token_batch)
    model.set_active(["prefix", "lora"])
    both = _forward(model, token_batch)
    base = _forward(make_tiny(), token_batch)
    assert len({tuple(t.flatten()[:5].tolist()) for t in (lora_out, prefix_out, both, base)}) == 4
    with model.disable_adapters():
        assert torch.equal(_forward(model, token_batch), base)


def _family(model):
    return peftreg.default_registry().describe_model(model)


# -- initialisation from real tokens (Li & Liang 2021, section 5) ------------------------------


def test_activation_init_makes_the_model_see_the_tokens_before_every_input():
    # A Hugging Face causal LM returns its own cache: the prefix is then exactly the keys and
    # values of the tokens, so the adapted model equals the base run on tokens + input.
    tiny_hf = pytest.importorskip("tiny_hf")
    pytest.importorskip("transformers")
    tokens = [5, 17, 33]
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    tokens_twice = torch.cat((torch.tensor(tokens * 2).expand(2, -1), ids), dim=1)
    with torch.no_grad():
        expected = tiny_hf.llama()(input_ids=tokens_twice).logits[:, 6:]
        model = peftreg.adapt(tiny_hf.llama(), PrefixTuningConfig(
            num_virtual_tokens=6, init_token_ids=tokens))  # repeated to length 6
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, tiny_hf.llama()(input_ids=ids).logits)


def test_activation_init_reads_the_key_value_projections_of_a_model_without_a_cache(
        make_tiny, tiny_config):
    base = make_tiny()
    tokens = torch.tensor([3, 9, 4, 1])
    captured = {}
    hooks = [base.get_submodule(f"layers.{i}.self_attn.{name}").register_forward_hook(
        lambda m, i, out, key=(i, name): captured.__setitem__(key, out[0]))
        for i in range(tiny_config.num_layers) for name in ("k_proj", "v_proj")]
    with torch.no_grad():
        base(tokens[None])
    for hook in hooks:
        hook.remove()
    model = peftreg.adapt(make_tiny(), PrefixTuningConfig(num_virtual_tokens=4,
                                                          init_token_ids=tokens.tolist()))
    encoder = model.model.peftreg_input_adapters.adapters["default"]
    for layer, (key, value) in enumerate(encoder.layer_kv(1, torch.float32)):
        torch.testing.assert_close(key[0].transpose(0, 1).reshape(4, -1),
                                   captured[(layer, "k_proj")], atol=0, rtol=0)
        torch.testing.assert_close(value[0].transpose(0, 1).reshape(4, -1),
                                   captured[(layer, "v_proj")], atol=0, rtol=0)


@pytest.mark.parametrize(("fields", "message"), [
    ({"prefix_init": "zeros"}, "prefix_init"),
    ({"init_token_ids": []}, "init_token_ids"),
    ({"init_token_ids": [1, -2]}, "init_token_ids"),
    ({"init_token_ids": [1], "prefix_init": "random"}, "init_token_ids"),
    ({"prefix_init": "activations", "prefix_projection": True}, "prefix_init"),
])
def test_bad_init_configs_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        PrefixTuningConfig(**fields)


def test_a_token_outside_the_vocabulary_is_refused(make_tiny, tiny_config):
    with pytest.raises(ConfigError, match="init_token_ids: id"):
        peftreg.adapt(make_tiny(), PrefixTuningConfig(
            num_virtual_tokens=2, init_token_ids=[tiny_config.vocab_size]))
