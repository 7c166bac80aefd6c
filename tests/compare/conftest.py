"""Fixtures of the comparison tests: a tiny pretrained-like BERT directory and a tweets CSV."""

from __future__ import annotations

import pytest
import torch

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
