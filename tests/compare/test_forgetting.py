"""The forgetting measure: a language-modelling task's loss on general text, before and after."""

from __future__ import annotations

import math

import pytest
import torch

import peftreg
from peftreg.compare import assets
from peftreg.compare.report import markdown_table, summarize
from peftreg.compare.runner import run_comparison
from peftreg.compare.runs import RunSettings
from peftreg.compare.stats import interval
from peftreg.compare.tasks import Task

tiny_hf = pytest.importorskip("tiny_hf")
pytest.importorskip("transformers")

TASK_IDS = torch.randint(0, 48, (24, 10), generator=torch.Generator().manual_seed(0))
GENERAL_IDS = torch.randint(48, 96, (8, 10), generator=torch.Generator().manual_seed(1))


def _lm_loss(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _task(steps=6):
    def batches(seed, limit=steps):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(limit):
            rows = torch.randint(0, TASK_IDS.shape[0], (4,), generator=generator)
            yield {"input_ids": TASK_IDS[rows], "labels": TASK_IDS[rows]}

    return Task(name="tiny lm", make_model=lambda seed: tiny_hf.llama(seed=5),
                train_batches=batches, evaluate=lambda m: _lm_loss(m, TASK_IDS[:8]),
                metric="loss", latency_inputs={"input_ids": TASK_IDS[:2]}, modules_to_save=[],
                loss=lambda m, b: m(**b).loss,
                general_evaluate=lambda m: _lm_loss(m, GENERAL_IDS))


def test_each_run_reports_its_change_in_general_text_loss():
    settings = RunSettings(steps=6, batch_size=4, seed=0, seeds=2, latency_repeats=1,
                           baselines=True, learning_rate=5e-3)
    _, results = run_comparison(_task(), ["lora"], settings, peftreg.default_registry())
    for r in results:
        assert r.error is None and math.isfinite(r.general_loss_change)
        assert r.general_loss_change != 0
    rows = {row.row: row for row in summarize(results)}
    assert rows["lora"].forgetting.mean == pytest.approx(
        interval([r.general_loss_change for r in results if r.method == "lora"]).mean)
    table = markdown_table("loss", interval([1.0, 1.0]), list(rows.values()))
    assert "general-text loss change" in table.splitlines()[0]


def test_a_task_without_general_text_has_no_forgetting_column():
    task = _task()
    task = Task(**{**task.__dict__, "general_evaluate": None})
    settings = RunSettings(steps=2, batch_size=4, seed=0, seeds=1, latency_repeats=1,
                           baselines=False)
    _, results = run_comparison(task, ["lora"], settings, peftreg.default_registry())
    assert math.isnan(results[0].general_loss_change)
    table = markdown_table("loss", interval([1.0]), summarize(results))
    assert "general-text" not in table


def test_the_general_text_is_the_chatterbot_corpus():
    pytest.importorskip("chatterbot_corpus", reason="make install installs chatterbot-corpus")
    texts = assets.general_texts()
    assert len(texts) > 1000 and all(isinstance(t, str) and t for t in texts)
    assert texts == assets.general_texts()  # a fixed order
