"""LoReFT (plugins/loreft.py) against a float64 transcription of the paper's equation.

PEFT has no LoReFT, so the reference is eq. 2 of Wu et al. 2024 written here in plain PyTorch:
forward hooks on the chosen blocks of an unadapted float64 copy of the base replace the hidden
state ``h`` at the chosen positions by ``h + R^T (W h + b - R h)``, with ``R``, ``W``, ``b``
read from the adapter. Outputs agree to float64 rounding; the parameter count is the paper's
``2 r d + r`` per intervened layer; a peftreg-format save and load reproduces the outputs.
"""

from __future__ import annotations

import pytest
import tiny_hf
import torch
from tolerances import tol

import peftreg
from peftreg import ConfigError, ModelFamilyError
from peftreg.testing import ALL_CHECKS, check_method
from peftreg_plugins.lora import LoraConfig
from peftreg_plugins.loreft import LoreftConfig, LoreftIntervention, LoreftMethod

# Stacking is checked below by hand: the kit stacks LoRA on the intervened modules themselves
# (transformer blocks here), which LoRA cannot adapt.
CHECKS = tuple(c for c in ALL_CHECKS if c not in ("compile", "stacking"))


def _randomize(model, seed=0, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters("default"):
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def _reference_logits(make, ours, ids, positions):
    """The paper's equation on a plain float64 copy of the base, with ``ours``' tensors."""
    base = make().double()
    hooks = []
    for path, slot in _hosts(ours):
        adapter = slot.adapters["default"]
        rot = adapter.rotation().detach().double()
        w = adapter.learned_source.weight.detach().double()
        b = adapter.learned_source.bias.detach().double()

        def hook(module, args, out, rot=rot, w=w, b=b):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            length = h.shape[1]
            chosen = range(length) if positions is None else sorted(
                set(range(min(positions[0], length)))
                | set(range(max(length - positions[1], 0), length)))
            for t in chosen:
                ht = h[:, t]
                h[:, t] = ht + (ht @ w.T + b - ht @ rot.T) @ rot
            return (h, *out[1:]) if isinstance(out, tuple) else h

        hooks.append(base.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return base(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()


def _hosts(model):
    from peftreg.plugin import iter_slots

    return [(p, s) for p, s in iter_slots(model.model) if "default" in s.adapter_names()]


@pytest.mark.parametrize(
    ("make", "fields", "positions"),
    [
        (tiny_hf.llama, dict(r=4, positions="f2+l3"), (2, 3)),
        (tiny_hf.llama, dict(r=1, layers=[1], positions="l1"), (0, 1)),
        (tiny_hf.bert, dict(r=3, layers=[0], positions="all"), None),
        (tiny_hf.bert, dict(r=2, positions="f6+l6"), (6, 6)),  # overlapping on 10 tokens
    ],
    ids=["llama-prefix-suffix", "llama-layer-1-last", "bert-all", "bert-overlap"],
)
def test_equals_the_papers_equation_in_float64(make, fields, positions):
    ours = peftreg.adapt(make().double(), LoreftConfig(**fields))
    _randomize(ours)
    with torch.no_grad():
        got = ours(input_ids=tiny_hf.IDS).logits
    expected = _reference_logits(make, ours, tiny_hf.IDS, positions)
    torch.testing.assert_close(got, expected, **tol("loreft.vs_equation", torch.float64))
    with torch.no_grad():
        base_out = make().double()(input_ids=tiny_hf.IDS).logits
    assert not torch.allclose(got, base_out), "the intervention changes nothing"


def test_r_keeps_orthonormal_rows_through_training_and_weight_decay():
    model = peftreg.adapt(tiny_hf.llama(), LoreftConfig(r=4, positions="all"))
    _randomize(model, scale=1.0)
    opt = torch.optim.AdamW(model.adapter_parameters("default"), lr=0.1, weight_decay=0.5)
    for _ in range(5):
        opt.zero_grad()
        tiny_hf.llama_loss(model, tiny_hf.IDS).backward()
        opt.step()
    for _, slot in _hosts(model):
        rot = slot.adapters["default"].rotation()
        torch.testing.assert_close(rot @ rot.T, torch.eye(4), atol=1e-5, rtol=0)


def test_parameter_count_is_2rd_plus_r_per_layer():
    model = tiny_hf.llama()
    family = peftreg.default_registry().describe_model(model)
    config = LoreftConfig(r=4, layers=[0, 1])
    assert LoreftMethod().parameter_count(model, config, family) == 2 * (2 * 4 * 32 + 4)
    adapted = peftreg.adapt(model, config)
    (row,) = adapted.summary().rows
    assert row.adapter_params == 520
    one = LoreftConfig(r=3, layers=[1])
    assert LoreftMethod().parameter_count(tiny_hf.bert(), one, family) == 2 * 3 * 32 + 3


def test_starts_as_the_identity():
    layer = LoreftIntervention(8, 3, (1, 1), torch.device("cpu"), torch.float32)
    h = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer.intervene(h), h, atol=1e-6, rtol=0)


def test_conformance_with_the_extra_checks(make_tiny, token_batch):
    # The reference transformer: its loss stays in float64 for the finite-difference gradient
    # check (transformers' loss functions compute in float32).
    report = check_method(LoreftConfig(r=2, positions="f2+l2"), make_tiny, token_batch,
                          lambda m, ids: m(ids)["logits"],
                          lambda m, ids: m(ids, labels=ids)["loss"], steps=6, lr=3e-2,
                          checks=CHECKS)
    assert report.loss_after < report.loss_before
    assert report.formula_params == 2 * (2 * 2 * 32 + 2)
    assert set(report.extra) == set(CHECKS)


def test_conformance_on_hf_llama():
    report = check_method(LoreftConfig(r=2, positions="all"), tiny_hf.llama, tiny_hf.IDS,
                          tiny_hf.logits, tiny_hf.llama_loss, steps=6, lr=3e-2)
    assert report.loss_after < report.loss_before


_LORA = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
_REFT = LoreftConfig(r=2, positions="all")


def _stacked(order):
    """Tiny Llama with LoRA inside the blocks and LoReFT on them, added in ``order``, with the
    adapters' tensors perturbed away from their init."""
    configs = {"lora": _LORA, "reft": _REFT}
    model = peftreg.adapt(tiny_hf.llama(), configs[order[0]], order[0])
    model.add_adapter(order[1], configs[order[1]])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("reft", "lora"):
            # state_dict tensors share the parameters' storage.
            for _, tensor in sorted(model.adapter_state_dict(name).items()):
                tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.2)
    model.set_active(["lora", "reft"])
    return model


@pytest.mark.parametrize("order", [("lora", "reft"), ("reft", "lora")],
                         ids=["lora-first", "reft-first"])
def test_stacks_with_lora_inside_the_block(order):
    model = _stacked(order)
    model.set_active(["lora"])
    lora_only = tiny_hf.logits(model, tiny_hf.IDS)
    model.set_active(["lora", "reft"])
    both = tiny_hf.logits(model, tiny_hf.IDS)
    assert not torch.allclose(both, lora_only)
    with torch.no_grad():
        model.merge(["lora"])  # on other modules than LoReFT's: unaffected by it
        torch.testing.assert_close(tiny_hf.logits(model, tiny_hf.IDS), both, atol=1e-5, rtol=0)
    with pytest.raises(peftreg.UnsupportedOperationError):
        model.merge(["reft"])
    model.unmerge()
    torch.testing.assert_close(tiny_hf.logits(model, tiny_hf.IDS), both, atol=1e-5, rtol=0)


def test_stacking_order_changes_neither_outputs_nor_saved_names(tmp_path):
    # LoRA added inside a block LoReFT already wraps: the paths (and so the saved tensor names)
    # are the model's own, as if the block were not wrapped.
    lora_first, reft_first = _stacked(("lora", "reft")), _stacked(("reft", "lora"))
    for name in ("lora", "reft"):
        source, target = lora_first.adapter_state_dict(name), reft_first.adapter_state_dict(name)
        assert sorted(source) == sorted(target)
        assert not any(".base." in k for k in target)
        with torch.no_grad():
            for key, tensor in target.items():
                tensor.copy_(source[key])
    expected = tiny_hf.logits(lora_first, tiny_hf.IDS)
    torch.testing.assert_close(tiny_hf.logits(reft_first, tiny_hf.IDS), expected, atol=0, rtol=0)
    reft_first.save_adapter(tmp_path / "lora", "lora")
    reft_first.save_adapter(tmp_path / "reft", "reft")
    loaded = peftreg.load(tiny_hf.llama(), tmp_path / "lora", "lora")
    loaded.load_adapter(tmp_path / "reft", "reft")
    loaded.set_active(["lora", "reft"])
    torch.testing.assert_close(tiny_hf.logits(loaded, tiny_hf.IDS), expected, atol=0, rtol=0)
    reft_first.delete_adapter("reft")  # the outer host goes; LoRA's hosts inside stay and run
    lora_first.set_active(["lora"])
    torch.testing.assert_close(tiny_hf.logits(reft_first, tiny_hf.IDS),
                               tiny_hf.logits(lora_first, tiny_hf.IDS), atol=0, rtol=0)


def test_save_and_load_round_trip(tmp_path):
    model = peftreg.adapt(tiny_hf.bert(), LoreftConfig(r=3, layers=[1], positions="f1+l2",
                                                       modules_to_save=["classifier"]))
    _randomize(model)
    expected = tiny_hf.logits(model, tiny_hf.IDS)
    model.save_adapter(tmp_path)
    loaded = peftreg.load(tiny_hf.bert(), tmp_path)
    assert loaded.record("default").config == model.record("default").config
    torch.testing.assert_close(tiny_hf.logits(loaded, tiny_hf.IDS), expected, atol=0, rtol=0)
    keys = sorted(loaded.adapter_state_dict("default"))
    assert "bert.encoder.layer.1.rotate_layer.parametrizations.weight.original" in keys
    assert "bert.encoder.layer.1.learned_source.bias" in keys


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"positions": "x3"}, r"LoreftConfig.positions: expected 'f<p>\+l<s>'"),
        ({"positions": "f0+l0"}, "LoreftConfig.positions: selects no position"),
        ({"positions": ""}, "LoreftConfig.positions: expected"),
        ({"positions": "f2++l1"}, "LoreftConfig.positions: expected"),
        ({"layers": []}, "LoreftConfig.layers: must not be an empty list"),
        ({"layers": [-1]}, "LoreftConfig.layers: indices must be >= 0"),
        ({"layers": [1, 1]}, "LoreftConfig.layers: indices must not repeat"),
        ({"r": 0}, "LoreftConfig.r: rank must be > 0"),
    ],
    ids=["positions-syntax", "positions-none", "positions-empty", "positions-plus",
         "layers-empty", "layers-negative", "layers-repeat", "rank"],
)
def test_bad_config(fields, message):
    with pytest.raises(ConfigError, match=message):
        LoreftConfig(**fields)


def test_model_dependent_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"LoreftConfig.layers: indices \[2\] out of range for "
                                          r"a model with 2 layers"):
        peftreg.adapt(tiny_hf.llama(), LoreftConfig(layers=[0, 2]))
    with pytest.raises(ConfigError, match=r"LoreftConfig.r: must be at most the hidden size 32"):
        peftreg.adapt(tiny_hf.llama(), LoreftConfig(r=33))
    with pytest.raises(ModelFamilyError, match=r"LoreftConfig\.layers"):
        peftreg.adapt(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoreftConfig())
