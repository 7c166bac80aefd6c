"""DoRA and QDoRA (plugins/dora.py): equal to HF PEFT's ``LoraConfig(use_dora=True)``, the
row norm without the dense ``W + s B A`` against the dense formula, merging, and the kit."""

from __future__ import annotations

import math

import pytest
import tiny_hf
import torch
from torch import nn

import peftreg
from peftreg import ConfigError
from peftreg.plugin import base_access, dense_linear
from peftreg.testing import ALL_CHECKS, check_method
from peftreg_plugins import dora
from peftreg_plugins.dora import DoraConfig, DoraLinear, DoraMethod, QDoraConfig, QDoraMethod
from peftreg_plugins.qlora import quantize_base

peft = pytest.importorskip("peft", reason="peft is not installed")

PEFT_PREFIX = "base_model.model."


def _forward(model, ids):
    return model(ids)["logits"]


def _loss(model, ids):
    return model(ids, labels=ids)["loss"]


def _family(model):
    return peftreg.default_registry().describe_model(model)


# -- against PEFT -------------------------------------------------------------------------------

CASES = [
    pytest.param(tiny_hf.llama, tiny_hf.llama_loss, ["q_proj", "v_proj", "down_proj"],
                 {"r": 4, "lora_alpha": 8}, id="llama"),
    pytest.param(tiny_hf.llama, tiny_hf.llama_loss, ["k_proj", "o_proj"],
                 {"r": 3, "lora_alpha": 5, "use_rslora": True}, id="llama-rslora"),
    pytest.param(tiny_hf.bert, tiny_hf.bert_loss, ["query", "value", "output.dense"],
                 {"r": 4, "lora_alpha": 16}, id="bert-bias"),
    pytest.param(tiny_hf.llama, tiny_hf.llama_loss, ["embed_tokens", "v_proj"],
                 {"r": 3, "lora_alpha": 6}, id="llama-embedding"),
    pytest.param(tiny_hf.bert, tiny_hf.bert_loss, ["word_embeddings", "query"],
                 {"r": 2, "lora_alpha": 8}, id="bert-embedding"),
]


def _peft_dora(make, targets, fields):
    model = peft.get_peft_model(make(), peft.LoraConfig(use_dora=True, target_modules=targets,
                                                        **fields))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * noise)  # magnitude != row norm
            else:
                p.add_(0.2 * noise)  # B != 0
    return model.eval()


def _peft_trainable(model):
    """PEFT's trainable tensors under the keys peftreg saves them with."""
    names = {n.removeprefix(PEFT_PREFIX).replace(".default", ""): p
             for n, p in model.named_parameters() if p.requires_grad}
    # PEFT's magnitude is a module's ``weight`` in memory, saved without the ``.weight``.
    return {n.removesuffix(".weight") if "lora_magnitude_vector" in n else n: p
            for n, p in names.items()}


def _ours_trainable(model):
    return {n.replace(".adapters.default", ""): p
            for n, p in model.model.named_parameters() if p.requires_grad}


def _pair(make, targets, fields):
    theirs = _peft_dora(make, targets, fields)
    ours = peftreg.adapt(make(), DoraConfig(target_modules=targets, **fields)).eval()
    saved = {k.removeprefix(PEFT_PREFIX): v
             for k, v in peft.get_peft_model_state_dict(
                 theirs, save_embedding_layers=False).items()}
    state = ours.adapter_state_dict("default")
    assert {k: tuple(v.shape) for k, v in state.items()} == \
        {k: tuple(v.shape) for k, v in saved.items()}
    with torch.no_grad():
        for key, tensor in state.items():
            tensor.copy_(saved[key])
    return theirs, ours


@pytest.mark.parametrize(("make", "loss", "targets", "fields"), CASES)
def test_logits_merge_and_gradients_equal_peft(make, loss, targets, fields):
    theirs, ours = _pair(make, targets, fields)
    ids = tiny_hf.IDS
    with torch.no_grad():
        expected, got = tiny_hf.logits(theirs, ids), tiny_hf.logits(ours, ids)
        base = tiny_hf.logits(make(), ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, base, atol=1e-4), "the adapter must change the outputs"

    loss(theirs, ids).backward()
    loss(ours, ids).backward()
    their_params, our_params = _peft_trainable(theirs), _ours_trainable(ours)
    assert set(their_params) == set(our_params)
    for name, p in our_params.items():
        torch.testing.assert_close(p.grad, their_params[name].grad, atol=1e-5, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert any(float(p.grad.abs().max()) > 0 for n, p in our_params.items()
               if "magnitude" in n)

    with torch.no_grad():
        theirs.merge_adapter()
        ours.merge()
        torch.testing.assert_close(tiny_hf.logits(ours, ids), tiny_hf.logits(theirs, ids),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(tiny_hf.logits(ours, ids), got, atol=1e-5, rtol=0)


def test_dropout_rescales_the_dropped_out_base_part(monkeypatch):
    # PEFT's formula with dropout active: base(x) + (m/n - 1) W d(x) + (m/n) s B A d(x).
    base = nn.Linear(12, 7)
    layer = DoraLinear(base_access(base), 3, 0.5, 0.4, "kaiming", None)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(1.5)
    monkeypatch.setattr(dora, "new_dropout_seed", lambda: 1234)
    x = torch.randn(5, 12)
    layer.train()
    got = layer.adapt_output(x, base(x))
    dropped = dora.lora_dropout(x, 0.4, 1234)
    w, a, b = base.weight, layer.lora_A.weight, layer.lora_B.weight
    scale = layer.lora_magnitude_vector / (w + 0.5 * b @ a).norm(dim=1)
    expected = base(x) + (scale - 1) * (dropped @ w.T) + scale * 0.5 * (dropped @ a.T @ b.T)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(dropped, x)


# -- the row norm -------------------------------------------------------------------------------

@pytest.mark.parametrize(("out_f", "in_f", "r", "zero_b"), [
    (7, 13, 3, False), (33, 5, 1, False), (1, 17, 4, False), (19, 11, 2, True), (64, 48, 8, False),
])
def test_row_norm_equals_the_dense_formula_in_float64(out_f, in_f, r, zero_b):
    gen = torch.Generator().manual_seed(out_f * 100 + in_f)
    base = nn.Linear(in_f, out_f, bias=True).double()
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=gen, dtype=torch.float64))
    layer = DoraLinear(base_access(base), r, 1.7, 0.0, "kaiming", None)
    if not zero_b:
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(out_f, r, generator=gen, dtype=torch.float64))
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    dense = (base.weight.detach() + 1.7 * b @ a).norm(dim=1)
    torch.testing.assert_close(layer.weight_norm(), dense, atol=1e-12, rtol=1e-12)


def test_row_norm_in_float32_and_with_cancellation():
    gen = torch.Generator().manual_seed(3)
    base = nn.Linear(21, 9, bias=False)
    layer = DoraLinear(base_access(base), 2, 0.8, 0.0, "kaiming", None)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(9, 2, generator=gen))
        # Row 0 of W + s B A is exactly zero: the expanded square cancels to rounding noise.
        base.weight[0] = -0.8 * layer.lora_B.weight[0] @ layer.lora_A.weight
    w, a, b = (t.detach().double() for t in (base.weight, layer.lora_A.weight,
                                             layer.lora_B.weight))
    dense = (w + 0.8 * b @ a).norm(dim=1)
    norm = layer.weight_norm()
    assert norm.dtype == torch.float32
    assert bool(torch.isfinite(norm).all()) and bool((norm > 0).all())
    torch.testing.assert_close(norm[1:].double(), dense[1:], atol=1e-5, rtol=1e-5)
    assert float(norm[0]) < 1e-2 * float(dense[1:].min())


def test_row_sq_cache_follows_a_rewritten_base():
    base = nn.Linear(6, 4)
    layer = DoraLinear(base_access(base), 2, 1.0, 0.0, "kaiming", None)
    first = layer.weight_norm().clone()
    with torch.no_grad():
        base.weight.mul_(2)
    torch.testing.assert_close(layer.weight_norm(), 2 * first)


# -- merging ------------------------------------------------------------------------------------

def test_merge_equals_the_dense_formula_and_unmerge_restores():
    gen = torch.Generator().manual_seed(9)
    base = nn.Linear(10, 6)
    layer = DoraLinear(base_access(base), 3, 0.6, 0.0, "kaiming", None)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(6, 3, generator=gen))
        layer.lora_magnitude_vector.mul_(torch.rand(6, generator=gen) + 0.5)
    original = base.weight.detach().clone()
    adapted = original + 0.6 * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    expected = (layer.lora_magnitude_vector.detach() / adapted.norm(dim=1))[:, None] * adapted
    x = torch.randn(4, 10)
    unmerged = layer.adapt_output(x, base(x)).detach()
    with torch.no_grad():
        layer.merge_into(base)
    torch.testing.assert_close(base.weight.detach(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(base(x).detach(), unmerged, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layer.unmerge_from(base)
    torch.testing.assert_close(base.weight.detach(), original, atol=1e-6, rtol=0)


# -- the conformance kit ------------------------------------------------------------------------

def _dense_reference(model, ids):
    """The paper's DoRA with the dense ``||W + s B A||`` per row, detached (section 4.3); for an
    embedding table the norm runs over each column (PEFT's orientation)."""
    layers = [m for m in model.modules() if isinstance(m, DoraLinear | dora.DoraEmbedding)]

    def dense_norm(layer):
        def norm():
            if isinstance(layer, dora.DoraEmbedding):
                a, b = layer.lora_embedding_A, layer.lora_embedding_B
                w = layer.base_view.weight(a.dtype)
                return (w + layer.scaling * (b @ a).T).norm(dim=0).detach()
            w = layer.base_view.weight(layer.lora_A.weight.dtype)
            delta = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
            return (w + delta).norm(dim=1).detach()
        return norm

    # The forward reads the norm through its per-update cache: replace that.
    for layer in layers:
        layer.cached_norm = dense_norm(layer)
    try:
        return _loss(model, ids)
    finally:
        for layer in layers:
            del layer.cached_norm


@pytest.mark.parametrize("config", [
    DoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    DoraConfig(r=2, lora_alpha=6, target_modules="all-linear", init_lora_weights="gaussian"),
    DoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "o_proj"]),
], ids=["qv-down", "all-linear", "embedding"])
def test_conformance(config, make_tiny, token_batch):
    report = check_method(config, make_tiny, token_batch, _forward, _loss, steps=4,
                          checks=ALL_CHECKS, reference_loss=_dense_reference)
    assert report.trainable_params == report.formula_params
    assert report.loss_after < report.loss_before
    assert report.extra["gradients"] < 1e-5
    stacking = report.extra["stacking"]
    assert stacking["under test first"] == "merged"
    assert "reads the base weights" in stacking["partner first"]


def test_parameter_count_closed_form(make_tiny, tiny_config):
    c = tiny_config
    h, f, kv = c.hidden_size, c.intermediate_size, c.num_kv_heads * c.head_dim
    per_layer = (4 * (h + h) + h) + (4 * (h + kv) + kv) + (2 * (f + h) + h)  # q, v, down
    model = make_tiny()
    config = DoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"down_proj": 2})
    assert DoraMethod().parameter_count(model, config, _family(model)) == \
        c.num_layers * per_layer
    adapted = peftreg.adapt(make_tiny(), config)
    assert adapted.summary().rows[0].adapter_params == c.num_layers * per_layer


# -- QDoRA --------------------------------------------------------------------------------------

def _qdora_pair(make_tiny, config):
    quantized = make_tiny()
    quantize_base(quantized, config, _family(quantized))
    dense = make_tiny()
    for path, module in list(quantized.named_modules()):
        if isinstance(module, peftreg.plugin.Linear4bit):
            parent, _, leaf = path.rpartition(".")
            setattr(dense.get_submodule(parent), leaf, dense_linear(module))
    ours = peftreg.adapt(quantized, config)
    reference = peftreg.adapt(dense, DoraConfig(
        r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        state, ref_state = ours.adapter_state_dict("default"), \
            reference.adapter_state_dict("default")
        for key, tensor in state.items():
            noise = torch.randn(tensor.shape, generator=gen)
            tensor.add_(0.2 * noise if "lora_" in key and "magnitude" not in key else
                        0.3 * noise * tensor)
            ref_state[key].copy_(tensor)
    return ours.eval(), reference.eval()


def test_qdora_equals_dora_on_the_dequantized_base(make_tiny, token_batch):
    config = QDoraConfig(r=4, compute_dtype="float32", quantize="targets",
                         target_modules=["q_proj", "v_proj", "down_proj"])
    ours, reference = _qdora_pair(make_tiny, config)
    got, expected = _forward(ours, token_batch), _forward(reference, token_batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    _loss(ours, token_batch).backward()
    _loss(reference, token_batch).backward()
    theirs = _ours_trainable(reference)
    for name, p in _ours_trainable(ours).items():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # Between steps the adapter holds vectors, never a dense (out x in) weight.
    for module in ours.modules():
        if isinstance(module, DoraLinear):
            out_f, in_f = module.base_view.shape
            held = [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
            held += [v[1] for v in [module._row_sq] if v is not None]
            assert all(t.numel() < out_f * in_f for t in held)
            assert module.base_view.quantized
    with torch.no_grad():
        ours.merge()
        torch.testing.assert_close(_forward(ours, token_batch), got, atol=1e-5, rtol=1e-5)


def test_qdora_conformance(make_tiny, token_batch):
    config = QDoraConfig(r=4, compute_dtype="float32", quantize="targets",
                         target_modules=["q_proj", "v_proj"])

    def make():
        model = make_tiny()
        quantize_base(model, config, _family(model))
        return model

    report = check_method(config, make, token_batch, _forward, _loss, steps=4, atol=1e-4,
                          checks=["gradients", "stacking", "state_dict"],
                          reference_loss=_dense_reference)
    assert report.trainable_params == report.formula_params
    assert report.extra["gradients"] < 1e-5
    assert QDoraMethod.capabilities.quantized_base


# -- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("cls", "fields", "message"), [
    (DoraConfig, {"r": 0}, r"DoraConfig.r: rank must be > 0"),
    (DoraConfig, {"lora_alpha": math.inf}, "lora_alpha: must be a finite number"),
    (DoraConfig, {"lora_dropout": 1.0}, "lora_dropout"),
    (DoraConfig, {"init_lora_weights": "pissa"}, "init_lora_weights"),
    (QDoraConfig, {"blocksize": 48}, "blocksize: must be a power of two"),
    (QDoraConfig, {"compute_dtype": "float64"}, "compute_dtype"),
], ids=["rank", "alpha", "dropout", "init", "blocksize", "compute-dtype"])
def test_bad_configs(cls, fields, message):
    with pytest.raises(ConfigError, match=message):
        cls(**fields)


def test_embedding_parameter_count_and_magnitude_shape():
    # An embedding's magnitude has one entry per dimension: DoRA normalises the table's columns.
    model = tiny_hf.llama()
    config = DoraConfig(r=3, target_modules=["embed_tokens"])
    vocab, dim = model.model.embed_tokens.weight.shape
    assert DoraMethod().parameter_count(model, config, _family(model)) == \
        3 * (vocab + dim) + dim
    adapted = peftreg.adapt(model, config)
    layer = adapted.model.model.embed_tokens.adapters["default"]
    assert isinstance(layer, dora.DoraEmbedding)
    table = layer.base_view.weight()
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), table.norm(dim=0))
    assert adapted.summary().rows[0].adapter_params == 3 * (vocab + dim) + dim


# -- PEFT's directory format (the DoRA codec) ---------------------------------------------------

@pytest.mark.parametrize(("make", "targets"), [
    (tiny_hf.llama, ["q_proj", "v_proj", "down_proj"]),
    (tiny_hf.bert, ["query", "value"]),
    (tiny_hf.llama, ["q_proj", "embed_tokens"]),
], ids=["llama", "bert", "llama-embedding"])
def test_a_peft_dora_directory_loads_as_dora(tmp_path, make, targets):
    theirs = _peft_dora(make, targets, {"r": 4, "lora_alpha": 8,
                                        "rank_pattern": {targets[1]: 2}})
    theirs.save_pretrained(tmp_path)
    ours = peftreg.load(make(), tmp_path)
    assert ours.record("default").config.method == "dora"
    with torch.no_grad():
        torch.testing.assert_close(tiny_hf.logits(ours, tiny_hf.IDS),
                                   tiny_hf.logits(theirs, tiny_hf.IDS), atol=1e-5, rtol=0)


def test_a_dora_export_loads_in_peft(tmp_path):
    config = DoraConfig(r=3, lora_alpha=6, use_rslora=True,
                        target_modules=["q_proj", "k_proj", "up_proj", "embed_tokens"])
    ours = peftreg.adapt(tiny_hf.llama(), config).eval()
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in ours.adapter_parameters("default"):
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    ours.save_adapter(tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_hf.llama(), tmp_path).eval()
    assert theirs.peft_config["default"].use_dora
    with torch.no_grad():
        expected = tiny_hf.logits(ours, tiny_hf.IDS)
        torch.testing.assert_close(tiny_hf.logits(theirs, tiny_hf.IDS), expected, atol=1e-5,
                                   rtol=0)
        assert not torch.allclose(expected, tiny_hf.logits(tiny_hf.llama(), tiny_hf.IDS),
                                  atol=1e-4)


def test_a_peft_dora_directory_without_magnitudes_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    theirs = _peft_dora(tiny_hf.llama, ["q_proj"], {"r": 2})
    theirs.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if "magnitude" not in k}
    save_file(tensors, weights)
    with pytest.raises(peftreg.AdapterFileError, match="lora_magnitude_vector"):
        peftreg.load(tiny_hf.llama(), tmp_path)


def test_qdora_forward_and_backward_never_dequantize_the_weight(make_tiny, token_batch,
                                                               monkeypatch):
    if not peftreg.plugin.has_extension():
        pytest.skip("without the compiled NF4 kernels the 4-bit product itself dequantizes")
    config = QDoraConfig(r=4, compute_dtype="float32", target_modules=["q_proj", "down_proj"])
    model = peftreg.adapt(make_tiny(), config)
    _loss(model, token_batch).backward()  # the row norms ||W_i||^2 are cached from here on
    calls = []
    original = peftreg.plugin.Linear4bit.dequantize

    def counting(self, dtype=None):
        calls.append(self)
        return original(self, dtype)

    monkeypatch.setattr(peftreg.plugin.Linear4bit, "dequantize", counting)
    optimizer = torch.optim.SGD(model.adapter_parameters("default"), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        _loss(model, token_batch).backward()
        optimizer.step()
    assert calls == []


def test_a_base_built_in_inference_mode(token_batch, make_tiny):
    # Inference tensors have no version counter; the row-norm cache must still work.
    with torch.inference_mode():
        model = make_tiny()
    adapted = peftreg.adapt(model, DoraConfig(r=2, target_modules=["q_proj"])).eval()
    with torch.inference_mode():
        first = _forward(adapted, token_batch)
        assert torch.equal(_forward(adapted, token_batch), first)


@pytest.mark.parametrize("case", ["float32-adapters-on-bf16", "qdora-bf16-compute"])
def test_mixed_precision_trains(make_tiny, token_batch, case):
    if case == "qdora-bf16-compute":
        model = peftreg.adapt(make_tiny(), QDoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        expected = torch.bfloat16
    else:
        model = peftreg.adapt(make_tiny().to(torch.bfloat16), DoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], adapter_dtype="float32"))
        expected = torch.float32
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert adapter.lora_magnitude_vector.dtype == adapter.lora_A.weight.dtype == expected
    optimizer = torch.optim.AdamW(model.adapter_parameters("default"), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = _loss(model, token_batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


# -- QDoRA in PEFT's format ---------------------------------------------------------------------

QDORA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _quantized_llama(config):
    model = tiny_hf.llama()
    quantize_base(model, config, _family(model))
    return model


def _dequantized_llama(config):
    """The float model PEFT checks against: every 4-bit layer replaced by its dense values."""
    quantized, dense = _quantized_llama(config), tiny_hf.llama()
    for path, module in list(quantized.named_modules()):
        if isinstance(module, peftreg.plugin.Linear4bit):
            parent, _, leaf = path.rpartition(".")
            setattr(dense.get_submodule(parent), leaf, dense_linear(module))
    return dense


def test_qdora_round_trip_through_peft(tmp_path):
    # PEFT writes QDoRA as DoRA's document; the 4-bit base is the model's business. Out: QDoRA
    # exports it, PEFT loads it on the dequantized base with equal logits. In: PEFT's directory
    # loads onto a model quantized first, as DoRA on its 4-bit layers, with equal logits again.
    config = QDoraConfig(r=4, lora_alpha=8, compute_dtype="float32", quantize="targets",
                         target_modules=QDORA_TARGETS)
    ours = peftreg.adapt(_quantized_llama(config), config).eval()
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen)
                p.add_(0.3 * noise * p if "magnitude" in name else 0.2 * noise)
    ours.save_adapter(tmp_path / "ours", format="peft")
    theirs = peft.PeftModel.from_pretrained(_dequantized_llama(config), tmp_path / "ours").eval()
    assert theirs.peft_config["default"].use_dora
    with torch.no_grad():
        expected = tiny_hf.logits(ours, tiny_hf.IDS)
        torch.testing.assert_close(tiny_hf.logits(theirs, tiny_hf.IDS), expected, atol=1e-5,
                                   rtol=0)
        assert not torch.allclose(expected, tiny_hf.logits(_quantized_llama(config),
                                                           tiny_hf.IDS), atol=1e-4)

    theirs.save_pretrained(tmp_path / "theirs")
    loaded = peftreg.load(_quantized_llama(config), tmp_path / "theirs")
    assert loaded.record("default").config.method == "dora"
    layers = [m for m in loaded.modules() if isinstance(m, DoraLinear)]
    assert len(layers) == 2 * len(QDORA_TARGETS)
    assert all(layer.base_view.quantized for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(tiny_hf.logits(loaded, tiny_hf.IDS),
                                   tiny_hf.logits(theirs, tiny_hf.IDS), atol=1e-5, rtol=0)


def test_a_dora_document_is_read_by_dora_not_qdora():
    doc = {"peft_type": "LORA", "use_dora": True}
    assert dora.DoraPeftCodec().claims(doc)
    assert not dora.QDoraPeftCodec().claims(doc)
