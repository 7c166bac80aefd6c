"""torch.compile(adapted_model): same outputs and gradients as eager, without graph breaks.

Comparisons use assert_close's float32 defaults, which is what tests/tolerances.py lists for
compiled vs eager LoRA ("lora_linear.compile"): the graphs reorder no reductions that matter.
"""

from __future__ import annotations

import pytest
import torch

import peftreg
from peftreg_plugins.lora import LoraConfig

pytestmark = pytest.mark.compile

@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Tiny models: a second thread only spins; a reset keeps compiled graphs from leaking
    # between tests (and their kernel modes).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def adapted(make_tiny):
    """The same adapted model on every call, with an adapter that changes the outputs."""
    torch.manual_seed(3)
    model = peftreg.adapt(make_tiny(), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # LoRA B starts at zero
        for p in model.adapter_parameters("default"):
            p.normal_(0.0, 0.2)
    return model


def logits_loss_grads(model, call, ids):
    model.zero_grad(set_to_none=True)
    out = call(ids, labels=ids)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out["logits"].detach(), out["loss"].detach(), grads


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_lora_model_matches_eager_fullgraph(make_tiny, token_batch, backend):
    # Default kernel mode: the fused LoRA op when the extension is built (its fake kernel and
    # autograd formula make fullgraph possible), plain PyTorch otherwise.
    model = adapted(make_tiny)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    eager = logits_loss_grads(model, model, token_batch)
    graph = logits_loss_grads(model, compiled, token_batch)
    torch.testing.assert_close(graph[0], eager[0])
    torch.testing.assert_close(graph[1], eager[1])
    assert graph[2].keys() == eager[2].keys() and eager[2]
    for name, grad in eager[2].items():
        torch.testing.assert_close(graph[2][name], grad, msg=name)


def test_compiled_model_follows_adapter_state_and_saves(make_tiny, token_batch, tmp_path):
    model = adapted(make_tiny)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        adapted_logits = compiled(token_batch)["logits"]
        # Disabling the adapters is seen by the compiled model (a guard fails, it recompiles).
        with model.disable_adapters():
            base = model(token_batch)["logits"]
            compiled_base = compiled(token_batch)["logits"]
        again = compiled(token_batch)["logits"]
    torch.testing.assert_close(compiled_base, base)
    assert not torch.allclose(base, adapted_logits)
    assert torch.equal(again, adapted_logits)

    # The compiled wrapper forwards attribute lookups to the AdaptedModel, so its API works.
    compiled.save_adapter(tmp_path / "adapter")
    reloaded = peftreg.load(make_tiny(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(token_batch)["logits"], adapted_logits)


def test_compiled_training_follows_eager_training(make_tiny, token_batch):
    runs = []
    for compile_it in (False, True):
        model = adapted(make_tiny)
        call = torch.compile(model, fullgraph=True, backend="aot_eager") if compile_it else model
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=1e-2)
        losses = []
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            loss = call(token_batch, labels=token_batch)["loss"]
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs.append((losses, model.adapter_state_dict("default")))
    (eager_losses, eager_state), (graph_losses, graph_state) = runs
    assert graph_losses[-1] < graph_losses[0]
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses))
    for key, tensor in eager_state.items():
        torch.testing.assert_close(graph_state[key], tensor, msg=key)


def test_compiled_qlora_model_traces_the_fused_op_fullgraph(make_tiny, token_batch):
    """QLoRA's fused NF4+LoRA op is traced into the graph (its fake kernel), with no break."""
    if not peftreg.ops.has_extension():
        pytest.skip(f"compiled extension unavailable: {peftreg.ops.extension_error()}")
    torch.manual_seed(3)
    config = peftreg.config_for("qlora", r=4, target_modules="all-linear", compute_dtype="float32")
    model = peftreg.adapt(make_tiny(), config)
    with torch.no_grad():
        for p in model.adapter_parameters("default"):
            p.normal_(0.0, 0.2)
    traced_ops: set[str] = set()

    def recording_backend(gm: torch.fx.GraphModule, example_inputs):
        traced_ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=recording_backend)
    eager = logits_loss_grads(model, model, token_batch)
    graph = logits_loss_grads(model, compiled, token_batch)
    assert "peftreg.nf4_lora_linear.default" in traced_ops
    torch.testing.assert_close(graph[0], eager[0])
    for name, grad in eager[2].items():
        torch.testing.assert_close(graph[2][name], grad, msg=name)


def test_compiled_training_with_lora_dropout_fullgraph(make_tiny, token_batch):
    """Dropout inside the fused op (a seed drawn per call) traces without a graph break, and
    the compiled step draws the same masks as eager under the same torch seed."""
    config = LoraConfig(r=4, lora_dropout=0.2, target_modules="all-linear")
    runs = []
    for compile_it in (False, True):
        torch.manual_seed(3)
        model = peftreg.adapt(make_tiny(), config)
        with torch.no_grad():
            for p in model.adapter_parameters("default"):
                p.normal_(0.0, 0.2)
        model.train()
        call = torch.compile(model, fullgraph=True, backend="aot_eager") if compile_it else model
        torch.manual_seed(11)
        runs.append(logits_loss_grads(model, call, token_batch))
    (_eager_logits, eager_loss, eager_grads), (_graph_logits, graph_loss, graph_grads) = runs
    torch.testing.assert_close(graph_loss, eager_loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(graph_grads[name], grad, msg=name)
