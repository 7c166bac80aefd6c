from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
from rich.console import Console

import peftreg
from peftreg.compare import assets
from peftreg.compare.command import DEFAULT_METHODS, add_arguments, choose_methods, run
from peftreg.compare.runner import run_comparison
from peftreg.compare.runs import RunSettings
from peftreg.compare.tasks import balanced_split, read_tweets, sentiment_task

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

def test_read_tweets_skips_bad_rows_and_duplicates(tweets_file):
    examples = read_tweets(tweets_file)
    # 120 rows + the last one (undecodable byte, valid label); bad labels, empty and dupes dropped
    assert len(examples) == 121
    assert examples[-1].text.startswith("caf") and examples[-1].label == 2
    train, test = balanced_split(examples, 20, 5, seed=3)
    assert [sum(e.label == k for e in test) for k in range(3)] == [5, 5, 5]
    assert len(train) == 60 and not {e.text for e in train} & {e.text for e in test}
    assert balanced_split(examples, 20, 5, seed=3) == (train, test)
    with pytest.raises(ValueError, match="examples, 500 needed"):
        balanced_split(examples, 495, 5, seed=0)


def _task(tiny_bert_dir, tweets_file, steps=6):
    return sentiment_task(tiny_bert_dir, read_tweets(tweets_file), steps=steps, batch_size=8,
                          max_length=12, seed=1, test_per_class=10)


def _figures(result):
    fields = dataclasses.asdict(result)
    for timing in ("step_ms", "peak_memory_mb", "latency_ratio", "latency_ratio_unmerged"):
        fields.pop(timing)
    return fields


def test_comparison_is_reproducible_and_reports_every_column(tiny_bert_dir, tweets_file):
    settings = RunSettings(steps=6, batch_size=8, max_length=12, seed=1, seeds=2,
                           test_per_class=10, latency_repeats=2)
    methods = ["lora", "ia3", "prompt_tuning"]
    first = run_comparison(_task(tiny_bert_dir, tweets_file), methods, settings,
                           peftreg.default_registry())
    second = run_comparison(_task(tiny_bert_dir, tweets_file), methods, settings,
                            peftreg.default_registry())
    assert first[0] == second[0] and sorted(first[0]) == [1, 2]
    assert [_figures(r) for r in first[1]] == [_figures(r) for r in second[1]]
    rows = [*methods, "full fine-tuning", "head only"]
    assert [(r.method, r.seed) for r in first[1]] == [(m, s) for s in (1, 2) for m in rows]
    for result in first[1]:
        assert result.error is None, result.error
        assert result.trainable_params > 0 and 0 < result.trainable_percent <= 100
        assert len(result.losses) == 6 and result.step_ms > 0 and result.adapter_bytes > 0
        assert 0.0 <= result.metric <= 1.0 and result.latency_ratio > 0
    by_name = {(r.method, r.seed): r for r in first[1]}
    assert by_name[("lora", 1)].mergeable and not by_name[("prompt_tuning", 1)].mergeable
    assert by_name[("lora", 1)].learning_rate == 2e-3
    assert by_name[("prompt_tuning", 1)].learning_rate == 3e-2
    # Seeds differ (head init, adapter init, data order); the held-out set does not.
    assert by_name[("lora", 1)].losses != by_name[("lora", 2)].losses
    full, head = by_name[("full fine-tuning", 1)], by_name[("head only", 1)]
    assert full.kind == head.kind == "baseline" and full.trainable_percent == 100.0
    classifier = sum(p.numel() for n, p in _task(tiny_bert_dir, tweets_file).make_model(1)
                     .named_parameters() if n.startswith("classifier"))
    assert head.trainable_params == classifier < by_name[("lora", 1)].trainable_params


def test_failing_method_is_reported_and_others_run(tiny_bert_dir, tweets_file):
    settings = RunSettings(steps=2, batch_size=8, max_length=12, seed=1, seeds=1,
                           test_per_class=10, latency_repeats=1, baselines=False)
    registry = peftreg.default_registry()
    _, results = run_comparison(_task(tiny_bert_dir, tweets_file, steps=2),
                                ["houlsby", "lora"], settings, registry)
    assert all(r.error is None for r in results)
    # A bottleneck wider than the model is a config error for that method only.
    from peftreg_plugins.houlsby import HoulsbyMethod

    class HugeHoulsby(HoulsbyMethod):
        def inject(self, model, adapter_name, config, family):
            return super().inject(model, adapter_name, config.replace(bottleneck_size=10**6),
                                  family)

    from peftreg_plugins.lora import LoraMethod

    broken = peftreg.Registry.for_testing([HugeHoulsby(), LoraMethod()],
                                          plugins=[__import__("peftreg_plugins.family_transformers",
                                                              fromlist=["x"])])
    _, results = run_comparison(_task(tiny_bert_dir, tweets_file, steps=2), ["houlsby", "lora"],
                                settings, broken)
    assert results[0].error and "bottleneck_size" in results[0].error
    assert results[1].error is None


def test_choose_methods():
    registry = peftreg.default_registry()
    assert choose_methods(registry, None) == [m for m in DEFAULT_METHODS
                                              if m in registry.names()]
    assert choose_methods(registry, "all") == registry.names()
    assert choose_methods(registry, "lora, ia3") == ["lora", "ia3"]
    with pytest.raises(peftreg.UnknownMethodError, match="'nonexistent'"):
        choose_methods(registry, "lora,nonexistent")


def test_third_party_plugin_joins_the_comparison(tiny_bert_dir, tweets_file):
    pytest.importorskip("peftreg_toy", reason="run `make test` to install tests/plugin_dists")
    settings = RunSettings(steps=3, batch_size=8, max_length=12, seed=1, seeds=1,
                           test_per_class=10, latency_repeats=1, baselines=False)
    assert "offset" in choose_methods(peftreg.default_registry(), "all")
    _, (result,) = run_comparison(_task(tiny_bert_dir, tweets_file, steps=3), ["offset"],
                                  settings, peftreg.default_registry())
    assert result.error is None and result.distribution == "peftreg-toy"


def test_real_default_assets_end_to_end(tmp_path):
    try:
        assets.minilm_dir()
        assets.tweets_csv()
    except assets.MissingAssetError as exc:
        pytest.skip(str(exc))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--methods", "lora", "--steps", "2", "--test-per-class", "4",
                              "--seeds", "2", "--no-baselines", "--out", str(tmp_path)])
    with open(tmp_path / "log.txt", "w") as log:
        assert run(args, Console(file=log, width=200)) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["schema"] == "peftreg-compare" and document["schema_version"] == 2
    assert [(r["method"], r["seed"]) for r in document["runs"]] == [("lora", 0), ("lora", 1)]
    assert all(r["error"] is None and len(r["losses"]) == 2 for r in document["runs"])
    (row,) = document["rows"]
    assert row["runs"] == 2 and row["metric"]["n"] == 2
    assert (tmp_path / "results.png").stat().st_size > 1000
    log = (tmp_path / "log.txt").read_text()
    assert "[1/2] lora seed 0: started" in log and "about" in log and "left" in log


def test_missing_asset_message():
    with pytest.raises(assets.MissingAssetError, match="pip install --no-deps not-a-package==1"):
        assets.package_dir(("not-a-package", "peftreg_no_such_module", "1"))


@pytest.fixture(scope="module")
def user_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "reviews.csv"
    rows = ["id,review,verdict"]
    for i in range(40):
        good = i % 2 == 0
        rows.append(f"{i},{'great good love' if good else 'awful bad hate'} the car {i},"
                    f"{'keep' if good else 'drop'}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_user_csv_task_with_a_local_model(tmp_path, tiny_bert_dir, user_csv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([
        "--model", str(tiny_bert_dir), "--task", f"csv:{user_csv}", "--text-column", "review",
        "--label-column", "verdict", "--methods", "lora", "--steps", "2", "--batch-size", "4",
        "--max-length", "12", "--test-per-class", "5", "--seeds", "2", "--no-baselines",
        "--format", "markdown", "--out", str(tmp_path)])
    with open(tmp_path / "log.txt", "w") as log:
        assert run(args, Console(file=log, width=200)) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["task"].startswith("reviews.csv: 2 classes")
    assert all(r["error"] is None for r in document["runs"]) and len(document["runs"]) == 2
    assert "| lora |" in (tmp_path / "log.txt").read_text()


def test_user_csv_errors_name_the_problem(tmp_path, user_csv, tiny_bert_dir):
    from peftreg.compare.tasks import TaskDataError, build_task, read_labelled_csv

    with pytest.raises(TaskDataError, match="no column 'text'; the file has id, review, verdict"):
        read_labelled_csv(user_csv, "text", "verdict")
    one = tmp_path / "one.csv"
    one.write_text("text,label\na,x\nb,x\n")
    with pytest.raises(TaskDataError, match="1 distinct label"):
        read_labelled_csv(one, "text", "label")
    with pytest.raises(TaskDataError, match="nor a local model directory"):
        build_task(str(tmp_path / "nowhere"), f"csv:{user_csv}", steps=1, batch_size=1,
                   max_length=8, seed=0, test_per_class=1)
    with pytest.raises(TaskDataError, match="only 20 drop examples, 101 needed"):
        build_task(str(tiny_bert_dir), f"csv:{user_csv}", text_column="review",
                   label_column="verdict", steps=1, batch_size=1, max_length=8, seed=0,
                   test_per_class=100)


def _sweep_run(tmp_path, tiny_bert_dir, tweets_file, monkeypatch, *extra):
    from peftreg.compare import command

    # The tweets task on the tiny model and its tiny data (no real assets needed).
    def fake_build(model, data, **sizes):
        kept = {k: v for k, v in sizes.items()
                if k not in ("text_column", "label_column", "registry")}
        return sentiment_task(tiny_bert_dir, read_tweets(tweets_file), **kept)

    monkeypatch.setattr(command, "build_task", fake_build)
    tmp_path.mkdir(parents=True, exist_ok=True)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--steps", "2", "--batch-size", "4", "--max-length", "12",
                              "--test-per-class", "5", "--seeds", "2", "--out", str(tmp_path),
                              *extra])
    with open(tmp_path / "log.txt", "w") as log:
        assert run(args, Console(file=log, width=250)) == 0
    return json.loads((tmp_path / "results.json").read_text()), (tmp_path / "log.txt").read_text()


def test_sweep_of_a_config_field(tmp_path, tiny_bert_dir, tweets_file, monkeypatch):
    document, log = _sweep_run(tmp_path, tiny_bert_dir, tweets_file, monkeypatch,
                               "--methods", "lora,ia3", "--sweep", "r=2,4")
    assert document["sweep"] == {"field": "r", "values": [2, 4]}
    runs = {(r["method"], r["sweep"], r["seed"]): r for r in document["runs"]}
    # baselines run once (they do not depend on r), at the first value
    assert {k[:2] for k in runs if k[0] == "full fine-tuning"} == {("full fine-tuning", "r=2")}
    assert runs[("lora", "r=4", 0)]["trainable_params"] > runs[("lora", "r=2", 0)][
        "trainable_params"]
    assert "IA3Config has no field 'r'" in runs[("ia3", "r=2", 0)]["error"]
    rows = {(r["row"], r["sweep"]): r for r in document["rows"]}
    assert rows[("lora", "r=4")]["metric"]["n"] == 2
    assert not math.isnan(rows[("lora", "r=4")]["gap_to_full"])
    assert "against r" in log and (tmp_path / "sweep.png").stat().st_size > 1000
    assert "[12/12]" in log   # one numbering across the sweep: 2 x 2 lora + 2 x 2 ia3 + 2 x 2
    # Every line names the sweep value: progress, table rows and the tied summary (rich must
    # not read "[r=4]" as markup and drop it).
    assert "lora [r=4] seed 1: started" in log and "lora [r=4] seed 1: done" in log
    assert "│ lora [r=2]" in log and "│ lora [r=4]" in log
    assert "lora [r=2]" in log.split("against r")[-1]


def test_sweep_of_targets_and_train_size(tmp_path, tiny_bert_dir, tweets_file, monkeypatch):
    document, _ = _sweep_run(tmp_path / "t", tiny_bert_dir, tweets_file, monkeypatch,
                             "--methods", "lora", "--no-baselines", "--sweep",
                             "targets=attention,attention+mlp,all-linear")
    params = {r["sweep"]: r["trainable_params"] for r in document["runs"] if r["seed"] == 0}
    assert params["targets=attention"] < params["targets=attention+mlp"]
    assert all(r["error"] is None for r in document["runs"])
    document, _ = _sweep_run(tmp_path / "s", tiny_bert_dir, tweets_file, monkeypatch,
                             "--methods", "lora", "--sweep", "train-size=9,30")
    full = [r for r in document["runs"] if r["method"] == "full fine-tuning"]
    assert {r["sweep"] for r in full} == {"train-size=9", "train-size=30"}


def test_bad_sweeps_name_the_problem():
    from peftreg.compare.sweep import SweepError, parse_sweep

    assert parse_sweep("r=4, 8,16").values == (4, 8, 16)
    assert parse_sweep("lora_dropout=0.0,0.1").values == (0.0, 0.1)
    for text, words in (("r", "FIELD=V1,V2"), ("r=4,4", "appears twice"),
                        ("targets=mlp", "targets are"), ("train-size=0,5", "positive")):
        with pytest.raises(SweepError, match=words):
            parse_sweep(text)


def test_time_budget_gives_every_run_the_same_wall_clock(tiny_bert_dir, tweets_file):
    from peftreg.compare.command import parse_budget

    settings = RunSettings(steps=2, batch_size=8, max_length=12, seed=1, seeds=1,
                           test_per_class=10, latency_repeats=1, baselines=True,
                           budget_seconds=0.4)
    _, results = run_comparison(_task(tiny_bert_dir, tweets_file, steps=2), ["lora"], settings,
                                peftreg.default_registry())
    for r in results:
        assert r.error is None
        seconds = r.step_ms * len(r.losses) / 1000
        # trains until the budget is spent (past the 2 steps the step budget would take)...
        assert len(r.losses) > 2 and seconds >= 0.4
        # ...and stops soon after it (a loaded machine can make the last step slow)
        assert seconds < 0.4 + 4 * r.step_ms / 1000 + 0.5
    assert parse_budget("steps") == (None, None) and parse_budget("seconds=90") == (90.0, None)
    assert parse_budget("params=5000") == (None, 5000)
    for bad in ("seconds=0", "minutes=3", "seconds=x", "params=0", "params=2.5"):
        with pytest.raises(peftreg.ConfigError, match="--budget"):
            parse_budget(bad)


def test_parameter_budget_sizes_every_method_near_the_target(tiny_bert_dir, tweets_file):
    # Small enough that prompt tuning's tokens fit the tiny BERT's 32 positions.
    target = 600
    settings = RunSettings(steps=2, batch_size=8, max_length=12, seed=1, seeds=1,
                           test_per_class=10, latency_repeats=1, baselines=False,
                           budget_params=target)
    registry = peftreg.default_registry()
    task = _task(tiny_bert_dir, tweets_file, steps=2)
    _, results = run_comparison(task, ["lora", "prompt_tuning", "ia3"], settings, registry)
    by_method = {r.method: r for r in results}
    head = sum(p.numel() for name, p in task.make_model(1).named_parameters()
               if name.startswith(tuple(task.modules_to_save)))
    for name in ("lora", "prompt_tuning"):
        r = by_method[name]
        assert r.error is None and "matched" in r.notes
        field = registry.get(name).size_field
        value = int(r.notes.split(f"{field}=")[1].split()[0])
        adapter = r.trainable_params - head
        # The nearest achievable count: one size step more or less is no nearer the target.
        config = registry.get(name).config_cls(modules_to_save=list(task.modules_to_save))
        model = task.make_model(1)
        family = registry.describe_model(model)
        method = registry.get(name)
        step_up = method.parameter_count(model, config.replace(**{field: value + 1}), family)
        assert abs(adapter - target) <= abs(step_up - target)
        if value > 1:
            step_down = method.parameter_count(model, config.replace(**{field: value - 1}),
                                               family)
            assert abs(adapter - target) <= abs(step_down - target)
    assert "not size-matched" in by_method["ia3"].notes


def test_a_local_causal_lm_directory_models_the_tweets(tmp_path, tiny_bert_dir):
    import tiny_hf

    try:
        assets.tweets_csv()
    except assets.MissingAssetError:
        pytest.skip("make install installs the tweets")

    from peftreg.compare.tasks import build_task

    folder = tmp_path / "tiny-llama"
    tiny_hf.llama(vocab_size=96).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
    task = build_task(str(folder), None, steps=2, batch_size=4, max_length=12, seed=0,
                      test_per_class=4)
    assert task.metric == "loss" and task.name.endswith("tiny-llama")
    model = task.make_model(0)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert math.isfinite(task.evaluate(model))
