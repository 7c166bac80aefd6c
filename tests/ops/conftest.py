# SPDX-License-Identifier: Apache-2.0
"""Fixtures for the compiled-op tests: an extension gate, the op device, op-call counting.

The device list itself is the suite's one list (``devices()`` in tests/conftest.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# tests/tolerances.py is imported as a top-level module (`from tolerances import tol`); under
# --import-mode=importlib the tests folder is not on sys.path by itself.
_TESTS_DIR = str(Path(__file__).resolve().parents[1])
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from peftreg import ops  # noqa: E402


@pytest.fixture
def require_extension() -> None:
    """Skip unless the compiled extension is loaded (CI makes its absence a failure instead)."""
    if not ops.has_extension():
        pytest.skip(f"compiled extension unavailable: {ops.extension_error()}")


@pytest.fixture
def op_device(require_extension: None, device: str) -> torch.device:
    """``device`` as a torch.device, skipping when this build has no kernel for it."""
    if not ops.kernel_available("lora_linear", device):
        pytest.skip(f"this build of the extension has no {device} kernels "
                    f"(built with CUDA: {ops.built_with_cuda()})")
    return torch.device(device)


@pytest.fixture
def op_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the compiled ops called while the test runs (every path, wrapper or ``run``,
    reaches the kernel through ``Op.overload``)."""
    from peftreg.ops._op import Op

    calls: list[str] = []
    real = Op.overload

    def counted(self: Op):
        calls.append(self.name)
        return real.fget(self)

    monkeypatch.setattr(Op, "overload", property(counted))
    return calls
