"""An AdaptedModel trained by the unchanged Hugging Face Trainer; adapters saved by callback."""

from __future__ import annotations

import copy
import inspect
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import tiny_hf
import torch

import peftreg
from peftreg.integrations.transformers import (
    ADAPTERS_FOLDER,
    find_adapted_model,
    prepare_for_trainer,
)
from peftreg.signature import signature_class
from peftreg_plugins.lora import LoraConfig

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from peftreg.integrations.transformers import SaveAdapterCallback  # noqa: E402

pytestmark = pytest.mark.transformers

VOCAB = 96


@pytest.fixture(autouse=True)
def _one_thread():
    # The models are tiny: a second intra-op thread only spins against other processes (a
    # loaded two-core machine ran these tests 20x slower with two threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_bert():
    return tiny_hf.bert(seed=31, vocab_size=VOCAB)


def make_llama():
    return tiny_hf.llama(seed=32, vocab_size=VOCAB)


def classification_rows(n=8, length=10):
    # The label is a function of the first token, so the task can be learned (and memorised).
    gen = torch.Generator().manual_seed(41)
    ids = torch.randint(0, VOCAB, (n, length), generator=gen)
    # "note" is a column the model does not take: Trainer must drop it, not pass it on.
    return [{"input_ids": row, "labels": row[0] % 3, "note": i} for i, row in enumerate(ids)]


def causal_rows(n=8, length=12):
    gen = torch.Generator().manual_seed(42)
    ids = torch.randint(0, VOCAB, (n, length), generator=gen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def training_args(tmp_path, **overrides):
    fields = dict(
        output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=8,
        save_steps=4, logging_steps=1, per_device_train_batch_size=4, learning_rate=2e-2,
        warmup_steps=0, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    fields.update(overrides)
    return transformers.TrainingArguments(**fields)


def snapshot(model):
    """Frozen (base) and trainable (adapter) tensors of ``model``, cloned."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return frozen, trained


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_training_touched_only_the_adapter(before, after):
    frozen_before, trained_before = before
    frozen_after, trained_after = after
    assert frozen_before.keys() == frozen_after.keys() and frozen_before
    for name, tensor in frozen_before.items():
        assert torch.equal(tensor, frozen_after[name]), f"base weight {name} changed"
    assert trained_before.keys() == trained_after.keys() and trained_before
    unchanged = [n for n, t in trained_before.items() if torch.equal(t, trained_after[n])]
    assert not unchanged, f"adapter tensors that did not train: {unchanged}"


def test_bert_with_head_trains_and_the_callback_saves_loadable_adapters(tmp_path):
    model = peftreg.adapt(make_bert(), LoraConfig(r=4, modules_to_save=["classifier"]))
    rows = classification_rows()
    before = snapshot(model)
    trainer = transformers.Trainer(
        model=model, args=training_args(tmp_path), train_dataset=rows,
        callbacks=[SaveAdapterCallback()])
    assert trainer.label_names == ["labels"]
    trainer.train()

    recorded = losses(trainer)
    assert len(recorded) == 8 and all(math.isfinite(x) for x in recorded)
    assert recorded[-1] < recorded[0], recorded
    assert_training_touched_only_the_adapter(before, snapshot(model))

    run = tmp_path / "run"
    saved = {step: run / f"checkpoint-{step}" / ADAPTERS_FOLDER / "default" for step in (4, 8)}
    final = run / ADAPTERS_FOLDER / "default"
    for path in (*saved.values(), final):
        assert (path / "adapter.json").is_file(), path

    ids = torch.stack([row["input_ids"] for row in rows])
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        with model.disable_adapters():
            base = model(input_ids=ids).logits
    assert not torch.equal(trained, base)
    for path in (saved[8], final):
        reloaded = peftreg.load(make_bert(), path).eval()
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, trained)
    halfway = peftreg.load(make_bert(), saved[4]).eval()
    with torch.no_grad():
        assert not torch.equal(halfway(input_ids=ids).logits, trained)


def test_llama_trains_with_eval_loss_checkpointing_and_resume(tmp_path):
    model = peftreg.adapt(make_llama(), LoraConfig(r=4))
    rows = causal_rows()
    before = snapshot(model)
    trainer = transformers.Trainer(
        model=model, train_dataset=rows, eval_dataset=rows[:4],
        args=training_args(tmp_path, activation_checkpointing=True),
        callbacks=[SaveAdapterCallback("default")])
    eval_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    eval_after = trainer.evaluate()["eval_loss"]

    recorded = losses(trainer)
    assert all(math.isfinite(x) for x in recorded) and recorded[-1] < recorded[0], recorded
    assert eval_after < eval_before
    assert_training_touched_only_the_adapter(before, snapshot(model))

    # Trainer's own checkpoint (the adapters' state dict) resumes into a fresh adapted model.
    resumed = peftreg.adapt(make_llama(), LoraConfig(r=4))
    resumer = transformers.Trainer(
        model=resumed, train_dataset=rows,
        args=training_args(tmp_path, output_dir=str(tmp_path / "resumed"), max_steps=8))
    resumer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    for name, tensor in model.adapter_state_dict("default").items():
        torch.testing.assert_close(resumed.adapter_state_dict("default")[name], tensor)

    ids = torch.stack([row["input_ids"] for row in rows[:2]])
    reloaded = peftreg.load(make_llama(), tmp_path / "run" / ADAPTERS_FOLDER / "default")
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    generated = reloaded.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, model.generate(ids[:, :4], max_new_tokens=3, do_sample=False))


def test_prepare_for_trainer_is_deprecated_and_changes_nothing():
    model = peftreg.adapt(make_bert(), LoraConfig(r=2))
    cls = type(model)
    with pytest.warns(DeprecationWarning, match="no longer needed"):
        assert prepare_for_trainer(model) is model
    assert type(model) is cls
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="AdaptedModel"):
        prepare_for_trainer(make_llama())


def test_adapted_model_shows_the_wrapped_signature_and_changes_nothing_else():
    # Without it Trainer would drop every batch column ("The batch received was empty") and
    # know no label column: AdaptedModel.forward itself takes (*args, **kwargs).
    base = make_llama()
    ids = torch.randint(0, VOCAB, (1, 5))
    model = peftreg.adapt(base, LoraConfig(r=2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert type(model).__name__ == "AdaptedLlamaForCausalLM"
    assert isinstance(model, peftreg.AdaptedModel)
    assert type(model).__mro__[1] is peftreg.AdaptedModel
    assert type(model) is signature_class(peftreg.AdaptedModel, transformers.LlamaForCausalLM)
    wrapped = inspect.signature(transformers.LlamaForCausalLM.forward)
    assert inspect.signature(model.forward) == inspect.signature(base.forward)
    assert inspect.signature(type(model).forward) == wrapped
    assert inspect.signature(peftreg.AdaptedModel.forward) != wrapped
    assert transformers.utils.generic.find_labels(type(model)) == ["labels"]
    assert transformers.utils.generic.find_labels(peftreg.AdaptedModel) == []
    assert type(peftreg.adapt(make_bert(), LoraConfig(r=2))).__name__ == (
        "AdaptedBertForSequenceClassification")
    # The run-time class survives deepcopy, with no help from the caller.
    clone = copy.deepcopy(model)
    assert type(clone) is type(model) and clone.model is not model.model
    with torch.no_grad():
        assert torch.equal(clone(input_ids=ids).logits, expected)
    # A wrapper that subclasses it again (as fully_shard does) keeps its class.
    model.__class__ = type("Resubclassed", (type(model),), {})
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_callback_checks_adapter_names_before_training(tmp_path):
    model = peftreg.adapt(make_bert(), LoraConfig(r=2))
    args = SimpleNamespace(should_save=True, output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=3)
    with pytest.raises(peftreg.AdapterError, match="missing"):
        SaveAdapterCallback("missing").on_train_begin(args, state, None, model=model)
    model.set_trainable("default", False)
    with pytest.raises(peftreg.AdapterError, match="no active, trainable adapter"):
        SaveAdapterCallback().on_train_begin(args, state, None, model=model)
    with pytest.raises(TypeError, match="no peftreg AdaptedModel"):
        SaveAdapterCallback().on_save(args, state, None, model=make_bert())
    # A frozen adapter can still be saved by name; non-writing processes write nothing.
    SaveAdapterCallback("default").on_save(args, state, None, model=model)
    assert (tmp_path / "checkpoint-3" / ADAPTERS_FOLDER / "default" / "adapter.json").is_file()
    args.should_save = False
    SaveAdapterCallback("default").on_save(SimpleNamespace(**{**vars(args), "output_dir":
                                                             str(tmp_path / "other")}),
                                           state, None, model=model)
    assert not (tmp_path / "other").exists()


def test_find_adapted_model_looks_through_wrappers():
    model = peftreg.adapt(make_bert(), LoraConfig(r=2))
    assert find_adapted_model(model) is model
    assert find_adapted_model(torch.nn.DataParallel(model)) is model
    assert find_adapted_model(torch.compile(model)) is model


def test_module_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import peftreg.integrations.transformers as m\n"
        "assert callable(m.find_adapted_model)\n"
        "try:\n"
        "    m.SaveAdapterCallback\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert "needs the optional 'transformers' package" in done.stdout, done.stderr
