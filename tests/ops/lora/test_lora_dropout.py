# SPDX-License-Identifier: Apache-2.0
"""Dropout inside the fused LoRA ops: the mask, its statistics, gradients and saved memory.

The mask is a counter-based hash of (seed, element index) (csrc/fused/lora_dropout.h); the
independent oracle is peftreg.ops.reference.lora_dropout_mask, the same function in torch
integer ops. Inverted dropout as in Srivastava et al. 2014 / torch.nn.Dropout: kept values
are scaled by 1 / (1 - p).
"""

from __future__ import annotations

import pytest
import torch
from tolerances import tol

from peftreg.ops import lora as lora_ops
from peftreg.ops import nf4 as nf4_ops
from peftreg.ops import reference

pytestmark = pytest.mark.usefixtures("require_extension")


def _identity_dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """dropout(x) through lora_linear: W = 0, A = B = I, scaling 1."""
    n = x.shape[-1]
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    return lora_ops.lora_linear(x, torch.zeros_like(eye), None, eye, eye, 1.0, dropout_p=p,
                             dropout_seed=seed)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_mask_equals_the_reference_bit_for_bit(op_device, p):
    seed = torch.tensor(0x1234_5678_9ABC_DEF, dtype=torch.int64)
    x = torch.ones(3, 7, 41, device=op_device)  # odd sizes: index order across rows matters
    y = _identity_dropout(x, p, seed)
    keep = reference.lora_dropout_mask(int(seed), x.numel(), p, op_device).view(x.shape)
    torch.testing.assert_close(y, torch.where(keep, 1.0 / (1.0 - p), 0.0).float())


def test_mask_statistics_and_seeds(op_device):
    x = torch.ones(200, 500, device=op_device)
    s1, s2 = torch.tensor(1, dtype=torch.int64), torch.tensor(2, dtype=torch.int64)
    a, b, again = (_identity_dropout(x, 0.25, s) for s in (s1, s2, s1))
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.005  # 1e5 draws: 5 standard deviations is 0.007
    assert torch.equal(a, again)
    assert (a != b).float().mean().item() > 0.3  # independent masks differ in ~37.5% of places
    # Rows are not copies of one another (the index, not the column, feeds the hash).
    assert (a[0] != a[1]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_forward_and_backward_match_the_reference(op_device, dtype):
    g = torch.Generator().manual_seed(0)

    def t(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype).to(op_device)

    x, w, bias = t(4, 6, 37), t(29, 37, s=0.2), t(29)
    a, b = t(5, 37, s=0.2), t(29, 5, s=0.5)
    seed = torch.tensor(99, dtype=torch.int64)
    leaves = [v.clone().requires_grad_() for v in (x, a, b)]
    y = lora_ops.lora_linear(leaves[0], w, bias, leaves[1], leaves[2], 2.0, dropout_p=0.2,
                          dropout_seed=seed)
    ref_leaves = [v.double().requires_grad_() for v in (x, a, b)]
    expected = reference.lora_linear(ref_leaves[0], w.double(), bias.double(), ref_leaves[1],
                                     ref_leaves[2], 2.0, dropout_p=0.2, dropout_seed=seed)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(y.double() / scale, expected / scale,
                               **tol("lora_linear.forward", dtype))
    upstream = t(4, 6, 29)
    y.backward(upstream)
    expected.backward(upstream.double())
    for mine, ref in zip(leaves, ref_leaves, strict=True):
        s = max(1.0, ref.grad.abs().max().item())
        torch.testing.assert_close(mine.grad.double() / s, ref.grad / s,
                                   **tol("lora_linear.backward", dtype))


def test_qlora_op_dropout_matches_the_reference(op_device):
    from peftreg.nn import Linear4bit

    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 40), compute_dtype=torch.float32)
    layer = layer.to(op_device)
    x = torch.randn(9, 64, device=op_device, requires_grad=True)
    a = (torch.randn(4, 64, device=op_device) * 0.1).requires_grad_()
    b = torch.randn(40, 4, device=op_device, requires_grad=True)
    seed = torch.tensor(7, dtype=torch.int64)
    w = {"codes": layer.weight, "absmax": layer.weight_absmax,
         "nested_absmax": layer.weight_nested_absmax, "offset": layer.weight_offset,
         "blocksize": layer.blocksize, "nested_blocksize": layer.nested_blocksize,
         "out_features": 40, "in_features": 64}
    y = nf4_ops.lora_linear(x, **w, lora_a=a, lora_b=b, scaling=1.5, bias=layer.bias,
                              dropout_p=0.4, dropout_seed=seed)
    xd, ad, bd = (v.detach().double().requires_grad_() for v in (x, a, b))
    expected = reference.nf4_lora_linear(xd, w["codes"], w["absmax"], w["nested_absmax"],
                                         w["offset"], 64, 256, 40, 64, layer.bias.double(), ad,
                                         bd, 1.5, dropout_p=0.4, dropout_seed=seed)
    torch.testing.assert_close(y.double(), expected, **tol("nf4_linear.forward", torch.float32))
    y.sum().backward()
    expected.sum().backward()
    for mine, ref in ((x, xd), (a, ad), (b, bd)):
        torch.testing.assert_close(mine.grad.double(), ref.grad,
                                   **tol("lora_linear.backward", torch.float32))


def test_gradcheck_with_dropout_float64(op_device):
    seed = torch.tensor(5, dtype=torch.int64)
    leaves = [torch.randn(*s, dtype=torch.float64, device=op_device, requires_grad=True)
              for s in ((2, 3, 6), (5, 6), (3, 6), (5, 3))]

    def op(x, w, a, b):
        return lora_ops.lora_linear(x, w, None, a, b, 0.7, dropout_p=0.3, dropout_seed=seed)

    assert torch.autograd.gradcheck(op, tuple(leaves))
    assert torch.autograd.gradgradcheck(op, tuple(leaves))


def _saved_activation_bytes(model: torch.nn.Module, fn) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while ``fn`` runs."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_training_with_dropout_saves_only_the_input():
    """The fused path keeps x (needed for A's gradient) and nothing input-sized besides; the
    plain path keeps dropout(x) and the one-byte-per-element mask instead."""
    import peftreg
    from peftreg.ops import kernels

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(256, 256))
    model = peftreg.adapt(base, peftreg.config_for("lora", r=4, lora_dropout=0.1,
                                                   target_modules=["0"]))
    model.train()
    x = torch.randn(64, 256).requires_grad_()  # 64 KiB of float32
    x_bytes = x.numel() * 4
    with kernels("compiled"):
        fused_bytes = _saved_activation_bytes(model, lambda: model(x))
    with kernels("reference"):
        plain_bytes = _saved_activation_bytes(model, lambda: model(x))
    assert x_bytes <= fused_bytes <= x_bytes + 64  # x plus the 8-byte seed
    assert plain_bytes >= x_bytes + x.numel()  # dropout(x) and the boolean mask


def test_argument_errors(op_device):
    x = torch.randn(2, 8, device=op_device)
    w, a, b = torch.randn(4, 8, device=op_device), torch.randn(2, 8, device=op_device), \
        torch.randn(4, 2, device=op_device)
    seed = torch.tensor(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="needs dropout_seed"):
        lora_ops.lora_linear(x, w, None, a, b, 1.0, dropout_p=0.5)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        lora_ops.lora_linear(x, w, None, a, b, 1.0, dropout_p=1.0, dropout_seed=seed)
    with pytest.raises(RuntimeError, match="either x_lora or dropout_p"):
        lora_ops.lora_linear(x, w, None, a, b, 1.0, x + 1, dropout_p=0.5, dropout_seed=seed)
    with pytest.raises(RuntimeError, match="dropout_seed must be an int64 tensor"):
        lora_ops.lora_linear(x, w, None, a, b, 1.0, dropout_p=0.5,
                          dropout_seed=torch.tensor(1.0))


def test_opcheck_with_dropout(op_device):
    def t(*shape):
        return torch.randn(*shape, device=op_device, requires_grad=True)

    seed = torch.tensor(3, dtype=torch.int64)
    torch.library.opcheck(torch.ops.peftreg.lora_linear.default,
                          (t(3, 8), t(6, 8), None, t(2, 8), t(6, 2), 0.5, None, 0.25, seed))
