"""LoRA on the reference transformer trained by two CPU processes (gloo): DDP and FSDP2.

The pytest process starts this file twice as a script (one process per rank, loopback only)
and compares what the ranks report with single-process training on the whole global batch.
Both wrappers run in the same two processes, one after the other, to pay the start-up once.
"""

from __future__ import annotations

import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import peftreg
from peftreg.integrations.distributed import adapter_parameters_for_ddp, save_on_main_process
from peftreg.reference_model import ReferenceConfig, ReferenceTransformer
from peftreg_plugins.lora import LoraConfig

WORLD = 2
STEPS = 3
LR = 0.5
CONFIG = ReferenceConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=48, max_positions=64)
TIMEOUT_S = 240  # per run of both ranks; a normal run takes a fraction of it

# Not marked slow: about 14 s on an idle two-core machine, most of it the two ranks importing
# torch and (through DDP) torch._dynamo; three times that when the machine is busy.
pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available")


# -- shared by the ranks and the single-process reference -------------------------------------


def make_base():
    """The same base model on every call and in every process."""
    torch.manual_seed(1234)
    return ReferenceTransformer(CONFIG)


def make_adapted():
    """The same adapted model on every call and in every process (LoRA A is random)."""
    base = make_base()
    torch.manual_seed(5)
    return peftreg.adapt(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                          lora_dropout=0.0))


def global_batch():
    return torch.randint(0, CONFIG.vocab_size, (2 * WORLD, 9),
                         generator=torch.Generator().manual_seed(7))


def shard(batch, rank):
    # Equal shares with no ignored labels, so the mean of the per-rank mean losses (what DDP's
    # gradient averaging computes) is the mean loss over the whole batch.
    per_rank = batch.shape[0] // WORLD
    return batch[rank * per_rank:(rank + 1) * per_rank]


def loss_of(model, ids):
    return model(ids, labels=ids)["loss"]


def train(model, ids, parameters, first_grads=None):
    """SGD for STEPS steps; records the first step's gradients into ``first_grads``."""
    optimizer = torch.optim.SGD(parameters, lr=LR)
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, ids).backward()
        if step == 0 and first_grads is not None:
            first_grads.update(first_grads_of(model))
        optimizer.step()


def first_grads_of(model):
    adapted = model.module if hasattr(model, "module") else model
    return {n: (None if p.grad is None else _full(p.grad).clone())
            for n, p in adapted.named_parameters()}


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach()


def full_adapter_state(adapted):
    return {k: _full(v).clone() for k, v in adapted.adapter_state_dict("default").items()}


# -- what each rank runs ------------------------------------------------------------------------


def ddp_case(rank, out):
    from torch.nn.parallel import DistributedDataParallel

    model = make_adapted()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ddp = DistributedDataParallel(model)
    parameters = adapter_parameters_for_ddp(ddp)
    logging = ddp._get_ddp_logging_data()
    grads = {}
    train(ddp, shard(global_batch(), rank), parameters, grads)

    saves = []
    original = model.save_adapter
    model.save_adapter = lambda *a, **k: saves.append(rank) or original(*a, **k)
    path = save_on_main_process(ddp, out / "ddp-adapter")
    del model.save_adapter
    # Every rank may read the directory as soon as save_on_main_process returns.
    ids = global_batch()
    reloaded = peftreg.load(make_base(), path)
    with torch.no_grad():
        same_outputs = torch.equal(reloaded(ids)["logits"], model(ids)["logits"])
    return {
        "registered": {"count": logging.get("num_parameter_tensors"),
                       "bytes": logging.get("total_parameter_size_bytes")},
        "adapter_param_count": len(parameters),
        "adapter_param_bytes": sum(p.numel() * p.element_size() for p in parameters),
        "adapter_param_names": sorted(n for n, p in model.named_parameters()
                                      if any(p is q for q in parameters)),
        "grads": grads,
        "frozen_unchanged": all(torch.equal(p, frozen[n]) for n, p in model.named_parameters()
                                if n in frozen),
        "frozen_requires_grad": any(model.get_parameter(n).requires_grad for n in frozen),
        "adapter": full_adapter_state(model),
        "saves": saves,
        "reload_equal": same_outputs,
    }


def fsdp2_case(rank, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_adapted()
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert isinstance(model, peftreg.AdaptedModel)
    parameters = adapter_parameters_for_ddp(model)
    grads = {}
    train(model, shard(global_batch(), rank), parameters, grads)
    path = save_on_main_process(model, out / "fsdp2-adapter")
    return {"grads": grads, "adapter": full_adapter_state(model), "saved": str(path),
            "sharded": type(next(iter(parameters))).__name__}


def worker(rank, port, out):
    torch.set_num_threads(1)  # two ranks on a small machine: one thread each
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    results = {}
    try:
        results["ddp"] = ddp_case(rank, out)
        torch.save(results, out / f"rank{rank}.pt")
        try:
            results["fsdp2"] = fsdp2_case(rank, out)
        except Exception:
            results["fsdp2_error"] = traceback.format_exc()
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# -- the pytest side --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run both ranks once; return (what each rank reported, the output folder)."""
    from gloo_ranks import run_ranks  # here: the ranks run this file without tests/ on the path

    out = tmp_path_factory.mktemp("distributed")
    run_ranks(__file__, WORLD, out, TIMEOUT_S)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], out


@pytest.fixture(scope="module")
def reference():
    """Single-process training on the whole global batch: first gradients and final adapter."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_adapted()
        grads = {}
        train(model, global_batch(), adapter_parameters_for_ddp(model), grads)
        return {"grads": grads, "adapter": full_adapter_state(model), "model": model}
    finally:
        torch.set_num_threads(threads)


def assert_states_close(actual, expected, what):
    assert actual.keys() == expected.keys(), what
    for key, tensor in expected.items():
        if tensor is None:
            assert actual[key] is None, f"{what}: {key} has a gradient"
            continue
        torch.testing.assert_close(actual[key], tensor, msg=lambda m, k=key: f"{what} {k}: {m}")


def test_ddp_registers_and_synchronises_only_the_adapter(ranks, reference):
    results, _ = ranks
    model = reference["model"]
    lora = sorted(n for n, p in model.named_parameters() if "lora_" in n)
    for ddp in (r["ddp"] for r in results):
        assert ddp["adapter_param_names"] == lora and len(lora) == 2 * 2 * CONFIG.num_layers
        # The reducer holds exactly the adapter's tensors (count and bytes)...
        assert ddp["registered"] == {"count": ddp["adapter_param_count"],
                                     "bytes": ddp["adapter_param_bytes"]}
        # ...the base stays frozen, without gradients, and bit-identical.
        assert not ddp["frozen_requires_grad"] and ddp["frozen_unchanged"]
        assert all(ddp["grads"][n] is None for n, _ in model.named_parameters()
                   if n not in lora)
    # After the all-reduce both ranks hold the same gradients although their data differed:
    # the full-batch gradient (only LoRA B has one at step 0, A's is zero while B is zero).
    first, second = (r["ddp"]["grads"] for r in results)
    for name in lora:
        assert torch.equal(first[name], second[name]), name
    assert_states_close(first, reference["grads"], "DDP gradient vs full batch")
    assert any(first[n].abs().sum() > 0 for n in lora)


def test_ddp_training_equals_single_process_on_the_global_batch(ranks, reference):
    results, _ = ranks
    first, second = (r["ddp"]["adapter"] for r in results)
    for key in first:  # replicas stay bit-identical
        assert torch.equal(first[key], second[key]), key
    assert_states_close(first, reference["adapter"], "DDP adapter vs single process")
    start = full_adapter_state(make_adapted())
    assert any(not torch.equal(start[k], first[k]) for k in start)  # it did train


def test_ddp_saves_once_from_rank_zero_and_the_adapter_loads(ranks, reference):
    results, out = ranks
    assert [r["ddp"]["saves"] for r in results] == [[0], []]
    assert all(r["ddp"]["reload_equal"] for r in results)
    reloaded = peftreg.load(make_base(), out / "ddp-adapter")
    assert_states_close(full_adapter_state(reloaded), results[0]["ddp"]["adapter"],
                        "saved DDP adapter")
    for key, tensor in full_adapter_state(reloaded).items():
        assert torch.equal(tensor, results[0]["ddp"]["adapter"][key]), key


def test_fsdp2_training_equals_single_process_and_saves(ranks, reference):
    results, out = ranks
    errors = [r.get("fsdp2_error") for r in results if "fsdp2" not in r]
    assert not errors, f"FSDP2 (fully_shard) failed on CPU/gloo:\n{errors[0]}"
    first, second = (r["fsdp2"] for r in results)
    assert first["sharded"] == "DTensor"
    assert_states_close(first["grads"], reference["grads"], "FSDP2 gradient vs full batch")
    for key in first["adapter"]:
        assert torch.equal(first["adapter"][key], second["adapter"][key]), key
    assert_states_close(first["adapter"], reference["adapter"], "FSDP2 adapter vs single process")
    reloaded = peftreg.load(make_base(), out / "fsdp2-adapter")
    for key, tensor in full_adapter_state(reloaded).items():
        assert torch.equal(tensor, first["adapter"][key]), key
    ids = global_batch()
    reference["model"].eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids)["logits"], reference["model"](ids)["logits"])


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
