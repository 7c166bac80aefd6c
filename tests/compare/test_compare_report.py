# SPDX-License-Identifier: Apache-2.0
"""The comparison's statistics, verdict, progress lines, resume and Markdown output."""

from __future__ import annotations

import io
import math

import pytest
import torch
from rich.console import Console

from peftreg.compare import hardware, report
from peftreg.compare.progress import LineProgress, clock
from peftreg.compare.runs import MethodResult, RunSettings
from peftreg.compare.stats import Interval, interval, rank


def test_known_values_give_known_intervals():
    # mean 2, sample sd 1, t(0.975, 2) = 4.303: half-width 4.303 / sqrt(3)
    got = interval([1.0, 2.0, 3.0])
    assert got.mean == 2.0 and got.n == 3
    assert math.isclose(got.half_width, 4.303 / math.sqrt(3), rel_tol=1e-12)
    # two values 0.6 and 0.7: sd 0.0707, t(1) = 12.706
    two = interval([0.6, 0.7])
    assert math.isclose(two.half_width, 12.706 * math.sqrt(0.005) / math.sqrt(2), rel_tol=1e-9)
    # 40 values: the normal quantile
    many = interval([0.0, 1.0] * 20)
    assert math.isclose(many.half_width, 1.96 * math.sqrt(40 / 39 * 0.25) / math.sqrt(40))
    assert math.isnan(interval([0.5]).half_width) and interval([0.5]).mean == 0.5
    assert interval([]).n == 0 and math.isnan(interval([float("nan")]).mean)
    assert interval([1.0, 2.0, 3.0]).format() == "2.000 ± 2.484"


def test_a_winner_is_named_only_when_its_interval_clears_the_rest():
    clear = {"a": Interval(0.70, 0.01, 3), "b": Interval(0.60, 0.02, 3),
             "c": Interval(0.50, 0.05, 3)}
    assert rank(clear, higher_is_better=True) == ("a", [])
    overlapping = {"a": Interval(0.65, 0.03, 3), "b": Interval(0.633, 0.03, 3),
                   "c": Interval(0.50, 0.01, 3)}
    assert rank(overlapping, higher_is_better=True) == (None, ["a", "b"])
    # lower is better (a loss): the smallest mean wins
    losses = {"a": Interval(2.0, 0.1, 3), "b": Interval(3.0, 0.1, 3)}
    assert rank(losses, higher_is_better=False) == ("a", [])
    # one seed: no interval, so no winner
    assert rank({"a": Interval(0.7, float("nan"), 1), "b": Interval(0.5, float("nan"), 1)},
                True) == (None, ["a", "b"])


def _result(method, seed, metric, kind="method", **extra):
    return MethodResult(method, "peftreg", 1e-3, seed=seed, kind=kind, trainable_params=10,
                        metric=metric, final_loss=1.0 - metric, losses=[1.0, 0.9], step_ms=5.0,
                        mergeable=kind == "method", latency_ratio=1.0,
                        latency_ratio_unmerged=1.1, **extra)


def test_rows_gap_to_full_fine_tuning_and_summary():
    results = [_result("lora", s, m) for s, m in ((0, 0.60), (1, 0.62), (2, 0.61))]
    results += [_result("ia3", s, m) for s, m in ((0, 0.59), (1, 0.63), (2, 0.60))]
    results += [_result("full fine-tuning", s, m, kind="baseline")
                for s, m in ((0, 0.70), (1, 0.71), (2, 0.69))]
    rows = {r.row: r for r in report.summarize(results)}
    assert math.isclose(rows["lora"].gap_to_full, 0.61 - 0.70)
    assert rows["full fine-tuning"].gap_to_full == 0.0
    lines = report.summary_lines(list(rows.values()), "accuracy")
    assert lines[0].startswith("no clear best accuracy: lora, ia3 are tied")
    assert "full fine-tuning" not in lines[0] and lines[1].startswith("full fine-tuning:")
    markdown = report.markdown_table("accuracy", interval([0.33, 0.34]), list(rows.values()))
    assert "| lora | 10 |" in markdown and "0.610 ± " in markdown
    assert "| full fine-tuning (baseline) |" in markdown and "-0.090" in markdown


def test_progress_lines_in_a_pipe_give_elapsed_and_time_left():
    out = io.StringIO()
    ticks = iter([0.0, 0.0, 10.0, 10.0, 30.0])
    progress = LineProgress(Console(file=out, width=300), now=lambda: next(ticks))
    progress.started(1, 3, "lora", 0)
    progress.finished(1, 3, _result("lora", 0, 0.6))
    progress.started(2, 3, "ia3", 0)
    progress.finished(2, 3, _result("ia3", 0, 0.5))
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/3] lora seed 0: started (elapsed 0:00)"
    assert lines[1].startswith("[1/3] lora seed 0: done in 0:10, metric 0.600")
    assert lines[1].endswith("elapsed 0:10, about 0:20 left")
    assert lines[3].endswith("elapsed 0:30, about 0:15 left")  # mean of 10 s and 20 s, one left
    assert clock(3725) == "1:02:05"


def test_resume_keeps_runs_of_the_same_settings(tmp_path):
    settings = RunSettings(steps=2, seeds=1)
    runs = [_result("lora", 0, 0.6)]
    path = tmp_path / "results.json"
    report.write_json(path, "task", "accuracy", {0: 0.33}, settings, ["lora"], runs)
    kept = report.read_runs(path, "task", RunSettings(steps=2, seeds=3))
    assert [(r.method, r.seed, r.metric, r.losses) for r in kept] == [("lora", 0, 0.6,
                                                                     [1.0, 0.9])]
    with pytest.raises(report.ResumeError, match="other settings \\(steps\\)"):
        report.read_runs(path, "task", RunSettings(steps=5))
    with pytest.raises(report.ResumeError, match="made for task"):
        report.read_runs(path, "other task", settings)


def test_resumed_comparison_runs_only_what_is_missing(monkeypatch):
    from peftreg.compare import runner

    calls = []

    def fake_method(name, task, settings, registry, seed, on_step=None, sweep=None, value=None):
        calls.append((name, seed))
        return _result(name, seed, 0.5)

    class FakeTask:
        modules_to_save = ["classifier"]

        def make_model(self, seed):
            return torch.nn.Identity()

        def evaluate(self, model):
            return 0.33

    monkeypatch.setattr(runner, "run_method", fake_method)
    monkeypatch.setattr(runner, "warm_up", lambda task, seed: None)
    settings = RunSettings(seeds=2, baselines=False)
    base, results = runner.run_comparison(FakeTask(), ["lora", "ia3"], settings, None,
                                          done=[_result("lora", 0, 0.7)])
    assert calls == [("ia3", 0), ("lora", 1), ("ia3", 1)]
    assert (results[0].method, results[0].seed, results[0].metric) == ("lora", 0, 0.7)
    assert base == {0: 0.33, 1: 0.33}


@pytest.mark.parametrize(("half_ms", "expected"), [(4.0, "float32"), (0.5, "bfloat16")])
def test_qlora_compute_dtype_follows_the_measured_speed(monkeypatch, half_ms, expected):
    hardware.cpu_compute_dtype.cache_clear()
    monkeypatch.setattr(hardware, "_best_ms",
                        lambda dtype, repeats=5: 1.0 if dtype is hardware.torch.float32
                        else half_ms)
    try:
        chosen, why = hardware.cpu_compute_dtype("bfloat16")
        assert chosen == expected and "measured" in why
        assert hardware.cpu_compute_dtype("float32") == ("float32", "")
    finally:
        hardware.cpu_compute_dtype.cache_clear()
