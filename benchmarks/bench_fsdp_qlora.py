"""Memory per rank of QLoRA sharded by FSDP2 (2 gloo CPU processes) against one process.

Model: the reference transformer (4 layers, width 1024, MLP 2816, vocabulary 2048; 50M base
weights, 26 MB in NF4 with double quantization), QLoRA r=16 on every linear layer, bf16 compute.
Three runs, each in fresh processes, train the same model for a few SGD steps on the same
global batch (4 x 32 tokens):

* ``one process``: the NF4 storage in buffers, the whole batch;
* ``FSDP2, NF4 replicated``: 2 ranks, ``fully_shard`` per block and at the root but without
  ``make_nf4_shardable``, so every rank keeps the whole 4-bit base (FSDP2 shards parameters,
  and the NF4 storage is in buffers); half the batch each;
* ``FSDP2, NF4 sharded``: the same after ``make_nf4_shardable(model)``.

Per rank it reports the bytes of the model's tensors that rank keeps between steps (tracked
exactly: the local shard of each parameter, every buffer), split into NF4 storage, other frozen
tensors and adapter parameters, and the process's resident memory: after setup and its peak
during training (sampled every 5 ms; includes torch itself, the activations and FSDP2's
gathered layers, and on a busy machine it moves by a few MB between runs). The last loss of
each run is printed as a check that the three runs train alike.

    python benchmarks/bench_fsdp_qlora.py [--smoke] [--steps N] [--layers N] [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, print_table, write_json

RUNS = {"single": ("one process", 1), "replicated": ("FSDP2, NF4 replicated", 2),
        "sharded": ("FSDP2, NF4 sharded", 2)}
MiB = 2**20


def build(size: dict[str, int]):
    import peftreg
    from peftreg.reference_model import ReferenceConfig, ReferenceTransformer
    from peftreg_plugins.qlora import QLoraConfig

    hidden = size["hidden"]
    cfg = ReferenceConfig(vocab_size=size["vocab"], hidden_size=hidden,
                          num_layers=size["layers"], num_heads=8, num_kv_heads=8,
                          intermediate_size=hidden * 11 // 4, max_positions=128)
    torch.manual_seed(0)
    base = ReferenceTransformer(cfg)
    torch.manual_seed(1)
    model = peftreg.adapt(base, QLoraConfig(r=16, lora_dropout=0.0))
    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(2))
    return model, ids


def tracked_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the tensors this process keeps for the model, by kind (local shards only)."""
    from peftreg.nn import Linear4bit

    nf4 = {id(t) for m in model.modules() if isinstance(m, Linear4bit)
           for t in list(m._parameters.values()) + list(m._buffers.values()) if t is not None}
    out = {"nf4": 0, "other_frozen": 0, "adapter": 0}
    for tensor in list(model.parameters()) + list(model.buffers()):
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        size = local.numel() * local.element_size()
        kind = ("nf4" if id(tensor) in nf4 else "adapter" if tensor.requires_grad
                else "other_frozen")
        out[kind] += size
    return out


def worker(kind: str, rank: int, world: int, port: int, out: Path, size: dict[str, int],
           steps: int) -> None:
    import torch.distributed as dist

    from peftreg.compare.memory import PeakMemory, resident_bytes
    from peftreg.integrations.distributed import make_nf4_shardable

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=300))
    model, ids = build(size)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if kind == "sharded":
            make_nf4_shardable(model)
        mesh = init_device_mesh("cpu", (world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        ids = ids.chunk(world)[rank]
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=1e-3)
    gc.collect()
    result = {"kind": kind, "rank": rank, "world": world, "tracked": tracked_bytes(model),
              "rss_setup": resident_bytes()}
    losses = []
    with PeakMemory() as peak:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = model(ids, labels=ids)["loss"]
            loss.backward()
            optimizer.step()
            value = loss.detach().float()
            if world > 1:
                dist.all_reduce(value)
                value /= world
            losses.append(float(value))
    result.update(rss_peak=peak.peak, rss_rise=peak.increase, losses=losses)
    (out / f"{kind}-{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(kind: str, out: Path, size: dict[str, int], steps: int) -> list[dict]:
    world = RUNS[kind][1]
    port = free_port()
    # A fixed mmap threshold makes glibc return every large freed block to the system at once,
    # so the resident size follows the live tensors (FSDP2 gathers and frees a layer group at a
    # time) instead of the allocator's high-water mark; the same for every run.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", kind, str(rank), str(world),
                               str(port), str(out), json.dumps(size), str(steps)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    rows = []
    for rank, proc in enumerate(procs):
        log = proc.communicate(timeout=600)[0]
        path = out / f"{kind}-{rank}.json"
        if proc.returncode != 0 or not path.exists():
            rows.append({"kind": kind, "rank": rank, "error": log.strip().splitlines()[-3:]})
        else:
            rows.append(json.loads(path.read_text()))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model and one step: checks the wiring in seconds")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4,
                        help="decoder layers (the NF4 base grows with them, FSDP2's gathered "
                             "working set does not)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "fsdp_qlora.json")
    args = parser.parse_args(argv)
    size = ({"hidden": 64, "layers": 2, "vocab": 128} if args.smoke
            else {"hidden": 1024, "layers": args.layers, "vocab": 2048})
    steps = 1 if args.smoke else args.steps
    scratch = args.out.parent / "fsdp_qlora_ranks"
    scratch.mkdir(parents=True, exist_ok=True)
    rows = [row for kind in RUNS for row in run(kind, scratch, size, steps)]

    single = next((r for r in rows if r["kind"] == "single" and "error" not in r), None)
    table = []
    for r in rows:
        name = f"{RUNS[r['kind']][0]}, rank {r['rank']}"
        if "error" in r:
            table.append([name, "-", "-", "-", "-", "-", "-", str(r["error"])[:60]])
            continue
        t = r["tracked"]
        total = sum(t.values())
        vs = "-" if single is None else f"{total / sum(single['tracked'].values()):.2f}x"
        table.append([name, f"{t['nf4'] / MiB:.2f}", f"{t['other_frozen'] / MiB:.2f}",
                      f"{t['adapter'] / MiB:.2f}", vs, f"{r['rss_setup'] / MiB:.0f}",
                      f"{r['rss_peak'] / MiB:.0f}", f"{r['losses'][-1]:.5f}"])
    print_table(f"QLoRA, {size['layers']} layers of width {size['hidden']}, {steps} SGD steps: "
                "memory per rank",
                ["run", "NF4 MiB", "other frozen MiB", "adapter MiB", "tensors vs one process",
                 "RSS after setup MiB", "peak RSS MiB", "last loss"], table)
    write_json(args.out, {"benchmark": "fsdp_qlora", "smoke": args.smoke, "size": size,
                          "steps": steps, "environment": environment(torch.device("cpu")),
                          "runs": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, rank, world, port, out, size, steps = sys.argv[2:9]
        worker(kind, int(rank), int(world), int(port), Path(out), json.loads(size), int(steps))
    else:
        main()
