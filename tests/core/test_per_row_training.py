"""Training several LoRA adapters in one batch: each gets the gradient of its own rows."""

from __future__ import annotations

import pytest
import torch

import peftreg
from peftreg import ops, row_adapters
from peftreg_plugins.lora import LoraConfig

NAMES = ["a", "b", "c"]


def _model(make_tiny):
    torch.manual_seed(0)
    model = peftreg.adapt(make_tiny(), LoraConfig(r=4, target_modules="all-linear"), "a")
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"]),
                      trainable=True)
    model.add_adapter("c", LoraConfig(r=2, use_rslora=True, target_modules=["v_proj"]),
                      trainable=True)
    with torch.no_grad():
        for name in NAMES:
            for p in model.adapter_parameters(name):
                p.normal_(0.0, 0.2)
    return model.train()


def _loss(model, ids, **kwargs):
    return model(ids, labels=ids, **kwargs)["loss"]


@pytest.mark.parametrize("mode", ["compiled", "reference"])
@pytest.mark.parametrize("rows", [["a", "b", "c", None, "a", "b"], ["c", "c", "a", "b", "b", "a"]])
def test_each_adapter_gets_the_gradient_of_training_it_alone_on_its_rows(make_tiny, rows, mode):
    """``compiled`` takes peftreg::lora_grouped_add, ``reference`` its plain-PyTorch path."""
    if mode == "compiled" and not ops.has_extension():
        pytest.skip("compiled extension unavailable")
    ids = torch.randint(0, 61, (len(rows), 9), generator=torch.Generator().manual_seed(1))
    model = _model(make_tiny)
    with ops.kernels(mode):
        _check_each_adapter_alone(model, ids, rows)


def _check_each_adapter_alone(model, ids, rows):
    # The batch loss is a mean over rows of per-row losses; sum per-row losses instead, so the
    # reference is a plain sum of each adapter's own rows' losses.
    total = sum(_loss(model, ids[i:i + 1], adapter_names=[rows[i]]) for i in range(len(rows)))
    total.backward()
    joint = {n: [p.grad.clone() for p in model.adapter_parameters(n)] for n in NAMES}

    model.zero_grad(set_to_none=True)
    batch = model(ids, adapter_names=rows)["logits"]
    per_row = torch.nn.functional.cross_entropy(
        batch[:, :-1].reshape(-1, batch.shape[-1]), ids[:, 1:].reshape(-1),
        reduction="none").reshape(len(rows), -1).mean(1)
    per_row.sum().backward()
    batched = {n: [p.grad for p in model.adapter_parameters(n)] for n in NAMES}
    for name in NAMES:
        for got, want in zip(batched[name], joint[name], strict=True):
            if name in rows:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            else:
                assert got is None or got.abs().max() == 0

    alone = {}
    for name in NAMES:
        own = [i for i, r in enumerate(rows) if r == name]
        model.zero_grad(set_to_none=True)
        model.set_active(name)
        sum(_loss(model, ids[i:i + 1]) for i in own).backward()
        alone[name] = [p.grad for p in model.adapter_parameters(name)]
        for got, want in zip(batched[name], alone[name], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_training_step_moves_only_the_rows_adapters(make_tiny):
    model = _model(make_tiny)
    ids = torch.randint(0, 61, (4, 9), generator=torch.Generator().manual_seed(2))
    before = {n: [p.detach().clone() for p in model.adapter_parameters(n)] for n in NAMES}
    optimizer = torch.optim.SGD([p for n in NAMES for p in model.adapter_parameters(n)], lr=0.1)
    _loss(model, ids, adapter_names=["a", "b", "a", None]).backward()
    optimizer.step()
    moved = {n: any(not torch.equal(p, q) for p, q in zip(model.adapter_parameters(n),
                                                         before[n], strict=True))
             for n in NAMES}
    assert moved == {"a": True, "b": True, "c": False}


# --- LoRA dropout: each row gets its own adapter's dropout ------------------------------------

DROPOUT = {"a": 0.3, "b": 0.6, "c": 0.0}


def _dropout_model(make_tiny):
    torch.manual_seed(0)
    model = peftreg.adapt(make_tiny(), LoraConfig(r=4, lora_dropout=DROPOUT["a"],
                                                  target_modules="all-linear"), "a")
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=16, lora_dropout=DROPOUT["b"],
                                      target_modules=["q_proj", "o_proj"]), trainable=True)
    model.add_adapter("c", LoraConfig(r=2, target_modules=["v_proj"]), trainable=True)
    with torch.no_grad():
        for name in NAMES:
            for p in model.adapter_parameters(name):
                p.normal_(0.0, 0.2)
    return model.train()


class _Masks:
    """Records the keep mask per-row training draws at each layer, and replays it on an
    adapter trained alone (its LoRA dropout given the recorded mask of its own rows)."""

    def __init__(self, model, monkeypatch):
        from peftreg.host import AdapterHost
        from peftreg_plugins import lora as lora_plugin

        self.by_host: dict[int, torch.Tensor] = {}
        self.current = None
        self.own: list[int] = []
        for module in model.modules():
            if isinstance(module, AdapterHost):
                module.register_forward_pre_hook(self._enter)
        draw = row_adapters._keep_mask

        def recording(x, p_row):
            keep = draw(x, p_row)
            self.by_host[id(self.current)] = keep
            return keep

        def replaying(x, p, seed):
            keep = self.by_host[id(self.current)][self.own]
            return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros_like(x))

        monkeypatch.setattr(row_adapters, "_keep_mask", recording)
        # Alone: the plain LoRA path, whose dropout is the replayed mask.
        monkeypatch.setattr(lora_plugin, "lora_dropout", replaying)
        monkeypatch.setattr(lora_plugin.LoraLinear, "fused_forward", lambda *a: None)

    def _enter(self, module, args):
        self.current = module


def _per_row_losses(logits, ids):
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
        reduction="none").reshape(ids.shape[0], -1).mean(1)


@pytest.mark.parametrize("mode", ["compiled", "reference"])
def test_dropout_per_row_equals_each_adapter_alone_with_the_same_masks(make_tiny, monkeypatch,
                                                                       mode):
    """Adapters with p 0.3, 0.6 and 0 in one batch: logits and gradients equal training each
    adapter alone on its rows with the masks the batch drew for those rows."""
    if mode == "compiled" and not ops.has_extension():
        pytest.skip("compiled extension unavailable")
    rows = ["a", "b", "c", None, "a", "b", "b"]
    ids = torch.randint(0, 61, (len(rows), 9), generator=torch.Generator().manual_seed(1))
    model = _dropout_model(make_tiny)
    masks = _Masks(model, monkeypatch)
    torch.manual_seed(3)
    with ops.kernels(mode):
        logits = model(ids, adapter_names=rows)["logits"]
    _per_row_losses(logits, ids).sum().backward()
    batched = {n: [p.grad.clone() for p in model.adapter_parameters(n)] for n in NAMES}
    assert masks.by_host, "no dropout mask was drawn"

    for name in NAMES:
        masks.own = [i for i, r in enumerate(rows) if r == name]
        model.zero_grad(set_to_none=True)
        model.set_active(name)
        alone = model(ids[masks.own])["logits"]
        torch.testing.assert_close(logits[masks.own], alone, atol=1e-5, rtol=1e-4)
        _per_row_losses(alone, ids[masks.own]).sum().backward()
        for got, want in zip(batched[name], (p.grad for p in model.adapter_parameters(name)),
                             strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_each_row_drops_with_its_own_adapters_p(make_tiny, monkeypatch):
    """At a layer holding a (p 0.3) and b (p 0.6), each row's share of dropped inputs is its
    adapter's p; rows of no adapter keep everything. Without gradients (training mode) the
    same dropout runs, through the inference op."""
    rows = ["a", "b", None, "a", "b", None]
    ids = torch.randint(0, 61, (len(rows), 40), generator=torch.Generator().manual_seed(2))
    model = _dropout_model(make_tiny)
    masks = _Masks(model, monkeypatch)
    q_proj = next(m for name, m in model.named_modules() if name.endswith("0.self_attn.q_proj"))
    for grad in (True, False):
        masks.by_host.clear()
        with torch.set_grad_enabled(grad):
            model(ids, adapter_names=rows)
        dropped = 1.0 - masks.by_host[id(q_proj)].float().mean(dim=(1, 2))
        for i, name in enumerate(rows):
            if name is None:
                assert dropped[i] == 0
            else:
                assert abs(dropped[i].item() - DROPOUT[name]) < 0.08, (i, name, dropped[i])


def test_no_dropout_in_eval_mode(make_tiny, monkeypatch):
    """Eval mode: no mask is drawn, and the gradients are those of each adapter alone."""
    def no_draw(*args):
        raise AssertionError("a dropout mask was drawn in eval mode")

    monkeypatch.setattr(row_adapters, "_keep_mask", no_draw)
    rows = ["a", "b", "c", "a"]
    ids = torch.randint(0, 61, (len(rows), 9), generator=torch.Generator().manual_seed(1))
    _check_each_adapter_alone(_dropout_model(make_tiny).eval(), ids, rows)
