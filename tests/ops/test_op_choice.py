# SPDX-License-Identifier: Apache-2.0
"""The one kernel choice (peftreg.ops._op.Op.run): kernel modes and the measured crossovers."""

from __future__ import annotations

import pytest
import torch

from peftreg import ops
from peftreg.ops import adapters, lora, reference

pytestmark = pytest.mark.usefixtures("require_extension")


def _lora_args(rows: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> tuple:
    x = torch.randn(rows, 40, dtype=dtype, requires_grad=grad)
    return (x, torch.randn(24, 40, dtype=dtype), None, torch.randn(4, 40, dtype=dtype),
            torch.randn(24, 4, dtype=dtype), 0.5, None, 0.0, None)


@pytest.mark.parametrize("mode", ["compiled", "reference"])
def test_forced_modes_take_their_path(op_calls, mode):
    args = _lora_args(1)
    with ops.kernels(mode):
        y = lora.LORA_LINEAR.run(*args)
    assert op_calls == (["lora_linear"] if mode == "compiled" else [])
    torch.testing.assert_close(y, reference.lora_linear(*args))


@pytest.mark.parametrize(("rows", "grad", "dropout", "fused"),
                         [(1, True, 0.1, False), (64, False, 0.0, False), (64, True, 0.0, False),
                          (64, True, 0.1, True)],
                         ids=["rows=1-dropout", "rows=64-inference", "rows=64-train",
                              "rows=64-dropout"])
def test_lora_fp32_cpu_crossover(op_calls, rows, grad, dropout, fused):
    """fp32 on the CPU: the kernel only with dropout from 32 rows (docs/ops.md)."""
    args = _lora_args(rows, grad=grad)
    if dropout:
        args = (*args[:7], dropout, lora.new_dropout_seed())
    with ops.kernels("auto"):
        lora.LORA_LINEAR.run(*args)
    assert op_calls == (["lora_linear"] if fused else [])


@pytest.mark.parametrize("widen", ["0", "1"])
def test_lora_16bit_cpu_crossover_follows_the_kernels_widening(op_calls, monkeypatch, widen):
    monkeypatch.setenv("PEFTREG_CPU_WIDEN_16BIT", widen)
    with ops.kernels("auto"), torch.no_grad():
        lora.LORA_LINEAR.run(*_lora_args(64, torch.bfloat16))
    assert op_calls == (["lora_linear"] if widen == "1" else [])


def test_ia3_and_houlsby_run_plain_pytorch_on_the_cpu(op_calls):
    x = torch.randn(8, 16)
    with ops.kernels("auto"):
        adapters.IA3_LINEAR.run(x, torch.randn(12, 16), None, torch.rand(12), False)
        adapters.HOULSBY_ADAPTER.run(x, torch.randn(4, 16), None, torch.randn(16, 4), None,
                                     "relu")
    assert op_calls == []
    with ops.kernels("compiled"):
        adapters.IA3_LINEAR.run(x, torch.randn(12, 16), None, torch.rand(12), False)
    assert op_calls == ["ia3_linear"]


def test_unknown_kernel_mode_is_refused(monkeypatch):
    monkeypatch.setenv("PEFTREG_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="PEFTREG_KERNELS='sometimes'"):
        lora.LORA_LINEAR.run(*_lora_args(1))
    with pytest.raises(ValueError, match="kernel mode 'fast'"):
        ops.set_kernel_mode("fast")  # type: ignore[arg-type]


def test_an_op_name_is_defined_once():
    with pytest.raises(ValueError, match="defined twice"):
        ops._op.Op("lora_linear")


def test_lean_autograd_registration_takes_plain_positional_schemas(require_extension):
    """Op.register_autograd's own autograd kernel covers every peftreg schema; a schema with a
    tensor list or a keyword-only argument is refused rather than registered wrongly."""
    plain = ops._op.positional_without_tensor_lists
    assert all(plain(op.overload._schema) for op in ops._op.registered().values())
    assert not plain(torch.ops.aten.cat.default._schema)  # Tensor[] argument
    assert not plain(torch.ops.aten.split.Tensor._schema)  # Tensor[] return
    assert not plain(torch.ops.aten.sum.dim_IntList._schema)  # keyword-only dtype
    assert plain(torch.ops.aten.mm.default._schema)
