# SPDX-License-Identifier: Apache-2.0
"""Registration of the compiled ops: opcheck, dispatcher contents, and how the library loads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from peftreg import ops

ROOT = Path(__file__).resolve().parents[2]


def _sample_inputs(device: torch.device) -> dict[str, tuple]:
    """Sample (args) per case for opcheck: grads on/off, bias/no bias, x_lora, 1-D..3-D x."""

    def t(*shape, grad=False, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, device=device, requires_grad=grad)

    return {
        "3d_lora_grads": (t(2, 3, 8), t(6, 8), t(6), t(4, 8, grad=True), t(6, 4, grad=True), 0.5,
                          None),
        "all_grads_x_lora": (t(5, 8, grad=True), t(6, 8, grad=True), t(6, grad=True),
                             t(4, 8, grad=True), t(6, 4, grad=True), 2.0, t(5, 8, grad=True)),
        "no_bias_1d": (t(8, grad=True), t(6, 8), None, t(1, 8, grad=True), t(6, 1, grad=True),
                       1.0, None),
        "no_grad": (t(3, 8), t(6, 8), t(6), t(4, 8), t(6, 4), 0.25, t(3, 8)),
        "float64": (t(3, 8, dtype=torch.float64, grad=True), t(6, 8, dtype=torch.float64),
                    t(6, dtype=torch.float64), t(2, 8, dtype=torch.float64, grad=True),
                    t(6, 2, dtype=torch.float64, grad=True), 0.5, None),
    }


OPCHECK_CASES = ["3d_lora_grads", "all_grads_x_lora", "no_bias_1d", "no_grad", "float64"]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[f"case={c}" for c in OPCHECK_CASES])
def test_opcheck_lora_linear(op_device, case):
    """Schema, autograd registration, fake kernel and AOT dispatch agree with the kernel."""
    args = _sample_inputs(op_device)[case]
    torch.library.opcheck(torch.ops.peftreg.lora_linear.default, args)


# (output_mask, with x_lora, dtype): LoRA-only training, everything, input gradient only.
BACKWARD_CASES = {
    "lora_only_f32": ([False, True, True, False], False, torch.float32),
    "all_x_lora_bf16": ([True, True, True, True], True, torch.bfloat16),
    "input_only_bf16": ([True, False, False, False], False, torch.bfloat16),
}


@pytest.mark.parametrize("case", list(BACKWARD_CASES), ids=[f"case={c}" for c in BACKWARD_CASES])
def test_opcheck_lora_linear_backward(op_device, case):
    """The compiled backward op on its own: schema, fake kernel (empty unrequested outputs)."""
    mask, with_x_lora, dtype = BACKWARD_CASES[case]

    def t(*shape):
        return torch.randn(*shape, dtype=dtype, device=op_device)

    x_lora = t(2, 5, 8) if with_x_lora else None
    args = (t(2, 5, 6), t(2, 5, 8), t(6, 8), t(3, 8), t(6, 3), 0.5, x_lora, mask)
    torch.library.opcheck(torch.ops.peftreg.lora_linear_backward.default, args)


def _nf4_sample_inputs(device: torch.device) -> dict[str, tuple[object, tuple, dict]]:
    """Sample (op, args, kwargs) per NF4 case: with/without double quant, odd sizes, grads."""
    gen = torch.Generator().manual_seed(0)

    def t(*shape, grad=False, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(
            grad)

    p = torch.ops.peftreg
    weight = t(6, 40)
    codes, absmax = p.nf4_quantize(weight, 32)
    dq_absmax, nested, offset = p.nf4_double_quantize(absmax, 256)
    plain = (codes, absmax, None, None, 32, 256)
    dq = (codes, dq_absmax, nested, offset, 32, 256)
    return {
        "quantize_odd_bf16": (p.nf4_quantize.default, (t(7, 9, dtype=torch.bfloat16), 64), {}),
        "quantize_fp16": (p.nf4_quantize.default, (t(130, dtype=torch.float16), 32), {}),
        "double_quantize": (p.nf4_double_quantize.default, (absmax, 256), {}),
        "dequantize_dq_bf16": (p.nf4_dequantize.default, (*dq, [6, 40], torch.bfloat16), {}),
        "dequantize_plain_f32": (p.nf4_dequantize.default, (*plain, [240], torch.float32), {}),
        "dequantize_into_fp16": (p.nf4_dequantize_into.default,
                                 (*dq, torch.empty(6, 40, dtype=torch.float16, device=device)),
                                 {}),
        "linear_dq_grads": (p.nf4_linear.default, (t(3, 40, grad=True), *dq, 6, 40,
                                                   t(6, grad=True)), {}),
        "linear_plain_3d": (p.nf4_linear.default, (t(2, 5, 40, grad=True), *plain, 6, 40, None),
                            {}),
        "linear_no_grad_bf16": (p.nf4_linear.default,
                                (t(9, 40, dtype=torch.bfloat16), *dq, 6, 40,
                                 t(6, dtype=torch.bfloat16)), {}),
        "linear_float64": (p.nf4_linear.default, (t(2, 40, grad=True, dtype=torch.float64), *dq,
                                                  6, 40, None), {}),
        "grad_input": (p.nf4_linear_grad_input.default, (t(4, 6, grad=True), *dq, 6, 40), {}),
    }


NF4_OPCHECK_CASES = ["quantize_odd_bf16", "quantize_fp16", "double_quantize",
                     "dequantize_dq_bf16", "dequantize_plain_f32", "dequantize_into_fp16",
                     "linear_dq_grads", "linear_plain_3d", "linear_no_grad_bf16",
                     "linear_float64", "grad_input"]


@pytest.mark.parametrize("case", NF4_OPCHECK_CASES, ids=[f"case={c}" for c in NF4_OPCHECK_CASES])
def test_opcheck_nf4(op_device, case):
    """Schema, fake kernel, autograd registration and AOT dispatch of every NF4 op."""
    op, args, kwargs = _nf4_sample_inputs(op_device)[case]
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.usefixtures("require_extension")
def test_ops_list_matches_dispatcher():
    """peftreg.ops.OPS (used by kernel_report and `peftreg doctor`) lists every defined op."""
    defined = {name.removeprefix("peftreg::") for name in torch._C._dispatch_get_all_op_names()
               if name.startswith("peftreg::")}
    assert defined == set(ops.OPS)


@pytest.mark.usefixtures("require_extension")
def test_every_op_has_cpu_kernel_fake_and_autograd():
    for op in ops.OPS:
        qualname = f"peftreg::{op}"
        assert ops.kernel_available(op, "cpu"), qualname
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"), qualname
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd"), qualname


@pytest.mark.usefixtures("require_extension")
def test_cuda_build_has_cuda_kernel_for_every_op():
    if not ops.built_with_cuda():
        pytest.skip("this build of the extension has no CUDA kernels (CPU torch or no toolkit)")
    missing = [op for op in ops.OPS if not ops.kernel_available(op, "cuda")]
    assert not missing, f"CUDA build without CUDA kernels for: {missing}"


@pytest.mark.usefixtures("require_extension")
def test_kernel_report_covers_every_op_and_device():
    report = ops.kernel_report()
    assert [(op, dev) for op, dev, _ in report] == [(o, d) for o in ops.OPS for d in ops.DEVICES]
    assert all(ok for op, dev, ok in report if dev == "cpu")
    assert all(ok == ops.built_with_cuda() for op, dev, ok in report if dev == "cuda")
    assert ops.kernel_available("peftreg::lora_linear", torch.device("cpu"))
    assert not ops.kernel_available("no_such_op", "cpu")
    assert not ops.kernel_available("lora_linear", "meta")  # only CPU and CUDA are reported


def test_extension_is_built_when_required():
    """CI sets PEFTREG_REQUIRE_EXTENSION=1: there, a missing extension is a failure."""
    if os.environ.get("PEFTREG_REQUIRE_EXTENSION") != "1":
        pytest.skip("set PEFTREG_REQUIRE_EXTENSION=1 to require the compiled extension")
    assert ops.has_extension(), ops.extension_error()
    assert ops.kernel_available("lora_linear", "cpu")


def _run_python(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "PYTHONPATH": pythonpath, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=full_env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


_NO_EXTENSION_SCRIPT = """
    import warnings
    import torch
    from peftreg import ops
    from peftreg.ops import lora as lora_ops
    from peftreg.ops import reference

    assert not ops.has_extension() and ops.extension_origin() is None
    err = ops.extension_error()
    for needle in ("PEFTREG_EXTENSION=off", "pip install --no-build-isolation -e .",
                   "python setup.py build_ext --inplace"):
        assert needle in err, err
    assert not any(ok for _, _, ok in ops.kernel_report()), ops.kernel_report()
    assert not hasattr(torch.ops.peftreg, "lora_linear")  # no schema without the library
    x, w, a, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
    try:
        lora_ops.lora_linear(x, w, None, a, b, 1.0)
    except ops.ExtensionUnavailableError as exc:
        assert isinstance(exc, RuntimeError)
        assert "pip install --no-build-isolation -e ." in str(exc), exc
    else:
        raise AssertionError("lora_ops.lora_linear ran without the extension")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops.warn_fallback_once("peftreg::lora_linear has no compiled cpu kernel")
        ops.warn_fallback_once("a second reason")
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert issubclass(caught[0].category, ops.PeftregFallbackWarning)
    assert issubclass(caught[0].category, UserWarning)
    message = str(caught[0].message)
    for needle in ("no compiled cpu kernel", "plain-PyTorch", "build_ext --inplace"):
        assert needle in message, message
    assert reference.lora_linear(x, w, None, a, b, 1.0).shape == (2, 4)
    print("ok")
"""


def test_import_without_extension_falls_back_cleanly():
    """PEFTREG_EXTENSION=off behaves like an unbuilt checkout: import works, errors say how."""
    proc = _run_python(_NO_EXTENSION_SCRIPT, PEFTREG_EXTENSION="off")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_unknown_extension_mode_is_reported():
    proc = _run_python("""
        from peftreg import ops
        assert not ops.has_extension()
        assert "PEFTREG_EXTENSION='sometimes'" in ops.extension_error(), ops.extension_error()
        print("ok")
    """, PEFTREG_EXTENSION="sometimes")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_jit_build_then_load(tmp_path):
    """`python -m peftreg.ops.build` compiles into the cache; a later import loads it."""
    build = subprocess.run([sys.executable, "-m", "peftreg.ops.build"], cwd=ROOT,
                           env={**os.environ, "PEFTREG_EXTENSION": "off",
                                "PEFTREG_EXTENSION_DIR": str(tmp_path)},
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr
    proc = _run_python("""
        import torch
        from peftreg import ops
        from peftreg.ops import lora as lora_ops
        from peftreg.ops import reference
        assert ops.extension_origin() == "jit", ops.extension_error()
        args = (torch.randn(3, 8), torch.randn(5, 8), torch.randn(5), torch.randn(2, 8),
                torch.randn(5, 2), 0.5)
        torch.testing.assert_close(lora_ops.lora_linear(*args), reference.lora_linear(*args))
        print("ok")
    """, PEFTREG_EXTENSION="jit", PEFTREG_EXTENSION_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
