"""End to end with real third-party distributions installed from tests/plugin_dists."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import peftreg
from peftreg import Registry
from peftreg.testing import check_method

pytest.importorskip("peftreg_toy", reason="run `make test` to install tests/plugin_dists")


def test_third_party_method_is_discovered_with_its_distribution():
    registry = Registry.from_entry_points()
    assert "offset" in registry.names()
    source = registry.source("offset")
    assert (source.dist, source.version, source.builtin) == ("peftreg-toy", "0.4.0", False)
    assert registry.source("soft_prompt").dist == "peftreg-toy"


def test_broken_plugins_are_reported_and_others_work():
    registry = Registry.from_entry_points()
    by_entry = {f.entry_point: f for f in registry.failures}
    assert by_entry["broken_import"].dist == "peftreg-broken"
    assert "not_installed_anywhere" in by_entry["broken_import"].reason
    assert "got dict" in by_entry["broken_garbage"].reason
    assert by_entry["fake_lora"].dist == "peftreg-dupe"
    assert "built-in distribution 'peftreg'" in by_entry["fake_lora"].reason
    assert type(registry.get("lora")).__module__ == "peftreg_plugins.lora"
    assert {"lora", "offset"} <= set(registry.names())


def _make_mlp():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def test_third_party_method_end_to_end():
    inputs = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    target = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    config = peftreg.config_for("offset", target_modules=["0", "2"])
    report = check_method(
        config, _make_mlp, inputs,
        lambda m, x: m(x), lambda m, x: torch.nn.functional.mse_loss(m(x), target))
    assert report.trainable_params == 16 + 4
    assert report.max_merge_difference is not None


def test_third_party_input_side_method_end_to_end(make_tiny, token_batch):
    config = peftreg.config_for("soft_prompt", num_virtual_tokens=3)
    n_tokens = token_batch.shape[1]
    report = check_method(
        config, make_tiny, token_batch, lambda m, ids: m(ids)["logits"][:, -n_tokens:],
        lambda m, ids: m(ids, labels=ids)["loss"], starts_equal=False, lr=5e-2, steps=6,
        checks=["gradients", "stacking", "state_dict"])
    assert report.trainable_params == 3 * make_tiny().config.hidden_size
    assert all(v.startswith("refused") for v in report.extra["stacking"].values())
    model = peftreg.adapt(make_tiny(), config)
    mask = torch.ones_like(token_batch)
    out = model(token_batch, attention_mask=mask)["logits"]
    assert out.shape[1] == n_tokens + 3


def test_third_party_bias_needed_to_merge(make_tiny, token_batch):
    model = peftreg.adapt(make_tiny(), peftreg.config_for("offset", target_modules=["o_proj"]))
    with pytest.raises(peftreg.UnsupportedOperationError, match="needs a bias"):
        model.merge()
    assert torch.isfinite(model(token_batch)["logits"]).all()


def test_cli_lists_third_party_and_failures():
    result = subprocess.run([sys.executable, "-m", "peftreg.cli", "methods"], capture_output=True,
                            text=True, timeout=120, check=False, env=_wide_env())
    assert result.returncode == 0, result.stderr
    assert "offset" in result.stdout and "peftreg-toy" in result.stdout
    assert "peftreg-broken" in result.stdout and "failed to load" in result.stdout


def _wide_env():
    return {**os.environ, "COLUMNS": "250"}
