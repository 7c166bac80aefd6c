# SPDX-License-Identifier: Apache-2.0
"""Fixtures of the paged-optimizer tests: the paged device and the extension gate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# tolerances.py (tests/) and adamw_reference.py (here) are imported as top-level modules;
# under --import-mode=importlib these folders are not on sys.path by themselves.
for _folder in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from peftreg import ops  # noqa: E402
from peftreg.ops.paged import page_pool_available  # noqa: E402


@pytest.fixture
def paged_device(device: str) -> torch.device:
    """``device`` (the suite's device list, tests/conftest.py) with a compiled page pool,
    skipping where this build has none."""
    if not ops.has_extension():
        pytest.skip(f"compiled extension unavailable: {ops.extension_error()}")
    if not page_pool_available(device):
        pytest.skip(f"this build of the extension has no page pool for {device}")
    return torch.device(device)


@pytest.fixture
def require_pool() -> None:
    """Skip unless the compiled CPU page pool is available."""
    if not page_pool_available("cpu"):
        pytest.skip(f"compiled page pool unavailable: {ops.extension_error()}")
