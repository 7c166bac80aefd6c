# SPDX-License-Identifier: Apache-2.0
"""peftreg.nn.Linear4bit and peftreg.quant.NF4Tensor: accuracy, memory, state-dict round trips in
bitsandbytes' layout, corrupt files, and the plain-PyTorch path without the extension."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save
from tolerances import tol

from peftreg.nn import Linear4bit
from peftreg.quant import NF4FormatError, NF4Tensor
from peftreg.targets import is_linear

pytestmark = pytest.mark.usefixtures("require_extension")

ROOT = Path(__file__).resolve().parents[2]
BNB_KEYS = ["weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
            "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"]
# Output error of a Linear4bit against the dense layer it was built from, relative Frobenius:
# the weight's NF4 error (about 0.092 at block 64) carries over to y = x W^T for random x, plus
# bf16 rounding of inputs and outputs; measured 0.093.
OUTPUT_ERROR_BOUND = 0.12
# NF4 with double quantization is 4.127 bits per weight against bf16's 16: about 0.26 of the
# memory with the code tables and a bias. The bound leaves room for those constants.
MEMORY_RATIO_BOUND = 0.3

try:
    import bitsandbytes as bnb
except Exception:  # optional comparison
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed (optional)")


def _dense(in_f=65, out_f=33, bias=True, seed=0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f, bias=bias)


def _relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
def test_from_linear_approximates_the_dense_layer(double_quant):
    dense = _dense(1376, 96)
    layer = Linear4bit.from_linear(dense, double_quant=double_quant)
    x = torch.randn(5, 1376)
    error = _relative_error(layer(x), dense(x))
    assert error < OUTPUT_ERROR_BOUND, f"relative output error {error:.4f}"
    other = _dense(1376, 96, seed=1)
    assert _relative_error(layer(x), other(x)) > 1.0, "the twin check: another layer differs"
    assert layer(x).dtype == x.dtype  # computed in bf16, returned in the input's dtype


def test_forward_equals_dequantize_then_matmul():
    layer = Linear4bit.from_linear(_dense())
    x = torch.randn(2, 3, 65)
    expected = torch.nn.functional.linear(x.bfloat16().double(), layer.dequantize(torch.float64),
                                          layer.bias.double())
    y = layer(x.bfloat16())
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(y.double() / scale, expected / scale,
                               **tol("linear4bit.forward", torch.bfloat16))


def test_attributes_and_all_linear_selection():
    layer = Linear4bit.from_linear(_dense(), compute_dtype=torch.float16)
    assert (layer.in_features, layer.out_features) == (65, 33)
    assert layer.weight_dtype == torch.float32 and layer.compute_dtype == torch.float16
    assert Linear4bit.peftreg_linear is True and is_linear(layer)
    assert layer.dequantize().shape == (33, 65) and layer.dequantize().dtype == torch.float32
    assert layer.bias.dtype == torch.float16


def test_memory_is_a_quarter_of_bf16():
    dense = _dense(1024, 1024)
    layer = Linear4bit.from_linear(dense)
    bf16_bytes = (dense.weight.numel() + dense.bias.numel()) * 2
    ratio = layer.memory_bytes() / bf16_bytes
    assert ratio < MEMORY_RATIO_BOUND, f"memory ratio {ratio:.3f}"
    without_dq = Linear4bit.from_linear(dense, double_quant=False)
    assert layer.memory_bytes() < without_dq.memory_bytes()


def test_input_gradient_flows_and_weight_is_frozen():
    layer = Linear4bit.from_linear(_dense(), compute_dtype=torch.float32)
    x = torch.randn(4, 65, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer.bias.grad is not None
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["bias"]
    expected = torch.ones(4, 33) @ layer.dequantize(torch.float32)
    torch.testing.assert_close(x.grad, expected, **tol("nf4_linear.backward", torch.float32))


def test_to_dtype_keeps_the_quantized_buffers():
    layer = Linear4bit.from_linear(_dense(), double_quant=False)
    before = {name: b.clone() for name, b in layer.named_buffers()}
    layer.to(torch.float16)
    for name, b in layer.named_buffers():
        assert b.dtype == before[name].dtype and torch.equal(b, before[name]), name


# --- state dicts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
def test_state_dict_safetensors_round_trip_is_bit_exact(double_quant):
    layer = Linear4bit.from_linear(_dense(), double_quant=double_quant)
    state = layer.state_dict()
    expected_keys = BNB_KEYS if double_quant else [k for k in BNB_KEYS if "nested" not in k]
    assert list(state) == expected_keys
    restored = Linear4bit(65, 33, double_quant=not double_quant)  # the file decides
    restored.load_state_dict(load(save(state)))
    for key, value in restored.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(3, 65)
    assert torch.equal(restored(x), layer(x))
    assert not torch.equal(Linear4bit(65, 33)(x), layer(x)), "the twin: an unloaded layer differs"


def test_quant_state_json_fields():
    layer = Linear4bit.from_linear(_dense().to(torch.bfloat16))
    blob = layer.state_dict()["weight.quant_state.bitsandbytes__nf4"]
    meta = json.loads(bytes(blob.tolist()).decode("utf-8"))
    assert list(meta) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
                          "nested_dtype", "nested_offset"]
    assert meta["quant_type"] == "nf4" and meta["dtype"] == "bfloat16"
    assert meta["shape"] == [33, 65] and meta["blocksize"] == 64
    assert meta["nested_offset"] == layer.weight_offset.item()


def _bnb_layer(dense: torch.nn.Linear, double_quant: bool):
    layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=True,
                              compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=double_quant)
    layer.bias = torch.nn.Parameter(dense.bias.data.clone())
    return layer.to("cpu")


@needs_bnb
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
def test_loads_a_bitsandbytes_state_dict(double_quant):
    dense = _dense(1376, 40)
    theirs = _bnb_layer(dense, double_quant).state_dict()
    layer = Linear4bit(1376, 40)
    layer.load_state_dict(load(save({k: v.contiguous() for k, v in theirs.items()})))
    assert torch.equal(layer.weight, theirs["weight"])
    assert torch.equal(layer.weight_absmax, theirs["weight.absmax"])
    ours = Linear4bit.from_linear(dense, double_quant=double_quant).state_dict()
    assert torch.equal(theirs["weight"], ours["weight"])
    assert bytes(theirs["weight.quant_state.bitsandbytes__nf4"].tolist()) == bytes(
        ours["weight.quant_state.bitsandbytes__nf4"].tolist())
    # The loaded layer computes with bitsandbytes' scales (whatever codes its CPU kernel chose).
    scales = theirs["weight.absmax"]
    if double_quant:
        import bitsandbytes.functional as F

        meta = json.loads(bytes(theirs["weight.quant_state.bitsandbytes__nf4"].tolist()))
        scales = F.dequantize_blockwise(scales, absmax=theirs["weight.nested_absmax"],
                                        code=theirs["weight.nested_quant_map"], blocksize=256)
        scales = scales + meta["nested_offset"]
    codes = theirs["weight"].flatten()
    values = torch.stack([codes >> 4, codes & 15], 1).flatten().long()
    dense_weight = theirs["weight.quant_map"][values] * scales.repeat_interleave(64)
    x = torch.randn(3, 1376).bfloat16()
    expected = torch.nn.functional.linear(x.double(), dense_weight.view(40, 1376).double(),
                                          theirs["bias"].bfloat16().double())
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(layer(x).double() / scale, expected / scale,
                               **tol("linear4bit.forward", torch.bfloat16))


@needs_bnb
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
def test_bitsandbytes_loads_our_state_dict(double_quant):
    """bitsandbytes reads peftreg's file as it reads its own (Params4bit.from_prequantized)."""
    import bitsandbytes.functional as F

    layer = Linear4bit.from_linear(_dense(128, 24), double_quant=double_quant)
    state = load(save(layer.state_dict()))
    stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(data=state["weight"], quantized_stats=stats,
                                                requires_grad=False, device="cpu")
    assert torch.equal(F.dequantize_4bit(param.data, param.quant_state), layer.dequantize())


def _good_state() -> dict[str, torch.Tensor]:
    return dict(Linear4bit.from_linear(_dense()).state_dict())


def _with_json(state, **changes):
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(state[key].tolist()))
    meta.update(changes)
    return {**state, key: torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}


def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


CORRUPT = {
    "missing_absmax": (lambda s: _without(s, "weight.absmax"), r"'weight\.absmax': missing"),
    "missing_json": (lambda s: _without(s, "weight.quant_state.bitsandbytes__nf4"),
                     r"'weight\.quant_state\.bitsandbytes__nf4': missing"),
    "codes_dtype": (lambda s: {**s, "weight": s["weight"].float()},
                    r"'weight': has dtype torch.float32; expected torch.uint8"),
    "codes_length": (lambda s: {**s, "weight": s["weight"][:-3]},
                     r"'weight': holds 1070 code bytes but shape \[33, 65\] needs"),
    "absmax_shape": (lambda s: {**s, "weight.absmax": s["weight.absmax"][:5]},
                     r"'weight\.absmax': has shape \[5\]; expected \(34,\)"),
    "fp4_key": (lambda s: {**_without(s, "weight.quant_state.bitsandbytes__nf4"),
                           "weight.quant_state.bitsandbytes__fp4":
                               s["weight.quant_state.bitsandbytes__nf4"]},
                r"unknown quant_type 'fp4'"),
    "fp4_json": (lambda s: _with_json(s, quant_type="fp4"), r"unknown quant_type 'fp4'"),
    "blocksize_48": (lambda s: _with_json(s, blocksize=48),
                     r"blocksize 48 is not a power of two from 32 to 4096"),
    "blocksize_8192": (lambda s: _with_json(s, blocksize=8192), r"blocksize 8192 is not"),
    "shape_mismatch": (lambda s: _with_json(s, shape=[33, 64]), r"needs \(numel \+ 1\) // 2"),
    "bad_dtype": (lambda s: _with_json(s, dtype="int8"), r"dtype 'int8' is not one of"),
    "nan_nested": (lambda s: {**s, "weight.nested_absmax": torch.tensor([float("nan")])},
                   r"'weight\.nested_absmax': contains NaN or infinity"),
    "inf_offset": (lambda s: _with_json(s, nested_offset=float("inf")),
                   r"nested_offset inf is not a finite number"),
    "quant_map": (lambda s: {**s, "weight.quant_map": s["weight.quant_map"] * 2},
                  r"'weight\.quant_map': does not hold the 16 NF4 code points"),
    "not_json": (lambda s: {**s, "weight.quant_state.bitsandbytes__nf4":
                            torch.tensor([255, 1, 2], dtype=torch.uint8)},
                 r"is not UTF-8 JSON"),
    "unexpected": (lambda s: {**s, "weight.extra": torch.zeros(1)},
                   r"'weight\.extra': unexpected key"),
}


@pytest.mark.parametrize("case", list(CORRUPT), ids=[f"corrupt={c}" for c in CORRUPT])
def test_corrupt_state_dicts_give_clear_errors(case):
    corrupt, pattern = CORRUPT[case]
    layer = Linear4bit(65, 33)
    with pytest.raises(NF4FormatError, match=pattern):
        layer.load_state_dict(corrupt(_good_state()))


def test_nan_absmax_without_double_quant_is_refused():
    state = dict(Linear4bit.from_linear(_dense(), double_quant=False).state_dict())
    state["weight.absmax"] = state["weight.absmax"].clone()
    state["weight.absmax"][3] = float("inf")
    with pytest.raises(NF4FormatError, match=r"'weight\.absmax': contains NaN or infinity"):
        NF4Tensor.from_state_dict(state, "weight")


def test_shape_of_another_layer_is_refused():
    with pytest.raises(NF4FormatError, match=r"shape \[33, 65\] does not match this layer"):
        Linear4bit(64, 33).load_state_dict(_good_state())


def test_nested_prefix_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Linear4bit.from_linear(_dense(65, 8)))
    state = model.state_dict()
    assert "1.weight.quant_state.bitsandbytes__nf4" in state
    copy = torch.nn.Sequential(torch.nn.Linear(8, 8), Linear4bit(65, 8))
    copy.load_state_dict(state)
    assert torch.equal(copy[1].weight, model[1].weight)


# --- without the compiled extension ------------------------------------------------------------


_NO_EXTENSION_SCRIPT = """
    import warnings
    import torch
    from peftreg import ops
    from peftreg.nn import Linear4bit
    from peftreg.quant import NF4Tensor

    assert not ops.has_extension()
    torch.manual_seed(0)
    dense = torch.nn.Linear(65, 33)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = Linear4bit.from_linear(dense)
        x = torch.randn(3, 65, requires_grad=True)
        y = layer(x)
        y.sum().backward()
    assert any(issubclass(w.category, ops.PeftregFallbackWarning) for w in caught), caught
    error = ((y - dense(x)).norm() / dense(x).norm()).item()
    assert error < 0.12, error
    assert x.grad is not None
    print("codes", layer.weight.flatten()[:8].tolist(), layer.weight_absmax[:4].tolist())
    print("ok")
"""


def test_plain_pytorch_path_without_the_extension():
    env = {**os.environ, "PEFTREG_EXTENSION": "off",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_NO_EXTENSION_SCRIPT)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")
    # The plain-PyTorch quantization writes the same bytes as the kernels.
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(65, 33))
    expected = f"codes {layer.weight.flatten()[:8].tolist()} {layer.weight_absmax[:4].tolist()}"
    assert expected in proc.stdout
