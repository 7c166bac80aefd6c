# SPDX-License-Identifier: Apache-2.0
"""Shared test fixtures: seeding, devices, tiny models, and the test-only plugin folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Test-only plugin distributions (tests/plugin_dists) are installed here by `make test`, away
# from the working environment; putting the folder on sys.path makes their entry points visible.
TEST_PLUGINS = ROOT / "build" / "test-plugins"
if TEST_PLUGINS.is_dir() and str(TEST_PLUGINS) not in sys.path:
    sys.path.insert(0, str(TEST_PLUGINS))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(TEST_PLUGINS), *filter(None, [os.environ.get("PYTHONPATH")])])


def devices() -> list[str]:
    """The one device list of the suite: cpu, plus cuda when a GPU is visible.

    ``PEFTREG_TEST_DEVICE`` overrides it with a comma list (``cuda`` or ``cpu,cuda``).
    """
    forced = os.environ.get("PEFTREG_TEST_DEVICE")
    if forced:
        return [d.strip() for d in forced.split(",") if d.strip()]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Every test that uses a `device` fixture (directly or through op_device / paged_device)
    # runs once per device of devices(), with ids like device=cpu.
    if "device" in metafunc.fixturenames:
        found = devices()
        metafunc.parametrize("device", found, ids=[f"device={d}" for d in found])


# Test models are tiny: one thread avoids thread start-up costs that dominate their run time
# (the benchmarks, not the tests, measure multi-threaded speed).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    from peftreg.reference_model import ReferenceConfig

    return ReferenceConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, intermediate_size=48, max_positions=64)


@pytest.fixture
def make_tiny(tiny_config):
    """Factory building the same tiny ReferenceTransformer (same weights) on every call."""
    from peftreg.reference_model import ReferenceTransformer

    torch.manual_seed(1234)
    state = ReferenceTransformer(tiny_config).state_dict()

    def make(config=None):
        model = ReferenceTransformer(config or tiny_config)
        if config is None:
            model.load_state_dict(state)
        return model

    return make


@pytest.fixture
def token_batch(tiny_config):
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, tiny_config.vocab_size, (3, 9), generator=gen)
