# SPDX-License-Identifier: Apache-2.0
"""One table-driven harness over every registered op (issue 14).

For each op in :data:`peftreg.ops.OPS` the table holds good calls and bad calls. Good calls
check the eager kernel against its fake kernel (shapes, dtypes, strides of every output, under
FakeTensorMode), against the plain-PyTorch reference (exact for the NF4 storage ops, otherwise
float64 through ``tests/tolerances.py``), and pass ``torch.library.opcheck``. Bad calls must fail
with the same error type and text eagerly (the C++ checks) and under ``torch.compile`` (the fake
kernel's checks, ``peftreg/ops/_checks.py``). An op missing from the table fails the suite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from tolerances import scaled_close
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map_only

from peftreg import ops
from peftreg.ops import reference

pytestmark = pytest.mark.usefixtures("require_extension")

Args = tuple[Any, ...]


@dataclass(frozen=True)
class Good:
    """A valid call: ``make(device, dtype)`` returns the schema's positional arguments."""

    op: str
    name: str
    make: Callable[[torch.device, torch.dtype], Args]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
    exact: bool = False  # integer or bit-exact outputs: compare at the call's own dtype
    grads: tuple[int, ...] = ()  # argument positions that require grad for opcheck


@dataclass(frozen=True)
class Bad:
    """An invalid call: ``break_args`` spoils one argument of a good call; ``names`` is the
    argument the message must name."""

    op: str
    name: str
    make: Callable[[torch.device, torch.dtype], Args]
    break_args: Callable[[Args], Args]
    names: str
    extra: dict[str, Any] = field(default_factory=dict)


def _t(device: torch.device, dtype: torch.dtype, *shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _replace(args: Args, index: int, value: Any) -> Args:
    return (*args[:index], value, *args[index + 1:])


# --- argument builders per op (odd, non-block-multiple sizes) -------------------------------


def _lora(d: torch.device, dt: torch.dtype) -> Args:
    return (_t(d, dt, 2, 5, 33), _t(d, dt, 17, 33), _t(d, dt, 17), _t(d, dt, 4, 33),
            _t(d, dt, 17, 4), 0.5, None, 0.0, None)


def _lora_x_lora(d: torch.device, dt: torch.dtype) -> Args:
    return _replace(_lora(d, dt), 6, _t(d, dt, 2, 5, 33, seed=3))


def _lora_dropout(d: torch.device, dt: torch.dtype) -> Args:
    args = _lora(d, dt)
    return (*args[:7], 0.25, torch.tensor(12345, dtype=torch.int64))


def _lora_backward(d: torch.device, dt: torch.dtype) -> Args:
    x, w, _b, a, b, s, *_ = _lora(d, dt)
    return (_t(d, dt, 2, 5, 17, seed=9), x, w, a, b, s, None, [True, True, True, False])


def _nf4_weight(d: torch.device, dt: torch.dtype, double: bool = True) -> Args:
    codes, absmax = reference.nf4_quantize(_t(torch.device("cpu"), torch.float32, 17, 40), 32)
    if double:
        absmax, nested, offset = reference.nf4_double_quantize(absmax, 256)
        return (codes.to(d), absmax.to(d), nested.to(d), offset.to(d), 32, 256)
    return (codes.to(d), absmax.to(d), None, None, 32, 256)


def _quantize(d: torch.device, dt: torch.dtype) -> Args:
    return (_t(d, dt, 7, 9), 32)


def _double_quantize(d: torch.device, dt: torch.dtype) -> Args:
    return (_t(d, torch.float32, 300).abs() + 0.1, 256)


def _double_quantize_nearest(d: torch.device, dt: torch.dtype) -> Args:
    return (*_double_quantize(d, dt), True)


def _dequantize(d: torch.device, dt: torch.dtype) -> Args:
    return (*_nf4_weight(d, dt), [17, 40], dt)


def _dequantize_plain(d: torch.device, dt: torch.dtype) -> Args:
    return (*_nf4_weight(d, dt, double=False), [680], dt)


def _dequantize_into(d: torch.device, dt: torch.dtype) -> Args:
    return (*_nf4_weight(d, dt), torch.empty(17, 40, dtype=dt, device=d))


def _nf4_linear(d: torch.device, dt: torch.dtype) -> Args:
    return (_t(d, dt, 3, 5, 40), *_nf4_weight(d, dt), 17, 40, _t(d, dt, 17))


def _nf4_grad_input(d: torch.device, dt: torch.dtype) -> Args:
    return (_t(d, dt, 7, 17), *_nf4_weight(d, dt), 17, 40)


def _nf4_lora(d: torch.device, dt: torch.dtype) -> Args:
    return (_t(d, dt, 3, 40), *_nf4_weight(d, dt), 17, 40, _t(d, dt, 17), _t(d, dt, 4, 40),
            _t(d, dt, 17, 4), 1.5, None, 0.0, None)


def _nf4_lora_backward(d: torch.device, dt: torch.dtype) -> Args:
    lead = _nf4_lora(d, dt)
    return (_t(d, dt, 3, 17, seed=5), lead[0], *lead[1:9], lead[10], lead[11], 1.5, None,
            [True, True, True, False])


def _ia3_out(d: torch.device, dt: torch.dtype) -> Args:
    return (_t(d, dt, 2, 5, 33), _t(d, dt, 17, 33), _t(d, dt, 17), _t(d, dt, 17) + 1, False)


def _ia3_in(d: torch.device, dt: torch.dtype) -> Args:
    return (_t(d, dt, 9, 33), _t(d, dt, 17, 33), None, _t(d, dt, 33) + 1, True)


def _ia3_scale_grad(d: torch.device, dt: torch.dtype) -> Args:
    x, w, b, scale, _ = _ia3_out(d, dt)
    out = reference.ia3_linear(x, w, b, scale, False)
    return (_t(d, dt, 2, 5, 17, seed=4), out, x, w, b, scale)


def _houlsby(d: torch.device, dt: torch.dtype) -> Args:
    return (_t(d, dt, 2, 5, 24), _t(d, dt, 6, 24), _t(d, dt, 6), _t(d, dt, 24, 6),
            _t(d, dt, 24), "gelu")


def _multi(d: torch.device, dt: torch.dtype) -> Args:
    x = _t(d, dt, 2, 5, 33)
    index = torch.tensor([[0, 1, -1, 2, 0], [2, 2, 1, -1, 0]], dtype=torch.int64, device=d)
    return (_t(d, dt, 2, 5, 17), x, _t(d, dt, 3, 4, 33), _t(d, dt, 3, 17, 4),
            torch.tensor([0.5, 1.0, 2.0], dtype=dt, device=d), index)


def _grouped(d: torch.device, dt: torch.dtype, counts: tuple[int, ...] = (3, 0, 5, 2)) -> Args:
    # 2 x 6 rows, 10 taken (two rows of no adapter), in an order unlike the rows' own.
    rows = torch.tensor([7, 0, 11, 4, 2, 9, 1, 5, 3, 10][:sum(counts)], dtype=torch.int64,
                        device=d)
    n = len(counts)
    return (_t(d, dt, 2, 6, 17), _t(d, dt, 2, 6, 33), _t(d, dt, n, 4, 33), _t(d, dt, n, 17, 4),
            torch.tensor([0.5, 1.0, 2.0, 0.25][:n], dtype=torch.float32, device=d), rows,
            torch.tensor(counts, dtype=torch.int64))  # on the CPU, as the row plan keeps it


def _grouped_uniform(d: torch.device, dt: torch.dtype) -> Args:
    return _grouped(d, dt, (2, 2, 2, 2))


def _grouped_backward(d: torch.device, dt: torch.dtype) -> Args:
    base, x, a, b, scaling, rows, counts = _grouped(d, dt)
    _out, u = ops.lora._grouped_reference(base, x, a, b, scaling, rows, counts)
    return (_t(d, dt, 2, 6, 17, seed=7), x, a, b, scaling, rows, counts, u, [True, True, True])


def _grouped_backward_uniform(d: torch.device, dt: torch.dtype) -> Args:
    base, x, a, b, scaling, rows, counts = _grouped_uniform(d, dt)
    _out, u = ops.lora._grouped_reference(base, x, a, b, scaling, rows, counts)
    return (_t(d, dt, 2, 6, 17, seed=7), x, a, b, scaling, rows, counts, u, [True, False, True])


# --- references for the ops whose plain path is a gradient ----------------------------------


def _autograd_reference(forward: Callable[..., torch.Tensor], args: Args, grad: torch.Tensor,
                        positions: tuple[int, ...], mask: list[bool]) -> tuple[torch.Tensor, ...]:
    leaves = [args[i].detach().requires_grad_(True) for i in positions]
    full = list(args)
    for i, leaf in zip(positions, leaves, strict=True):
        full[i] = leaf
    out = forward(*full)
    grads = torch.autograd.grad(out, leaves, grad)
    return tuple(g if want else g.new_empty((0,)) for g, want in zip(grads, mask, strict=True))


def _lora_backward_reference(grad, x, weight, a, b, s, x_lora, mask, p=0.0, seed=None):
    args = (x, weight, None, a, b, s, None, p, seed)
    return (*_autograd_reference(reference.lora_linear, args, grad, (0, 3, 4), mask[:3]),
            grad.new_empty((0,)))


def _nf4_lora_backward_reference(grad, x, codes, absmax, nested, offset, bs, nbs, out_f, in_f,
                                 a, b, s, x_lora, mask, p=0.0, seed=None):
    args = (x, codes, absmax, nested, offset, bs, nbs, out_f, in_f, None, a, b, s, None, p, seed)
    return (*_autograd_reference(reference.nf4_lora_linear, args, grad, (0, 10, 11), mask[:3]),
            grad.new_empty((0,)))


def _grouped_backward_reference(grad, x, a, b, scaling, rows, counts, u, mask):
    base = grad.new_zeros(grad.shape)

    def forward(x_, a_, b_):
        return ops.lora._grouped_reference(base, x_, a_, b_, scaling, rows, counts)[0]

    return _autograd_reference(forward, (x, a, b), grad, (0, 1, 2), mask)


def _ia3_scale_grad_reference(grad, out, x, weight, bias, scale):
    pre = torch.nn.functional.linear(x, weight, bias)
    return (grad * pre).reshape(-1, pre.shape[-1]).sum(0)


EXTRA_REFERENCES: dict[str, Callable[..., Any]] = {
    "lora_linear_backward": _lora_backward_reference,
    "nf4_lora_linear_backward": _nf4_lora_backward_reference,
    "ia3_scale_grad": _ia3_scale_grad_reference,
    "lora_grouped_add_backward": _grouped_backward_reference,
}

GOOD: list[Good] = [
    Good("lora_linear", "3d_bias", _lora, grads=(0, 3, 4)),
    Good("lora_linear", "x_lora", _lora_x_lora, grads=(0, 1, 2, 3, 4, 6)),
    Good("lora_linear", "dropout", _lora_dropout, grads=(0, 3, 4)),
    Good("lora_linear_backward", "lora_and_x", _lora_backward),
    Good("nf4_quantize", "odd", _quantize, (torch.float32, torch.bfloat16, torch.float16),
         exact=True),
    Good("nf4_double_quantize", "300_blocks", _double_quantize, (torch.float32,), exact=True),
    Good("nf4_double_quantize", "nearest_codes", _double_quantize_nearest, (torch.float32,),
         exact=True),
    Good("nf4_dequantize", "double_quant", _dequantize, (torch.float32, torch.bfloat16),
         exact=True),
    Good("nf4_dequantize", "plain_1d", _dequantize_plain, (torch.float16,), exact=True),
    Good("nf4_dequantize_into", "double_quant", _dequantize_into, exact=True),
    Good("nf4_linear", "3d_bias", _nf4_linear, grads=(0, 9)),
    Good("nf4_linear_grad_input", "2d", _nf4_grad_input, grads=(0,)),
    Good("nf4_lora_linear", "bias", _nf4_lora, grads=(0, 9, 10, 11)),
    Good("nf4_lora_linear_backward", "lora_and_x", _nf4_lora_backward),
    Good("ia3_linear", "output_scale", _ia3_out, grads=(0, 1, 2, 3)),
    Good("ia3_linear", "input_scale", _ia3_in, grads=(0, 1, 3)),
    Good("ia3_scale_grad", "3d", _ia3_scale_grad),
    Good("houlsby_adapter", "gelu", _houlsby, grads=(0, 1, 2, 3, 4)),
    Good("lora_multi_add", "mixed_rows", _multi),
    Good("lora_grouped_add", "ragged_groups", _grouped, grads=(0, 1, 2, 3)),
    Good("lora_grouped_add", "uniform_groups", _grouped_uniform, grads=(0, 1, 2, 3)),
    Good("lora_grouped_add_backward", "ragged_groups", _grouped_backward),
    Good("lora_grouped_add_backward", "uniform_groups", _grouped_backward_uniform),
]

BAD: list[Bad] = [
    Bad("lora_linear", "lora_b_rows", _lora, lambda a: _replace(a, 4, a[4][:16]), "lora_b"),
    Bad("lora_linear", "weight_dtype", _lora, lambda a: _replace(a, 1, a[1].double()), "weight"),
    Bad("lora_linear", "bias_size", _lora, lambda a: _replace(a, 2, a[2][:3]), "bias"),
    Bad("lora_linear_backward", "lora_b_rank", _lora_backward,
        lambda a: _replace(a, 4, a[4][:, :3]), "lora_b"),
    Bad("nf4_quantize", "blocksize", _quantize, lambda a: _replace(a, 1, 48), "blocksize"),
    Bad("nf4_quantize", "int_dtype", _quantize, lambda a: _replace(a, 0, a[0].to(torch.int32)),
        "x"),
    Bad("nf4_double_quantize", "dtype", _double_quantize,
        lambda a: _replace(a, 0, a[0].double()), "absmax"),
    Bad("nf4_dequantize", "codes_numel", _dequantize, lambda a: _replace(a, 0, a[0][:-1]),
        "codes"),
    Bad("nf4_dequantize", "float_absmax_with_nested", _dequantize,
        lambda a: _replace(a, 1, a[1].float()), "nested_absmax"),
    Bad("nf4_dequantize_into", "out_shape", _dequantize_into,
        lambda a: _replace(a, 6, a[6][:16]), "codes"),
    # The CUDA entry used to name peftreg::nf4_dequantize in these (issue 14).
    Bad("nf4_dequantize_into", "out_dtype", _dequantize_into,
        lambda a: _replace(a, 6, a[6].to(torch.int32)), "out"),
    Bad("nf4_dequantize_into", "out_not_contiguous", _dequantize_into,
        lambda a: _replace(a, 6, a[6].new_empty(40, 17).t()), "out"),
    Bad("nf4_linear", "x_features", _nf4_linear, lambda a: _replace(a, 0, a[0][..., :39]), "x"),
    Bad("nf4_linear", "bias_size", _nf4_linear, lambda a: _replace(a, 9, a[9][:3]), "bias"),
    Bad("nf4_linear_grad_input", "grad_features", _nf4_grad_input,
        lambda a: _replace(a, 0, a[0][:, :16]), "grad"),
    # The fake kernel used to name peftreg::lora_linear here (issue 14).
    Bad("nf4_lora_linear", "lora_b_rows", _nf4_lora, lambda a: _replace(a, 11, a[11][:16]),
        "lora_b"),
    Bad("nf4_lora_linear", "lora_a_dtype", _nf4_lora, lambda a: _replace(a, 10, a[10].double()),
        "lora_a"),
    # The quantized weight is checked once, in the entry, under the op's own name.
    Bad("nf4_lora_linear", "codes_numel", _nf4_lora, lambda a: _replace(a, 1, a[1][:-1]),
        "codes"),
    Bad("nf4_lora_linear_backward", "lora_b_rows", _nf4_lora_backward,
        lambda a: _replace(a, 11, a[11][:16]), "lora_b"),
    Bad("nf4_lora_linear_backward", "absmax_numel", _nf4_lora_backward,
        lambda a: _replace(a, 3, a[3][:-1]), "absmax"),
    Bad("ia3_linear", "scale_size", _ia3_out, lambda a: _replace(a, 3, a[3][:16]), "scale"),
    Bad("ia3_linear", "input_scale_size", _ia3_in, lambda a: _replace(a, 3, a[3][:32]), "scale"),
    Bad("ia3_scale_grad", "out_shape", _ia3_scale_grad, lambda a: _replace(a, 1, a[1][:1]),
        "out"),
    Bad("houlsby_adapter", "activation", _houlsby, lambda a: _replace(a, 5, "swish"),
        "activation"),
    Bad("houlsby_adapter", "w_up_rows", _houlsby, lambda a: _replace(a, 3, a[3][:23]), "w_up"),
    Bad("lora_multi_add", "index_dtype", _multi, lambda a: _replace(a, 5, a[5].int()), "index"),
    Bad("lora_multi_add", "lora_b_adapters", _multi, lambda a: _replace(a, 3, a[3][:2]),
        "lora_b"),
    Bad("lora_grouped_add", "rows_dtype", _grouped, lambda a: _replace(a, 5, a[5].int()),
        "rows"),
    # The values of counts are data (a wrong sum fails only eagerly: test_lora_grouped.py);
    # its shape is checked while tracing too.
    Bad("lora_grouped_add", "counts_adapters", _grouped, lambda a: _replace(a, 6, a[6][:3]),
        "counts"),
    Bad("lora_grouped_add", "counts_dtype", _grouped, lambda a: _replace(a, 6, a[6].int()),
        "counts"),
    Bad("lora_grouped_add", "base_shape", _grouped, lambda a: _replace(a, 0, a[0][:, :5]),
        "base"),
    Bad("lora_grouped_add_backward", "u_shape", _grouped_backward,
        lambda a: _replace(a, 7, a[7][:, :3]), "u"),
]

GOOD_CALLS = [(g, dt) for g in GOOD for dt in g.dtypes]


def _overload(op: str) -> Any:
    return getattr(torch.ops.peftreg, op).default


def _outputs(result: Any, args: Args, op: str) -> list[torch.Tensor]:
    if op == "nf4_dequantize_into":
        return [args[-1]]
    if isinstance(result, torch.Tensor):
        return [result]
    return list(result)


def _reference(op: str) -> Callable[..., Any]:
    found = EXTRA_REFERENCES.get(op) or ops._op.registered()[op].reference
    assert found is not None, f"no reference for peftreg::{op}"
    return found


def _as_float64(args: Args) -> Args:
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def test_every_registered_op_is_in_the_harness():
    """A new op without good and bad cases here fails the suite."""
    good = {g.op for g in GOOD}
    bad = {b.op for b in BAD}
    assert good == set(ops.OPS), f"ops without good cases: {set(ops.OPS) - good}"
    assert bad == set(ops.OPS), f"ops without bad cases: {set(ops.OPS) - bad}"


def test_derived_op_list_matches_the_dispatcher():
    defined = {name.removeprefix("peftreg::") for name in torch._C._dispatch_get_all_op_names()
               if name.startswith("peftreg::")}
    assert defined == set(ops.OPS)


@pytest.mark.parametrize(("case", "dtype"), GOOD_CALLS,
                         ids=[f"{g.op}-{g.name}-dtype={str(dt).removeprefix('torch.')}"
                              for g, dt in GOOD_CALLS])
def test_eager_matches_fake_and_reference(op_device, case: Good, dtype: torch.dtype):
    args = case.make(op_device, dtype)
    result = _overload(case.op)(*args)
    eager = _outputs(result, args, case.op)

    mode = FakeTensorMode()
    fake_args = tree_map_only(torch.Tensor, mode.from_tensor,
                              case.make(op_device, dtype))
    with mode:
        fake = _outputs(_overload(case.op)(*fake_args), fake_args, case.op)
    assert len(fake) == len(eager)
    for i, (e, f) in enumerate(zip(eager, fake, strict=True)):
        assert (list(f.shape), f.dtype, f.stride()) == (list(e.shape), e.dtype, e.stride()), \
            f"output {i}: fake {list(f.shape)} {f.dtype} {f.stride()} vs eager " \
            f"{list(e.shape)} {e.dtype} {e.stride()}"

    ref_args = case.make(op_device, dtype) if case.exact else _as_float64(
        case.make(op_device, dtype))
    expected_result = _reference(case.op)(*ref_args)
    expected = _outputs(expected_result, ref_args, case.op)
    for i, (e, r) in enumerate(zip(eager, expected, strict=True)):
        if case.exact:
            assert torch.equal(e.cpu(), r.cpu()), f"output {i} differs from the reference"
        else:
            scaled_close(e, r, "parity.forward", dtype, f"output {i}")


OPCHECK = [g for g in GOOD if torch.float32 in g.dtypes]


@pytest.mark.parametrize("case", OPCHECK, ids=[f"{g.op}-{g.name}" for g in OPCHECK])
def test_opcheck(op_device, case: Good):
    args = list(case.make(op_device, torch.float32))
    for i in case.grads:
        args[i] = args[i].requires_grad_(True)
    torch.library.opcheck(_overload(case.op), tuple(args))


def _message(exc: BaseException) -> str:
    return str(exc).split("\nException raised from", 1)[0].strip()


@pytest.mark.compile
@pytest.mark.parametrize("case", BAD, ids=[f"{b.op}-{b.name}" for b in BAD])
def test_bad_input_same_error_eager_and_compiled(op_device, case: Bad):
    args = case.break_args(case.make(op_device, torch.float32))
    overload = _overload(case.op)
    with pytest.raises(RuntimeError) as eager:
        overload(*args)
    eager_text = _message(eager.value)
    assert eager_text.startswith(f"peftreg::{case.op}: "), eager_text
    assert f"'{case.names}'" in eager_text, eager_text

    def call(*a: Any) -> Any:
        return overload(*a)

    torch._dynamo.reset()  # a cached graph would skip the fake kernel
    compiled = torch.compile(call, backend="eager", fullgraph=True)
    with pytest.raises(RuntimeError) as traced:
        compiled(*case.break_args(case.make(op_device, torch.float32)))
    assert isinstance(traced.value, torch._dynamo.exc.TorchRuntimeError), type(traced.value)
    assert eager_text in str(traced.value), \
        f"eager: {eager_text!r}\ncompiled: {str(traced.value)[:600]!r}"
