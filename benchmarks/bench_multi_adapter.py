"""Training many LoRA adapters in one batch: peftreg's per-row step against PEFT's loop.

The model of bench_training_step.py (a random-init Llama-style decoder, hidden 512, 4 layers),
LoRA r=16 on every linear layer of the blocks, N adapters (8 and 64 by default), one batch of 64
rows x 32 tokens whose rows are spread evenly over the adapters. One step = forward and backward
of the batch (no optimizer, the same for all):

* peftreg per row: ``model(ids, labels=ids, adapter_names=rows)``, every adapter trained at once;
* peftreg one adapter: the same 64 rows through one adapter (the floor the per-row step is held
  against: the goal is at most 1.5x);
* PEFT loop: PEFT cannot train different adapters in one batch (``adapter_names=`` is for
  inference), so for each adapter ``set_adapter`` and forward/backward its rows (the goal is
  that peftreg's step is at least 5x faster).

The steps are timed in turn, round after round, so a shared machine's drift hits all alike.

    python benchmarks/bench_multi_adapter.py [--adapters 8,64] [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, print_table, write_json
from bench_training_step import TARGETS, make_base

ROWS, TOKENS = 64, 32


def _ids() -> torch.Tensor:
    return torch.randint(0, 4096, (ROWS, TOKENS), generator=torch.Generator().manual_seed(0))


def _rows(n: int) -> list[str]:
    return [f"a{i % n}" for i in range(ROWS)]


def peftreg_steps(n: int) -> tuple[Callable[[], None], Callable[[], None]]:
    import peftreg

    config = peftreg.config_for("lora", r=16, lora_alpha=32, target_modules=TARGETS)
    model = peftreg.adapt(make_base(torch.float32), config, "a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config, activate=False, trainable=True)
    model.train()
    ids, rows = _ids(), _rows(n)

    def per_row() -> None:
        model(input_ids=ids, labels=ids, adapter_names=rows).loss.backward()
        model.zero_grad(set_to_none=True)

    def one_adapter() -> None:
        model(input_ids=ids, labels=ids, adapter_names=["a0"] * ROWS).loss.backward()
        model.zero_grad(set_to_none=True)

    return per_row, one_adapter


def peft_loop(n: int) -> Callable[[], None]:
    import peft

    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(make_base(torch.float32), config, adapter_name="a0")
        for i in range(1, n):
            model.add_adapter(f"a{i}", config)
    model.train()
    ids, rows = _ids(), _rows(n)
    groups = {name: [i for i, r in enumerate(rows) if r == name] for name in dict.fromkeys(rows)}

    def step() -> None:
        for name, own in groups.items():
            model.set_adapter(name)
            sub = ids[own]
            # Each group's mean loss weighted by its share of the rows: the batch's mean.
            (model(input_ids=sub, labels=sub).loss * len(own) / ROWS).backward()
        model.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", default="8,64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "multi_adapter.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    rows = []
    for n in (int(v) for v in args.adapters.split(",")):
        per_row, one = peftreg_steps(n)
        steps = {"peftreg per row": per_row, "peftreg one adapter": one, "PEFT loop": peft_loop(n)}
        for step in steps.values():
            step()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(1000 * (time.perf_counter() - start))
        med = {k: statistics.median(v) for k, v in times.items()}
        results[str(n)] = {"median_ms": med, "all_ms": times}
        rows.append([str(n), f"{med['peftreg per row']:.0f}", f"{med['peftreg one adapter']:.0f}",
                     f"{med['PEFT loop']:.0f}",
                     f"{med['peftreg per row'] / med['peftreg one adapter']:.2f}x",
                     f"{med['PEFT loop'] / med['peftreg per row']:.2f}x"])
    print_table(f"Forward + backward of {ROWS} x {TOKENS} tokens, LoRA r=16 on every linear "
                f"layer, rows spread over N adapters (median of {args.rounds})",
                ["N adapters", "peftreg per row ms", "peftreg one adapter ms", "PEFT loop ms",
                 "per row / one adapter", "PEFT loop / per row"], rows)
    write_json(args.out, {"environment": environment(torch.device("cpu")), "results": results})


if __name__ == "__main__":
    main()
