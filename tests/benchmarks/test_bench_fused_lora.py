# SPDX-License-Identifier: Apache-2.0
"""The QLoRA baselines of benchmarks/bench_fused_lora.py compute the fused op's numbers, and
``dequant+matmul`` keeps no dense weight between its passes (the ``dense kept`` one does)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tolerances import scaled_close

from peftreg import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_fused_lora as bench

pytestmark = pytest.mark.skipif(not ops.has_extension(), reason="needs the compiled extension")

SHAPE = bench.Shape(5, 96, 40, 4)  # odd rows, out not a multiple of the block


def _grads(forward, trainable, p):
    x = p.x.detach().clone().requires_grad_()
    y = forward(x)
    return (y, *torch.autograd.grad(y, [x, *trainable], p.grad_out))


def _saved_dense(forward, trainable, p) -> bool:
    """Whether autograd saved a tensor of the weight's size (either orientation) for the
    backward."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    x = p.x.detach().clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(x)
    return p.weight.numel() in sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unfused_qlora_baselines_equal_the_fused_op(dtype):
    p = bench.make_problem(SHAPE, dtype, torch.device("cpu"))
    impls = bench.nf4_impls(p, with_fused=True)
    expected = _grads(*impls["fused"], p)
    for name in ("dequant+matmul", "dense kept"):
        for got, want, what in zip(_grads(*impls[name], p), expected, ("y", "x", "A", "B"),
                                   strict=True):
            check = "nf4_linear.forward" if what == "y" else "nf4_linear.backward"
            scaled_close(got, want, check, dtype, f"{name} {what}")
    assert not _saved_dense(*impls["dequant+matmul"], p)
    assert _saved_dense(*impls["dense kept"], p)


def test_peft_bitsandbytes_peer_equals_the_fused_op():
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    p = bench.make_problem(bench.Shape(5, 128, 64, 4), torch.float32, torch.device("cpu"))
    fused = _grads(*bench.nf4_impls(p, with_fused=True)["fused"], p)
    peer = _grads(*bench.peft_bnb_impl(p), p)
    # bitsandbytes quantizes the weight itself (the same NF4 codes, tests/ops/nf4), so both
    # compute with the same dequantized weight.
    for got, want, what in zip(peer, fused, ("y", "x", "A", "B"), strict=True):
        check = "nf4_linear.forward" if what == "y" else "nf4_linear.backward"
        scaled_close(got, want, check, torch.float32, what)
