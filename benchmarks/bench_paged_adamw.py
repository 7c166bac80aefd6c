"""PagedAdamW vs torch.optim.AdamW: step time, bytes moved, and peak memory of a QLoRA run.

Part 1, optimizer step alone: a LoRA-shaped parameter set (96 adapters of r=16 on 1024-wide
layers, 3.1M trainable fp32 parameters), gradients fixed, one ``step()`` timed. Rows: torch AdamW
single-tensor (the CPU default), foreach and fused; PagedAdamW with float32 and with 8-bit
blockwise states (``state_bits=8``, issue 17), each with everything resident and at a 10% budget
(with the bytes it moves per step and the state bytes per parameter). Ratios are against each
torch variant. On a machine shared with other work the times are indicative only.

Part 1b, all resident, timed side by side (interleaved rounds, so load drift falls on every
variant alike): torch's fused AdamW, PagedAdamW float32, and PagedAdamW 8-bit with each CPU
kernel of its step this CPU runs (``scalar``, ``avx2-gather``: the kernel before the AVX-512
one, ``avx2``, ``avx512``; all bit-identical). The ratio against fused AdamW is the issue's
goal (at most 1.3x).

Part 2, peak process memory of a QLoRA training run (NF4 base, LoRA r=64 on every linear of a
4-layer 1024-wide reference transformer, 5M trainable parameters, 40 MB of AdamW moments):
each configuration runs in a fresh process, and the figure is the rise of its resident memory
from just before the optimizer is made to the end of training.

On CUDA the two paged rows are the two tiers: all resident keeps every page in device memory;
at the 10% budget most pages live in pinned host memory and cross PCIe each step (each row's
``tier`` says which). ``--smoke`` shrinks both parts to seconds (a wiring check, not a
measurement).

    python benchmarks/bench_paged_adamw.py [--quick] [--smoke] [--device cpu|cuda] [--threads N]
                                           [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    environment,
    fmt_ms,
    fmt_ratio,
    print_table,
    time_callable,
    time_side_by_side,
    write_json,
)

from peftreg.optim import PagedAdamW
from peftreg.optim.quant8 import dynamic_map

HIDDEN, RANK, ADAPTERS = 1024, 16, 96
BUDGET = 0.10


def lora_params(device: torch.device, adapters: int = ADAPTERS, hidden: int = HIDDEN
                ) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(adapters):
        for shape in ((RANK, hidden), (hidden, RANK)):
            p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device) * 0.02)
            p.grad = torch.randn(shape, generator=gen).to(device) * 1e-3
            params.append(p)
    return params


def tier(device: torch.device, budget: float | None) -> str:
    """Where the paged state lives for this device and budget."""
    fast, backing = ("device memory", "pinned host memory") if device.type == "cuda" else (
        "process memory", "a backing file")
    return f"{fast} (all resident)" if budget is None else (
        f"{fast} ({budget:.0%} budget) + {backing}")


def step_rows(device: torch.device, min_run_time: float, adapters: int = ADAPTERS,
              hidden: int = HIDDEN) -> tuple[list[dict], dict]:
    variants: list[tuple[str, dict]] = [
        ("torch AdamW (single-tensor)", {"foreach": False}),
        ("torch AdamW (foreach)", {"foreach": True}),
        ("torch AdamW (fused)", {"fused": True}),
        ("PagedAdamW (all resident)", {"paged": None}),
        (f"PagedAdamW ({BUDGET:.0%} budget)", {"paged": BUDGET}),
        ("PagedAdamW 8-bit (all resident)", {"paged": None, "state_bits": 8}),
        (f"PagedAdamW 8-bit ({BUDGET:.0%} budget)", {"paged": BUDGET, "state_bits": 8}),
    ]
    rows = []
    for name, kwargs in variants:
        params = lora_params(device, adapters, hidden)
        if "paged" in kwargs:
            opt = PagedAdamW(params, lr=1e-4, budget_fraction=kwargs["paged"],
                             state_bits=kwargs.get("state_bits", 32))
        else:
            try:
                opt = torch.optim.AdamW(params, lr=1e-4, **kwargs)
                opt.step()
            except (RuntimeError, ValueError) as exc:
                rows.append({"name": name, "error": str(exc).splitlines()[0]})
                continue
        opt.step()  # states exist before timing
        timing = time_callable(opt.step, device, min_run_time=min_run_time)
        row = {"name": name, **timing.to_dict()}
        if isinstance(opt, PagedAdamW):
            row["tier"] = tier(device, kwargs["paged"])
            # Bytes per step from one more counted step (the timer does not report its calls).
            before = opt.counters()
            opt.step()
            after = opt.counters()
            row["counters"] = after
            row["bytes_out_per_step"] = after["bytes_out"] - before["bytes_out"]
            row["bytes_in_per_step"] = after["bytes_in"] - before["bytes_in"]
            row["peak_resident_bytes"] = after["peak_resident_bytes"]
            row["budget_bytes"] = after["budget_bytes"]
            row["state_bytes"] = after["num_pages"] * after["page_bytes"]
            row["state_bytes_per_param"] = row["state_bytes"] / sum(p.numel() for p in params)
            opt.close()
        rows.append(row)
    count = sum(p.numel() for p in lora_params(torch.device("cpu"), adapters, hidden))
    return rows, {"trainable_params": count}


def kernel_rows(device: torch.device, min_run_time: float, adapters: int = ADAPTERS,
                hidden: int = HIDDEN) -> list[dict]:
    """All-resident steps of torch fused AdamW, PagedAdamW float32 and each 8-bit kernel,
    timed interleaved."""
    fns, keep = {}, []
    try:
        opt = torch.optim.AdamW(lora_params(device, adapters, hidden), lr=1e-4, fused=True)
        opt.step()
        fns["torch AdamW (fused)"] = opt.step
    except (RuntimeError, ValueError):
        pass
    paged = PagedAdamW(lora_params(device, adapters, hidden), lr=1e-4)
    keep.append(paged)
    fns["PagedAdamW float32"] = paged.step
    kernels = [None]
    if device.type == "cpu":
        probe = PagedAdamW(lora_params(device, 1, 64), state_bits=8)
        kernels = probe.pool.quant8_kernels()
        auto = probe.pool.quant8_kernel()
        probe.close()
    for kernel in kernels:
        opt8 = PagedAdamW(lora_params(device, adapters, hidden), lr=1e-4, state_bits=8)
        if kernel is not None:
            opt8.pool.set_quant_maps(dynamic_map(True), dynamic_map(False), kernel=kernel)
        keep.append(opt8)
        label = "" if kernel is None else f" {kernel}" + (" (auto)" if kernel == auto else "")
        fns[f"PagedAdamW 8-bit{label}"] = opt8.step
    for fn in fns.values():
        fn()  # states exist before timing
    timings = time_side_by_side(fns, device, min_run_time=min_run_time)
    for opt in keep:
        opt.close()
    return [{"name": name, **t.to_dict()} for name, t in timings.items()]


QLORA_RUN = textwrap.dedent("""
    import json, sys, torch
    import peftreg
    from peftreg.compare.memory import PeakMemory
    from peftreg.optim import PagedAdamW
    from peftreg.reference_model import ReferenceConfig, ReferenceTransformer
    from peftreg_plugins.qlora import QLoraConfig
    kind, steps, device, hidden = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    torch.manual_seed(0)
    cfg = ReferenceConfig(vocab_size=2048, hidden_size=hidden, num_layers=4, num_heads=8,
                          num_kv_heads=8, intermediate_size=hidden * 11 // 4, max_positions=128)
    model = peftreg.adapt(ReferenceTransformer(cfg).to(device),
                          QLoraConfig(r=64, compute_dtype="float32"))
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, cfg.vocab_size, (2, 32), device=device)
    with PeakMemory() as peak:
        if kind == "torch":
            opt = torch.optim.AdamW(params, lr=1e-4)
        else:
            bits = 8 if kind.startswith("paged8") else 32
            opt = PagedAdamW(params, lr=1e-4, state_bits=bits,
                             budget_fraction=None if kind.endswith("-all")
                             else float(kind.split("-")[1]))
        for _ in range(steps):
            model(ids, labels=ids)["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    result = {"kind": kind, "rss_increase": peak.increase, "rss_peak": peak.peak,
              "trainable": sum(p.numel() for p in params)}
    if device.startswith("cuda"):
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
    if kind != "torch":
        result["counters"] = opt.counters()
    print("RESULT", json.dumps(result))
""")


def qlora_rows(device: torch.device, steps: int, hidden: int = HIDDEN) -> list[dict]:
    rows = []
    for kind in ("torch", "paged-all", f"paged-{BUDGET}", "paged8-all", f"paged8-{BUDGET}"):
        proc = subprocess.run([sys.executable, "-c", QLORA_RUN, kind, str(steps), str(device),
                               str(hidden)], capture_output=True, text=True, timeout=1800)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            rows.append({"kind": kind, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(line[-1][len("RESULT "):]))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing, fewer steps")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and one step: checks the wiring in seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on a loaded machine 1 keeps "
                             "fused AdamW's per-parameter parallel regions from waiting on "
                             "descheduled threads")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "paged_adamw.json")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    adapters, hidden = (4, 64) if args.smoke else (ADAPTERS, HIDDEN)
    min_run_time = 0.01 if args.smoke else 0.3 if args.quick else 1.0

    rows, info = step_rows(device, min_run_time, adapters, hidden)
    base = {r["name"]: r.get("median_ms") for r in rows}
    single = base["torch AdamW (single-tensor)"]
    foreach = base["torch AdamW (foreach)"]
    fused = base["torch AdamW (fused)"]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["name"], "-", "-", "-", "-", "-", "-", r["error"][:40]])
            continue
        moved = r.get("bytes_out_per_step")
        per_param = r.get("state_bytes_per_param", 8.0)  # torch: two float32 moments
        table.append([r["name"], fmt_ms(r["median_ms"]), fmt_ratio(r["median_ms"], single),
                      fmt_ratio(r["median_ms"], foreach), fmt_ratio(r["median_ms"], fused),
                      f"{per_param:.3f}",
                      "-" if moved is None else f"{(moved + r['bytes_in_per_step']) / 2**20:.1f}",
                      "-" if moved is None else f"{r['peak_resident_bytes'] / 2**20:.1f}"])
    print_table(f"Optimizer step, {info['trainable_params'] / 1e6:.1f}M LoRA parameters, "
                f"{device} ({torch.get_num_threads()} threads)",
                ["optimizer", "median ms", "vs single", "vs foreach", "vs fused",
                 "state B/param", "MiB moved/step", "peak resident MiB"], table)
    for r in rows:
        if "tier" in r:
            print(f"  {r['name']}: {r['tier']}")

    krows = kernel_rows(device, min_run_time, adapters, hidden)
    fused_sbs = next((r["median_ms"] for r in krows if r["name"] == "torch AdamW (fused)"), None)
    paged_sbs = next(r["median_ms"] for r in krows if r["name"] == "PagedAdamW float32")
    print_table(f"All resident, side by side, {device} ({torch.get_num_threads()} threads)",
                ["optimizer", "median ms", "IQR ms", "vs fused", "vs PagedAdamW float32"],
                [[r["name"], fmt_ms(r["median_ms"]), fmt_ms(r["iqr_ms"]),
                  fmt_ratio(r["median_ms"], fused_sbs), fmt_ratio(r["median_ms"], paged_sbs)]
                 for r in krows])

    qrows = qlora_rows(device, 1 if args.smoke else 3 if args.quick else 5, hidden)
    torch_rss = next((r.get("rss_increase") for r in qrows if r["kind"] == "torch"), None)
    qtable = []
    for r in qrows:
        if "error" in r:
            qtable.append([r["kind"], "-", "-", "-", str(r["error"])[:60]])
            continue
        c = r.get("counters", {})
        qtable.append([r["kind"], f"{r['rss_increase'] / 2**20:.1f}",
                       fmt_ratio(r["rss_increase"], torch_rss),
                       f"{c.get('peak_resident_bytes', 0) / 2**20:.1f}" if c else "-",
                       f"{(c.get('bytes_out', 0) + c.get('bytes_in', 0)) / 2**20:.1f}"
                       if c else "-"])
    trainable = next((r["trainable"] for r in qrows if "trainable" in r), 0)
    print_table(f"QLoRA training run ({trainable / 1e6:.1f}M trainable), peak RSS rise",
                ["optimizer", "RSS rise MiB", "vs torch AdamW", "state resident MiB",
                 "MiB moved"], qtable)
    write_json(args.out, {"benchmark": "paged_adamw", "smoke": args.smoke, "quick": args.quick,
                          "environment": environment(device), "step": rows, **info,
                          "side_by_side": krows,
                          "qlora": qrows, "budget_fraction": BUDGET})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
