"""QLoRA with its NF4 base sharded by FSDP2 (``fully_shard``) over two gloo CPU processes.

The pytest process starts this file twice as a script (one process per rank, loopback only;
tests/gloo_ranks.py) and compares what the ranks report with one process training the same
model, unsharded, on the whole global batch: the NF4 bytes each rank holds and gathers, the
losses and adapter after a few steps, and the adapter directory saved from the sharded run.
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
from peftreg.integrations.distributed import (
    adapter_parameters_for_ddp,
    make_nf4_shardable,
    save_on_main_process,
)
from peftreg.nn import Linear4bit
from peftreg.quant import NF4FormatError, NF4Tensor, nf4_shard
from peftreg.reference_model import ReferenceConfig, ReferenceTransformer
from peftreg_plugins.qlora import QLoraConfig

WORLD = 2
STEPS = 3
LR = 0.5
# Width 64 and an MLP of 256: the MLP weights hold two double-quantization groups at block 32
# (256 blocks of 32 elements each), one per rank; the 64x64 attention weights hold one, so
# rank 1 holds none of them (FSDP2's uneven sharding).
CONFIG = ReferenceConfig(vocab_size=61, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=256, max_positions=64)
TIMEOUT_S = 240  # per run of both ranks; a normal run takes a fraction of it

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available")


# -- shared by the ranks and the single-process reference -------------------------------------


def make_base():
    torch.manual_seed(1234)
    return ReferenceTransformer(CONFIG)


def make_adapted():
    """The same QLoRA model on every call and in every process (float32 compute, so the
    comparison with one process is at float32 rounding)."""
    base = make_base()
    torch.manual_seed(5)
    return peftreg.adapt(base, QLoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                           lora_dropout=0.0, blocksize=32,
                                           compute_dtype="float32"))


def global_batch():
    return torch.randint(0, CONFIG.vocab_size, (2 * WORLD, 9),
                         generator=torch.Generator().manual_seed(7))


def shard(batch, rank):
    per_rank = batch.shape[0] // WORLD  # equal shares: the mean of rank means is the mean
    return batch[rank * per_rank:(rank + 1) * per_rank]


def train(model, ids, parameters, world=1):
    """SGD for STEPS steps; returns each step's loss over the global batch."""
    optimizer = torch.optim.SGD(parameters, lr=LR)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids)["loss"]
        loss.backward()
        optimizer.step()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(value)
    return torch.stack(losses)


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach()


def full_adapter_state(adapted):
    return {k: _full(v).clone() for k, v in adapted.adapter_state_dict("default").items()}


def fp32_tol():
    from tolerances import tol  # here: the ranks run this file without tests/ on the path

    return tol("fsdp.vs_single_process", torch.float32)


def nf4_layers(model):
    return {path: m for path, m in model.named_modules() if isinstance(m, Linear4bit)}


# -- what each rank runs ------------------------------------------------------------------------


def fsdp_case(rank, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_adapted()
    paths = make_nf4_shardable(model)
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

    layers = nf4_layers(model)
    # What this rank keeps between steps: its rows of each grouped matrix.
    local = {p: {f: getattr(m, name).to_local().clone() for f, name in
                 (("codes", "weight"), ("absmax", "weight_absmax"),
                  ("nested_absmax", "weight_nested_absmax"))} for p, m in layers.items()}
    offsets = {p: m.weight_offset.clone() for p, m in layers.items()}
    held = {p: sum(t.numel() for t in rows.values()) for p, rows in local.items()}
    # nf4 gathers the rows (a collective: every rank, in the same order).
    before = {p: m.nf4.to_state_dict() for p, m in layers.items()}
    sharded_state = {p: m.state_dict() for p, m in layers.items()}  # no collective

    parameters = adapter_parameters_for_ddp(model)
    losses = train(model, shard(global_batch(), rank), parameters, WORLD)
    after = {p: m.nf4.to_state_dict() for p, m in layers.items()}
    # On one rank only: a collective inside would hang here (gloo times out after 60 s).
    adapter_keys = sorted(model.state_dict()) if rank == 0 else None
    some_path = next(iter(layers))
    try:
        layers[some_path].load_state_dict(after[some_path])
        load_error = None
    except Exception as exc:
        load_error = f"{type(exc).__name__}: {exc}"
    local_adapter = {k: (v.to_local().clone() if hasattr(v, "to_local") else v.clone())
                     for k, v in model.adapter_state_dict("default").items()}
    path = save_on_main_process(model, out / "adapter")
    return {"paths": paths, "local": local, "offsets": offsets, "held_bytes": held,
            "state_before": before, "state_after": after, "losses": losses,
            "adapter": full_adapter_state(model), "local_adapter": local_adapter,
            "saved": str(path), "param_type": type(parameters[0]).__name__,
            "load_error": load_error, "adapter_keys": adapter_keys,
            "sharded_state": {p: {k: (type(v).__name__, v.to_local().clone()
                                      if hasattr(v, "to_local") else v.clone())
                                  for k, v in st.items()} for p, st in sharded_state.items()}}


def worker(rank, port, out):
    torch.set_num_threads(1)  # two ranks on a small machine: one thread each
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    results = {}
    try:
        try:
            results["fsdp"] = fsdp_case(rank, out)
        except Exception:
            results["error"] = traceback.format_exc()
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# -- the pytest side --------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(64, 48), (33, 31), (5,)])
def test_grouped_layout_round_trips_and_every_chunk_decodes(double_quant, shape):
    torch.manual_seed(0)
    storage = NF4Tensor.quantize(torch.randn(shape), 32, double_quant, nested_blocksize=32)
    groups = nf4_shard.to_groups(storage)
    rows = groups["codes"].shape[0]
    assert all(t.dtype == torch.uint8 and t.shape[0] == rows for t in groups.values())
    back = nf4_shard.from_groups(groups, storage.shape, storage.dtype, 32, 32, storage.offset)
    for name in nf4_shard.GROUP_FIELDS:
        ours, original = getattr(back, name), getattr(storage, name)
        assert (ours is None) == (original is None), name
        if original is not None:
            assert torch.equal(ours, original), name
            assert ours.untyped_storage().data_ptr() == groups[name].untyped_storage(
                ).data_ptr(), f"{name} is a copy"
    dense = storage.dequantize().reshape(-1)
    for world in (2, 3):
        parts = []
        for rank in range(world):
            start, stop = nf4_shard.rows_of_rank(rows, world, rank)
            chunk = {k: v[start:stop] for k, v in groups.items()}
            parts.append(nf4_shard.decode_rows(chunk, start, storage.numel, 32, 32,
                                               storage.offset))
        assert torch.equal(torch.cat(parts), dense), world


def test_grouped_layout_names_a_wrong_matrix():
    storage = NF4Tensor.quantize(torch.randn(64, 64), 64)
    groups = nf4_shard.to_groups(storage)
    with pytest.raises(NF4FormatError, match="'absmax' must be contiguous uint8"):
        nf4_shard.from_groups({**groups, "absmax": groups["absmax"].float()}, storage.shape,
                              storage.dtype, 64, 256, storage.offset)
    with pytest.raises(NF4FormatError, match="'codes' holds 8 bytes"):
        nf4_shard.from_groups({**groups, "codes": groups["codes"][:, :8]}, storage.shape,
                              storage.dtype, 64, 256, storage.offset)


@pytest.mark.parametrize("double_quant", [True, False])
def test_make_shardable_keeps_outputs_and_the_bitsandbytes_state_dict(double_quant):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 64)
    plain = Linear4bit.from_linear(linear, 32, double_quant, compute_dtype=torch.float32)
    sharded = Linear4bit.from_linear(linear, 32, double_quant, compute_dtype=torch.float32)
    assert make_nf4_shardable(torch.nn.Sequential(sharded)) == ["0"]
    frozen = dict(sharded.named_parameters())
    assert {n for n, p in frozen.items() if p.dtype == torch.uint8} == {
        "weight", "weight_absmax"} | ({"weight_nested_absmax"} if double_quant else set())
    assert not any(p.requires_grad for n, p in frozen.items() if n != "bias")
    x = torch.randn(3, 48, requires_grad=True)
    y = sharded(x)
    assert torch.equal(y, plain(x))
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    ours, theirs = sharded.state_dict(), plain.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    sharded.half()  # casts floating tensors only: the NF4 bytes survive
    assert torch.equal(sharded.dequantize(), plain.dequantize())
    loaded = Linear4bit(48, 64, double_quant=double_quant,
                        compute_dtype=torch.float32).make_shardable()
    loaded.load_state_dict(theirs)
    assert loaded.shardable and torch.equal(loaded(x), plain(x))



@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from gloo_ranks import run_ranks  # here: the ranks run this file without tests/ on the path

    out = tmp_path_factory.mktemp("fsdp_qlora")
    run_ranks(__file__, WORLD, out, TIMEOUT_S)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, f"FSDP2 QLoRA failed on CPU/gloo:\n{errors[0]}"
    return [r["fsdp"] for r in results], out


@pytest.fixture(scope="module")
def reference():
    """One process, the NF4 storage unsharded in buffers, trained on the whole global batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_adapted()
        layers = nf4_layers(model)
        state = {p: m.state_dict() for p, m in layers.items()}
        dense = {p: m.dequantize(torch.float32) for p, m in layers.items()}
        losses = train(model, global_batch(), adapter_parameters_for_ddp(model))
        return {"model": model, "state": state, "dense": dense, "losses": losses,
                "adapter": full_adapter_state(model),
                "storage_bytes": sum(m.nf4.nbytes for m in layers.values())}
    finally:
        torch.set_num_threads(threads)


def test_each_rank_holds_whole_groups_that_decode_on_their_own(ranks, reference):
    results, _ = ranks
    for rank, result in enumerate(results):
        assert sorted(result["paths"]) == sorted(reference["state"])
        for path, rows in result["local"].items():
            dense = reference["dense"][path].reshape(-1)
            layer = reference["model"].get_submodule(path)
            groups = nf4_shard.groups_of(dense.numel(), layer.blocksize, True,
                                         layer.nested_blocksize)
            start, stop = nf4_shard.rows_of_rank(groups, WORLD, rank)
            assert all(t.shape[0] == stop - start for t in rows.values()), path
            decoded = nf4_shard.decode_rows(rows, start, dense.numel(), layer.blocksize,
                                            layer.nested_blocksize, result["offsets"][path])
            per_row = layer.nested_blocksize * layer.blocksize
            expected = dense[start * per_row:stop * per_row]
            assert torch.equal(decoded, expected), f"rank {rank} {path}"
    # The MLP weights are split between the ranks, the attention weights sit on rank 0.
    up = "model.layers.0.mlp.up_proj.base"
    assert [r["local"][up]["codes"].shape[0] for r in results] == [1, 1]
    q = "model.layers.0.self_attn.q_proj.base"
    assert [r["local"][q]["codes"].shape[0] for r in results] == [1, 0]


def test_gathered_storage_is_byte_identical_and_unchanged_by_training(ranks, reference):
    results, _ = ranks
    for result in results:
        for when in ("state_before", "state_after"):
            for path, expected in reference["state"].items():
                actual = result[when][path]
                assert list(actual) == list(expected), path  # bitsandbytes' keys and order
                for key, tensor in expected.items():
                    assert torch.equal(actual[key], tensor), f"{when} {path} {key}"


def test_state_dict_under_fsdp2_keeps_the_shards_and_needs_no_collective(ranks, reference):
    results, _ = ranks
    # AdaptedModel.state_dict() ran on rank 0 alone (the Trainer's checkpoint) and returned.
    assert results[0]["adapter_keys"] == sorted(reference["model"].state_dict())
    for result in results:
        for path, state in result["sharded_state"].items():
            assert set(state) - {"bias"} == {"weight", "weight_absmax", "weight_nested_absmax",
                                             "weight_offset"}, path
            rows = result["local"][path]
            for key, field in (("weight", "codes"), ("weight_absmax", "absmax"),
                               ("weight_nested_absmax", "nested_absmax")):
                kind, local = state[key]
                assert kind == "DTensor" and torch.equal(local, rows[field]), f"{path} {key}"


def test_each_rank_holds_its_share_of_the_4bit_base(ranks, reference):
    results, _ = ranks
    for path, layer in nf4_layers(reference["model"]).items():
        held = [r["held_bytes"][path] for r in results]
        exact = layer.nf4.nbytes - 4  # the 4-byte offset stays replicated
        groups = nf4_shard.groups_of(layer.nf4.numel, layer.blocksize, True,
                                     layer.nested_blocksize)
        padded = groups * (layer.nested_blocksize * (layer.blocksize // 2 + 1) + 4)
        # Between them the ranks hold one copy (and the last group's padding), not two.
        assert exact <= sum(held) == padded < exact + padded / groups, path
        if groups == WORLD:  # the MLP weights: exactly half each
            assert held[0] == held[1] == padded // 2, path


def test_loading_into_a_sharded_layer_is_refused_by_name(ranks):
    for result in ranks[0]:
        error = result["load_error"]
        assert error is not None
        assert error.startswith("UnsupportedOperationError: 'weight': "), error  # the key
        assert "before fully_shard" in error


def test_sharded_training_equals_one_process(ranks, reference):
    first, second = ranks[0]
    assert first["param_type"] == "DTensor"
    assert torch.equal(first["losses"], second["losses"])
    torch.testing.assert_close(first["losses"], reference["losses"],
                               **fp32_tol())
    assert reference["losses"][-1] < reference["losses"][0]  # it did train
    for key, tensor in reference["adapter"].items():
        assert torch.equal(first["adapter"][key], second["adapter"][key]), key
        torch.testing.assert_close(first["adapter"][key], tensor,
                                   **fp32_tol(),
                                   msg=lambda m, k=key: f"adapter {k}: {m}")


def test_the_sharded_save_holds_every_ranks_share(ranks, reference):
    results, out = ranks
    first = results[0]
    # Each rank held only its rows of each adapter tensor...
    for key, full in first["adapter"].items():
        shares = [r["local_adapter"][key] for r in results]
        assert sum(s.shape[0] for s in shares) == full.shape[0], key
        assert torch.equal(torch.cat(shares), full), key
    # ...and the file holds both ranks' rows: reloading gives the full tensors, bit for bit.
    reloaded = peftreg.load(make_base(), out / "adapter")
    state = full_adapter_state(reloaded)
    assert state.keys() == first["adapter"].keys()
    for key, tensor in state.items():
        assert torch.equal(tensor, first["adapter"][key]), key
    ids = global_batch()
    reference["model"].eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids)["logits"], reference["model"](ids)["logits"],
                                   **fp32_tol())


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
