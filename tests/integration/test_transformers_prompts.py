"""Prompt and prefix tuning on small random-init transformers models."""

from __future__ import annotations

import pytest
import tiny_hf
import torch

import peftreg
from peftreg.testing import check_method
from peftreg_plugins.prefix_tuning import PrefixTuningConfig
from peftreg_plugins.prompt_tuning import PromptTuningConfig

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

IDS = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(5))
LEFT_PADDED = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
CONFIGS = [
    PromptTuningConfig(num_virtual_tokens=4),
    PrefixTuningConfig(num_virtual_tokens=3),
    PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16),
]
IDS_OF = ["prompt", "prefix", "prefix-projection"]


def make_llama():
    return tiny_hf.llama(seed=21)


def make_bert():
    return tiny_hf.bert(seed=22)


def _strong(model):
    """Scale the fresh adapter so that it clearly changes the model's predictions."""
    with torch.no_grad():
        for p in model.adapter_parameters("default"):
            p.mul_(3)
    return model


@pytest.mark.parametrize("config", CONFIGS, ids=IDS_OF)
def test_generation_with_cache_matches_generation_without(config):
    # No warning filter here: the suite turns deprecations our calls cause into errors
    # (pyproject.toml), so a deprecated cache argument would fail this test.
    model = _strong(peftreg.adapt(make_llama(), config))
    cached = model.generate(input_ids=IDS, attention_mask=LEFT_PADDED, max_new_tokens=6,
                            do_sample=False, use_cache=True)
    uncached = model.generate(input_ids=IDS, attention_mask=LEFT_PADDED, max_new_tokens=6,
                              do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    with model.disable_adapters():
        base = model.generate(input_ids=IDS, attention_mask=LEFT_PADDED, max_new_tokens=6,
                              do_sample=False)
    assert not torch.equal(cached, base)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS_OF)
def test_llama_conformance(config):
    def forward(model, ids):
        return model(input_ids=ids).logits[:, -ids.shape[1]:]

    def loss(model, ids):
        return model(input_ids=ids, labels=ids).loss

    check_method(config, make_llama, IDS, forward, loss, starts_equal=False, lr=0.05, steps=6)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS_OF)
def test_bert_conformance_with_head(config):
    labels = torch.tensor([0, 2])
    config = config.replace(modules_to_save=["classifier"])

    def forward(model, ids):
        return model(input_ids=ids, attention_mask=torch.ones_like(ids),
                     token_type_ids=torch.zeros_like(ids)).logits

    def loss(model, ids):
        return model(input_ids=ids, attention_mask=torch.ones_like(ids),
                     token_type_ids=torch.zeros_like(ids), labels=labels).loss

    check_method(config, make_bert, IDS, forward, loss, starts_equal=False, lr=0.05, steps=6)


def test_prompt_logits_cover_virtual_tokens():
    model = peftreg.adapt(make_llama(), PromptTuningConfig(num_virtual_tokens=4))
    out = model(input_ids=IDS, attention_mask=LEFT_PADDED, labels=IDS)
    assert out.logits.shape == (2, 10, 96) and torch.isfinite(out.loss)


@pytest.mark.parametrize("config", CONFIGS[1:], ids=IDS_OF[1:])
def test_prefix_reaches_the_model_as_a_cache_object_under_its_current_name(config):
    # transformers 5.24 deprecates the ``past_key_values`` argument (removed in 5.40) for
    # ``cache``, holding a ``transformers.Cache``.
    model = peftreg.adapt(make_llama(), config)
    seen = []
    inner = model.model.model

    def record(module, args, kwargs):
        cache = kwargs.get("cache")
        length = cache.get_seq_length() if cache is not None else None
        seen.append((dict(kwargs), length))

    inner.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=IDS, attention_mask=LEFT_PADDED)
        model.generate(input_ids=IDS, attention_mask=LEFT_PADDED, max_new_tokens=2,
                       do_sample=False, use_cache=True)
    assert len(seen) == 3
    for kwargs, _ in seen:
        assert kwargs.get("past_key_values") is None, sorted(kwargs)
        assert isinstance(kwargs["cache"], transformers.Cache), sorted(kwargs)
    # The plain call and generation's first step carry the prefix alone; at the second step the
    # cache holds the prefix and the prompt (the new token is being added).
    n = config.num_virtual_tokens
    assert [length for _, length in seen] == [n, n, n + IDS.shape[1]]
