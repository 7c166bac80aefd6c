from __future__ import annotations

import pytest
import tiny_hf
import torch
from torch import nn

import peftreg
from peftreg import ConfigError, ModelFamilyError, TargetNotFoundError
from peftreg import UnsupportedOperationError as Unsupported
from peftreg.host import AdapterHost
from peftreg.plugin import ModelFamily
from peftreg.testing import check_method
from peftreg_plugins.ia3 import IA3Config, IA3Linear, IA3Method
from peftreg_plugins.lora import LoraConfig

# IA3 adds one scale per channel; on the tiny test model that is well under 1% of the weights
# (on billion-parameter models the paper reports about 0.01%).
MAX_TRAINABLE_PERCENT = 1.0


def _lm_forward(model, ids):
    return model(ids)["logits"]


def _lm_loss(model, ids):
    return model(ids, labels=ids)["loss"]


# -- small random-init transformers models (skipped without the package) -----------------------

HF_IDS, HF_LABELS = tiny_hf.IDS, tiny_hf.LABELS
_hf_forward, _llama_loss, _bert_loss = tiny_hf.logits, tiny_hf.llama_loss, tiny_hf.bert_loss


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed")


def make_llama():
    return tiny_hf.llama(seed=11)


def make_bert():
    return tiny_hf.bert(seed=12)


# -- conformance ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        IA3Config(),
        IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                  feedforward_modules=["down_proj"], layers_to_transform=[1]),
        IA3Config(target_modules=r".*\.(q_proj|up_proj)", feedforward_modules=r".*up_proj",
                  modules_to_save=["lm_head"]),
    ],
    ids=["family-defaults", "explicit-layer1", "regex-with-head"],
)
def test_conformance_reference_model(config, make_tiny, token_batch):
    report = check_method(config, make_tiny, token_batch, _lm_forward, _lm_loss, steps=8)
    assert report.formula_params is not None
    assert report.max_merge_difference is not None


@pytest.mark.parametrize(
    ("make", "loss", "config"),
    [
        (make_llama, _llama_loss, IA3Config()),
        (make_bert, _bert_loss, IA3Config(modules_to_save=["classifier"])),
    ],
    ids=["llama-defaults", "bert-defaults-with-head"],
)
def test_conformance_transformers(make, loss, config):
    report = check_method(config, make, HF_IDS, _hf_forward, loss, steps=6, lr=2e-2)
    assert report.loss_after < report.loss_before


# -- parameter count, written from the shapes -----------------------------------------------------


def test_parameter_formula_reference_model(make_tiny, tiny_config):
    c = tiny_config
    kv_width = c.num_kv_heads * (c.hidden_size // c.num_heads)
    # l_k and l_v have one entry per key/value output channel, l_ff one per FFN activation.
    expected = c.num_layers * (kv_width + kv_width + c.intermediate_size)
    assert expected == 2 * (16 + 16 + 48)
    model = make_tiny()
    assert IA3Method().parameter_count(model, IA3Config(), _family(model)) == expected
    adapted = peftreg.adapt(model, IA3Config())
    assert adapted.summary().rows[0].adapter_params == expected


def test_parameter_formula_bert():
    model = make_bert()
    c = model.config
    expected = c.num_hidden_layers * (c.hidden_size + c.hidden_size + c.intermediate_size)
    assert IA3Method().parameter_count(model, IA3Config(), _family(model)) == expected
    adapted = peftreg.adapt(model, IA3Config())
    assert adapted.summary().rows[0].adapter_params == expected


def test_trainable_fraction_is_tiny(make_tiny):
    adapted = peftreg.adapt(make_tiny(), IA3Config())
    summary = adapted.summary()
    (row,) = summary.rows
    percent = summary.percent(row)
    print(f"ia3 trains {row.params} of {summary.base_params} parameters ({percent:.3f}%)")
    assert percent < MAX_TRAINABLE_PERCENT, f"ia3 trains {percent:.3f}% of the base model"
    # Fewer than even rank-1 LoRA on the same layers: one vector instead of two.
    lora = peftreg.adapt(make_tiny(), LoraConfig(r=1, target_modules=["k_proj", "v_proj",
                                                                      "down_proj"]))
    assert row.params < lora.summary().rows[0].params


# -- placement and maths ------------------------------------------------------------------------


def test_default_targets_and_shapes_reference_model(make_tiny, tiny_config):
    adapted = peftreg.adapt(make_tiny(), IA3Config())
    targets = adapted.adapters["default"].targets
    assert targets == [f"layers.{i}.{n}" for i in range(2)
                       for n in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")]
    state = adapted.adapter_state_dict("default")
    assert sorted(state) == sorted(f"{t}.ia3_l" for t in targets)
    assert state["layers.0.self_attn.k_proj.ia3_l"].shape == (16, 1)
    assert state["layers.0.mlp.down_proj.ia3_l"].shape == (1, tiny_config.intermediate_size)
    assert all(torch.equal(t, torch.ones_like(t)) for t in state.values())


def test_bert_defaults_do_not_catch_attention_output():
    # BERT's feed-forward down projection is "output.dense", a suffix of the attention's
    # "attention.output.dense": the defaults must name the FFN one only.
    adapted = peftreg.adapt(make_bert(), IA3Config())
    targets = adapted.adapters["default"].targets
    assert targets == [f"bert.encoder.layer.{i}.{n}" for i in range(2)
                       for n in ("attention.self.key", "attention.self.value", "output.dense")]
    ffn = adapted.model.bert.encoder.layer[0].output.dense.adapters["default"]
    assert ffn.is_feedforward and ffn.ia3_l.shape == (1, 64)


def test_feedforward_vector_scales_the_input():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    host = AdapterHost(base)
    host.adapters["a"] = IA3Linear(base, is_feedforward=True, init_ones=False)
    host.set_active(["a"])
    x = torch.randn(3, 6)
    l_ff = host.adapters["a"].ia3_l.detach()
    # y = W (l_ff * x) + b, by hand
    expected = (x * l_ff[0]) @ base.weight.detach().T + base.bias.detach()
    torch.testing.assert_close(host(x).detach(), expected)
    assert not torch.allclose(expected, base(x).detach())


def test_output_vector_scales_the_output():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    host = AdapterHost(base)
    host.adapters["a"] = IA3Linear(base, is_feedforward=False, init_ones=False)
    host.set_active(["a"])
    x = torch.randn(2, 5, 6)
    l_out = host.adapters["a"].ia3_l.detach()
    expected = (x @ base.weight.detach().T + base.bias.detach()) * l_out[:, 0]
    torch.testing.assert_close(host(x).detach(), expected)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output-scale", "input-scale"])
def test_merge_folds_the_vector_and_unmerge_restores(feedforward):
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    original_w, original_b = base.weight.detach().clone(), base.bias.detach().clone()
    adapter = IA3Linear(base, feedforward, init_ones=False)
    scale = adapter.ia3_l.detach()
    x = torch.randn(4, 7)
    adapted_out = adapter.adapt_output(x, base(adapter.adapt_input(x))).detach()
    with torch.no_grad():
        adapter.merge_into(base)
    if feedforward:  # W' = W diag(scale), bias unchanged
        assert scale.shape == (1, 7)
        torch.testing.assert_close(base.weight.detach(), original_w @ torch.diag(scale[0]))
        assert torch.equal(base.bias.detach(), original_b)
    else:  # W' = diag(scale) W, b' = scale * b
        assert scale.shape == (5, 1)
        torch.testing.assert_close(base.weight.detach(), torch.diag(scale[:, 0]) @ original_w)
        torch.testing.assert_close(base.bias.detach(), original_b * scale[:, 0])
    torch.testing.assert_close(base(x).detach(), adapted_out)
    with torch.no_grad():
        adapter.unmerge_from(base)
    torch.testing.assert_close(base.weight.detach(), original_w)
    torch.testing.assert_close(base.bias.detach(), original_b)


def test_model_merge_and_unmerge(make_tiny, token_batch):
    model = make_tiny()
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = peftreg.adapt(model, IA3Config(init_ia3_weights=False))
    adapted.eval()
    with torch.no_grad():
        unmerged = _lm_forward(adapted, token_batch)
        with adapted.disable_adapters():
            base_out = _lm_forward(adapted, token_batch)
        adapted.merge()
        merged = _lm_forward(adapted, token_batch)
    assert not torch.allclose(unmerged, base_out), "the random vectors should change the output"
    torch.testing.assert_close(merged, unmerged)
    down = adapted.model.layers[0].mlp.down_proj
    assert not torch.allclose(down.base.weight, originals["layers.0.mlp.down_proj.weight"])
    adapted.unmerge()
    for path, tensor in adapted.model.state_dict().items():
        key = path.replace(".base.", ".")
        if key in originals:
            torch.testing.assert_close(tensor, originals[key], msg=lambda m, k=key: f"{k}: {m}")


def test_merge_refused_when_a_scale_is_zero(make_tiny):
    model = peftreg.adapt(make_tiny(), IA3Config(), "scaled")
    weights = {p: m.base.weight.detach().clone() for p, m in model.model.named_modules()
               if isinstance(m, AdapterHost)}
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.adapters["scaled"].ia3_l[3, 0] = 0.0
    with pytest.raises(Unsupported, match=r"'scaled' on 'layers\.1\.self_attn\.v_proj'.*"
                                          r"cannot merge.*unsafe"):
        model.merge()
    assert model.merged_adapters == []
    for path, w in weights.items():  # all or nothing: layer 0 was merged, then rolled back
        assert torch.equal(model.model.get_submodule(path).base.weight, w), path


# -- several methods on one model --------------------------------------------------------------


def test_switching_between_ia3_and_lora(make_tiny, token_batch, tmp_path):
    model = peftreg.adapt(make_tiny(), IA3Config(init_ia3_weights=False), "ia3")
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["v_proj", "o_proj"]))
    with torch.no_grad():
        for p in model.adapter_parameters("lora"):
            p.normal_(std=0.5)
    model.eval()
    # both methods share the v_proj host
    assert set(model.model.layers[0].self_attn.v_proj.adapters) == {"ia3", "lora"}
    outputs = {}
    for name in ("ia3", "lora"):
        model.set_active(name)
        outputs[name] = _lm_forward(model, token_batch).detach()
        model.save_adapter(tmp_path / name, name)
    with model.disable_adapters():
        disabled = _lm_forward(model, token_batch).detach()
    base = make_tiny().eval()
    assert torch.equal(disabled, _lm_forward(base, token_batch).detach())
    for name in ("ia3", "lora"):
        alone = peftreg.load(make_tiny(), tmp_path / name).eval()
        assert torch.equal(_lm_forward(alone, token_batch), outputs[name]), name
        assert not torch.allclose(outputs[name], disabled), name
    model.set_active(["ia3", "lora"])
    both = _lm_forward(model, token_batch).detach()
    assert not torch.allclose(both, outputs["ia3"]) and not torch.allclose(both, outputs["lora"])


# -- bad configs -------------------------------------------------------------------------------


def test_json_round_trip():
    config = IA3Config(target_modules=["k", "fc2"], feedforward_modules=["fc2"],
                       init_ia3_weights=False)
    assert IA3Config.from_json(config.to_json()) == config
    assert peftreg.config_for("ia3", feedforward_modules="fc.*") == IA3Config(
        feedforward_modules="fc.*")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"feedforward_modules": []}, r"IA3Config.feedforward_modules: must not be an empty"),
        ({"feedforward_modules": ["ok", ""]}, r"feedforward_modules: entries must be non-empty"),
        ({"feedforward_modules": "(["}, r"feedforward_modules: invalid regular expression"),
        ({"feedforward_modules": "all-linear"}, r"'all-linear' is only valid for target_modules"),
        ({"init_ia3_weights": "yes"}, r"init_ia3_weights: expected bool"),
        ({"target_modules": []}, r"target_modules: must not be an empty list"),
    ],
    ids=["ff-empty", "ff-blank-entry", "ff-bad-regex", "ff-all-linear", "init-type",
         "targets-empty"],
)
def test_bad_config_values(fields, message):
    with pytest.raises(ConfigError, match=message):
        IA3Config(**fields)


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (IA3Config(target_modules=["k_proj", "nope_proj"]), TargetNotFoundError,
         r"entries \['nope_proj'\] match no module.*candidates:.*k_proj"),
        (IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"]),
         ConfigError, r"feedforward_modules: entry 'down_proj' matches none of the adapted "
                      r"modules; every feed-forward module must also be a target"),
        (IA3Config(target_modules=r".*k_proj", feedforward_modules=r".*up_proj"), ConfigError,
         r"entry '\.\*up_proj' matches none of the adapted"),
        (IA3Config(target_modules=["embed_tokens"]), TargetNotFoundError,
         r"unsupported types: embed_tokens \(Embedding\); supported: Linear"),
    ],
    ids=["unknown-target", "ff-not-a-target", "ff-regex-not-a-target", "embedding-target"],
)
def test_bad_targets(config, error, message, make_tiny):
    model = make_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = peftreg.AdaptedModel(model)
    with pytest.raises(error, match=message):
        adapted.add_adapter("x", config)
    assert not any(isinstance(m, AdapterHost) for m in model.modules()), "left a host behind"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_no_family_and_no_targets():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ModelFamilyError, match=r"ia3: IA3Config.target_modules is not set and "
                                               r"no model family plugin describes this model"):
        peftreg.adapt(model, IA3Config())
    # explicit targets work without a family; nothing is feed-forward unless named
    adapted = peftreg.adapt(model, IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    assert model[0].adapters["default"].ia3_l.shape == (8, 1)
    assert model[2].adapters["default"].ia3_l.shape == (1, 8)
    assert adapted.summary().rows[0].adapter_params == 8 + 8


def test_family_without_the_roles(make_tiny):
    family = ModelFamily(name="half-known", layers=("layers.0", "layers.1"),
                         roles={"k": "self_attn.k_proj"})
    with pytest.raises(ModelFamilyError, match=r"model family 'half-known' has no 'v' role"):
        IA3Method().inject(make_tiny(), "a", IA3Config(), family)


def _family(model):
    return peftreg.default_registry().describe_model(model)
