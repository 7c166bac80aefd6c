"""A third-party method's PEFT codec, end to end against the real ``peft`` package.

tests/plugin_dists/peftreg-lntuning is a plugin distribution written from docs/plugins.md alone:
LayerNorm tuning with a PEFT codec (``peft_type`` LN_TUNING). PEFT-written directories of the
method load into peftreg with PEFT's outputs, and the plugin's adapters export to directories
``PeftModel.from_pretrained`` loads with peftreg's outputs. Without the plugin the same
directory is refused, naming its peft_type.
"""

from __future__ import annotations

import importlib.metadata
import warnings

import pytest
import tiny_hf
import torch

peft = pytest.importorskip("peft", reason="peft is not installed")
pytest.importorskip("peftreg_lntuning", reason="run `make test` to install tests/plugin_dists")

import peftreg  # noqa: E402
from peftreg import AdapterFileError, Registry  # noqa: E402
from peftreg.io.peft_format import PEFT_CONFIG_FILE  # noqa: E402

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(7))
TARGETS = ["input_layernorm", "post_attention_layernorm", "norm"]


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def perturb(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "ln_tuning_layers" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)


@pytest.fixture
def registry():
    return Registry.from_entry_points()


@pytest.mark.parametrize("make", [tiny_hf.llama, tiny_hf.bert], ids=["llama", "bert"])
def test_a_peft_written_directory_loads_with_peft_outputs(tmp_path, registry, make):
    targets = TARGETS if make is tiny_hf.llama else ["LayerNorm"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft.LNTuningConfig(target_modules=targets))
    perturb(theirs, seed=1)
    theirs.save_pretrained(tmp_path / "peft")
    expected = logits(theirs)

    base_out = logits(make())
    ours = peftreg.AdaptedModel(make(), registry=registry)
    ours.load_adapter(tmp_path / "peft")
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, base_out), "the adapter does not change the outputs"
    assert ours.record("default").config.method == "ln_tuning"
    ours.merge(["default"])
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=0)
    ours.unmerge(["default"])
    with ours.disable_adapters():
        torch.testing.assert_close(logits(ours), base_out, atol=0, rtol=0)


def test_the_plugins_adapter_exports_to_a_directory_peft_loads(tmp_path, registry):
    ours = peftreg.AdaptedModel(tiny_hf.llama(), registry=registry)
    config = registry.get("ln_tuning").config_cls(target_modules=TARGETS)
    ours.add_adapter("default", config)
    perturb(ours, seed=2)
    expected = logits(ours)
    ours.save_adapter(tmp_path / "export", format="peft")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_hf.llama(), tmp_path / "export")
    torch.testing.assert_close(logits(theirs), expected, atol=1e-5, rtol=0)


def test_without_the_plugin_the_directory_is_refused_by_peft_type(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_hf.llama(), peft.LNTuningConfig(target_modules=["norm"]))
    theirs.save_pretrained(tmp_path / "peft")
    others = [ep for ep in importlib.metadata.entry_points(group="peftreg")
              if ep.dist is None or ep.dist.name != "peftreg-lntuning"]
    builtins_only = Registry.from_entry_points(others)
    assert "ln_tuning" not in builtins_only.names()
    model = peftreg.AdaptedModel(tiny_hf.llama(), registry=builtins_only)
    with pytest.raises(AdapterFileError, match="peft_type 'LN_TUNING' is not one peftreg can load"):
        model.load_adapter(tmp_path / "peft")
    assert (tmp_path / "peft" / PEFT_CONFIG_FILE).is_file()  # nothing destroyed
