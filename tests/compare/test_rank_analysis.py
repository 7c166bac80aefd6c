"""The LoRA section 7 measures on matrices whose answers are known, and the command end to end."""

from __future__ import annotations

import math

import pytest
import torch

from peftreg.compare.rank import amplification, energy_shares, subspace_similarity
from peftreg.errors import ConfigError


def _with_singular_values(values, rows=12, cols=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    s = torch.zeros(rows, cols, dtype=torch.float64)
    for i, value in enumerate(values):
        s[i, i] = value
    return u @ s @ v.T


def test_energy_shares_are_the_cumulative_squared_singular_values():
    delta = _with_singular_values([4.0, 2.0, 1.0, 1.0])
    shares = energy_shares(delta, ks=(1, 2, 4, 8))
    total = 16 + 4 + 1 + 1
    assert shares[1] == pytest.approx(16 / total)
    assert shares[2] == pytest.approx(20 / total)
    assert shares[4] == pytest.approx(1.0) and shares[8] == pytest.approx(1.0)
    assert energy_shares(torch.zeros(3, 5), ks=(1,)) == {1: 0.0}


def test_subspace_similarity_is_one_for_nested_subspaces_and_zero_for_orthogonal_ones():
    generator = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(20, 20, generator=generator, dtype=torch.float64))
    mix = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    small = mix @ basis[:3]                # spans e1..e3 of the basis
    large = basis[:10] * 2.0               # spans e1..e10
    phi = subspace_similarity(small, large)
    assert phi.shape == (3, 10)
    # All of the small factor's 3 directions lie in the large factor's top 10 ...
    assert phi[2, 9].item() == pytest.approx(1.0)
    assert phi[0, 9].item() == pytest.approx(1.0)
    orthogonal = subspace_similarity(basis[:3], basis[10:14])
    assert orthogonal.abs().max().item() < 1e-12
    # ... and phi is a normalised overlap: between 0 and 1 everywhere.
    assert phi.min().item() >= -1e-12 and phi.max().item() <= 1 + 1e-12
    with pytest.raises(ConfigError, match="different input widths"):
        subspace_similarity(torch.zeros(2, 5), torch.zeros(4, 6))


def test_subspace_similarity_of_one_random_direction_against_j_random_ones():
    # Two unrelated subspaces of R^d: phi(1, j) is about j / d in expectation.
    d = 400
    generator = torch.Generator().manual_seed(2)
    a1 = torch.randn(1, d, generator=generator, dtype=torch.float64)
    a2 = torch.randn(100, d, generator=generator, dtype=torch.float64)
    assert subspace_similarity(a1, a2)[0, 99].item() == pytest.approx(100 / d, abs=0.1)


def test_amplification_of_an_update_along_the_weights_own_directions():
    # W = diag(10, 1, 0.1, ...); an update of norm 2 along W's third direction, where W has 0.1.
    weight = torch.diag(torch.tensor([10.0, 1.0, 0.1, 0.01], dtype=torch.float64))
    delta = torch.zeros(4, 4, dtype=torch.float64)
    delta[2, 2] = 2.0
    assert amplification(delta, weight, 1) == pytest.approx(2.0 / 0.1)
    # Along W's top direction the update is no amplification at all: 2 / 10.
    delta = torch.zeros(4, 4, dtype=torch.float64)
    delta[0, 0] = 2.0
    assert amplification(delta, weight, 1) == pytest.approx(0.2)
    assert math.isfinite(amplification(_with_singular_values([1.0, 0.5], 4, 4),
                                       _with_singular_values([3.0, 2.0, 1.0, 1.0], 4, 4), 2))


def test_the_analysis_runs_end_to_end_on_a_small_task(tiny_bert_dir, tweets_file, tmp_path):
    from peftreg.compare.rank import ENERGY_KS, analyze, plot
    from peftreg.compare.tasks import read_tweets, sentiment_task
    from peftreg.registry import default_registry

    task = sentiment_task(tiny_bert_dir, read_tweets(tweets_file), steps=4, batch_size=8,
                          max_length=12, seed=1, test_per_class=10)
    result = analyze(task, default_registry(), ranks=(2, 8), seed=1)
    assert set(result.energy) == {"q", "k", "v", "o", "ffn_up", "ffn_down"}
    for shares in result.energy.values():
        values = [shares[k] for k in ENERGY_KS]
        assert values == sorted(values) and 0 < values[0] <= values[-1] <= 1 + 1e-9
    phi = result.similarity["q"]
    assert len(phi) == 2 and len(phi[0]) == 8
    assert all(0 <= x <= 1 + 1e-9 for row in phi for x in row)
    assert all(a > 0 for amp in result.amplification.values() for a in amp.values())
    assert [run["run"] for run in result.runs] == ["full fine-tuning", "lora r=2", "lora r=8"]
    plot(result, tmp_path / "analysis.png")
    assert (tmp_path / "analysis.png").stat().st_size > 1000
