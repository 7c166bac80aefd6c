"""LoHa, LoKr and OFT in Hugging Face PEFT's format, through each plugin's own codec.

Against the real ``peft`` package on tiny random-init models: a directory PEFT writes loads into
peftreg with PEFT's logits, and peftreg's export loads in ``PeftModel.from_pretrained`` with
peftreg's logits (float32; both libraries run the same operations, measured differences at
most 1e-7). Files PEFT would read differently from peftreg are refused, naming the key or
tensor.
"""

from __future__ import annotations

import json
import warnings

import pytest
import tiny_hf
import torch
from peft_twin import our_trainable
from tolerances import tol

peft = pytest.importorskip("peft", reason="peft is not installed")

from safetensors.torch import load_file, save_file  # noqa: E402

import peftreg  # noqa: E402
from peftreg import AdapterFileError  # noqa: E402
from peftreg_plugins.loha import LohaConfig  # noqa: E402
from peftreg_plugins.lokr import LokrConfig  # noqa: E402
from peftreg_plugins.oft import OftConfig  # noqa: E402

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def logits(model):
    with torch.no_grad():
        return model(input_ids=tiny_hf.IDS).logits


def randomize(params, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


CASES = [
    pytest.param(tiny_hf.llama, "loha", dict(r=3, alpha=5, target_modules=["q_proj", "down_proj"],
                                             rank_pattern={"down_proj": 2}), 0.2, id="loha-llama"),
    pytest.param(tiny_hf.bert, "loha", dict(r=2, target_modules=["query", "value"],
                                            modules_to_save=["classifier"]), 0.2,
                 id="loha-bert-head"),
    pytest.param(tiny_hf.llama, "lokr", dict(r=1, decompose_both=True,
                                             target_modules=["k_proj", "up_proj"]), 0.3,
                 id="lokr-llama-low-rank"),
    pytest.param(tiny_hf.llama, "lokr", dict(r=8, alpha=4, decompose_factor=4,
                                             target_modules=["q_proj", "o_proj"],
                                             layers_to_transform=[1]), 0.3,
                 id="lokr-llama-full-layer-1"),
    pytest.param(tiny_hf.llama, "oft",
                 dict(oft_block_size=8, target_modules=["q_proj", "down_proj"]), 0.1,
                 id="oft-llama-neumann"),
    pytest.param(tiny_hf.bert, "oft", dict(r=4, oft_block_size=0, block_share=True,
                                           use_cayley_neumann=False,
                                           target_modules=["query", "output.dense"]), 0.1,
                 id="oft-bert-shared-exact"),
    pytest.param(tiny_hf.llama, "oft", dict(oft_block_size=16,
                                            target_modules=["embed_tokens", "k_proj"]), 0.1,
                 id="oft-llama-embedding"),
]
PEFT_CONFIGS = {"loha": "LoHaConfig", "lokr": "LoKrConfig", "oft": "OFTConfig"}
OUR_CONFIGS = {"loha": LohaConfig, "lokr": LokrConfig, "oft": OftConfig}


def peft_model(make, method, fields, scale):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = peft.get_peft_model(make(), getattr(peft, PEFT_CONFIGS[method])(**fields))
    randomize([p for p in model.parameters() if p.requires_grad], seed=1, scale=scale)
    return model.eval()


@pytest.mark.parametrize(("make", "method", "fields", "scale"), CASES)
def test_a_peft_directory_loads_with_peft_outputs(tmp_path, make, method, fields, scale):
    theirs = peft_model(make, method, fields, scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT notes it saves the embedding too
        theirs.save_pretrained(tmp_path)
    expected = logits(theirs)
    ours = peftreg.load(make(), tmp_path)
    assert ours.record("default").config.method == method
    torch.testing.assert_close(logits(ours), expected, **tol("peft_parity", torch.float32))
    assert not torch.allclose(expected, logits(make())), "the adapter changes nothing"
    ours.merge()
    torch.testing.assert_close(logits(ours), expected, **tol("peft_parity", torch.float32))


@pytest.mark.parametrize(("make", "method", "fields", "scale"), CASES)
def test_our_export_loads_in_peft_with_our_outputs(tmp_path, make, method, fields, scale):
    ours = peftreg.adapt(make(), OUR_CONFIGS[method](**fields))
    randomize(our_trainable(ours).values(), seed=2, scale=scale)
    if "modules_to_save" in fields:
        randomize(ours.adapter_parameters("default")[-2:], seed=3, scale=0.5)
    expected = logits(ours.eval())
    # PEFT adds the classifier to modules_to_save by itself for SEQ_CLS: only with a saved head.
    task = "SEQ_CLS" if "modules_to_save" in fields else None
    ours.save_adapter(tmp_path, format="peft", task_type=task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), expected, **tol("peft_parity", torch.float32))
    doc = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert doc["peft_type"] == method.upper()


def _rewrite_config(directory, **changes):
    path = directory / CONFIG_FILE
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def test_oft_bias_training_is_refused_naming_the_key(tmp_path):
    peft_model(tiny_hf.llama, "oft", dict(oft_block_size=8, target_modules=["q_proj"]),
               0.1).save_pretrained(tmp_path)
    _rewrite_config(tmp_path, bias="all")
    with pytest.raises(AdapterFileError, match="bias"):
        peftreg.load(tiny_hf.llama(), tmp_path)


def test_oft_block_size_peft_adjusted_is_refused(tmp_path):
    # 12 divides no width of the model: PEFT picks a nearby divisor (warning) and saves 12.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        theirs = peft_model(tiny_hf.llama, "oft", dict(oft_block_size=12,
                                                       target_modules=["q_proj"]), 0.1)
    theirs.save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError, match="PEFT adjusted the config for this layer"):
        peftreg.load(tiny_hf.llama(), tmp_path)


def test_a_loha_file_missing_a_factor_is_refused_naming_it(tmp_path):
    peft_model(tiny_hf.llama, "loha", dict(r=2, target_modules=["q_proj"]),
               0.2).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    gone = "base_model.model.model.layers.0.self_attn.q_proj.hada_w2_b"
    del tensors[gone]
    save_file(tensors, tmp_path / WEIGHTS_FILE)
    with pytest.raises(AdapterFileError, match=f"{gone}.*missing"):
        peftreg.load(tiny_hf.llama(), tmp_path)


def test_lokr_factors_against_the_config_are_refused(tmp_path):
    peft_model(tiny_hf.llama, "lokr", dict(r=1, decompose_both=True, target_modules=["q_proj"]),
               0.2).save_pretrained(tmp_path)
    _rewrite_config(tmp_path, decompose_both=False)  # W1 would be full, the file has W1a W1b
    with pytest.raises(AdapterFileError, match="not what LoKr's rules give"):
        peftreg.load(tiny_hf.llama(), tmp_path)
