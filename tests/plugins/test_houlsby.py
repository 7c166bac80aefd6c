from __future__ import annotations

import pytest
import tiny_hf
import torch
import torch.nn.functional as F
from torch import nn

import peftreg
from peftreg import ConfigError, ModelFamilyError, TargetNotFoundError
from peftreg import UnsupportedOperationError as Unsupported
from peftreg.host import AdapterHost
from peftreg.plugin import ModelFamily
from peftreg.testing import check_method
from peftreg_plugins.houlsby import INIT_STD, HoulsbyAdapter, HoulsbyConfig, HoulsbyMethod
from peftreg_plugins.lora import LoraConfig


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
        HoulsbyConfig(),
        HoulsbyConfig(placement="ffn", reduction_factor=4),
        HoulsbyConfig(bottleneck_size=5, non_linearity="gelu", layers_to_transform=[0]),
        HoulsbyConfig(target_modules=["up_proj"], non_linearity="tanh",
                      modules_to_save=["lm_head"]),
    ],
    ids=["both-default", "ffn-factor4", "size5-gelu-layer0", "explicit-up-with-head"],
)
def test_conformance_reference_model(config, make_tiny, token_batch):
    report = check_method(config, make_tiny, token_batch, _lm_forward, _lm_loss, steps=8)
    assert report.formula_params is not None
    assert report.max_merge_difference is None  # not mergeable: the merge check is skipped


@pytest.mark.parametrize(
    ("make", "loss", "config"),
    [
        (make_llama, _llama_loss, HoulsbyConfig()),
        (make_bert, _bert_loss, HoulsbyConfig(reduction_factor=8,
                                              modules_to_save=["classifier"])),
        (make_bert, _bert_loss, HoulsbyConfig(placement="ffn", non_linearity="gelu")),
    ],
    ids=["llama-both", "bert-both-with-head", "bert-ffn-gelu"],
)
def test_conformance_transformers(make, loss, config):
    report = check_method(config, make, HF_IDS, _hf_forward, loss, steps=6, lr=2e-2)
    assert report.loss_after < report.loss_before


# -- parameter count, written from the shapes -----------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "modules_per_layer", "m"),
    [
        ({}, 2, 32 // 16),
        ({"placement": "ffn"}, 1, 32 // 16),
        ({"bottleneck_size": 7}, 2, 7),
        ({"reduction_factor": 64}, 2, 1),  # 32 // 64 == 0, floored at one
    ],
    ids=["both-r16", "ffn-r16", "size7", "factor-above-width"],
)
def test_parameter_formula_reference_model(fields, modules_per_layer, m, make_tiny, tiny_config):
    h = tiny_config.hidden_size
    # down: h*m weights + m biases; up: m*h weights + h biases
    per_module = (h * m + m) + (m * h + h)
    expected = tiny_config.num_layers * modules_per_layer * per_module
    config = HoulsbyConfig(**fields)
    model = make_tiny()
    assert HoulsbyMethod().parameter_count(model, config, _family(model)) == expected
    adapted = peftreg.adapt(model, config)
    assert adapted.summary().rows[0].adapter_params == expected


def test_parameter_formula_bert():
    model = make_bert()
    c = model.config
    h, m = c.hidden_size, c.hidden_size // 16
    expected = c.num_hidden_layers * 2 * (2 * h * m + m + h)
    assert HoulsbyMethod().parameter_count(model, HoulsbyConfig(), _family(model)) == expected
    adapted = peftreg.adapt(model, HoulsbyConfig())
    assert adapted.summary().rows[0].adapter_params == expected


# -- placement and maths -------------------------------------------------------------------------


def test_placement_both_and_ffn(make_tiny):
    both = peftreg.adapt(make_tiny(), HoulsbyConfig()).adapters["default"].targets
    assert both == [f"layers.{i}.{n}" for i in range(2)
                    for n in ("self_attn.o_proj", "mlp.down_proj")]
    ffn = peftreg.adapt(make_tiny(), HoulsbyConfig(placement="ffn")).adapters["default"].targets
    assert ffn == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]


def test_bert_placement_after_attention_output_and_ffn_output():
    targets = peftreg.adapt(make_bert(), HoulsbyConfig()).adapters["default"].targets
    assert targets == [f"bert.encoder.layer.{i}.{n}" for i in range(2)
                       for n in ("attention.output.dense", "output.dense")]
    ffn = peftreg.adapt(make_bert(), HoulsbyConfig(placement="ffn")).adapters["default"].targets
    assert ffn == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]


def test_explicit_targets_ignore_placement(make_tiny):
    config = HoulsbyConfig(target_modules=["o_proj"], placement="ffn")
    targets = peftreg.adapt(make_tiny(), config).adapters["default"].targets
    assert targets == ["layers.0.self_attn.o_proj", "layers.1.self_attn.o_proj"]


def test_near_identity_init():
    adapter = HoulsbyAdapter(32, 4, "relu")
    assert torch.count_nonzero(adapter.adapter_up.weight) == 0
    assert torch.count_nonzero(adapter.adapter_up.bias) == 0
    assert torch.count_nonzero(adapter.adapter_down.bias) == 0
    down = adapter.adapter_down.weight.detach()
    assert torch.count_nonzero(down) == down.numel()
    assert float(down.abs().max()) <= 2 * INIT_STD
    y = torch.randn(3, 32)
    assert torch.equal(adapter.adapt_output(None, y), y)


_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


@pytest.mark.parametrize("non_linearity", list(_ACTIVATIONS), ids=lambda n: f"act={n}")
def test_bottleneck_equals_the_formula(non_linearity):
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    host = AdapterHost(base)
    host.adapters["a"] = HoulsbyAdapter(10, 3, non_linearity)
    host.set_active(["a"])
    adapter = host.adapters["a"]
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    x = torch.randn(2, 5, 12)
    h = x @ base.weight.detach().T + base.bias.detach()
    act = _ACTIVATIONS[non_linearity]
    down = act(h @ adapter.adapter_down.weight.detach().T + adapter.adapter_down.bias.detach())
    expected = h + down @ adapter.adapter_up.weight.detach().T + adapter.adapter_up.bias.detach()
    torch.testing.assert_close(host(x).detach(), expected)
    # the choice matters: every other activation gives a different result
    for other, fn in _ACTIVATIONS.items():
        if other != non_linearity:
            down_other = fn(h @ adapter.adapter_down.weight.detach().T
                            + adapter.adapter_down.bias.detach())
            wrong = h + down_other @ adapter.adapter_up.weight.detach().T
            assert not torch.allclose(host(x).detach(), wrong), other


def test_non_linearity_reaches_the_model(make_tiny):
    adapted = peftreg.adapt(make_tiny(), HoulsbyConfig(non_linearity="silu", bottleneck_size=3))
    adapter = adapted.model.layers[1].mlp.down_proj.adapters["default"]
    assert isinstance(adapter.act, nn.SiLU)
    assert adapter.adapter_down.weight.shape == (3, 32)
    assert adapter.adapter_up.weight.shape == (32, 3)


def test_merge_is_refused(make_tiny, token_batch):
    model = peftreg.adapt(make_tiny(), HoulsbyConfig(), "bottleneck")
    assert not HoulsbyMethod.capabilities.mergeable
    assert HoulsbyMethod.capabilities.inference_latency
    with pytest.raises(Unsupported, match=r"adapter 'bottleneck' uses method 'houlsby', which "
                                          r"cannot be merged"):
        model.merge()
    with pytest.raises(Unsupported, match="cannot be merged"):
        model.merge_and_unload()
    assert model.merged_adapters == []
    # the model still runs with the adapter after the refusals
    model.eval()
    _lm_forward(model, token_batch)


# -- several methods on one model --------------------------------------------------------------


def test_switching_between_houlsby_and_lora(make_tiny, token_batch, tmp_path):
    model = peftreg.adapt(make_tiny(), HoulsbyConfig(bottleneck_size=4), "houlsby")
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["o_proj", "q_proj"]))
    with torch.no_grad():
        for name in ("houlsby", "lora"):
            for p in model.adapter_parameters(name):
                p.normal_(std=0.3)
    model.eval()
    assert set(model.model.layers[0].self_attn.o_proj.adapters) == {"houlsby", "lora"}
    outputs = {}
    for name in ("houlsby", "lora"):
        model.set_active(name)
        outputs[name] = _lm_forward(model, token_batch).detach()
        model.save_adapter(tmp_path / name, name)
    with model.disable_adapters():
        disabled = _lm_forward(model, token_batch).detach()
    assert torch.equal(disabled, _lm_forward(make_tiny().eval(), token_batch).detach())
    for name in ("houlsby", "lora"):
        alone = peftreg.load(make_tiny(), tmp_path / name).eval()
        assert torch.equal(_lm_forward(alone, token_batch), outputs[name]), name
        assert not torch.allclose(outputs[name], disabled), name
    model.set_active(["houlsby", "lora"])
    both = _lm_forward(model, token_batch).detach()
    assert not torch.allclose(both, outputs["houlsby"])
    assert not torch.allclose(both, outputs["lora"])


def test_saved_keys(make_tiny):
    adapted = peftreg.adapt(make_tiny(), HoulsbyConfig(placement="ffn"))
    keys = sorted(adapted.adapter_state_dict("default"))
    assert keys == sorted(f"layers.{i}.mlp.down_proj.adapter_{p}.{t}" for i in range(2)
                          for p in ("down", "up") for t in ("weight", "bias"))


# -- bad configs -------------------------------------------------------------------------------


def test_json_round_trip():
    config = HoulsbyConfig(bottleneck_size=8, non_linearity="tanh", placement="ffn")
    assert HoulsbyConfig.from_json(config.to_json()) == config
    assert peftreg.config_for("houlsby", reduction_factor=4) == HoulsbyConfig(reduction_factor=4)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"reduction_factor": 0}, r"HoulsbyConfig.reduction_factor: must be > 0 \(got 0\)"),
        ({"bottleneck_size": -2}, r"HoulsbyConfig.bottleneck_size: must be > 0 \(got -2\)"),
        ({"non_linearity": "softmax"}, r"non_linearity: expected one of 'relu', 'gelu'"),
        ({"placement": "attention"}, r"placement: expected one of 'both', 'ffn'"),
        ({"reduction_factor": 2.5}, r"reduction_factor: expected int"),
    ],
    ids=["factor-zero", "size-negative", "activation", "placement", "factor-float"],
)
def test_bad_config_values(fields, message):
    with pytest.raises(ConfigError, match=message):
        HoulsbyConfig(**fields)


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (HoulsbyConfig(bottleneck_size=33), ConfigError,
         r"HoulsbyConfig.bottleneck_size: 33 is larger than the hidden size 32 of module "
         r"'layers.0.self_attn.o_proj' \(got 33\)"),
        (HoulsbyConfig(target_modules=["o_proj", "nope"]), TargetNotFoundError,
         r"entries \['nope'\] match no module.*candidates:.*o_proj"),
        (HoulsbyConfig(target_modules=["layers.0.mlp"]), TargetNotFoundError,
         r"unsupported types: layers.0.mlp \(MLP\); supported: Linear"),
    ],
    ids=["bottleneck-wider-than-hidden", "unknown-target", "non-linear-target"],
)
def test_bad_targets(config, error, message, make_tiny):
    model = make_tiny()
    adapted = peftreg.AdaptedModel(model)
    with pytest.raises(error, match=message):
        adapted.add_adapter("x", config)
    assert not any(isinstance(m, AdapterHost) for m in model.modules()), "left a host behind"


def test_no_family_and_no_targets():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ModelFamilyError, match=r"houlsby: HoulsbyConfig.target_modules is not "
                                               r"set and no model family plugin describes"):
        peftreg.adapt(model, HoulsbyConfig())
    adapted = peftreg.adapt(model, HoulsbyConfig(target_modules=["0", "2"], bottleneck_size=2))
    assert adapted.summary().rows[0].adapter_params == (2 * 8 * 2 + 2 + 8) + (2 * 4 * 2 + 2 + 4)


@pytest.mark.parametrize(
    ("placement", "missing"), [("both", "o"), ("ffn", "ffn_down")], ids=["both", "ffn"])
def test_family_without_the_roles(placement, missing, make_tiny):
    roles = {"o": "self_attn.o_proj"} if missing == "ffn_down" else {"ffn_down": "mlp.down_proj"}
    family = ModelFamily(name="half-known", layers=("layers.0", "layers.1"), roles=roles)
    with pytest.raises(ModelFamilyError, match=rf"model family 'half-known' has no '{missing}' "
                                               rf"role, needed for placement '{placement}'"):
        HoulsbyMethod().inject(make_tiny(), "a", HoulsbyConfig(placement=placement), family)


def _family(model):
    return peftreg.default_registry().describe_model(model)
