"""VeRA (plugins/vera.py): equal to HF PEFT's ``VeraConfig`` (projections, logits, merged
logits, gradients), saving without the projections, the closed-form count and the kit."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import tiny_hf
import torch

import peftreg
from peftreg import ConfigError
from peftreg.testing import ALL_CHECKS, check_method
from peftreg_plugins.vera import VeraConfig, VeraLinear, VeraMethod, VeraSlot, projections

peft = pytest.importorskip("peft", reason="peft is not installed")

PEFT_PREFIX = "base_model.model."


def _forward(model, ids):
    return model(ids)["logits"]


def _loss(model, ids):
    return model(ids, labels=ids)["loss"]


def _peft_vera(make, **fields):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Specified to not save vera_A", UserWarning)
        model = peft.get_peft_model(make(), peft.VeraConfig(**fields))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # lambda_b != 0, lambda_d away from d_initial
                p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


def _saved_keys(peft_state):
    """PEFT's file keys under peftreg's names: layer tensors lose ``base_model.model.``, the
    shared projections ``base_model.``."""
    return {k.removeprefix(PEFT_PREFIX).removeprefix("base_model."): v
            for k, v in peft_state.items()}


def _pair(make, targets, r):
    theirs = _peft_vera(make, r=r, target_modules=targets)
    ours = peftreg.adapt(make(), VeraConfig(r=r, target_modules=targets)).eval()
    saved = _saved_keys(peft.get_peft_model_state_dict(theirs))
    state = ours.adapter_state_dict("default")
    assert {k: tuple(v.shape) for k, v in state.items()} == \
        {k: tuple(v.shape) for k, v in saved.items()}
    # The same key draws the same projections: nothing of them is copied.
    for key in ("vera_A", "vera_B"):
        assert torch.equal(state[key], saved[key]), key
    with torch.no_grad():
        for key, tensor in state.items():
            tensor.copy_(saved[key])
    return theirs, ours


def _trainable(model, prefix, adapter_infix):
    return {n.removeprefix(prefix).replace(adapter_infix, ""): p
            for n, p in model.named_parameters() if p.requires_grad}


CASES = [
    # q (32x32), v (16x32), up (64x32), down (32x64): the shared pair is (64 x 64)-sized.
    pytest.param(tiny_hf.llama, tiny_hf.llama_loss, ["q_proj", "v_proj", "up_proj", "down_proj"],
                 8, id="llama-mixed-shapes"),
    pytest.param(tiny_hf.bert, tiny_hf.bert_loss, ["query", "value", "intermediate.dense"], 40,
                 id="bert-bias-rank-above-width"),
]


@pytest.mark.parametrize(("make", "loss", "targets", "r"), CASES)
def test_logits_merge_and_gradients_equal_peft(make, loss, targets, r):
    theirs, ours = _pair(make, targets, r)
    ids = tiny_hf.IDS
    with torch.no_grad():
        expected, got = tiny_hf.logits(theirs, ids), tiny_hf.logits(ours, ids)
        base = tiny_hf.logits(make(), ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, base, atol=1e-4), "the adapter must change the outputs"

    loss(theirs, ids).backward()
    loss(ours, ids).backward()
    their_params = _trainable(theirs, PEFT_PREFIX, ".default")
    our_params = _trainable(ours.model, "", ".adapters.default")
    assert set(their_params) == set(our_params) and our_params
    for name, p in our_params.items():
        torch.testing.assert_close(p.grad, their_params[name].grad, atol=1e-5, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")

    with torch.no_grad():
        theirs.merge_adapter()
        ours.merge()
        torch.testing.assert_close(tiny_hf.logits(ours, ids), tiny_hf.logits(theirs, ids),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(tiny_hf.logits(ours, ids), got, atol=1e-5, rtol=0)
        ours.unmerge()
        torch.testing.assert_close(tiny_hf.logits(ours, ids), got, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", [0, 7, 2**40 + 3])
def test_projections_equal_peft_for_the_same_key(key):
    theirs = _peft_vera(tiny_hf.llama, r=16, projection_prng_key=key,
                        target_modules=["k_proj", "gate_proj"])
    a, b = projections(16, 32, 64, key)
    assert torch.equal(a, theirs.base_model.vera_A["default"])
    assert torch.equal(b, theirs.base_model.vera_B["default"])


def test_defaults_are_peft_defaults():
    ours = {f.name: f.default for f in dataclasses.fields(VeraConfig)}
    theirs = peft.VeraConfig()
    for name in ("r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial"):
        assert ours[name] == getattr(theirs, name), name


def test_fresh_adapter_init(make_tiny):
    model = peftreg.adapt(make_tiny(), VeraConfig(r=6, d_initial=0.25,
                                                  target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert isinstance(layer, VeraLinear)
    assert torch.count_nonzero(layer.vera_lambda_b) == 0
    assert torch.equal(layer.vera_lambda_d.detach(), torch.full((6,), 0.25))


def test_projections_are_stored_once_per_adapter(make_tiny):
    model = peftreg.adapt(make_tiny(), VeraConfig(r=8, target_modules="all-linear"))
    slots = [m for m in model.model.modules() if isinstance(m, VeraSlot)]
    assert len(slots) == 1
    buffers = [b for m in model.model.modules() if isinstance(m, VeraLinear)
               for b in m.buffers()]
    assert not buffers, "layers hold no copy of the projections"
    state = model.adapter_state_dict("default")
    assert [k for k in state if "vera_A" in k or "vera_B" in k] == ["vera_A", "vera_B"]
    assert state["vera_A"].shape == (8, 48) and state["vera_B"].shape == (48, 8)


def test_saved_without_projections_loads_equal(make_tiny, token_batch, tmp_path):
    config = VeraConfig(r=8, projection_prng_key=11, save_projection=False,
                        target_modules=["q_proj", "down_proj"])
    model = peftreg.adapt(make_tiny(), config).eval()
    with torch.no_grad():
        for p in model.adapter_parameters("default"):
            p.normal_()
    assert not any("vera_A" in k for k in model.adapter_state_dict("default"))
    model.save_adapter(tmp_path / "v")
    loaded = peftreg.load(make_tiny(), tmp_path / "v").eval()
    assert torch.equal(_forward(loaded, token_batch), _forward(model, token_batch))


def test_peft_without_projections_matches_peftreg(make_tiny):
    theirs = _peft_vera(tiny_hf.llama, r=4, save_projection=False, target_modules=["q_proj"])
    saved = _saved_keys(peft.get_peft_model_state_dict(theirs))
    ours = peftreg.adapt(tiny_hf.llama(), VeraConfig(r=4, save_projection=False,
                                                     target_modules=["q_proj"]))
    assert set(saved) == set(ours.adapter_state_dict("default"))


def test_conformance(make_tiny, token_batch):
    config = VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    report = check_method(config, make_tiny, token_batch, _forward, _loss, steps=6, lr=5e-2,
                          checks=ALL_CHECKS)
    assert report.trainable_params == report.formula_params
    assert report.loss_after < report.loss_before
    assert report.extra["gradients"] < 1e-5
    assert report.extra["stacking"] == {"partner first": "merged", "under test first": "merged"}


def test_parameter_count_closed_form(make_tiny, tiny_config):
    c = tiny_config
    h, kv = c.hidden_size, c.num_kv_heads * c.head_dim
    r = 16
    expected = c.num_layers * ((r + h) + (r + kv) + (r + h))  # q, v, down
    model = make_tiny()
    config = VeraConfig(r=r, target_modules=["q_proj", "v_proj", "down_proj"])
    family = peftreg.default_registry().describe_model(model)
    assert VeraMethod().parameter_count(model, config, family) == expected
    assert peftreg.adapt(make_tiny(), config).summary().rows[0].adapter_params == expected


def test_delete_removes_the_projections(make_tiny, token_batch):
    model = peftreg.adapt(make_tiny(), VeraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", VeraConfig(r=2, projection_prng_key=3,
                                          target_modules=["v_proj"]))
    slot = model.model.peftreg_vera
    assert set(slot.adapter_names()) == {"default", "other"}
    model.delete_adapter("default")
    assert slot.adapter_names() == ["other"]
    plain = model.merge_and_unload()
    assert not hasattr(plain, VeraSlot.ATTRIBUTE)


@pytest.mark.parametrize(("fields", "message"), [
    ({"r": 0}, r"VeraConfig.r: rank must be > 0"),
    ({"projection_prng_key": -1}, "projection_prng_key: must be in"),
    ({"projection_prng_key": 2**64}, "projection_prng_key"),
    ({"vera_dropout": 1.0}, r"vera_dropout: must be in \[0, 1\)"),
    ({"d_initial": math.nan}, "d_initial: must be a finite number"),
    ({"save_projection": "yes"}, "save_projection"),
], ids=["rank", "negative-key", "key-too-large", "dropout", "d-initial", "save-projection"])
def test_bad_configs(fields, message):
    with pytest.raises(ConfigError, match=message):
        VeraConfig(**fields)


def test_embedding_targets_are_refused(make_tiny):
    with pytest.raises(peftreg.TargetNotFoundError, match="embed_tokens"):
        peftreg.adapt(make_tiny(), VeraConfig(target_modules=["embed_tokens"]))


# -- PEFT's directory format (the VeRA codec) ---------------------------------------------------

@pytest.mark.parametrize("save_projection", [True, False], ids=["projections", "prng-key"])
@pytest.mark.parametrize(("make", "targets"), [
    (tiny_hf.llama, ["q_proj", "v_proj", "down_proj"]),
    (tiny_hf.bert, ["query", "intermediate.dense"]),
], ids=["llama", "bert"])
def test_a_peft_vera_directory_loads(tmp_path, make, targets, save_projection):
    theirs = _peft_vera(make, r=6, projection_prng_key=5, save_projection=save_projection,
                        target_modules=targets)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Specified to not", UserWarning)
        theirs.save_pretrained(tmp_path)
    ours = peftreg.load(make(), tmp_path)
    record = ours.record("default")
    assert record.config.method == "vera"
    assert record.config.save_projection is save_projection
    with torch.no_grad():
        torch.testing.assert_close(tiny_hf.logits(ours, tiny_hf.IDS),
                                   tiny_hf.logits(theirs, tiny_hf.IDS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("save_projection", [True, False], ids=["projections", "prng-key"])
def test_a_vera_export_loads_in_peft(tmp_path, save_projection):
    config = VeraConfig(r=5, projection_prng_key=9, save_projection=save_projection,
                        d_initial=0.3, target_modules=["k_proj", "o_proj", "gate_proj"],
                        exclude_modules=["model.layers.1.self_attn.o_proj"])
    ours = peftreg.adapt(tiny_hf.llama(), config).eval()
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in ours.adapter_parameters("default"):
            p.copy_(torch.randn(p.shape, generator=gen))
    ours.save_adapter(tmp_path, format="peft")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Specified to not", UserWarning)
        theirs = peft.PeftModel.from_pretrained(tiny_hf.llama(), tmp_path).eval()
    assert theirs.peft_config["default"].save_projection is save_projection
    with torch.no_grad():
        expected = tiny_hf.logits(ours, tiny_hf.IDS)
        torch.testing.assert_close(tiny_hf.logits(theirs, tiny_hf.IDS), expected, atol=1e-5,
                                   rtol=0)
        assert not torch.allclose(expected, tiny_hf.logits(tiny_hf.llama(), tiny_hf.IDS),
                                  atol=1e-4)


def test_a_peft_vera_directory_with_a_bad_projection_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    theirs = _peft_vera(tiny_hf.llama, r=4, target_modules=["q_proj"])
    theirs.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"][:3]
    save_file(tensors, weights)
    with pytest.raises(peftreg.AdapterFileError, match=r"base_model\.vera_A.*must be \(r, in\)"):
        peftreg.load(tiny_hf.llama(), tmp_path)


def test_on_a_4bit_base(make_tiny, token_batch):
    from peftreg_plugins.qlora import QLoraConfig, quantize_base

    model = make_tiny()
    quantize_base(model, QLoraConfig(compute_dtype="float32", quantize="targets",
                                     target_modules=["q_proj", "v_proj"]),
                  peftreg.default_registry().describe_model(model))
    adapted = peftreg.adapt(model, VeraConfig(r=8, target_modules=["q_proj", "v_proj"])).eval()
    with torch.no_grad():
        for p in adapted.adapter_parameters("default"):
            p.normal_()
        out = _forward(adapted, token_batch)
        adapted.merge()
        torch.testing.assert_close(_forward(adapted, token_batch), out, atol=1e-4, rtol=1e-4)


def test_a_deep_copy_shares_its_own_projections(make_tiny, token_batch):
    import copy

    model = peftreg.adapt(make_tiny(), VeraConfig(r=4, target_modules=["q_proj"])).eval()
    twin = copy.deepcopy(model)
    layer = twin.model.layers[0].self_attn.q_proj.adapters["default"]
    assert layer._shared[0] is twin.model.peftreg_vera.adapters["default"]
    assert layer._shared[0] is not model.model.peftreg_vera.adapters["default"]
    with torch.no_grad():
        twin.model.peftreg_vera.adapters["default"].vera_B.zero_()
        for p in model.adapter_parameters("default"):
            p.normal_()
        for p in twin.adapter_parameters("default"):
            p.normal_()
    assert torch.equal(_forward(twin, token_batch), _forward(make_tiny(), token_batch))
    assert not torch.equal(_forward(model, token_batch), _forward(make_tiny(), token_batch))
