"""Training several LoRA adapters in one batch: each gets the gradient of its own rows."""

from __future__ import annotations

import pytest
import torch

import peftreg
from peftreg import ops
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
