from __future__ import annotations

import pytest
import torch
from torch import nn

import peftreg
from peftreg import ConfigError, ModelFamilyError, Registry
from peftreg.testing import check_method
from peftreg_plugins.lora import LoraConfig
from peftreg_plugins.prompt_tuning import PromptTuningConfig, PromptTuningMethod


def _forward(model, ids):
    return model(ids)["logits"]


def _loss(model, ids):
    return model(ids, labels=ids)["loss"]


def test_conformance(make_tiny, token_batch):
    config = PromptTuningConfig(num_virtual_tokens=5)
    # Logits gain the virtual positions, so the adapted model cannot equal the base in shape;
    # equality is checked on the real positions below.
    report = check_method(config, make_tiny, token_batch, lambda m, ids: _forward(m, ids)[:, -9:],
                          _loss, starts_equal=False, lr=0.1)
    assert report.trainable_params == 5 * 32


def test_parameter_count_formula(make_tiny):
    model = make_tiny()
    config = PromptTuningConfig(num_virtual_tokens=7)
    width = model.embed_tokens.embedding_dim
    assert PromptTuningMethod().parameter_count(model, config, _family(model)) == 7 * width


def test_prompt_is_prepended_to_the_embeddings(make_tiny, token_batch):
    model = peftreg.adapt(make_tiny(), PromptTuningConfig(num_virtual_tokens=3))
    prompt = model.model.peftreg_input_adapters.adapters["default"].prompt_embeddings
    plain = make_tiny()
    embeds = torch.cat((prompt.detach()[None].expand(3, -1, -1),
                        plain.embed_tokens(token_batch)), dim=1)
    expected = plain(inputs_embeds=embeds)["logits"]
    torch.testing.assert_close(_forward(model, token_batch), expected)


def test_mask_and_labels_are_extended(make_tiny, token_batch):
    model = peftreg.adapt(make_tiny(), PromptTuningConfig(num_virtual_tokens=4))
    seen = {}

    def spy(module, args, kwargs):
        seen.update(kwargs)

    model.model.register_forward_pre_hook(spy, with_kwargs=True)
    mask = torch.ones_like(token_batch)
    mask[0, -2:] = 0
    out = model(token_batch, attention_mask=mask, labels=token_batch)
    assert seen["attention_mask"].shape == (3, 13)
    assert seen["attention_mask"][:, :4].eq(1).all()
    assert torch.equal(seen["attention_mask"][:, 4:], mask)
    assert seen["labels"][:, :4].eq(-100).all() and torch.equal(seen["labels"][:, 4:], token_batch)
    assert out["logits"].shape[1] == 13 and torch.isfinite(out["loss"])


def test_init_from_token_ids(make_tiny):
    model = peftreg.adapt(make_tiny(), PromptTuningConfig(
        num_virtual_tokens=5, prompt_tuning_init="TOKENS", init_token_ids=[3, 9]))
    prompt = model.model.peftreg_input_adapters.adapters["default"].prompt_embeddings
    table = model.model.embed_tokens.weight
    assert torch.equal(prompt.detach(), table[torch.tensor([3, 9, 3, 9, 3])])


def test_sample_vocab_rows_come_from_the_table(make_tiny):
    model = peftreg.adapt(make_tiny(), PromptTuningConfig(
        num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"))
    prompt = model.model.peftreg_input_adapters.adapters["default"].prompt_embeddings.detach()
    table = model.model.embed_tokens.weight
    assert all((table == row).all(-1).any() for row in prompt)


def test_token_ids_outside_the_vocabulary(make_tiny):
    with pytest.raises(ConfigError, match=r"init token ids must be in 0\.\.60"):
        peftreg.adapt(make_tiny(), PromptTuningConfig(
            num_virtual_tokens=2, prompt_tuning_init="TOKENS", init_token_ids=[61]))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_virtual_tokens": 0}, r"num_virtual_tokens: must be in 1\.\.65536 \(got 0\)"),
        ({"prompt_tuning_init": "TOKENS"}, "TOKENS init needs non-negative token ids"),
        ({"prompt_tuning_init": "TEXT"}, "TEXT init needs prompt_tuning_init_text"),
        ({"token_dim": -1}, "token_dim: must be > 0"),
    ],
    ids=["zero-tokens", "tokens-missing", "text-missing", "token-dim"],
)
def test_bad_configs(fields, message):
    with pytest.raises(ConfigError, match=message):
        PromptTuningConfig(**fields)


def test_wrong_token_dim(make_tiny):
    with pytest.raises(ConfigError, match="token_dim: 16 does not match the model's embedding "
                                          "width 32"):
        peftreg.adapt(make_tiny(), PromptTuningConfig(token_dim=16))


def test_unknown_family_is_a_clear_error():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(ModelFamilyError, match="prompt tuning needs the model's input embedding"):
        peftreg.adapt(model, PromptTuningConfig(num_virtual_tokens=2))


def test_merge_is_refused_and_switching_with_lora(make_tiny, token_batch):
    model = peftreg.adapt(make_tiny(), PromptTuningConfig(num_virtual_tokens=2), "prompt")
    with pytest.raises(peftreg.UnsupportedOperationError, match="'prompt' uses method "
                                                                "'prompt_tuning'"):
        model.merge()
    model.add_adapter("lora", LoraConfig(target_modules=["q_proj"]))
    with torch.no_grad():
        for p in model.adapter_parameters("lora"):
            p.normal_()
    lora_out = _forward(model, token_batch)
    assert lora_out.shape[1] == 9
    model.set_active("prompt")
    assert _forward(model, token_batch).shape[1] == 11
    with model.disable_adapters():
        assert torch.equal(_forward(model, token_batch), _forward(make_tiny(), token_batch))
    model.delete_adapter("prompt")
    assert not hasattr(model.model, "peftreg_input_adapters")
    model.set_active("lora")
    assert torch.equal(_forward(model, token_batch), lora_out)


def test_save_load_keys(make_tiny, token_batch, tmp_path):
    model = peftreg.adapt(make_tiny(), PromptTuningConfig(num_virtual_tokens=3))
    assert list(model.adapter_state_dict("default")) == ["prompt_embeddings"]
    model.save_adapter(tmp_path / "p")
    loaded = peftreg.load(make_tiny(), tmp_path / "p")
    assert torch.equal(_forward(loaded, token_batch), _forward(model, token_batch))


def test_registry_without_family_plugins_cannot_prompt_tune(make_tiny):
    registry = Registry.for_testing([PromptTuningMethod()])
    with pytest.raises(ModelFamilyError, match="no family plugin describes this model"):
        peftreg.adapt(make_tiny(), PromptTuningConfig(), registry=registry)


def _family(model):
    return peftreg.default_registry().describe_model(model)
