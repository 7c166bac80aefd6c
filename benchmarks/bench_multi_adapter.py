"""Training many LoRA adapters in one batch: peftreg's per-row step against PEFT's loop.

The model of bench_training_step.py (a random-init Llama-style decoder, hidden 512, 4 layers),
LoRA r=16 on every linear layer of the blocks, N adapters (8 and 64 by default), one batch of 64
rows x 32 tokens whose rows are spread evenly over the adapters. One step = forward and backward
of the batch (no optimizer, the same for all):

* peftreg per row: ``model(ids, labels=ids, adapter_names=rows)``, every adapter trained at once
  (``peftreg::lora_grouped_add``: one GEMM per adapter slice in C++, and its mirrored backward);
* peftreg per row, plain: the same with the op's plain-PyTorch path (kernel mode ``reference``:
  two products per adapter from Python), what the op replaces;
* peftreg one adapter: the same 64 rows through one adapter (the floor the per-row step is held
  against: the goal is at most 1.5x);
* PEFT loop: PEFT cannot train different adapters in one batch (``adapter_names=`` is for
  inference), so for each adapter ``set_adapter`` and forward/backward its rows (the goal is
  that peftreg's step is at least 5x faster);
* with ``--dropout P``, also peftreg per row with ``lora_dropout=P`` on every adapter (each row
  dropped with its own adapter's p), to show what dropout adds to the step.

The steps are timed side by side (``_harness.time_side_by_side``: interleaved rounds, one torch
thread by default), so a shared machine's drift hits all alike.

    python benchmarks/bench_multi_adapter.py [--adapters 8,64] [--threads 1] [--no-peft]
        [--dropout 0.1]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, fmt_ms, fmt_ratio, print_table, time_side_by_side, write_json
from bench_training_step import TARGETS, make_base

ROWS, TOKENS = 64, 32


def _ids() -> torch.Tensor:
    return torch.randint(0, 4096, (ROWS, TOKENS), generator=torch.Generator().manual_seed(0))


def _rows(n: int) -> list[str]:
    return [f"a{i % n}" for i in range(ROWS)]


def _model(n: int, dropout: float = 0.0) -> torch.nn.Module:
    import peftreg

    config = peftreg.config_for("lora", r=16, lora_alpha=32, lora_dropout=dropout,
                                target_modules=TARGETS)
    model = peftreg.adapt(make_base(torch.float32), config, "a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config, activate=False, trainable=True)
    return model.train()


def dropout_step(n: int, dropout: float) -> Callable[[], None]:
    """peftreg per row with ``lora_dropout=dropout`` on every adapter (kernel mode auto)."""
    model = _model(n, dropout)
    ids, rows = _ids(), _rows(n)

    def run() -> None:
        model(input_ids=ids, labels=ids, adapter_names=rows).loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def peftreg_steps(n: int) -> dict[str, Callable[[], None]]:
    import peftreg

    model = _model(n)
    ids, rows = _ids(), _rows(n)

    def step(names: list[str], mode: str) -> Callable[[], None]:
        def run() -> None:
            with peftreg.ops.kernels(mode):  # type: ignore[arg-type]
                model(input_ids=ids, labels=ids, adapter_names=names).loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    return {
        # The kernel mode's choice: peftreg::lora_grouped_add on the CPU.
        "peftreg per row": step(rows, "auto"),
        # The op's plain-PyTorch path: two products per adapter from Python, recorded by autograd.
        "peftreg per row, plain": step(rows, "reference"),
        "peftreg one adapter": step(["a0"] * ROWS, "auto"),
    }


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
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a shared machine's load falls on all alike)")
    parser.add_argument("--min-run-time", type=float, default=2.0,
                        help="seconds of timed rounds per candidate (at least 15 rounds)")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's loop (slow)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="also time per-row training with this lora_dropout (0: not run)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "multi_adapter.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    results = {}
    rows = []
    for n in (int(v) for v in args.adapters.split(",")):
        steps = peftreg_steps(n)
        if not args.no_peft:
            steps["PEFT loop"] = peft_loop(n)
        if args.dropout:
            steps["peftreg per row, dropout"] = dropout_step(n, args.dropout)
        timed = time_side_by_side(steps, device, min_run_time=args.min_run_time, warmup=1)
        med = {k: t.median_ms for k, t in timed.items()}
        results[str(n)] = {k: t.to_dict() for k, t in timed.items()}
        per_row = med["peftreg per row"]
        rows.append([str(n), fmt_ms(per_row), fmt_ms(med["peftreg per row, plain"]),
                     fmt_ms(med["peftreg one adapter"]), fmt_ms(med.get("PEFT loop")),
                     fmt_ratio(per_row, med["peftreg one adapter"]),
                     fmt_ratio(med["peftreg per row, plain"], per_row),
                     fmt_ratio(med.get("PEFT loop"), per_row),
                     fmt_ratio(med.get("peftreg per row, dropout"), per_row)])
    print_table(f"Forward + backward of {ROWS} x {TOKENS} tokens, LoRA r=16 on every linear "
                f"layer, rows spread over N adapters ({args.threads} thread(s), median of "
                "interleaved rounds)",
                ["N adapters", "per row ms", "per row plain ms", "one adapter ms", "PEFT loop ms",
                 "per row / one adapter", "plain / per row", "PEFT loop / per row",
                 f"dropout {args.dropout:g} / per row"], rows)
    write_json(args.out, {"environment": environment(device), "threads": args.threads,
                          "results": results})


if __name__ == "__main__":
    main()
