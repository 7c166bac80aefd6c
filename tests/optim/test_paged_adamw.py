# SPDX-License-Identifier: Apache-2.0
"""PagedAdamW against torch.optim.AdamW and the paper's AdamW, at any budget (issue 7)."""

from __future__ import annotations

import pytest
import torch
from adamw_reference import ReferenceAdamW
from tolerances import tol

from peftreg.optim import PagedAdamW, load_optimizer, save_optimizer

PAGE = 4096  # 512 elements of each moment per page: the odd shapes below straddle pages
# Bigger than a page, smaller than a page, exactly one element, page-unaligned sizes.
SHAPES = [(37, 5), (700,), (3, 129), (1,), (2600,), (8, 64)]
HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
STEPS = 30
BUDGETS = {"unlimited": None, "half": 0.5, "five_percent": 0.05}


def _params(dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in SHAPES]


def _grads(step, params):
    """Deterministic gradients; parameter 3 gets none on every third step (own step count)."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
        out.append(None if (i == 3 and step % 3 == 0) else g)
    return out


def _run(optimizer, params, start, steps):
    for step in range(start, start + steps):
        for p, g in zip(params, _grads(step, params), strict=True):
            p.grad = None if g is None else g.clone()
        optimizer.step()


def _paged(params, budget, **kwargs):
    return PagedAdamW(params, **HYPER, page_bytes=PAGE, budget_fraction=budget, **kwargs)


def _state_bytes(params):
    elements = sum(p.numel() for p in params)
    return -(-elements // (PAGE // 8)) * PAGE


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=[f"budget={k}" for k in BUDGETS])
def test_fp32_equals_torch_adamw(paged_device, budget):
    ours, theirs = _params(torch.float32, paged_device), _params(torch.float32, paged_device)
    paged = _paged(ours, budget)
    torch_opt = torch.optim.AdamW(theirs, **HYPER)
    _run(paged, ours, 0, STEPS)
    _run(torch_opt, theirs, 0, STEPS)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **tol("paged_adamw.vs_torch", torch.float32))
    # The twin that can fail: the parameters did move.
    start = _params(torch.float32, paged_device)
    moved = [(a - s).abs().max().item() for a, s in zip(ours, start, strict=True)]
    assert min(moved) > 0 and max(moved) > 5 * HYPER["lr"], moved
    state, ref_state = paged.state_dict()["state"], torch_opt.state_dict()["state"]
    assert state.keys() == ref_state.keys()
    for index in state:
        assert state[index]["step"].item() == ref_state[index]["step"].item()
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[index][key], ref_state[index][key],
                                       **tol("paged_adamw.vs_torch", torch.float32))
    paged.close()


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=[f"budget={k}" for k in BUDGETS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["dtype=bf16", "dtype=fp16"])
def test_half_precision_params_equal_reference(paged_device, budget, dtype):
    ours, ref_params = _params(dtype, paged_device), _params(dtype, "cpu")
    paged = _paged(ours, budget)
    reference = ReferenceAdamW(ref_params, HYPER["lr"], HYPER["betas"], HYPER["eps"],
                               HYPER["weight_decay"])
    _run(paged, ours, 0, STEPS)
    _run(reference, ref_params, 0, STEPS)
    for a, b in zip(ours, ref_params, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.cpu(), b, **tol("paged_adamw.vs_reference", dtype))
    moments = paged.state_dict()["state"][0]
    assert moments["exp_avg"].dtype == torch.float32  # states stay fp32 for half parameters
    torch.testing.assert_close(moments["exp_avg"].cpu(), reference.m[0],
                               **tol("paged_adamw.vs_reference", dtype))
    paged.close()


def test_maximize_and_param_groups_equal_torch(paged_device):
    ours, theirs = _params(torch.float32, paged_device), _params(torch.float32, paged_device)
    groups = lambda ps: [{"params": ps[:3], "lr": 3e-3}, {"params": ps[3:], "weight_decay": 0.0}]  # noqa: E731
    paged = PagedAdamW(groups(ours), lr=1e-2, maximize=True, page_bytes=PAGE, budget_bytes=PAGE)
    torch_opt = torch.optim.AdamW(groups(theirs), lr=1e-2, maximize=True)
    _run(paged, ours, 0, 12)
    _run(torch_opt, theirs, 0, 12)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **tol("paged_adamw.vs_torch", torch.float32))
    paged.close()


@pytest.mark.parametrize("budget", [0.5, 0.05], ids=["budget=half", "budget=five_percent"])
def test_peak_resident_within_budget_and_counters(paged_device, budget):
    params = _params(torch.float32, paged_device)
    paged = _paged(params, budget)
    _run(paged, params, 0, 8)
    c = paged.counters()
    requested = max(int(budget * _state_bytes(params)), PAGE)
    assert c["budget_bytes"] == requested
    assert c["peak_resident_bytes"] <= requested + PAGE, c
    assert c["resident_bytes"] <= c["peak_resident_bytes"]
    assert c["pages_out"] > 0 and c["pages_in"] > 0, c  # the budget forced paging
    assert c["bytes_out"] == c["pages_out"] * PAGE and c["bytes_in"] == c["pages_in"] * PAGE
    # A page comes in only after it went out, and every page ever out is on the backing tier.
    assert c["pages_in"] <= c["pages_out"]
    assert c["num_pages"] == _state_bytes(params) // PAGE
    paged.close()


def test_unlimited_budget_never_pages(paged_device):
    params = _params(torch.float32, paged_device)
    paged = _paged(params, None)
    _run(paged, params, 0, 5)
    c = paged.counters()
    assert c["pages_out"] == c["pages_in"] == c["bytes_out"] == 0
    assert c["resident_bytes"] == c["peak_resident_bytes"] == _state_bytes(params)
    paged.close()


def test_tighter_budget_moves_more_bytes(paged_device):
    moved = {}
    for budget in (0.5, 0.05):
        params = _params(torch.float32, paged_device)
        paged = _paged(params, budget)
        _run(paged, params, 0, 6)
        moved[budget] = paged.counters()["bytes_out"]
        paged.close()
    assert moved[0.05] > moved[0.5] > 0, moved


@pytest.mark.parametrize("save_budget,load_budget", [(0.05, 0.5), (None, 0.05)],
                         ids=["paged-to-half", "unlimited-to-paged"])
def test_resume_equals_uninterrupted(paged_device, tmp_path, save_budget, load_budget):
    uninterrupted = _params(torch.float32, paged_device)
    opt = _paged(uninterrupted, save_budget)
    _run(opt, uninterrupted, 0, 10)
    save_optimizer(opt, tmp_path / "opt.safetensors")  # taken while pages are out
    saved_params = [p.detach().clone() for p in uninterrupted]
    _run(opt, uninterrupted, 10, 10)
    opt.close()

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = _paged(resumed, load_budget)
    load_optimizer(opt2, tmp_path / "opt.safetensors")
    _run(opt2, resumed, 10, 10)
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert torch.equal(a, b)  # same kernel, same inputs: bit for bit
    # Twin: without the saved state the continuation differs.
    fresh = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt3 = _paged(fresh, load_budget)
    _run(opt3, fresh, 10, 10)
    assert not all(torch.equal(a, b) for a, b in zip(uninterrupted, fresh, strict=True))
    for o in (opt2, opt3):
        o.close()


def test_state_dict_interoperates_with_torch_adamw(paged_device):
    ours, theirs = _params(torch.float32, paged_device), _params(torch.float32, paged_device)
    paged = _paged(ours, 0.05)
    _run(paged, ours, 0, 7)
    with torch.no_grad():
        for a, b in zip(theirs, ours, strict=True):
            a.copy_(b)
    torch_opt = torch.optim.AdamW(theirs, **HYPER)
    torch_opt.load_state_dict(paged.state_dict())
    _run(paged, ours, 7, 8)
    _run(torch_opt, theirs, 7, 8)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **tol("paged_adamw.vs_torch", torch.float32))
    # ... and back: torch's state dict loads into a paged optimizer with constant paging.
    again = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    paged2 = _paged(again, 0.05)
    paged2.load_state_dict(torch_opt.state_dict())
    _run(paged2, again, 15, 3)
    _run(torch_opt, theirs, 15, 3)
    for a, b in zip(again, theirs, strict=True):
        torch.testing.assert_close(a, b, **tol("paged_adamw.vs_torch", torch.float32))
    paged.close()
    paged2.close()


def test_bad_arguments(require_pool):
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="amsgrad"):
        PagedAdamW(p, amsgrad=True)
    with pytest.raises(ValueError, match="not both"):
        PagedAdamW(p, budget_bytes=PAGE, budget_fraction=0.5)
    with pytest.raises(ValueError, match="multiple of 4096"):
        PagedAdamW(p, page_bytes=1000)
    with pytest.raises(ValueError, match=r"dtype torch\.int64"):
        PagedAdamW([torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ValueError, match="betas"):
        PagedAdamW(p, betas=(1.0, 0.9))


def test_qlora_trainable_params(require_pool, make_tiny, token_batch):
    """Works on a QLoRA-adapted model's trainable parameters (NF4 base, LoRA adapters)."""
    import peftreg
    from peftreg_plugins.qlora import QLoraConfig

    def model_and_params():
        model = peftreg.adapt(make_tiny(), QLoraConfig(r=4, compute_dtype="float32"))
        return model, [p for p in model.parameters() if p.requires_grad]

    def loss_of(model):
        return model(token_batch, labels=token_batch)["loss"]

    (m1, p1), (m2, p2) = model_and_params(), model_and_params()
    assert p1 and all(a.dtype == torch.float32 for a in p1)
    with torch.no_grad():  # the adapters' random init differs between the two models
        for a, b in zip(p1, p2, strict=True):
            b.copy_(a)
    paged = PagedAdamW(p1, lr=1e-2, page_bytes=PAGE, budget_fraction=0.05)
    torch_opt = torch.optim.AdamW(p2, lr=1e-2)
    for _ in range(4):
        for model, opt in ((m1, paged), (m2, torch_opt)):
            opt.zero_grad()
            loss_of(model).backward()
            opt.step()
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, **tol("paged_adamw.vs_torch", torch.float32))
    assert paged.counters()["pages_out"] > 0
    paged.close()


def test_add_param_group_grows_the_pool(paged_device):
    ours, theirs = _params(torch.float32, paged_device), _params(torch.float32, paged_device)
    paged = PagedAdamW(ours[:2], **HYPER, page_bytes=PAGE, budget_bytes=2 * PAGE)
    torch_opt = torch.optim.AdamW(theirs[:2], **HYPER)
    pages_before = paged.counters()["num_pages"]
    paged.add_param_group({"params": ours[2:], "lr": 5e-3})
    torch_opt.add_param_group({"params": theirs[2:], "lr": 5e-3})
    assert paged.counters()["num_pages"] > pages_before
    _run(paged, ours, 0, 10)
    _run(torch_opt, theirs, 0, 10)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **tol("paged_adamw.vs_torch", torch.float32))
    paged.close()
