"""Every method with a PEFT twin: training-step time and peak memory, peftreg against HF PEFT.

The model, batch and step of bench_training_step.py (a random-init Llama-style decoder, hidden
512, 4 layers; batch 8 x 128 tokens; one step = forward, backward, AdamW), every linear layer of
the blocks adapted (IA3: keys, values and the feed-forward down projection). Each method runs
at the same settings in both libraries. Step times come from one process taking the cases' steps
in turn (so a shared machine's drift hits every case alike); peak memory from one process per
case (the resident-set rise over one step after a warm-up step).

    python benchmarks/bench_methods.py [--methods lora,dora,...] [--rounds N] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, print_table, write_json
from bench_training_step import TARGETS, make_base

# method -> (peftreg config fields, PEFT config factory)
METHODS: dict[str, tuple[dict[str, Any], Callable[[Any], Any]]] = {
    "lora": ({"r": 16, "lora_alpha": 32, "target_modules": TARGETS},
             lambda peft: peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)),
    "dora": ({"r": 16, "lora_alpha": 32, "target_modules": TARGETS},
             lambda peft: peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                          use_dora=True)),
    "vera": ({"r": 256, "target_modules": TARGETS},
             lambda peft: peft.VeraConfig(r=256, target_modules=TARGETS)),
    "loha": ({"r": 8, "alpha": 8.0, "target_modules": TARGETS},
             lambda peft: peft.LoHaConfig(r=8, alpha=8, target_modules=TARGETS)),
    "lokr": ({"r": 8, "alpha": 8.0, "target_modules": TARGETS},
             lambda peft: peft.LoKrConfig(r=8, alpha=8, target_modules=TARGETS)),
    "oft": ({"oft_block_size": 32, "target_modules": TARGETS},
            lambda peft: peft.OFTConfig(r=0, oft_block_size=32, target_modules=TARGETS)),
    "ia3": ({"target_modules": ["k_proj", "v_proj", "down_proj"],
             "feedforward_modules": ["down_proj"]},
            lambda peft: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                        feedforward_modules=["down_proj"])),
}


def build(case: str, dtype: torch.dtype) -> torch.nn.Module:
    """``peftreg:<method>`` or ``peft:<method>`` on a fresh base."""
    library, method = case.split(":")
    fields, peft_config = METHODS[method]
    if library == "peftreg":
        import peftreg

        return peftreg.adapt(make_base(dtype), peftreg.config_for(method, **fields))
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(make_base(dtype), peft_config(peft))


def make_step(case: str, dtype: torch.dtype) -> tuple[Callable[[], None], int]:
    model = build(case, dtype)
    ids = torch.randint(0, 4096, (8, 128), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def time_interleaved(cases: list[str], dtype: torch.dtype, rounds: int) -> dict[str, Any]:
    steps, counts = {}, {}
    for case in cases:
        steps[case], counts[case] = make_step(case, dtype)
        steps[case]()  # warm-up
    times: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(rounds):
        for case in cases:
            start = time.perf_counter()
            steps[case]()
            times[case].append(1000 * (time.perf_counter() - start))
    return {case: {"step_ms": statistics.median(t), "min_ms": min(t), "rounds": rounds,
                   "trainable": counts[case]} for case, t in times.items()}


def peak_memory(case: str, dtype: torch.dtype) -> dict[str, Any]:
    from peftreg.compare.memory import PeakMemory

    step, trainable = make_step(case, dtype)
    step()
    with PeakMemory() as peak:
        step()
    return {"peak_mb": peak.increase / 2**20, "trainable": trainable}


# As bench_training_step.py: freed blocks go back to the system at once, so the resident set
# follows live memory.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _memory_in_subprocess(case: str, dtype: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--memory", case, "--dtype", dtype],
                          capture_output=True, text=True, env={**os.environ, **_MALLOC_ENV})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": ((proc.stderr.strip().splitlines() or ["no output"])[-1])[:100]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "methods.json")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.memory:
        print(json.dumps(peak_memory(args.memory, dtype)))
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cases = [f"{lib}:{m}" for m in methods for lib in ("peftreg", "peft")]
    timings = time_interleaved(cases, dtype, args.rounds)
    memory = {case: _memory_in_subprocess(case, args.dtype) for case in cases}
    rows = []
    for method in methods:
        ours, theirs = timings[f"peftreg:{method}"], timings[f"peft:{method}"]
        ours_mb = memory[f"peftreg:{method}"].get("peak_mb")
        theirs_mb = memory[f"peft:{method}"].get("peak_mb")
        rows.append([method, f"{ours['trainable']:,}", f"{theirs['trainable']:,}",
                     f"{ours['step_ms']:.0f}", f"{theirs['step_ms']:.0f}",
                     f"{theirs['step_ms'] / ours['step_ms']:.2f}x",
                     "-" if ours_mb is None else f"{ours_mb:.0f}",
                     "-" if theirs_mb is None else f"{theirs_mb:.0f}"])
    print_table(f"Training step, {args.dtype}, peftreg vs HF PEFT (median of {args.rounds} "
                "interleaved steps)",
                ["method", "trainable (peftreg)", "trainable (PEFT)", "peftreg ms", "PEFT ms",
                 "PEFT / peftreg", "peftreg peak MiB", "PEFT peak MiB"], rows)
    write_json(args.out, {"environment": environment(torch.device("cpu")), "dtype": args.dtype,
                          "timings": timings, "memory": memory})


if __name__ == "__main__":
    main()
