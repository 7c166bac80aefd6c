"""Promise 6 (our part): a NaN gradient is reported with the adapter and layer name when the
user asks for checks (``peftreg.diagnostics``)."""

from __future__ import annotations

import warnings

import pytest
import torch

import peftreg
from peftreg.diagnostics import (
    NonFiniteGradientError,
    check_gradients,
    find_nonfinite_gradients,
    watch_gradients,
)
from peftreg_plugins.ia3 import IA3Config
from peftreg_plugins.lora import LoraConfig

LAYER = "layers.1.self_attn.q_proj"


@pytest.fixture
def model(make_tiny):
    model = peftreg.adapt(make_tiny(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("other", IA3Config(target_modules=["k_proj"], feedforward_modules=None),
                      activate=False)
    return model


def _poison(model, adapter, layer, parameter, count, on_call):
    """Put ``count`` NaNs into one parameter's gradient on its ``on_call``-th backward pass
    (a hook registered before the watch, so the watch sees the poisoned gradient)."""
    param = dict(model.model.get_submodule(layer).adapters[adapter].named_parameters())[parameter]
    calls = []

    def hook(grad):
        calls.append(1)
        if len(calls) == on_call:
            grad = grad.clone()
            grad.view(-1)[:count] = float("nan")
        return grad

    param.register_hook(hook)


def _step(model, batch):
    loss = model(batch)["logits"].float().pow(2).mean()
    loss.backward()
    return loss


def test_nan_gradient_names_adapter_layer_parameter_and_step(model, token_batch):
    _poison(model, "default", LAYER, "lora_A.weight", 3, on_call=4)
    with watch_gradients(model) as watch:
        for _ in range(3):
            _step(model, token_batch)
        with pytest.raises(NonFiniteGradientError) as info:
            _step(model, token_batch)
    assert str(info.value) == (f"adapter 'default' layer '{LAYER}' parameter lora_A.weight: "
                               "3 NaN values in gradient at step 4")
    assert len(watch.findings) == 1
    # The hooks are gone after the block: the same poison passes silently.
    _poison(model, "default", LAYER, "lora_A.weight", 1, on_call=1)
    model.zero_grad()
    _step(model, token_batch)


def test_clean_training_reports_nothing_and_counts_steps(model, token_batch):
    with watch_gradients(model) as watch:
        for _ in range(2):
            _step(model, token_batch)
    assert watch.findings == []
    assert set(watch.steps.values()) == {2}
    # Only the active, trainable adapter was watched (the inactive IA3 one gets no gradient).
    assert {key[0] for key in watch.steps} == {"default"}
    assert len(watch.steps) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_record_and_warn_modes_keep_training(model, token_batch):
    _poison(model, "default", "layers.0.self_attn.v_proj", "lora_B.weight", 2, on_call=1)
    with watch_gradients(model, on_error="record") as watch:
        _step(model, token_batch)
    (finding,) = watch.findings
    assert (finding.adapter, finding.layer, finding.parameter, finding.nan, finding.step) == (
        "default", "layers.0.self_attn.v_proj", "lora_B.weight", 2, 1)
    _poison(model, "default", LAYER, "lora_B.weight", 1, on_call=1)
    with watch_gradients(model, on_error="warn"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _step(model, token_batch)
    assert any(f"layer '{LAYER}' parameter lora_B.weight: 1 NaN" in str(w.message) for w in seen)


def test_infinite_activations_give_a_named_report(model, token_batch):
    """A real overflow (not a poisoned hook): inf in a base weight reaches the adapter grads."""
    with torch.no_grad():
        model.model.get_submodule(LAYER).base.weight[0, 0] = float("inf")
    with watch_gradients(model, on_error="record") as watch:
        _step(model, token_batch)
    assert watch.findings, "an infinite weight must give non-finite adapter gradients"
    assert all(f.adapter == "default" and (f.nan or f.inf) for f in watch.findings)
    with pytest.raises(NonFiniteGradientError, match="adapter 'default' layer 'layers"):
        check_gradients(model)


def test_check_after_backward(model, token_batch):
    _step(model, token_batch)
    assert find_nonfinite_gradients(model) == []
    check_gradients(model)
    param = model.model.get_submodule(LAYER).adapters["default"].lora_A.weight
    param.grad[0, :5] = float("inf")
    (bad,) = find_nonfinite_gradients(model)
    assert str(bad) == (f"adapter 'default' layer '{LAYER}' parameter lora_A.weight: 5 inf "
                        "values in gradient")
    with pytest.raises(NonFiniteGradientError, match="5 inf"):
        check_gradients(model, adapters=["default"])
    assert find_nonfinite_gradients(model, adapters=["other"]) == []


def test_bad_mode_is_refused(model):
    with pytest.raises(ValueError, match="on_error"):
        watch_gradients(model, on_error="ignore")
