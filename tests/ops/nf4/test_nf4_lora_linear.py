# SPDX-License-Identifier: Apache-2.0
"""peftreg::nf4_lora_linear (LoRA on an NF4 base) against a float64 evaluation of QLoRA's layer.

The reference (peftreg.ops.reference.nf4_lora_linear, from Dettmers et al. 2023, eq. 5) runs on
float64 copies of the inputs; the NF4 weight's decoded float32 values are exact in float64, so
only the kernel's float32 sums and final rounding differ.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import scaled_close

from peftreg.nn import Linear4bit
from peftreg.ops import kernels, reference
from peftreg.ops import nf4 as nf4_ops

pytestmark = pytest.mark.usefixtures("require_extension")


def _layer(in_f: int, out_f: int, double_quant: bool, dtype: torch.dtype,
           device: torch.device) -> Linear4bit:
    torch.manual_seed(in_f * 7 + out_f)
    dense = torch.nn.Linear(in_f, out_f, bias=True)
    return Linear4bit.from_linear(dense, double_quant=double_quant,
                                  compute_dtype=dtype).to(device)


def _args(layer: Linear4bit) -> dict:
    return {"codes": layer.weight, "absmax": layer.weight_absmax,
            "nested_absmax": layer.weight_nested_absmax, "offset": layer.weight_offset,
            "blocksize": layer.blocksize, "nested_blocksize": layer.nested_blocksize,
            "out_features": layer.out_features, "in_features": layer.in_features}


def _reference(layer, x, bias, a, b, s, x_lora):
    w = _args(layer)
    return reference.nf4_lora_linear(x, w["codes"], w["absmax"], w["nested_absmax"],
                                     w["offset"], w["blocksize"], w["nested_blocksize"],
                                     w["out_features"], w["in_features"], bias, a, b, s, x_lora)


CASES = [  # (leading shape, in, out, rank, double_quant, with x_lora)
    ((5,), 64, 48, 4, True, False),
    ((2, 3), 67, 29, 3, True, True),   # odd sizes: blocks straddle weight rows
    ((1,), 128, 33, 8, False, False),  # one row (the batch-1 kernel)
    ((70,), 96, 80, 16, True, False),  # many rows (the tiled GEMM kernel)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_forward_and_gradients_match_float64(op_device, case, dtype):
    lead, in_f, out_f, r, dq, with_xl = case
    layer = _layer(in_f, out_f, dq, dtype, op_device)
    g = torch.Generator().manual_seed(1)

    def t(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype).to(op_device)

    x, a, b, bias = t(*lead, in_f), t(r, in_f, s=in_f**-0.5), t(out_f, r, s=0.3), t(out_f)
    xl = t(*lead, in_f) if with_xl else None
    leaves = [v.clone().requires_grad_() for v in (x, bias, a, b)]
    xl_leaf = xl.clone().requires_grad_() if with_xl else None
    y = nf4_ops.lora_linear(leaves[0], **_args(layer), lora_a=leaves[2], lora_b=leaves[3],
                              scaling=1.25, bias=leaves[1], x_lora=xl_leaf)
    assert y.dtype == dtype and y.shape == (*lead, out_f)

    ref_leaves = [v.double().requires_grad_() for v in (x, bias, a, b)]
    ref_xl = xl.double().requires_grad_() if with_xl else None
    expected = _reference(layer, ref_leaves[0], ref_leaves[1], ref_leaves[2], ref_leaves[3], 1.25,
                          ref_xl)
    rows = x.numel() // in_f
    # Where the CPU rounds W to bf16 the whole layer runs in bf16 (docs/ops.md), with
    # lora_linear's 16-bit roundings.
    rounds_w = op_device.type == "cpu" and nf4_ops.cpu_rounds_weight(dtype, rows)
    scaled_close(y, expected, "lora_linear.forward" if rounds_w else "nf4_linear.forward", dtype)

    upstream = t(*lead, out_f)
    y.backward(upstream)
    expected.backward(upstream.double())
    for name, mine, ref in zip(("x", "bias", "lora_a", "lora_b"), leaves, ref_leaves,
                               strict=True):
        assert mine.grad is not None, name
        scaled_close(mine.grad, ref.grad, "lora_linear.backward", dtype)
    if with_xl:
        scaled_close(xl_leaf.grad, ref_xl.grad, "lora_linear.backward", dtype)


def test_only_requested_gradients(op_device):
    """The usual QLoRA step: x and bias frozen, only A and B get gradients."""
    layer = _layer(64, 32, True, torch.float32, op_device)
    x = torch.randn(4, 64, device=op_device)
    a = torch.randn(4, 64, device=op_device, requires_grad=True)
    b = torch.randn(32, 4, device=op_device, requires_grad=True)
    nf4_ops.lora_linear(x, **_args(layer), lora_a=a, lora_b=b, scaling=2.0).sum().backward()
    assert a.grad is not None and b.grad is not None and x.grad is None


@pytest.mark.parametrize("case", ["grads", "x_lora_bf16", "no_grad"])
def test_opcheck(op_device, case):
    dtype = torch.bfloat16 if case == "x_lora_bf16" else torch.float32
    layer = _layer(40, 24, True, dtype, op_device)
    w = _args(layer)
    grad = case != "no_grad"

    def t(*shape):
        return torch.randn(*shape, dtype=dtype, device=op_device, requires_grad=grad)

    x_lora = t(3, 40) if case == "x_lora_bf16" else None
    args = (t(3, 40), w["codes"], w["absmax"], w["nested_absmax"], w["offset"], w["blocksize"],
            w["nested_blocksize"], 24, 40, t(24), t(2, 40), t(24, 2), 0.5, x_lora)
    torch.library.opcheck(torch.ops.peftreg.nf4_lora_linear.default, args)


def test_mismatched_lora_factor_is_named(op_device):
    layer = _layer(64, 32, True, torch.float32, op_device)
    x = torch.randn(2, 64, device=op_device)
    with pytest.raises(RuntimeError, match="nf4_lora_linear: argument 'lora_b'"):
        nf4_ops.lora_linear(x, **_args(layer), lora_a=torch.randn(4, 64, device=op_device),
                              lora_b=torch.randn(31, 4, device=op_device), scaling=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_qlora_plugin_fused_equals_reference_path(monkeypatch, dtype):
    """A QLoRA model trains to the same place with the fused ops and with plain PyTorch."""
    import peftreg

    calls = []
    real = nf4_ops.LORA_LINEAR.reference

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    # Counting the plain path's calls shows which path each mode took.
    monkeypatch.setattr(nf4_ops.LORA_LINEAR, "reference", counting)
    from peftreg.reference_model import ReferenceConfig, ReferenceTransformer

    def run(mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        base = ReferenceTransformer(ReferenceConfig(vocab_size=61, hidden_size=32,
                                                    intermediate_size=48, num_layers=2,
                                                    num_heads=4)).to(dtype)
        config = peftreg.config_for("qlora", r=4, lora_alpha=8, target_modules="all-linear",
                                    compute_dtype=str(dtype).removeprefix("torch."))
        model = peftreg.adapt(base, config)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        ids = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(2))
        with kernels(mode):
            for _ in range(2):
                loss = model(ids)["logits"].float().logsumexp(-1).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
            out = model(ids)["logits"]
        return out, [p.detach().clone() for p in model.parameters() if p.requires_grad]

    fused_out, fused_params = run("compiled")
    assert not calls
    ref_out, ref_params = run("reference")
    assert len(calls) == 3 * 2 * 7  # 3 forwards x 2 layers x 7 linear layers each
    check = "nf4_linear.forward" if dtype == torch.float32 else "lora_linear.backward"
    scaled_close(fused_out, ref_out.double(), check, dtype)
    for mine, ref in zip(fused_params, ref_params, strict=True):
        scaled_close(mine, ref.double(), check, dtype)
