# SPDX-License-Identifier: Apache-2.0
"""Choosing between compiled kernels and the plain-PyTorch path.

``auto`` (the default) uses a compiled kernel when the extension has one for the tensor's device
and otherwise the plain-PyTorch path, warning once per process. ``compiled`` insists on kernels
(a missing one is an error); ``reference`` always uses plain PyTorch. Set it with
:func:`set_kernel_mode` or the ``PEFTREG_KERNELS`` environment variable.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Literal

import torch

from peftreg import ops

KernelMode = Literal["auto", "compiled", "reference"]
_MODES = ("auto", "compiled", "reference")
_mode: KernelMode | None = None


def kernel_mode() -> KernelMode:
    """The current mode (``PEFTREG_KERNELS`` unless :func:`set_kernel_mode` was called)."""
    if _mode is not None:
        return _mode
    env = os.environ.get("PEFTREG_KERNELS", "auto").lower()
    if env not in _MODES:
        raise ValueError(f"PEFTREG_KERNELS={env!r}; expected one of {', '.join(_MODES)}")
    return env  # type: ignore[return-value]


def set_kernel_mode(mode: KernelMode | None) -> None:
    """Force ``"compiled"`` or ``"reference"`` kernels, or ``"auto"``; ``None`` resets."""
    global _mode
    if mode is not None and mode not in _MODES:
        raise ValueError(f"kernel mode {mode!r}; expected one of {', '.join(_MODES)}")
    _mode = mode


@contextlib.contextmanager
def kernels(mode: KernelMode) -> Iterator[None]:
    """Use ``mode`` inside a ``with`` block."""
    global _mode
    before = _mode
    set_kernel_mode(mode)
    try:
        yield
    finally:
        _mode = before


def use_compiled(op: str, device: torch.device) -> bool:
    """Whether to call compiled op ``peftreg::<op>`` for tensors on ``device``.

    Raises:
        ops.ExtensionUnavailableError: mode is ``compiled`` and no kernel exists.
    """
    mode = kernel_mode()
    if mode == "reference":
        return False
    available = ops.has_extension() and ops.kernel_available(op, device.type)
    if available:
        return True
    if mode == "compiled":
        raise ops.ExtensionUnavailableError(
            f"PEFTREG_KERNELS=compiled but peftreg::{op} has no compiled {device.type} kernel: "
            f"{ops.extension_error() or 'not built for this device'}"
        )
    if ops.has_extension():
        ops.warn_fallback_once(f"peftreg::{op} has no compiled {device.type} kernel")
    else:
        ops.warn_fallback_once(f"the compiled extension is not loaded: {ops.extension_error()}")
    return False
