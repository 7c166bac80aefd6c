# SPDX-License-Identifier: Apache-2.0
"""peftreg::lora_grouped_add: many LoRA adapters trained in one batch.

Each adapter's gradients from one call over the whole batch must equal those of running that
adapter alone on its own rows (float64 reference, the inputs rounded to the tested dtype first),
in float32 and bfloat16, for groups of equal size (the batched-GEMM path) and of unequal size.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tolerances import scaled_close, tol

from peftreg import ops
from peftreg.ops import lora as lora_ops

pytestmark = pytest.mark.usefixtures("require_extension")

IN, OUT, RANK = 24, 20, 4


def _batch(counts: list[int], dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n, rows_total = len(counts), sum(counts) + 3  # three rows that no adapter takes
    x = torch.randn(rows_total, IN, generator=gen).to(dtype)
    base = torch.randn(rows_total, OUT, generator=gen).to(dtype)
    a = (0.3 * torch.randn(n, RANK, IN, generator=gen)).to(dtype)
    b = (0.3 * torch.randn(n, OUT, RANK, generator=gen)).to(dtype)
    scaling = torch.tensor([0.5 + k for k in range(n)], dtype=torch.float32)
    rows = torch.randperm(rows_total, generator=gen)[:sum(counts)]
    upstream = torch.randn(rows_total, OUT, generator=gen).to(dtype)
    return x, base, a, b, scaling, rows, upstream


def _alone(x, base, a, b, scaling, rows, counts, upstream):
    """Each adapter on its own rows in float64: the gradients of training it alone."""
    x, base, upstream = x.double(), base.double(), upstream.double()
    grads_a, grads_b, grad_x = [], [], torch.zeros_like(x)
    offset = 0
    for k, n in enumerate(counts):
        own = rows[offset:offset + n]
        offset += n
        ak = a[k].double().requires_grad_(True)
        bk = b[k].double().requires_grad_(True)
        xk = x[own].requires_grad_(True)
        y = base[own] + float(scaling[k]) * (xk @ ak.t()) @ bk.t()
        ga, gb, gx = torch.autograd.grad((y * upstream[own]).sum(), (ak, bk, xk))
        grads_a.append(ga)
        grads_b.append(gb)
        grad_x[own] += gx
    return torch.stack(grads_a), torch.stack(grads_b), grad_x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("counts", [[5, 5, 5, 5], [7, 1, 0, 4]], ids=["uniform", "ragged"])
def test_gradients_equal_training_each_adapter_alone(dtype, counts):
    x, base, a, b, scaling, rows, upstream = _batch(counts, dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, base, a, b)]
    out = lora_ops.lora_grouped_add(leaves[1], leaves[0], leaves[2], leaves[3], scaling, rows,
                                    counts)
    (out * upstream).sum().backward()
    want_a, want_b, want_x = _alone(x, base, a, b, scaling, rows, counts, upstream)
    scaled_close(leaves[2].grad, want_a, "lora_linear.backward", dtype, "grad lora_a")
    scaled_close(leaves[3].grad, want_b, "lora_linear.backward", dtype, "grad lora_b")
    scaled_close(leaves[0].grad, want_x, "lora_linear.backward", dtype, "grad x")
    assert torch.equal(leaves[1].grad, upstream), "the base's gradient is the upstream one"
    # An adapter without rows gets an exactly zero gradient.
    for k, n in enumerate(counts):
        if n == 0:
            assert leaves[2].grad[k].abs().max() == 0 and leaves[3].grad[k].abs().max() == 0


def test_compiled_and_plain_paths_agree(op_calls):
    counts = [3, 6, 2]
    x, base, a, b, scaling, rows, upstream = _batch(counts, torch.float32, seed=3)
    results = {}
    for mode in ("reference", "compiled"):
        op_calls.clear()
        leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
        with ops.kernels(mode):
            out, _u = lora_ops.LORA_GROUPED_ADD.run(base, leaves[0], leaves[1], leaves[2],
                                                    scaling, rows, torch.tensor(counts))
            (out * upstream).sum().backward()
        results[mode] = (out.detach(), *(t.grad for t in leaves))
        assert op_calls == ([] if mode == "reference" else
                            ["lora_grouped_add", "lora_grouped_add_backward"])
    for got, want in zip(results["compiled"], results["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("adapters", "dtype", "fused"),
                         [(2, torch.float32, False), (16, torch.float32, True),
                          (2, torch.bfloat16, None)],
                         ids=["fp32-2", "fp32-16", "bf16-2"])
def test_auto_follows_the_cpu_crossover(op_calls, adapters, dtype, fused):
    """fp32 on the CPU: the op from 16 adapters; 16-bit: where the kernel widens (docs/ops.md)."""
    if fused is None:
        fused = lora_ops.cpu_widens_16bit(dtype)
    x, base, a, b, scaling, rows, _ = _batch([1] * adapters, dtype)
    with ops.kernels("auto"), torch.no_grad():
        lora_ops.LORA_GROUPED_ADD.run(base, x, a, b, scaling, rows, torch.ones(adapters,
                                                                                dtype=torch.int64))
    assert op_calls == (["lora_grouped_add"] if fused else [])


def test_double_backward_runs_through_the_plain_formulas():
    counts = [2, 3]
    x, base, a, b, scaling, rows, _ = _batch(counts, torch.float64, seed=5)
    a.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradgradcheck(
        lambda a_, b_: lora_ops.lora_grouped_add(base, x, a_, b_, scaling, rows, counts),
        (a, b))


def test_rows_out_of_range_name_the_op_and_the_argument():
    x, base, a, b, scaling, rows, _ = _batch([2, 2], torch.float32)
    bad = rows.clone()
    bad[0] = x.shape[0]
    with pytest.raises(RuntimeError, match=r"peftreg::lora_grouped_add: argument 'rows' holds "
                                           r"indices from"):
        lora_ops.lora_grouped_add(base, x, a, b, scaling, bad, [2, 2])


@pytest.mark.parametrize(("counts", "message"),
                         [([3, 2], r"argument 'counts' sums to 5 but 'rows' holds 4 rows"),
                          ([5, -1], r"argument 'counts' has a negative entry -1 at 1")],
                         ids=["sum", "negative"])
def test_bad_counts_values_fail_in_the_kernel(counts, message):
    """The values of counts are data: the kernel checks them (the fake kernel cannot)."""
    x, base, a, b, scaling, rows, upstream = _batch([2, 2], torch.float32)
    with pytest.raises(RuntimeError, match=f"peftreg::lora_grouped_add: {message}"):
        lora_ops.lora_grouped_add(base, x, a, b, scaling, rows, counts)
    _out, u = lora_ops.LORA_GROUPED_ADD(base, x, a, b, scaling, rows, torch.tensor([2, 2]))
    with pytest.raises(RuntimeError,
                       match=f"peftreg::lora_grouped_add_backward: {message}"):
        torch.ops.peftreg.lora_grouped_add_backward(upstream, x, a, b, scaling, rows,
                                                    torch.tensor(counts), u, [True] * 3)


@pytest.mark.compile
def test_a_new_split_of_the_rows_does_not_recompile():
    """The same batch split differently between the adapters (uniform and ragged, so both
    kernel paths) runs the first compiled graph, forward and backward, and matches eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(base, x, a, b, scaling, rows, counts):
        return lora_ops.lora_grouped_add(base, x, a, b, scaling, rows, counts)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    x, base, a, b, scaling, _, upstream = _batch([4, 4], torch.float32, seed=6)
    taken = x.shape[0] - 3
    splits = [[3, 5], [4, 4], [6, 2], [1, 7], [4, 4]]
    for seed, counts in enumerate(splits):
        rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:taken]
        results = []
        for fn in (compiled, step):
            leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
            out = fn(base, leaves[0], leaves[1], leaves[2], scaling, rows,
                     torch.tensor(counts))
            (out * upstream).sum().backward()
            results.append((out.detach(), *(t.grad for t in leaves)))
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for one batch shape"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_model_trains_each_rows_adapter_through_the_op(make_tiny, op_calls, dtype):
    """Per-row training of a tiny model runs the op, and each adapter's gradient
    equals that of training it alone on its rows (summed per-row losses on both sides): in
    fp32 to the table's tolerance, in bf16 at most twice as far from float64 as training alone
    in bf16 is (plus the table's slack)."""
    import peftreg
    from peftreg_plugins.lora import LoraConfig

    torch.manual_seed(0)
    model = peftreg.adapt(make_tiny().to(dtype), LoraConfig(r=4, target_modules="all-linear"),
                          "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules="all-linear"), trainable=True)
    with torch.no_grad():
        for name in ("a", "b"):
            for p in model.adapter_parameters(name):
                p.normal_(0.0, 0.2)
    model.train()
    ids = torch.randint(0, 61, (4, 7), generator=torch.Generator().manual_seed(4))
    rows = ["b", "a", "a", "b"]

    def row_losses(logits):
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
            reduction="none").reshape(ids.shape[0], -1).mean(1)

    with ops.kernels("compiled"):
        row_losses(model(ids, adapter_names=rows)["logits"]).sum().backward()
    assert "lora_grouped_add" in op_calls and "lora_grouped_add_backward" in op_calls
    batched = {n: [p.grad.clone() for p in model.adapter_parameters(n)] for n in ("a", "b")}
    exact = copy.deepcopy(model).double()  # the same (rounded) weights, float64 arithmetic
    for name in ("a", "b"):
        own = [i for i, r in enumerate(rows) if r == name]
        alone = []
        for m in (model, exact):
            m.zero_grad(set_to_none=True)
            m.set_active(name)
            logits = m(ids[own])["logits"]
            torch.nn.functional.cross_entropy(
                logits[:, :-1].double().reshape(-1, logits.shape[-1]),
                ids[own][:, 1:].reshape(-1), reduction="none").reshape(len(own), -1).mean(
                    1).sum().backward()
            alone.append([p.grad for p in m.adapter_parameters(name)])
        for got, same_dtype, want in zip(batched[name], *alone, strict=True):
            if dtype == torch.float32:
                scaled_close(got, want, "per_row.vs_alone", dtype, f"adapter {name}")
                continue
            # bf16: the batch is at least as accurate as training the adapter alone in bf16.
            scale = max(1.0, want.abs().max().item())
            err = ((got.double() - want).abs().max() / scale).item()
            err_alone = ((same_dtype.double() - want).abs().max() / scale).item()
            assert err <= 2 * err_alone + tol("per_row.vs_alone", dtype)["atol"], \
                f"adapter {name}: batched error {err:.4f}, alone {err_alone:.4f}"
