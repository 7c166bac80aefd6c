# SPDX-License-Identifier: Apache-2.0
"""Fake (meta) kernels: output shapes and dtypes of every peftreg op, without computing.

``torch.compile``, ``torch.export`` and FakeTensor tracing call these instead of the compiled
kernels. Each one repeats the invariants of the C++ checks (csrc/fused/lora_args.h) with
``torch._check`` so a bad call fails while tracing with the same message it would get eagerly.
``csrc/registration.cpp`` names this module in ``m.set_python_module``; PyTorch insists that the
registrations live here. Imported by :mod:`peftreg.ops` only after the compiled library loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LORA = "peftreg::lora_linear"


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check_same_dtype(t: torch.Tensor, name: str, x: torch.Tensor) -> None:
    torch._check(
        t.dtype == x.dtype,
        lambda: f"{_LORA}: argument '{name}' has dtype {t.dtype} but 'x' has dtype {x.dtype}; "
        "all tensor arguments must share one dtype",
    )


def _check_same_device(t: torch.Tensor, name: str, x: torch.Tensor) -> None:
    torch._check(
        t.device == x.device,
        lambda: f"{_LORA}: argument '{name}' is on device {t.device} but 'x' is on device "
        f"{x.device}; all tensor arguments must be on one device",
    )


def _check_dim(t: torch.Tensor, name: str, dim: int, layout: str) -> None:
    torch._check(
        t.dim() == dim,
        lambda: f"{_LORA}: argument '{name}' must be {dim}-D {layout} but has shape {_shape(t)}",
    )


def _check_size(t: torch.Tensor, name: str, dim: int, expected: int, layout: str,
                meaning: str) -> None:
    torch._check(
        t.shape[dim] == expected,
        lambda: f"{_LORA}: argument '{name}' must have shape {layout} with size {expected} at "
        f"dim {dim} ({meaning}) but has shape {_shape(t)}",
    )


@torch.library.register_fake("peftreg::lora_linear")
def _lora_linear_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shape of ``x @ weight^T + bias + scaling * (x_l @ lora_a^T) @ lora_b^T``."""
    torch._check(
        x.dim() >= 1,
        lambda: f"{_LORA}: argument 'x' must have at least 1 dimension(s) (..., in_features) "
        f"but has shape {_shape(x)}",
    )
    _check_dim(weight, "weight", 2, "(out_features, in_features)")
    _check_dim(lora_a, "lora_a", 2, "(r, in_features)")
    _check_dim(lora_b, "lora_b", 2, "(out_features, r)")
    in_features, out_features, rank = x.shape[-1], weight.shape[0], lora_a.shape[0]
    _check_size(weight, "weight", 1, in_features, "(out_features, in_features)",
                "in_features = x.shape[-1]")
    _check_size(lora_a, "lora_a", 1, in_features, "(r, in_features)",
                "in_features = x.shape[-1]")
    _check_size(lora_b, "lora_b", 0, out_features, "(out_features, r)",
                "out_features = weight.shape[0]")
    _check_size(lora_b, "lora_b", 1, rank, "(out_features, r)", "r = lora_a.shape[0]")
    if bias is not None:
        _check_dim(bias, "bias", 1, "(out_features,)")
        _check_size(bias, "bias", 0, out_features, "(out_features,)",
                    "out_features = weight.shape[0]")
    if x_lora is not None:
        torch._check(
            x_lora.shape == x.shape,
            lambda: f"{_LORA}: argument 'x_lora' must have the same shape as 'x' {_shape(x)} "
            f"but has shape {_shape(x_lora)}",
        )

    torch._check(
        x.dtype in _SUPPORTED_DTYPES,
        lambda: f"{_LORA}: argument 'x' has dtype {x.dtype}; expected one of float32, "
        "bfloat16, float16 or float64",
    )
    named = [("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)]
    if bias is not None:
        named.append(("bias", bias))
    if x_lora is not None:
        named.append(("x_lora", x_lora))
    for name, tensor in named:
        _check_same_dtype(tensor, name, x)
    for name, tensor in named:
        _check_same_device(tensor, name, x)

    return x.new_empty((*x.shape[:-1], out_features))


def _lora_grads_fake(grad: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                     has_x_lora: bool, output_mask: Sequence[bool]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes of (grad_x, grad_lora_a, grad_lora_b, grad_x_lora); empty where not requested."""
    need_x, need_a, need_b, need_xl = output_mask
    x_shape = (*grad.shape[:-1], lora_a.shape[1])
    # Each unrequested output is its own empty tensor: outputs never alias one another.
    return (grad.new_empty(x_shape if need_x else (0,)),
            grad.new_empty(lora_a.shape if need_a else (0,)),
            grad.new_empty(lora_b.shape if need_b else (0,)),
            grad.new_empty(x_shape if need_xl and has_x_lora else (0,)))


@torch.library.register_fake("peftreg::lora_linear_backward")
def _lora_linear_backward_fake(
    grad: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None,
    output_mask: Sequence[bool],
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient shapes of lora_linear (csrc/fused/lora_args.h holds the full checks)."""
    torch._check(len(output_mask) == 4, lambda: "output_mask must have 4 entries")
    _check_dim(lora_a, "lora_a", 2, "(r, in_features)")
    _check_dim(lora_b, "lora_b", 2, "(out_features, r)")
    _check_size(lora_b, "lora_b", 0, grad.shape[-1], "(out_features, r)",
                "out_features = grad.shape[-1]")
    return _lora_grads_fake(grad, lora_a, lora_b, x_lora is not None, output_mask)


# --- NF4 ops (csrc/nf4/nf4_args.h holds the C++ checks these repeat) -------------------------

_NF4_QUANTIZE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _nf4_check_blocksize(op: str, name: str, value: int) -> None:
    torch._check(
        32 <= value <= 4096 and value & (value - 1) == 0,
        lambda: f"{op}: argument '{name}' is {value}; expected a power of two from 32 to 4096",
    )


# c10::ScalarType names, so the fake kernels' messages read like the C++ ones.
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short",
    torch.int32: "Int", torch.int64: "Long", torch.bool: "Bool",
}


def _scalar_type(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype))


def _nf4_check_dtype(op: str, t: torch.Tensor, name: str, expected: torch.dtype) -> None:
    torch._check(
        t.dtype == expected,
        lambda: f"{op}: argument '{name}' has dtype {_scalar_type(t.dtype)}; expected "
        f"{_scalar_type(expected)}",
    )


def _nf4_check_numel(op: str, t: torch.Tensor, name: str, expected: int, meaning: str) -> None:
    torch._check(
        t.numel() == expected,
        lambda: f"{op}: argument '{name}' has {t.numel()} elements (shape {_shape(t)}) but "
        f"{expected} are expected ({meaning})",
    )


def _nf4_check_weight(op: str, codes: torch.Tensor, absmax: torch.Tensor,
                      nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                      blocksize: int, nested_blocksize: int, numel: int) -> None:
    """The checks of check_quantized_weight (csrc/nf4/nf4_args.h), same wording."""
    _nf4_check_blocksize(op, "blocksize", blocksize)
    blocks = (numel + blocksize - 1) // blocksize
    _nf4_check_dtype(op, codes, "codes", torch.uint8)
    _nf4_check_numel(op, codes, "codes", (numel + 1) // 2,
                     "(numel + 1) // 2 packed bytes for the weight's element count")
    _nf4_check_numel(op, absmax, "absmax", blocks, "one per block: ceil(numel / blocksize)")
    if absmax.dtype == torch.uint8:
        _nf4_check_blocksize(op, "nested_blocksize", nested_blocksize)
        torch._check(
            nested_absmax is not None and offset is not None,
            lambda: f"{op}: argument 'absmax' is uint8 (double-quantized), so 'nested_absmax' "
            "and 'offset' are required",
        )
        assert nested_absmax is not None and offset is not None
        _nf4_check_dtype(op, nested_absmax, "nested_absmax", torch.float32)
        _nf4_check_dtype(op, offset, "offset", torch.float32)
        _nf4_check_numel(op, nested_absmax, "nested_absmax",
                         (blocks + nested_blocksize - 1) // nested_blocksize,
                         "one per nested block: ceil(blocks / nested_blocksize)")
        _nf4_check_numel(op, offset, "offset", 1, "one scalar: the mean of the absmax")
    else:
        torch._check(
            absmax.dtype == torch.float32,
            lambda: f"{op}: argument 'absmax' has dtype {_scalar_type(absmax.dtype)}; expected "
            "Float "
            "(float32 scales) or Byte (uint8 double-quantized scales)",
        )
        torch._check(
            nested_absmax is None and offset is None,
            lambda: f"{op}: arguments 'nested_absmax' and 'offset' belong to double-quantized "
            "weights (uint8 'absmax') but 'absmax' is float32; pass None for both",
        )


def _nf4_check_input(op: str, x: torch.Tensor, name: str, features: int,
                     features_name: str) -> None:
    torch._check(
        x.dim() >= 1,
        lambda: f"{op}: argument '{name}' must have at least 1 dimension(s) (..., features) "
        f"but has shape {_shape(x)}",
    )
    torch._check(
        x.shape[-1] == features,
        lambda: f"{op}: argument '{name}' has {x.shape[-1]} features in its last dimension "
        f"(shape {_shape(x)}) but {features_name} is {features}",
    )
    torch._check(
        x.dtype in _SUPPORTED_DTYPES,
        lambda: f"{op}: argument '{name}' has dtype {x.dtype}; expected one of float32, "
        "bfloat16, float16 or float64",
    )


@torch.library.register_fake("peftreg::nf4_quantize")
def _nf4_quantize_fake(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    op = "peftreg::nf4_quantize"
    _nf4_check_blocksize(op, "blocksize", blocksize)
    torch._check(
        x.dtype in _NF4_QUANTIZE_DTYPES,
        lambda: f"{op}: argument 'x' has dtype {_scalar_type(x.dtype)}; expected Float "
        "(float32), BFloat16 "
        "or Half (float16)",
    )
    n = x.numel()
    codes = x.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = x.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32)
    return codes, absmax


@torch.library.register_fake("peftreg::nf4_double_quantize")
def _nf4_double_quantize_fake(absmax: torch.Tensor, nested_blocksize: int = 256,
                              nearest: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "peftreg::nf4_double_quantize"
    _nf4_check_blocksize(op, "nested_blocksize", nested_blocksize)
    _nf4_check_dtype(op, absmax, "absmax", torch.float32)
    torch._check(
        absmax.dim() == 1,
        lambda: f"{op}: argument 'absmax' must be 1-D (blocks,) but has shape {_shape(absmax)}",
    )
    n = absmax.numel()
    codes = absmax.new_empty((n,), dtype=torch.uint8)
    nested = absmax.new_empty(((n + nested_blocksize - 1) // nested_blocksize,))
    return codes, nested, absmax.new_empty(())


def _nf4_dequantize_checks(codes: torch.Tensor, absmax: torch.Tensor,
                           nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                           blocksize: int, nested_blocksize: int, shape: list[int],
                           dtype: torch.dtype) -> None:
    op = "peftreg::nf4_dequantize"
    torch._check(
        dtype in _SUPPORTED_DTYPES,
        lambda: f"{op}: argument 'dtype' is {dtype}; expected one of Float (float32), BFloat16, "
        "Half (float16) or Double",
    )
    numel = 1
    for size in shape:
        torch._check(size >= 0, lambda: f"{op}: argument 'shape' {shape} has a negative size")
        numel *= size
    _nf4_check_weight(op, codes, absmax, nested_absmax, offset, blocksize, nested_blocksize,
                      numel)


@torch.library.register_fake("peftreg::nf4_dequantize")
def _nf4_dequantize_fake(codes: torch.Tensor, absmax: torch.Tensor,
                         nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                         blocksize: int, nested_blocksize: int, shape: list[int],
                         dtype: torch.dtype) -> torch.Tensor:
    _nf4_dequantize_checks(codes, absmax, nested_absmax, offset, blocksize, nested_blocksize,
                           shape, dtype)
    return codes.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake("peftreg::nf4_dequantize_into")
def _nf4_dequantize_into_fake(codes: torch.Tensor, absmax: torch.Tensor,
                              nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                              blocksize: int, nested_blocksize: int, out: torch.Tensor) -> None:
    _nf4_dequantize_checks(codes, absmax, nested_absmax, offset, blocksize, nested_blocksize,
                           list(out.shape), out.dtype)


@torch.library.register_fake("peftreg::nf4_linear")
def _nf4_linear_fake(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                     nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                     blocksize: int, nested_blocksize: int, out_features: int, in_features: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Shape of ``x @ W^T + bias`` for an NF4 weight ``W`` (out_features, in_features)."""
    op = "peftreg::nf4_linear"
    _nf4_check_input(op, x, "x", in_features, "in_features")
    _nf4_check_weight(op, codes, absmax, nested_absmax, offset, blocksize, nested_blocksize,
                      out_features * in_features)
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == out_features,
            lambda: f"{op}: argument 'bias' has shape {_shape(bias)} but out_features is "
            f"{out_features}",
        )
        torch._check(
            bias.dtype == x.dtype,
            lambda: f"{op}: argument 'bias' has dtype {bias.dtype} but 'x' has dtype {x.dtype}; "
            "all tensor arguments must share one dtype",
        )
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("peftreg::nf4_linear_grad_input")
def _nf4_linear_grad_input_fake(grad: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                                nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                                blocksize: int, nested_blocksize: int, out_features: int,
                                in_features: int) -> torch.Tensor:
    """Shape of ``grad @ W``."""
    op = "peftreg::nf4_linear_grad_input"
    _nf4_check_input(op, grad, "grad", out_features, "out_features")
    _nf4_check_weight(op, codes, absmax, nested_absmax, offset, blocksize, nested_blocksize,
                      out_features * in_features)
    return grad.new_empty((*grad.shape[:-1], in_features))


@torch.library.register_fake("peftreg::nf4_lora_linear")
def _nf4_lora_linear_fake(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                          nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                          blocksize: int, nested_blocksize: int, out_features: int,
                          in_features: int, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scaling: float,
                          x_lora: torch.Tensor | None = None, dropout_p: float = 0.0,
                          dropout_seed: torch.Tensor | None = None) -> torch.Tensor:
    """Shape of nf4_linear's output; the LoRA factors must fit (in_features, out_features)."""
    out = _nf4_linear_fake(x, codes, absmax, nested_absmax, offset, blocksize, nested_blocksize,
                           out_features, in_features, bias)
    _check_dim(lora_a, "lora_a", 2, "(r, in_features)")
    _check_dim(lora_b, "lora_b", 2, "(out_features, r)")
    _check_size(lora_a, "lora_a", 1, in_features, "(r, in_features)", "in_features")
    _check_size(lora_b, "lora_b", 0, out_features, "(out_features, r)", "out_features")
    _check_size(lora_b, "lora_b", 1, lora_a.shape[0], "(out_features, r)", "r = lora_a.shape[0]")
    return out


@torch.library.register_fake("peftreg::nf4_lora_linear_backward")
def _nf4_lora_linear_backward_fake(
    grad: torch.Tensor, x: torch.Tensor | None, codes: torch.Tensor, absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int,
    nested_blocksize: int, out_features: int, in_features: int, lora_a: torch.Tensor,
    lora_b: torch.Tensor, scaling: float, x_lora: torch.Tensor | None,
    output_mask: Sequence[bool], dropout_p: float = 0.0, dropout_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient shapes of nf4_lora_linear (as lora_linear_backward)."""
    torch._check(len(output_mask) == 4, lambda: "output_mask must have 4 entries")
    _check_size(lora_a, "lora_a", 1, in_features, "(r, in_features)", "in_features")
    _check_size(lora_b, "lora_b", 0, out_features, "(out_features, r)", "out_features")
    return _lora_grads_fake(grad, lora_a, lora_b, x_lora is not None, output_mask)


# --- IA3, Houlsby, multi-LoRA (csrc/fused/adapters_args.h holds the C++ checks these repeat) ---


def _adapter_check(op: str, cond: bool, message: str) -> None:
    torch._check(cond, lambda: f"{op}: {message}")


def _adapter_same(op: str, named: list[tuple[str, torch.Tensor]], ref: torch.Tensor,
                  ref_name: str) -> None:
    for name, t in named:
        _adapter_check(op, t.dtype == ref.dtype,
                       f"argument '{name}' has dtype {t.dtype} but '{ref_name}' has dtype "
                       f"{ref.dtype}; all tensor arguments must share one dtype")
    for name, t in named:
        _adapter_check(op, t.device == ref.device,
                       f"argument '{name}' is on device {t.device} but '{ref_name}' is on "
                       f"device {ref.device}; all tensor arguments must be on one device")


def _adapter_dim(op: str, t: torch.Tensor, name: str, dim: int, layout: str) -> None:
    _adapter_check(op, t.dim() == dim,
                   f"argument '{name}' must be {dim}-D {layout} but has shape {_shape(t)}")


def _adapter_size(op: str, t: torch.Tensor, name: str, dim: int, expected: int, layout: str,
                  meaning: str) -> None:
    _adapter_check(op, t.shape[dim] == expected,
                   f"argument '{name}' must have shape {layout} with size {expected} at dim "
                   f"{dim} ({meaning}) but has shape {_shape(t)}")


def _adapter_input(op: str, x: torch.Tensor, name: str, layout: str) -> None:
    _adapter_check(op, x.dim() >= 1, f"argument '{name}' must have at least 1 dimension(s) "
                   f"{layout} but has shape {_shape(x)}")
    _adapter_check(op, x.dtype in _SUPPORTED_DTYPES,
                   f"argument '{name}' has dtype {x.dtype}; expected one of float32, bfloat16, "
                   "float16 or float64")


def _ia3_weight_checks(op: str, x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> int:
    _adapter_input(op, x, "x", "(..., in_features)")
    _adapter_dim(op, weight, "weight", 2, "(out_features, in_features)")
    _adapter_size(op, weight, "weight", 1, x.shape[-1], "(out_features, in_features)",
                  "in_features = x.shape[-1]")
    out_features = weight.shape[0]
    if bias is not None:
        _adapter_dim(op, bias, "bias", 1, "(out_features,)")
        _adapter_size(op, bias, "bias", 0, out_features, "(out_features,)",
                      "out_features = weight.shape[0]")
    return out_features


@torch.library.register_fake("peftreg::ia3_linear")
def _ia3_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     scale: torch.Tensor, scale_input: bool) -> torch.Tensor:
    """Shape of ``(x W^T + b) * l`` or ``(x * l) W^T + b``."""
    op = "peftreg::ia3_linear"
    out_features = _ia3_weight_checks(op, x, weight, bias)
    if scale_input:
        _adapter_dim(op, scale, "scale", 1, "(in_features,)")
        _adapter_size(op, scale, "scale", 0, x.shape[-1], "(in_features,)",
                      "scale_input=True: in_features = x.shape[-1]")
    else:
        _adapter_dim(op, scale, "scale", 1, "(out_features,)")
        _adapter_size(op, scale, "scale", 0, out_features, "(out_features,)",
                      "scale_input=False: out_features = weight.shape[0]")
    named = [("weight", weight), ("scale", scale)] + ([("bias", bias)] if bias is not None else [])
    _adapter_same(op, named, x, "x")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("peftreg::ia3_scale_grad")
def _ia3_scale_grad_fake(grad: torch.Tensor, out: torch.Tensor, x: torch.Tensor,
                         weight: torch.Tensor, bias: torch.Tensor | None,
                         scale: torch.Tensor) -> torch.Tensor:
    """Shape of the scale's gradient: ``(out_features,)``."""
    op = "peftreg::ia3_scale_grad"
    out_features = _ia3_weight_checks(op, x, weight, bias)
    _adapter_dim(op, scale, "scale", 1, "(out_features,)")
    _adapter_size(op, scale, "scale", 0, out_features, "(out_features,)",
                  "out_features = weight.shape[0]")
    expected = [*x.shape[:-1], out_features]
    _adapter_check(op, list(out.shape) == expected,
                   f"argument 'out' must have shape (*x.shape[:-1], out_features) = {expected} "
                   f"but has shape {_shape(out)}")
    _adapter_check(op, grad.shape == out.shape,
                   f"argument 'grad' must have the same shape as 'out' {_shape(out)} but has "
                   f"shape {_shape(grad)}")
    named = [("grad", grad), ("out", out), ("weight", weight), ("scale", scale)]
    if bias is not None:
        named.append(("bias", bias))
    _adapter_same(op, named, x, "x")
    return x.new_empty((out_features,))


_HOULSBY_ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


@torch.library.register_fake("peftreg::houlsby_adapter")
def _houlsby_adapter_fake(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None,
                          w_up: torch.Tensor, b_up: torch.Tensor | None,
                          activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes of ``out`` (like ``h``) and ``z`` (``(..., bottleneck)``)."""
    op = "peftreg::houlsby_adapter"
    _adapter_input(op, h, "h", "(..., hidden)")
    _adapter_dim(op, w_down, "w_down", 2, "(bottleneck, hidden)")
    _adapter_dim(op, w_up, "w_up", 2, "(hidden, bottleneck)")
    hidden, bottleneck = h.shape[-1], w_down.shape[0]
    _adapter_size(op, w_down, "w_down", 1, hidden, "(bottleneck, hidden)", "hidden = h.shape[-1]")
    _adapter_size(op, w_up, "w_up", 0, hidden, "(hidden, bottleneck)", "hidden = h.shape[-1]")
    _adapter_size(op, w_up, "w_up", 1, bottleneck, "(hidden, bottleneck)",
                  "bottleneck = w_down.shape[0]")
    named = [("w_down", w_down), ("w_up", w_up)]
    if b_down is not None:
        _adapter_dim(op, b_down, "b_down", 1, "(bottleneck,)")
        _adapter_size(op, b_down, "b_down", 0, bottleneck, "(bottleneck,)",
                      "bottleneck = w_down.shape[0]")
        named.append(("b_down", b_down))
    if b_up is not None:
        _adapter_dim(op, b_up, "b_up", 1, "(hidden,)")
        _adapter_size(op, b_up, "b_up", 0, hidden, "(hidden,)", "hidden = h.shape[-1]")
        named.append(("b_up", b_up))
    _adapter_same(op, named, h, "h")
    _adapter_check(op, activation in _HOULSBY_ACTIVATIONS,
                   f"argument 'activation' is '{activation}'; expected one of relu, gelu, silu, "
                   "tanh")
    return h.new_empty(h.shape), h.new_empty((*h.shape[:-1], bottleneck))


@torch.library.register_fake("peftreg::lora_multi_add")
def _lora_multi_add_fake(base: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                         lora_b: torch.Tensor, scaling: torch.Tensor,
                         index: torch.Tensor) -> torch.Tensor:
    """Shape of ``base`` plus each row's own adapter update."""
    op = "peftreg::lora_multi_add"
    _adapter_input(op, x, "x", "(..., in_features)")
    _adapter_dim(op, lora_a, "lora_a", 3, "(adapters, r, in_features)")
    _adapter_dim(op, lora_b, "lora_b", 3, "(adapters, out_features, r)")
    _adapter_dim(op, scaling, "scaling", 1, "(adapters,)")
    adapters, rank, out_features = lora_a.shape[0], lora_a.shape[1], lora_b.shape[1]
    _adapter_size(op, lora_a, "lora_a", 2, x.shape[-1], "(adapters, r, in_features)",
                  "in_features = x.shape[-1]")
    _adapter_size(op, lora_b, "lora_b", 0, adapters, "(adapters, out_features, r)",
                  "adapters = lora_a.shape[0]")
    _adapter_size(op, lora_b, "lora_b", 2, rank, "(adapters, out_features, r)",
                  "r = lora_a.shape[1]")
    _adapter_size(op, scaling, "scaling", 0, adapters, "(adapters,)",
                  "adapters = lora_a.shape[0]")
    expected = [*x.shape[:-1], out_features]
    _adapter_check(op, list(base.shape) == expected,
                   f"argument 'base' must have shape (*x.shape[:-1], out_features) = {expected} "
                   f"but has shape {_shape(base)}")
    _adapter_check(op, list(index.shape) == list(x.shape[:-1]),
                   f"argument 'index' must have shape x.shape[:-1] = {list(x.shape[:-1])} (one "
                   f"adapter per row) but has shape {_shape(index)}")
    _adapter_check(op, index.dtype == torch.int64,
                   f"argument 'index' has dtype {index.dtype}; expected Long (int64)")
    _adapter_same(op, [("base", base), ("lora_a", lora_a), ("lora_b", lora_b)], x, "x")
    _adapter_check(op, scaling.dtype in _SUPPORTED_DTYPES,
                   f"argument 'scaling' has dtype {scaling.dtype}; expected a floating dtype")
    return base.new_empty(base.shape)
