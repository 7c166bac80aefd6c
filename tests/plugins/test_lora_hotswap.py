"""Hot-swapping LoRA weights on a compiled model: no recompilation, outputs of a fresh load."""

from __future__ import annotations

import pytest
import torch

import peftreg
from peftreg import AdapterError, UnsupportedOperationError
from peftreg_plugins.ia3 import IA3Config
from peftreg_plugins.lora import LoraConfig

TARGETS = ["q_proj", "v_proj"]


def _saved(make_tiny, tmp_path, name, seed, **fields):
    torch.manual_seed(seed)
    model = peftreg.adapt(make_tiny(), LoraConfig(target_modules=TARGETS, **fields))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_adapter(tmp_path / name)
    return tmp_path / name


def _fresh(make_tiny, directory, token_batch):
    model = peftreg.AdaptedModel(make_tiny())
    model.load_adapter(directory)
    with torch.no_grad():
        return model(token_batch)["logits"]


class CountingBackend:
    """A torch.compile backend that runs graphs eagerly and counts how many it was given:
    every compilation or recompilation is one more."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.fixture
def backend():
    torch._dynamo.reset()
    yield CountingBackend()
    torch._dynamo.reset()


def test_swaps_of_other_ranks_and_alphas_need_no_recompile(make_tiny, token_batch, tmp_path,
                                                           backend):
    first = _saved(make_tiny, tmp_path, "a", 1, r=4, lora_alpha=8)
    others = [_saved(make_tiny, tmp_path, "b", 2, r=2, lora_alpha=16),
              _saved(make_tiny, tmp_path, "c", 3, r=8, lora_alpha=4, use_rslora=True)]
    model = peftreg.AdaptedModel(make_tiny())
    model.load_adapter(first)
    model.prepare_hotswap("default", max_rank=8)
    model.eval()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(token_batch)["logits"],
                                   _fresh(make_tiny, first, token_batch), atol=1e-5, rtol=0)
        compiled_once = backend.graphs
        assert compiled_once > 0
        for directory in others:
            model.hotswap_adapter(directory, "default")
            torch.testing.assert_close(compiled(token_batch)["logits"],
                                       _fresh(make_tiny, directory, token_batch), atol=1e-5,
                                       rtol=0)
    assert backend.graphs == compiled_once, "a swap recompiled the model"
    assert model.record("default").config.r == 8


def test_without_preparation_the_same_rank_and_scale_swap_in_place(make_tiny, token_batch,
                                                                    tmp_path, backend):
    first = _saved(make_tiny, tmp_path, "a", 1, r=4)
    second = _saved(make_tiny, tmp_path, "b", 2, r=4)
    model = peftreg.AdaptedModel(make_tiny())
    model.load_adapter(first)
    model.eval()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(token_batch)
        compiled_once = backend.graphs
        model.hotswap_adapter(second, "default")
        torch.testing.assert_close(compiled(token_batch)["logits"],
                                   _fresh(make_tiny, second, token_batch), atol=1e-5, rtol=0)
    assert backend.graphs == compiled_once, "a swap recompiled the model"
    other_rank = _saved(make_tiny, tmp_path, "c", 3, r=2)
    with pytest.raises(UnsupportedOperationError, match="call prepare_hotswap"):
        model.hotswap_adapter(other_rank, "default")


def test_refusals_change_nothing(make_tiny, token_batch, tmp_path):
    first = _saved(make_tiny, tmp_path, "a", 1, r=4)
    model = peftreg.AdaptedModel(make_tiny())
    model.load_adapter(first)
    model.prepare_hotswap("default", max_rank=4)
    with torch.no_grad():
        before = model(token_batch)["logits"]
    too_big = _saved(make_tiny, tmp_path, "big", 2, r=8)
    with pytest.raises(UnsupportedOperationError, match="above the prepared maximum"):
        model.hotswap_adapter(too_big, "default")
    torch.manual_seed(0)
    other = peftreg.adapt(make_tiny(), LoraConfig(target_modules=["k_proj"], r=4))
    other.save_adapter(tmp_path / "other-targets")
    with pytest.raises(UnsupportedOperationError, match="other modules"):
        model.hotswap_adapter(tmp_path / "other-targets", "default")
    ia3 = peftreg.adapt(make_tiny(), IA3Config(target_modules=TARGETS,
                                               feedforward_modules=None))
    ia3.save_adapter(tmp_path / "ia3")
    with pytest.raises(UnsupportedOperationError, match="cannot replace the weights"):
        model.hotswap_adapter(tmp_path / "ia3", "default")
    with torch.no_grad():
        assert torch.equal(model(token_batch)["logits"], before)
    with pytest.raises(AdapterError, match="prepared for hot-swapping"):
        model.save_adapter(tmp_path / "padded")
    assert not (tmp_path / "padded").exists()
