"""Soak: many adapters added, switched, saved, loaded and deleted on one model, in a loop.

After a warm-up, neither resident memory nor the number of live Python objects and tensors may
grow, the model's parameter count must return to the base after each round, and every loaded
adapter must give exactly the outputs of a fresh model holding only that adapter.

Bounded by time: ``PEFTREG_SOAK_SECONDS`` (default 4) after a fixed warm-up.
"""

from __future__ import annotations

import gc
import os
import random
import time

import pytest
import torch

import peftreg
from peftreg import AdaptedModel
from peftreg_plugins.houlsby import HoulsbyConfig
from peftreg_plugins.ia3 import IA3Config
from peftreg_plugins.lora import LoraConfig

SECONDS = float(os.environ.get("PEFTREG_SOAK_SECONDS", "4"))
WARMUP_ROUNDS = 4
# Allocator and interpreter caches settle during the warm-up; what is left is noise of a few
# MiB. A leak of one tiny adapter per round (~10 KiB of tensors plus module objects) over the
# hundreds of rounds run here would exceed both bounds.
RSS_GROWTH_BOUND = 24 * 2**20
OBJECT_GROWTH_BOUND = 2000
# The last round's locals (outputs, a fresh model) may still be alive at either measurement.
TENSOR_GROWTH_BOUND = 20

CONFIGS = [
    LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    LoraConfig(r=4, lora_alpha=8.0, target_modules=["o_proj"], modules_to_save=["lm_head"]),
    IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    HoulsbyConfig(reduction_factor=4),
]


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    # type(), not isinstance(): the latter reads __class__, which warns on deprecated proxies.
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def _randomise(model, name, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_soak_add_switch_save_load_delete(make_tiny, token_batch, tmp_path):
    model = AdaptedModel(make_tiny())
    base_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        base_out = model(token_batch)["logits"].clone()
    rng = random.Random(0)
    rounds, loads = 0, 0
    baseline = None
    deadline = None
    while deadline is None or time.monotonic() < deadline:
        names = [f"a{rounds}_{i}" for i in range(3)]
        chosen = [rng.randrange(len(CONFIGS)) for _ in names]
        for i, (name, c) in enumerate(zip(names, chosen, strict=True)):
            model.add_adapter(name, CONFIGS[c], activate=False)
            _randomise(model, name, seed=rounds * 10 + i)
        for name, c in zip(names, chosen, strict=True):
            model.set_active(name)
            with torch.no_grad():
                expected = model(token_batch)["logits"].clone()
            directory = model.save_adapter(tmp_path / f"slot{rng.randrange(4)}", name)
            model.delete_adapter(name)
            model.load_adapter(directory, name)
            loads += 1
            with torch.no_grad():
                assert torch.equal(model(token_batch)["logits"], expected), (rounds, name)
            if rng.random() < 0.15:  # sometimes also against a fresh model with only it
                fresh = peftreg.load(make_tiny(), directory)
                with torch.no_grad():
                    assert torch.equal(fresh(token_batch)["logits"], expected), (rounds, name)
            assert CONFIGS[c] == model.record(name).config
        for name in names:
            model.delete_adapter(name)
        assert model.adapters == {}
        assert sum(p.numel() for p in model.parameters()) == base_params
        rounds += 1
        if rounds == WARMUP_ROUNDS:
            gc.collect()
            baseline = (_rss(), len(gc.get_objects()), _live_tensors())
            deadline = time.monotonic() + SECONDS
    gc.collect()
    rss, objects, tensors = _rss(), len(gc.get_objects()), _live_tensors()
    with torch.no_grad():
        assert torch.equal(model(token_batch)["logits"], base_out)
    print(f"\n[reliability] soak: {rounds} rounds, {loads} save/load cycles in {SECONDS:.0f} s; "
          f"RSS {baseline[0] / 2**20:.1f} -> {rss / 2**20:.1f} MiB, objects {baseline[1]} -> "
          f"{objects}, tensors {baseline[2]} -> {tensors}")
    assert rounds > WARMUP_ROUNDS
    assert rss - baseline[0] < RSS_GROWTH_BOUND, (baseline[0], rss)
    assert objects - baseline[1] < OBJECT_GROWTH_BOUND, (baseline[1], objects)
    assert tensors - baseline[2] < TENSOR_GROWTH_BOUND, (baseline[2], tensors)
