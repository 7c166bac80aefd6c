"""Trainer checkpoints of an adapted Llama with tied and untied embeddings: saved (the adapters
only), resumed, and equal to an uninterrupted run; summary counts; deepcopy and pickle."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from safetensors import safe_open

import peftreg
from peftreg_plugins.lora import LoraConfig

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

pytestmark = pytest.mark.transformers

VOCAB = 64
STEPS = 6
SAVE_EVERY = 3
TIED = pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_llama(tied: bool):
    torch.manual_seed(5)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config)


def adapted(tied: bool):
    return peftreg.adapt(make_llama(tied), LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))


def rows():
    ids = torch.randint(0, VOCAB, (8, 8), generator=torch.Generator().manual_seed(6))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def trainer(model, output_dir, eval_dataset=None, **overrides):
    fields = dict(output_dir=str(output_dir), use_cpu=True, report_to=[], max_steps=STEPS,
                  save_steps=SAVE_EVERY, per_device_train_batch_size=2, learning_rate=5e-2,
                  warmup_steps=0, logging_steps=1, disable_tqdm=True, seed=0,
                  dataloader_num_workers=0)
    fields.update(overrides)
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**fields),
                                train_dataset=rows(), eval_dataset=eval_dataset)


def cloned_adapter(model):
    return {k: v.detach().clone() for k, v in model.adapter_state_dict("default").items()}


@TIED
def test_checkpoints_hold_the_adapter_and_resume_to_the_uninterrupted_result(tmp_path, tied):
    model = adapted(tied)
    assert (model.model.lm_head.weight is model.model.model.embed_tokens.weight) is tied
    initial = cloned_adapter(model)
    trainer(model, tmp_path / "full").train()
    full = cloned_adapter(model)

    # The checkpoint is the adapter: every tensor of the wrapper's adapters, nothing of the base.
    checkpoint = tmp_path / "full" / f"checkpoint-{SAVE_EVERY}"
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        halfway = {k: f.get_tensor(k) for k in keys}
    assert keys == set(model.state_dict())
    assert keys and all(".adapters.default." in k for k in keys), sorted(keys)
    assert sum(t.numel() for t in halfway.values()) == model.summary().rows[0].params

    resumed = adapted(tied)
    resumer = trainer(resumed, tmp_path / "resumed")
    resumer.train(resume_from_checkpoint=str(checkpoint))
    assert resumer.state.global_step == STEPS
    after = cloned_adapter(resumed)
    assert after.keys() == full.keys()
    for name, tensor in full.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=1e-6, msg=name)
        # The twin that can fail: training moved the adapter before and after the checkpoint.
        assert not torch.equal(tensor, initial[name]), name
    halfway_b = {k.removeprefix("model.").replace(".adapters.default", ""): v
                 for k, v in halfway.items()}
    moved = [k for k in full if not torch.equal(full[k], halfway_b[k])]
    assert moved, "no adapter tensor changed after the checkpoint"
    # Resuming loaded the adapter into the tied model without untying it.
    assert (resumed.model.lm_head.weight is resumed.model.model.embed_tokens.weight) is tied


@TIED
def test_state_dict_round_trips_strictly_and_a_missing_adapter_tensor_is_reported(tied):
    model = adapted(tied)
    state = model.state_dict()
    assert model.load_state_dict(state, strict=True).missing_keys == []
    dropped = next(iter(state))
    partial = {k: v for k, v in state.items() if k != dropped}
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(partial, strict=True)
    # A whole-model dict (base included) still loads: the base keys are real tensors.
    whole = {f"model.{k}": v for k, v in model.model.state_dict().items()}
    assert model.load_state_dict(whole, strict=True).unexpected_keys == []
    # Nested under another module (DDP's "module." prefix) the same rules hold.
    outer = torch.nn.ModuleDict({"module": model})
    nested = outer.state_dict()
    assert set(nested) == {f"module.{k}" for k in state}
    assert outer.load_state_dict(nested, strict=True).missing_keys == []


@TIED
def test_summary_counts_a_shared_tensor_once(tied):
    base = make_llama(tied)
    unique = sum(p.numel() for p in base.parameters())  # parameters() skips repeats
    every = sum(p.numel() for _, p in base.named_parameters(remove_duplicate=False))
    assert (every > unique) is tied
    model = peftreg.adapt(base, LoraConfig(r=2))
    summary = model.summary()
    assert summary.base_params == unique
    row = summary.rows[0]
    assert summary.percent(row) == pytest.approx(100.0 * row.params / unique)


def test_the_adapted_model_deep_copies_and_pickles():
    model = adapted(True)
    with torch.no_grad():
        for p in model.adapter_parameters("default"):
            p.add_(0.1)  # a non-zero LoRA B: the adapter changes the output
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapters():
            base = model(input_ids=ids).logits
    assert not torch.equal(expected, base)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone).__name__ == type(model).__name__
        assert clone.registry is not None and clone.adapters.keys() == {"default"}
        with torch.no_grad():
            assert torch.equal(clone(input_ids=ids).logits, expected)
            with clone.disable_adapters():
                assert torch.equal(clone(input_ids=ids).logits, base)
        # Independent tensors: changing the clone leaves the original as it was.
        with torch.no_grad():
            clone.adapter_parameters("default")[0].add_(1.0)
            assert torch.equal(model(input_ids=ids).logits, expected)
        assert clone.model.lm_head.weight is clone.model.model.embed_tokens.weight


def test_the_integrations_guide_trainer_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    guide = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.S)
                if "resume_from_checkpoint" in b]
    monkeypatch.setattr("tempfile.mkdtemp", lambda: str(tmp_path))
    namespace: dict = {}
    exec(compile(block, "docs/integrations.md", "exec"), namespace)
    model, again = namespace["model"], namespace["again"]
    with safe_open(tmp_path / "checkpoint-2" / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    for name, tensor in model.adapter_state_dict("default").items():
        torch.testing.assert_close(again.adapter_state_dict("default")[name], tensor)


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    # "Best" is the highest eval loss here, so it is the first checkpoint while the loss falls:
    # loading it must undo the later steps.
    model = adapted(True)
    run = trainer(model, tmp_path / "run", eval_dataset=rows(), eval_strategy="steps",
                  eval_steps=SAVE_EVERY, load_best_model_at_end=True,
                  metric_for_best_model="eval_loss", greater_is_better=True)
    run.train()
    evals = [e["eval_loss"] for e in run.state.log_history if "eval_loss" in e]
    assert len(evals) >= 2 and evals[1] < evals[0], evals
    best = tmp_path / "run" / f"checkpoint-{SAVE_EVERY}"
    assert run.state.best_model_checkpoint == str(best)
    with safe_open(best / "model.safetensors", "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(tmp_path / "run" / f"checkpoint-{STEPS}" / "model.safetensors", "pt") as f:
        last = {k: f.get_tensor(k) for k in f.keys()}
    state = model.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert any(not torch.equal(last[k], v) for k, v in saved.items())
