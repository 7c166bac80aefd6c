"""Hugging Face PEFT's adapter directory, checked against the real ``peft`` package.

Both directions on tiny random-init models: an adapter made and saved by PEFT gives the same
outputs once loaded by peftreg, and an adapter made by peftreg and exported gives the same
outputs once loaded by ``PeftModel.from_pretrained``. Broken files that PEFT would load without
complaint are refused with an error naming the file, the tensor or key, and the problem, and
the model is left as it was.

Outputs are compared with ``torch.testing.assert_close``'s float32 defaults: both libraries run
the same float32 operations, in a slightly different order at most (measured differences are
at most 1.2e-7).
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import tiny_hf
import torch

peft = pytest.importorskip("peft", reason="peft is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from safetensors.torch import load_file, save_file  # noqa: E402

import peftreg  # noqa: E402
from peftreg.errors import (  # noqa: E402
    AdapterError,
    AdapterFileError,
    UnsupportedOperationError,
)
from peftreg.host import AdapterSlot  # noqa: E402
from peftreg.io import peft_format  # noqa: E402
from peftreg.io.adapter_dir import read_adapter_dir  # noqa: E402
from peftreg.io.convert import convert  # noqa: E402
from peftreg.io.peft_format import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE  # noqa: E402
from peftreg_plugins.houlsby import HoulsbyConfig  # noqa: E402
from peftreg_plugins.ia3 import IA3Config  # noqa: E402
from peftreg_plugins.lora import LoraConfig  # noqa: E402
from peftreg_plugins.prefix_tuning import PrefixTuningConfig  # noqa: E402
from peftreg_plugins.prompt_tuning import PromptTuningConfig  # noqa: E402

VOCAB = 96
IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(7))
MASK = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])  # left padding: masks and positions
NOISE = 0.3  # added to every adapter weight so that B != 0 and scales differ from one


def make_llama():
    return tiny_hf.llama(seed=31, vocab_size=VOCAB)


def make_bert():
    return tiny_hf.bert(seed=32, vocab_size=VOCAB)


def logits(model):
    with torch.no_grad(), warnings.catch_warnings():
        if isinstance(model, peft.PeftModel):
            # PEFT's prefix tuning passes past_key_values itself (peft/peft_model.py), which
            # transformers 5.24 deprecates; peftreg's own calls stay under the suite's filter.
            warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
        return model(input_ids=IDS, attention_mask=MASK).logits


def perturb(params):
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * NOISE)


def assert_changes_outputs(adapted_out, base_out):
    """The twin of every equality check: the adapter must make a difference."""
    tail = adapted_out[:, -base_out.shape[1]:] if adapted_out.dim() == 3 else adapted_out
    assert not torch.allclose(tail, base_out), "the adapter does not change the outputs"


def peft_model_with_noise(make, config):
    model = peft.get_peft_model(make(), config)
    perturb(p for p in model.parameters() if p.requires_grad)
    return model.eval()


# -- PEFT -> peftreg ------------------------------------------------------------------------------

PEFT_CASES = [
    pytest.param(make_llama, lambda: peft.LoraConfig(
        r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "embed_tokens"],
        rank_pattern={"model.layers.1.self_attn.v_proj": 2}, alpha_pattern={"v_proj": 3},
        task_type="CAUSAL_LM"), id="lora-llama-rslora-patterns-embedding"),
    pytest.param(make_bert, lambda: peft.LoraConfig(
        r=4, target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"],
        task_type="SEQ_CLS"), id="lora-bert-head"),
    pytest.param(make_llama, lambda: peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
        task_type="CAUSAL_LM"), id="ia3-llama"),
    pytest.param(make_bert, lambda: peft.IA3Config(
        target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
        modules_to_save=["classifier"], task_type="SEQ_CLS"), id="ia3-bert-head"),
    pytest.param(make_llama, lambda: peft.PrefixTuningConfig(
        num_virtual_tokens=3, task_type="CAUSAL_LM"), id="prefix-llama"),
    pytest.param(make_llama, lambda: peft.PrefixTuningConfig(
        num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16,
        task_type="CAUSAL_LM"), id="prefix-projection-llama"),
    pytest.param(make_llama, lambda: peft.PromptTuningConfig(
        num_virtual_tokens=4, task_type="CAUSAL_LM"), id="prompt-llama"),
    pytest.param(make_bert, lambda: peft.PromptTuningConfig(
        num_virtual_tokens=4, task_type="SEQ_CLS"), id="prompt-bert-head"),
]


@pytest.mark.parametrize(("make", "peft_config"), PEFT_CASES)
def test_peft_adapter_loads_into_peftreg(tmp_path, make, peft_config):
    peft_model = peft_model_with_noise(make, peft_config())
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    base = make()
    base_out = logits(base)

    model = peftreg.load(base, tmp_path)

    # Prompt tuning on a causal LM: both return logits for the virtual tokens too.
    torch.testing.assert_close(logits(model), expected)
    assert_changes_outputs(expected, base_out)


def test_prefix_projection_loads_as_a_direct_prefix(tmp_path):
    peft_model_with_noise(make_llama, peft.PrefixTuningConfig(
        num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16,
        task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    model = peftreg.load(make_llama(), tmp_path)
    config = model.adapters["default"].config
    assert config.prefix_projection is False
    assert list(model.adapter_state_dict("default")) == ["prompt_embeddings"]


def test_modules_to_save_layout_in_peft_files(tmp_path):
    """PEFT saves a modules_to_save module under its own path (LoRA: base_model.model.<path>,
    prompt learning: base_model.<path>) and adds classifier/score for SEQ_CLS by itself."""
    lora_dir, prompt_dir = tmp_path / "lora", tmp_path / "prompt"
    peft_model_with_noise(make_bert, peft.LoraConfig(
        r=2, target_modules=["query"], modules_to_save=["classifier"], task_type="SEQ_CLS",
    )).save_pretrained(lora_dir)
    peft_model_with_noise(make_bert, peft.PromptTuningConfig(
        num_virtual_tokens=2, task_type="SEQ_CLS")).save_pretrained(prompt_dir)
    lora_keys = set(load_file(lora_dir / PEFT_WEIGHTS_FILE))
    prompt_keys = set(load_file(prompt_dir / PEFT_WEIGHTS_FILE))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= lora_keys
    assert prompt_keys == {"prompt_embeddings", "base_model.classifier.weight",
                           "base_model.classifier.bias"}
    for directory in (lora_dir, prompt_dir):
        listed = json.loads((directory / PEFT_CONFIG_FILE).read_text())["modules_to_save"]
        assert "score" in listed  # added by PEFT, matches nothing in BERT: must be tolerated
        model = peftreg.load(make_bert(), directory)
        assert model.adapters["default"].saved_modules == ["classifier"]


# -- peftreg -> PEFT ------------------------------------------------------------------------------

PEFTREG_CASES = [
    pytest.param(make_llama, lambda: LoraConfig(
        r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "embed_tokens"],
        rank_pattern={r"model\.layers\.1\..*v_proj": 2}, alpha_pattern={"v_proj": 3}), None,
        id="lora-llama-rslora-regex-patterns-embedding"),
    pytest.param(make_llama, lambda: LoraConfig(r=2, target_modules="all-linear",
                                                layers_to_transform=[1]), None,
                 id="lora-llama-all-linear-layer-1"),
    pytest.param(make_bert, lambda: LoraConfig(
        r=4, target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"]),
        "SEQ_CLS", id="lora-bert-head"),
    pytest.param(make_llama, lambda: IA3Config(), None, id="ia3-llama-family-defaults"),
    pytest.param(make_bert, lambda: IA3Config(modules_to_save=["classifier"]), None,
                 id="ia3-bert-head"),
    pytest.param(make_llama, lambda: PrefixTuningConfig(num_virtual_tokens=3), None,
                 id="prefix-llama"),
    pytest.param(make_llama, lambda: PrefixTuningConfig(
        num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16), None,
        id="prefix-projection-llama"),
    pytest.param(make_llama, lambda: PromptTuningConfig(num_virtual_tokens=4), None,
                 id="prompt-llama"),
    pytest.param(make_bert, lambda: PromptTuningConfig(
        num_virtual_tokens=4, modules_to_save=["classifier"]), None, id="prompt-bert-head"),
]


@pytest.mark.parametrize(("make", "config", "task_type"), PEFTREG_CASES)
def test_peftreg_adapter_loads_into_peft(tmp_path, make, config, task_type):
    model = peftreg.adapt(make(), config())
    perturb(model.adapter_parameters("default"))
    model.eval()
    expected = logits(model)
    with model.disable_adapters():
        base_out = logits(model)

    written = model.save_adapter(tmp_path, format="peft", task_type=task_type)
    peft_model = peft.PeftModel.from_pretrained(make(), written).eval()

    torch.testing.assert_close(logits(peft_model), expected)
    assert_changes_outputs(expected, base_out)


def test_exported_config_has_peft_common_keys(tmp_path):
    model = peftreg.adapt(make_llama(), PromptTuningConfig(num_virtual_tokens=2))
    model.save_adapter(tmp_path, format="peft")
    doc = json.loads((tmp_path / PEFT_CONFIG_FILE).read_text())
    assert doc["peft_type"] == "PROMPT_TUNING"
    assert doc["task_type"] == "CAUSAL_LM"  # guessed from LlamaForCausalLM
    assert doc["inference_mode"] is True and doc["peft_version"] == "0.21.2"
    assert doc["base_model_name_or_path"] is None and doc["auto_mapping"] is None
    from safetensors import safe_open

    with safe_open(tmp_path / PEFT_WEIGHTS_FILE, "pt") as handle:
        # PEFT's own key, plus the two that make the export crash-consistent (PEFT ignores them).
        assert handle.metadata()["format"] == "pt"
        assert set(handle.metadata()) == {"format", "peftreg_adapter_config",
                                          "peftreg_replaces_config_sha256"}
    lora = peftreg.adapt(make_llama(), LoraConfig(r=2))
    lora.save_adapter(tmp_path / "lora", format="peft")
    doc = json.loads((tmp_path / "lora" / PEFT_CONFIG_FILE).read_text())
    assert doc["task_type"] is None and doc["use_dora"] is False and doc["bias"] == "none"
    assert set(doc["target_modules"]) == {f"model.layers.{i}.self_attn.{n}_proj"
                                          for i in range(2) for n in "qv"}


def test_methods_without_peft_equivalent_are_refused(tmp_path):
    model = peftreg.adapt(make_llama(), HoulsbyConfig())
    with pytest.raises(UnsupportedOperationError, match="'houlsby' has no Hugging Face PEFT"):
        model.save_adapter(tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()


def test_prompt_export_without_task_type_is_refused(tmp_path):
    model = peftreg.adapt(make_llama(), PromptTuningConfig(num_virtual_tokens=2))
    model.save_adapter(tmp_path / "own")
    with pytest.raises(AdapterError, match="task_type"):
        convert(tmp_path / "own", tmp_path / "peft", to="peft")


def test_failed_export_leaves_the_previous_one_readable(tmp_path, monkeypatch):
    model = peftreg.adapt(make_llama(), LoraConfig(r=2))
    perturb(model.adapter_parameters("default"))
    model.eval()
    first = logits(model)
    (tmp_path / "README.md").write_text("mine")
    model.save_adapter(tmp_path, format="peft")
    perturb(model.adapter_parameters("default"))

    def failing_replace(src, dst):
        raise OSError("disk trouble")

    monkeypatch.setattr(peft_format.os, "replace", failing_replace)
    with pytest.raises(AdapterFileError, match=r"cannot write the PEFT adapter.*disk trouble"):
        model.save_adapter(tmp_path, format="peft")
    monkeypatch.undo()

    assert (tmp_path / "README.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
    torch.testing.assert_close(logits(peftreg.load(make_llama(), tmp_path)), first)


# -- subdirectory adapters ------------------------------------------------------------------------


def test_named_peft_adapters_live_in_subdirectories(tmp_path):
    peft_model = peft.get_peft_model(make_llama(), peft.LoraConfig(r=4, task_type="CAUSAL_LM"))
    peft_model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["k_proj", "o_proj"],
                                                    task_type="CAUSAL_LM"))
    perturb(p for n, p in peft_model.named_parameters() if "lora_" in n)
    peft_model.eval()
    expected = {}
    for name in ("default", "other"):
        peft_model.set_adapter(name)
        expected[name] = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / PEFT_CONFIG_FILE).is_file()

    model = peftreg.load(make_llama(), tmp_path)
    record = model.load_adapter(tmp_path / "other")
    assert record.name == "other" and model.active_adapters == ["other"]
    torch.testing.assert_close(logits(model), expected["other"])
    model.set_active("default")
    torch.testing.assert_close(logits(model), expected["default"])


def test_export_writes_named_adapters_to_subdirectories(tmp_path):
    model = peftreg.adapt(make_llama(), LoraConfig(r=4))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj", "o_proj"]))
    for name in ("default", "other"):
        perturb(model.adapter_parameters(name))
    model.eval()
    expected = {}
    for name in ("default", "other"):
        model.set_active(name)
        expected[name] = logits(model)
        model.save_adapter(tmp_path, name, format="peft")
    assert (tmp_path / PEFT_CONFIG_FILE).is_file()
    assert (tmp_path / "other" / PEFT_WEIGHTS_FILE).is_file()

    peft_model = peft.PeftModel.from_pretrained(make_llama(), tmp_path)
    peft_model.load_adapter(tmp_path / "other", adapter_name="other")
    peft_model.eval()
    for name in ("default", "other"):
        peft_model.set_adapter(name)
        torch.testing.assert_close(logits(peft_model), expected[name])


# -- broken files ---------------------------------------------------------------------------------

LAYER0_Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A good PEFT LoRA directory (r=4 on q_proj and v_proj of the tiny Llama)."""
    directory = tmp_path_factory.mktemp("peft-lora")
    peft_model_with_noise(make_llama, peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).save_pretrained(directory)
    return directory


@pytest.fixture
def broken(lora_dir, tmp_path):
    """A copy of ``lora_dir`` to break."""
    target = tmp_path / "adapter"
    shutil.copytree(lora_dir, target)
    return target


def edit_tensors(directory, change):
    path = directory / PEFT_WEIGHTS_FILE
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(directory, **changes):
    path = directory / PEFT_CONFIG_FILE
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def assert_refused(directory, *patterns, model=None):
    """Loading fails with every pattern in the message, and the model is left as it was."""
    model = model if model is not None else make_llama()
    plain = model.model if isinstance(model, peftreg.AdaptedModel) else model
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    modules = [name for name, _ in plain.named_modules()]
    out = logits(model)
    with pytest.raises(AdapterFileError) as info:
        peftreg.load(model, directory)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, message
    after = plain.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [name for name, _ in plain.named_modules()] == modules
    torch.testing.assert_close(logits(model), out)
    return message


def _drop_b(t):
    del t[f"{LAYER0_Q}.lora_B.weight"]


def _nan(t):
    t[f"{LAYER0_Q}.lora_A.weight"][0, 0] = math.nan


def _inf(t):
    t[f"{LAYER0_Q}.lora_B.weight"][1, 2] = math.inf


def _unknown(t):
    t[f"{LAYER0_Q}.lora_C.weight"] = torch.zeros(4, 32)


def _integer(t):
    t[f"{LAYER0_Q}.lora_A.weight"] = torch.ones(4, 32, dtype=torch.int64)


@pytest.mark.parametrize(("change", "patterns"), [
    pytest.param(_drop_b, [f"{LAYER0_Q}.lora_B.weight", "missing"], id="missing-lora_B"),
    pytest.param(_nan, [f"{LAYER0_Q}.lora_A.weight", "NaN or infinite"], id="nan"),
    pytest.param(_inf, [f"{LAYER0_Q}.lora_B.weight", "NaN or infinite"], id="inf"),
    pytest.param(_unknown, [f"{LAYER0_Q}.lora_C.weight", "unknown tensor"], id="unknown-tensor"),
    pytest.param(_integer, [f"{LAYER0_Q}.lora_A.weight", "floating point"], id="integer-dtype"),
])
def test_broken_tensors_are_refused(broken, change, patterns):
    edit_tensors(broken, change)
    assert_refused(broken, PEFT_WEIGHTS_FILE, *patterns)


@pytest.mark.parametrize(("changes", "patterns"), [
    pytest.param({"peft_type": "FROBNICATE"}, ["peft_type 'FROBNICATE'"],
                 id="unknown-peft_type"),
    pytest.param({"bias": "all"}, ["bias = 'all'"], id="bias-all"),
    pytest.param({"fan_in_fan_out": True}, ["fan_in_fan_out"], id="fan_in_fan_out"),
    pytest.param({"target_parameters": ["mlp.experts.down_proj"]}, ["target_parameters"],
                 id="target_parameters"),
    pytest.param({"use_frobnication": True}, ["use_frobnication = True", "switches"],
                 id="unknown-key-set"),
    pytest.param({"frobnicate_modules": ["q_proj"]}, ["frobnicate_modules = ['q_proj']"],
                 id="unknown-key-list"),
])
def test_config_features_peftreg_cannot_reproduce_are_refused(broken, changes, patterns):
    edit_config(broken, **changes)
    assert_refused(broken, PEFT_CONFIG_FILE, *patterns)


def test_a_lora_document_switched_to_dora_lacks_the_magnitudes(broken):
    # DoRA's codec claims a document with use_dora: true; LoRA tensors alone are not DoRA's.
    edit_config(broken, use_dora=True)
    assert_refused(broken, PEFT_WEIGHTS_FILE, "lora_magnitude_vector", "missing")


def test_unknown_keys_that_are_off_are_ignored(broken, lora_dir):
    edit_config(broken, use_frobnication=None, frobnication_config={}, lora_bias=False)
    torch.testing.assert_close(logits(peftreg.load(make_llama(), broken)),
                               logits(peftreg.load(make_llama(), lora_dir)))


def test_shape_mismatches_are_reported_together_and_rolled_back(broken):
    def rank_two(tensors):
        for layer in (0, 1):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(2, 32)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(32, 2)

    edit_tensors(broken, rank_two)
    model = peftreg.adapt(make_llama(), LoraConfig(r=2), "mine")
    message = assert_refused(broken, "4 problem(s)", "(2, 32)", "the model expects (4, 32)",
                             model=model)
    assert "layers.1.self_attn.q_proj.lora_B.weight" in message
    assert list(model.adapters) == ["mine"] and model.active_adapters == ["mine"]


def test_missing_modules_to_save_tensors_are_refused(tmp_path):
    peft_model_with_noise(make_bert, peft.LoraConfig(
        r=2, target_modules=["query"], modules_to_save=["classifier"], task_type="SEQ_CLS",
    )).save_pretrained(tmp_path)
    edit_tensors(tmp_path, lambda t: [t.pop(k) for k in list(t) if "classifier" in k])
    base = make_bert()
    with pytest.raises(AdapterFileError, match=r"'classifier'.*none of its tensors"):
        peftreg.load(base, tmp_path)
    assert not any(isinstance(m, AdapterSlot) for m in base.modules())


def test_prefix_geometry_is_checked_against_the_model(tmp_path):
    peft_model_with_noise(make_llama, peft.PrefixTuningConfig(
        num_virtual_tokens=3, task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    edit_config(tmp_path, num_layers=4)
    assert_refused(tmp_path, "num_layers = 4", "has 2")


def test_encoder_decoder_prompts_are_refused(tmp_path):
    peft_model_with_noise(make_llama, peft.PromptTuningConfig(
        num_virtual_tokens=2, task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    edit_config(tmp_path, num_transformer_submodules=2)
    assert_refused(tmp_path, "num_transformer_submodules = 2")


def test_base_rewriting_initialisation_warns(broken):
    # Exact PiSSA and OLoRA are reproduced (tests/plugins/test_lora_init.py); the randomised
    # fast SVD of pissa_niter_N is not.
    edit_config(broken, init_lora_weights="pissa_niter_4")
    with pytest.warns(UserWarning, match="rewrote the base weights"):
        peftreg.load(make_llama(), broken)


def test_resized_embedding_copy_is_refused(tmp_path):
    peft_model_with_noise(make_llama, peft.LoraConfig(
        r=2, target_modules=["embed_tokens"], task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in load_file(tmp_path / PEFT_WEIGHTS_FILE)  # PEFT's save_embedding_layers
    peftreg.load(make_llama(), tmp_path)  # equal to the model's own: accepted
    edit_tensors(tmp_path, lambda t: t[key].mul_(2))
    assert_refused(tmp_path, key, "differs from the model's own weight")


# -- convert ------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    pytest.param(lambda: LoraConfig(r=4, lora_alpha=12, target_modules=["query", "value"],
                                    modules_to_save=["classifier"]), id="lora"),
    pytest.param(lambda: IA3Config(modules_to_save=["classifier"]), id="ia3"),
])
def test_convert_round_trip_from_peftreg_without_a_model(tmp_path, config):
    model = peftreg.adapt(make_bert(), config())
    perturb(model.adapter_parameters("default"))
    model.eval()
    expected = logits(model)
    model.save_adapter(tmp_path / "own")

    convert(tmp_path / "own", tmp_path / "peft", to="peft")
    convert(tmp_path / "peft", tmp_path / "back", to="peftreg")

    original, back = read_adapter_dir(tmp_path / "own"), read_adapter_dir(tmp_path / "back")
    assert original.tensors.keys() == back.tensors.keys()
    assert all(torch.equal(original.tensors[k], back.tensors[k]) for k in original.tensors)
    torch.testing.assert_close(logits(peftreg.load(make_bert(), tmp_path / "back")), expected)
    torch.testing.assert_close(
        logits(peft.PeftModel.from_pretrained(make_bert(), tmp_path / "peft").eval()), expected)


@pytest.mark.parametrize("peft_config", [
    pytest.param(lambda: peft.LoraConfig(r=4, target_modules=["query", "value"],
                                         modules_to_save=["classifier"], task_type="SEQ_CLS"),
                 id="lora"),
    pytest.param(lambda: peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                        feedforward_modules=["output.dense"],
                                        task_type="SEQ_CLS"), id="ia3"),
])
def test_convert_round_trip_from_peft_without_a_model(tmp_path, peft_config):
    peft_model = peft_model_with_noise(make_bert, peft_config())
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")

    convert(tmp_path / "peft", tmp_path / "own", to="peftreg")
    convert(tmp_path / "own", tmp_path / "again", to="peft", task_type="SEQ_CLS")

    first, again = load_file(tmp_path / "peft" / PEFT_WEIGHTS_FILE), load_file(
        tmp_path / "again" / PEFT_WEIGHTS_FILE)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    doc0, doc1 = (json.loads((tmp_path / d / PEFT_CONFIG_FILE).read_text())
                  for d in ("peft", "again"))
    assert doc0["peft_type"] == doc1["peft_type"]
    if doc0["peft_type"] == "LORA":
        assert set(doc0["target_modules"]) == set(doc1["target_modules"])  # order not stable
    else:
        # IA3 is written with exact module paths (PEFT matches feedforward_modules by a plain
        # string suffix and wants them to be a subset of target_modules).
        assert set(doc1["feedforward_modules"]) == {
            f"bert.encoder.layer.{i}.{m}.dense" for i in range(2)
            for m in ("attention.output", "output")}
        assert set(doc1["feedforward_modules"]) < set(doc1["target_modules"])
    torch.testing.assert_close(logits(peftreg.load(make_bert(), tmp_path / "own")), expected)
    torch.testing.assert_close(
        logits(peft.PeftModel.from_pretrained(make_bert(), tmp_path / "again").eval()), expected)


def test_convert_prefix_to_peft_needs_the_model(tmp_path):
    model = peftreg.adapt(make_llama(), PrefixTuningConfig(num_virtual_tokens=2))
    perturb(model.adapter_parameters("default"))
    model.eval()
    expected = logits(model)
    model.save_adapter(tmp_path / "own")
    with pytest.raises(AdapterError, match="needs the base model"):
        convert(tmp_path / "own", tmp_path / "peft", to="peft", task_type="CAUSAL_LM")
    convert(tmp_path / "own", tmp_path / "peft", to="peft", model=make_llama())
    peft_model = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(peft_model), expected)


def test_convert_refuses_the_wrong_source_format(tmp_path, lora_dir):
    with pytest.raises(AdapterFileError, match="already a PEFT adapter"):
        convert(lora_dir, tmp_path / "x", to="peft")
    with pytest.raises(AdapterFileError, match="not a PEFT adapter"):
        convert(tmp_path, tmp_path / "y", to="peftreg")


def test_velora_adapters_load_as_plain_lora(tmp_path):
    """VeLoRA changes only the backward pass; its saved lora_velora_embed buffers are dropped."""
    from peft.tuners.lora.config import VeloraConfig

    peft_model = peft_model_with_noise(make_llama, peft.LoraConfig(
        r=2, velora_config=VeloraConfig(num_groups=4), task_type="CAUSAL_LM"))
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    assert any(k.endswith("lora_velora_embed") for k in load_file(tmp_path / PEFT_WEIGHTS_FILE))
    torch.testing.assert_close(logits(peftreg.load(make_llama(), tmp_path)), expected)


def test_interop_guide_example_runs():
    import re
    from pathlib import Path

    guide = Path(__file__).resolve().parents[2] / "docs" / "interop.md"
    (block,) = re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile(block, "docs/interop.md", "exec"), namespace)
    assert isinstance(namespace["model"], peftreg.AdaptedModel)
