from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
from rich.console import Console

import peftreg
from peftreg.compare import assets
from peftreg.compare.command import DEFAULT_METHODS, add_arguments, choose_methods, run
from peftreg.compare.runner import run_comparison
from peftreg.compare.runs import RunSettings
from peftreg.compare.tasks import balanced_split, read_tweets, sentiment_task

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

WORDS = ["good", "bad", "fine", "great", "awful", "okay", "love", "hate", "meh", "car", "road",
         "the", "is", "a", "very"]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT with a word-level tokenizer, saved like a pretrained checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tweets_file(tmp_path_factory):
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "tweets.csv"
    rows = ["sentiment,confidence,text"]
    mood = {"negative": ["bad", "awful", "hate"], "neutral": ["okay", "meh", "fine"],
            "positive": ["good", "great", "love"]}
    for i in range(120):
        label = ["negative", "neutral", "positive"][i % 3]
        words = [rng.choice(mood[label]), *rng.choices(["car", "road", "the", "is", "a"], k=4)]
        rows.append(f"{label},0.9,{' '.join(words)} {i}")
    rows += ["sarcastic,0.5,not a label", "positive,0.9,", rows[1]]
    path.write_bytes(("\n".join(rows) + "\n").encode() + b"positive,1,caf\xe9 good\n")
    return path


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
