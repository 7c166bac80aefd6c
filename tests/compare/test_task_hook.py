"""A plugin registers a comparison task (hook peftreg_register_tasks) and compare runs it."""

from __future__ import annotations

import argparse
import json

import pytest
from rich.console import Console

from peftreg import PluginError, Registry
from peftreg.compare.command import add_arguments, run
from peftreg.compare.tasks import (
    TaskDataError,
    TaskSpec,
    build_task,
    plugin_tasks,
    read_tweets,
    sentiment_task,
)
from peftreg.hookspecs import hookimpl
from peftreg_plugins import family_transformers, lora


def _provider(specs):
    class Provider:
        @staticmethod
        @hookimpl
        def peftreg_register_tasks():
            return specs

    return Provider()


def _registry(*specs):
    return Registry.for_testing([lora.LoraMethod()], [family_transformers,
                                                      _provider(list(specs))])


@pytest.fixture
def tiny_spec(tiny_bert_dir, tweets_file):
    def build(**sizes):
        sizes.pop("train_size", None)
        return sentiment_task(tiny_bert_dir, read_tweets(tweets_file), **sizes,
                              name="tiny tweets")

    return TaskSpec("tiny-tweets", "a tiny BERT on a small tweets file", build)


def test_a_plugin_task_is_built_by_its_name(tiny_spec):
    registry = _registry(tiny_spec)
    assert list(plugin_tasks(registry)) == ["tiny-tweets"]
    task = build_task("tiny-tweets", None, registry=registry, steps=2, batch_size=4,
                      max_length=12, seed=0, test_per_class=5)
    assert task.name == "tiny tweets" and task.metric == "accuracy"
    with pytest.raises(TaskDataError, match="tiny-tweets"):
        build_task("no-such-task", None, registry=registry, steps=2)


def test_compare_runs_a_plugin_task(tiny_spec, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "tiny-tweets", "--methods", "lora", "--steps", "2",
                              "--seeds", "1", "--no-baselines", "--batch-size", "4",
                              "--max-length", "12", "--test-per-class", "5",
                              "--out", str(tmp_path)])
    assert run(args, Console(file=open(tmp_path / "log.txt", "w")), _registry(tiny_spec)) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task"] == "tiny tweets"
    assert [r["method"] for r in results["runs"]] == ["lora"]


def test_a_taken_name_and_a_wrong_type_are_reported_by_plugin(tiny_spec):
    clash = TaskSpec("minilm", "shadows the built-in task", tiny_spec.build)
    with pytest.raises(PluginError, match="task name 'minilm' is already taken"):
        plugin_tasks(_registry(clash))
    with pytest.raises(PluginError, match="returned a dict, not a TaskSpec"):
        plugin_tasks(_registry({"name": "x"}))
