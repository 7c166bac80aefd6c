# SPDX-License-Identifier: Apache-2.0
"""Argument checks of the fake kernels, each taking the op's name.

They mirror csrc/common/checks.h and csrc/nf4/nf4_kernels.h word for word (c10's dtype names,
shapes as lists), so a bad argument reads the same eagerly (the C++ check) and under
``torch.compile`` (the fake kernel). tests/ops/test_parity.py holds both to that for every op.
Every helper raises through ``torch._check``, which works on symbolic sizes too.
"""

from __future__ import annotations

from typing import Final

import torch

# c10::ScalarType names, as the C++ messages print them.
_SCALAR_NAMES: Final[dict[torch.dtype, str]] = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short",
    torch.int32: "Int", torch.int64: "Long", torch.bool: "Bool",
}
SUPPORTED_FLOATS: Final[tuple[torch.dtype, ...]] = (
    torch.float32, torch.bfloat16, torch.float16, torch.float64)
MIN_BLOCKSIZE: Final[int] = 32
MAX_BLOCKSIZE: Final[int] = 4096


def scalar_name(dtype: torch.dtype) -> str:
    """``dtype`` as c10 prints it (``Float``, ``BFloat16``, ...)."""
    return _SCALAR_NAMES.get(dtype, str(dtype))


def shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check(op: str, cond: bool, message: str) -> None:
    """Fail with ``"<op>: <message>"`` unless ``cond``."""
    torch._check(cond, lambda: f"{op}: {message}")


def supported_dtype(op: str, t: torch.Tensor, name: str) -> None:
    check(op, t.dtype in SUPPORTED_FLOATS,
          f"argument '{name}' has dtype {scalar_name(t.dtype)}; expected one of Float "
          "(float32), BFloat16, Half (float16) or Double")


def dtype(op: str, t: torch.Tensor, name: str, expected: torch.dtype) -> None:
    check(op, t.dtype == expected, f"argument '{name}' has dtype {scalar_name(t.dtype)}; "
          f"expected {scalar_name(expected)}")


def same_dtype(op: str, named: list[tuple[str, torch.Tensor]], ref: torch.Tensor,
               ref_name: str) -> None:
    for name, t in named:
        check(op, t.dtype == ref.dtype,
              f"argument '{name}' has dtype {scalar_name(t.dtype)} but '{ref_name}' has dtype "
              f"{scalar_name(ref.dtype)}; all tensor arguments must share one dtype")


def same_device(op: str, named: list[tuple[str, torch.Tensor]], ref: torch.Tensor,
                ref_name: str) -> None:
    for name, t in named:
        check(op, t.device == ref.device,
              f"argument '{name}' is on device {t.device} but '{ref_name}' is on device "
              f"{ref.device}; all tensor arguments must be on one device")


def dim(op: str, t: torch.Tensor, name: str, expected: int, layout: str) -> None:
    check(op, t.dim() == expected,
          f"argument '{name}' must be {expected}-D {layout} but has shape {shape(t)}")


def min_dim(op: str, t: torch.Tensor, name: str, expected: int, layout: str) -> None:
    check(op, t.dim() >= expected, f"argument '{name}' must have at least {expected} "
          f"dimension(s) {layout} but has shape {shape(t)}")


def size(op: str, t: torch.Tensor, name: str, at: int, expected: int, layout: str,
         meaning: str) -> None:
    """``t.shape[at] == expected``; ``meaning`` says where ``expected`` comes from."""
    check(op, t.shape[at] == expected,
          f"argument '{name}' must have shape {layout} with size {expected} at dim {at} "
          f"({meaning}) but has shape {shape(t)}")


def optional_vector(op: str, t: torch.Tensor | None, name: str, expected: int, layout: str,
                    meaning: str) -> None:
    """An optional 1-D argument of ``expected`` entries (a bias): its rank, then its length."""
    if t is not None:
        dim(op, t, name, 1, layout)
        size(op, t, name, 0, expected, layout, meaning)


def same_shape(op: str, t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    check(op, t.shape == ref.shape, f"argument '{name}' must have the same shape as "
          f"'{ref_name}' {shape(ref)} but has shape {shape(t)}")


def numel(op: str, t: torch.Tensor, name: str, expected: int, meaning: str) -> None:
    check(op, t.numel() == expected, f"argument '{name}' has {t.numel()} elements (shape "
          f"{shape(t)}) but {expected} are expected ({meaning})")


def blocksize(op: str, name: str, value: int) -> None:
    check(op, MIN_BLOCKSIZE <= value <= MAX_BLOCKSIZE and value & (value - 1) == 0,
          f"argument '{name}' is {value}; expected a power of two from {MIN_BLOCKSIZE} to "
          f"{MAX_BLOCKSIZE}")



def stacked_lora(op: str, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 scaling: torch.Tensor) -> None:
    """Several adapters' stacked LoRA factors: ``x`` (..., in), ``lora_a`` (adapters, r, in),
    ``lora_b`` (adapters, out, r), ``scaling`` (adapters,). ``check_stacked_lora`` of
    csrc/common/checks.h, in its order and words (lora_multi_add, lora_grouped_add)."""
    min_dim(op, x, "x", 1, "(..., in_features)")
    dim(op, lora_a, "lora_a", 3, "(adapters, r, in_features)")
    dim(op, lora_b, "lora_b", 3, "(adapters, out_features, r)")
    dim(op, scaling, "scaling", 1, "(adapters,)")
    adapters, rank = lora_a.shape[0], lora_a.shape[1]
    size(op, lora_a, "lora_a", 2, x.shape[-1], "(adapters, r, in_features)",
         "in_features = x.shape[-1]")
    size(op, lora_b, "lora_b", 0, adapters, "(adapters, out_features, r)",
         "adapters = lora_a.shape[0]")
    size(op, lora_b, "lora_b", 2, rank, "(adapters, out_features, r)", "r = lora_a.shape[1]")
    size(op, scaling, "scaling", 0, adapters, "(adapters,)", "adapters = lora_a.shape[0]")
