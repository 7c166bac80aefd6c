# SPDX-License-Identifier: Apache-2.0
"""Fake (meta) kernels: output shapes and dtypes of every peftreg op, without computing.

``torch.compile``, ``torch.export`` and FakeTensor tracing call these instead of the compiled
kernels. Each one repeats the invariants of the C++ checks (csrc/fused/lora_args.h) with
``torch._check`` so a bad call fails while tracing with the same message it would get eagerly.
``csrc/registration.cpp`` names this module in ``m.set_python_module``; PyTorch insists that the
registrations live here. Imported by :mod:`peftreg.ops` only after the compiled library loaded.
"""

from __future__ import annotations

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
