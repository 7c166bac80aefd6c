# SPDX-License-Identifier: Apache-2.0
"""Where widening bf16 to float32 wins on this CPU, forward and backward (issue 17, item 2).

Usage::

    python benchmarks/bench_bf16_crossover.py [--rows 1 8 32 128] [--threads 1] [--repeats 2]
                                              [--min-run-time 0.5] [--out PATH]

One LoRA layer, ``rows x 4096 -> 4096``, r=16, forward (no_grad) and forward + backward (grads for
x, A, B; the base frozen). Timed interleaved in one process (benchmarks/_harness.py), so every
candidate sees the same load:

* ``fp32``: the fused op in float32, the twin every bf16 path is compared with;
* ``bf16 reference``: the plain-PyTorch expression in bf16 (what PEFT and torch run);
* ``bf16 native``: the fused op keeping ATen's bf16 products (``PEFTREG_CPU_WIDEN_16BIT=0``);
* ``bf16 widened``: the fused op widening every product to float32 (``PEFTREG_CPU_WIDEN_16BIT=1``,
  at any row count);
* ``bf16 row kernel``: the fused op with the backward's bf16 row kernel (``g @ W`` reading W once,
  widened in registers; ``PEFTREG_CPU_16BIT_ROWS=1``, at any row count); the forward as native;
* ``bf16 default``: what the kernel mode picks by itself (``LORA_LINEAR.run``).

Each ratio is the bf16 path's median over the fp32 twin's; the issue's goal is <= 1.5x. The
whole measurement runs ``--repeats`` times and the spread of the ratios across repeats is
reported as the noise. The JSON records the processor's capabilities (torch's
``get_cpu_capability()`` and the avx512_bf16 / amx_bf16 / avx512_fp16 flags), since the
crossover differs between processors with and without native bf16 arithmetic.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _harness import environment, print_table, time_side_by_side, write_json

from peftreg.ops import lora as lora_ops
from peftreg.ops import reference

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bf16_crossover.json"
FEATURES, RANK = 4096, 16
FLAGS = ("avx512_bf16", "amx_bf16", "avx512_fp16", "avx2", "avx512f")


def cpu_features() -> dict[str, Any]:
    flags = lora_ops.cpu_flags()
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            **{flag: flag in flags for flag in FLAGS}}


def problem(rows: int, dtype: torch.dtype, features: int = FEATURES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(dtype)

    f = features
    return [randn(rows, f), randn(f, f, scale=f ** -0.5), randn(f),
            randn(RANK, f, scale=f ** -0.5), randn(f, RANK, scale=RANK ** -0.5), randn(rows, f)]


def candidate(fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor], mode: str,
              env: dict[str, str] | None) -> Callable[[], object]:
    x, w, b, a, bb, g = tensors
    x = x.clone().requires_grad_(mode != "fwd")
    a = a.clone().requires_grad_(mode != "fwd")
    bb = bb.clone().requires_grad_(mode != "fwd")

    def run() -> object:
        # The overrides are read per call, by the Python crossover and by the C++ kernels.
        os.environ.update(env or {})
        try:
            if mode == "fwd":
                with torch.no_grad():
                    return fn(x, w, b, a, bb, 2.0)
            return torch.autograd.grad(fn(x, w, b, a, bb, 2.0), [x, a, bb], g)
        finally:
            for name in env or {}:
                os.environ.pop(name, None)
    return run


def default_path(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                 bb: torch.Tensor, s: float) -> torch.Tensor:
    return lora_ops.LORA_LINEAR.run(x, w, b, a, bb, s, None, 0.0, None)


def measure(rows: int, mode: str, min_run_time: float, features: int = FEATURES
            ) -> dict[str, float]:
    p32 = problem(rows, torch.float32, features)
    p16 = problem(rows, torch.bfloat16, features)
    fns = {"fp32": candidate(lora_ops.lora_linear, p32, mode, None),
           "bf16 reference": candidate(reference.lora_linear, p16, mode, None),
           "bf16 native": candidate(lora_ops.lora_linear, p16, mode,
                                    {"PEFTREG_CPU_WIDEN_16BIT": "0"}),
           "bf16 widened": candidate(lora_ops.lora_linear, p16, mode,
                                     {"PEFTREG_CPU_WIDEN_16BIT": "1"}),
           "bf16 row kernel": candidate(lora_ops.lora_linear, p16, mode,
                                        {"PEFTREG_CPU_16BIT_ROWS": "1"}),
           "bf16 default": candidate(default_path, p16, mode, None)}
    timings = time_side_by_side(fns, torch.device("cpu"), min_run_time=min_run_time, warmup=1)
    return {name: t.median_ms for name, t in timings.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"],
                        default=["fwd", "fwd+bwd"])
    parser.add_argument("--features", type=int, default=FEATURES,
                        help="in = out features (4096 is the issue's shape)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for rows in args.rows:
            for mode in args.modes:
                medians = measure(rows, mode, args.min_run_time, args.features)
                results.append({"repeat": repeat, "rows": rows, "mode": mode, "ms": medians})
                print(f"  repeat {repeat} rows {rows:4} {mode:8} "
                      + "  ".join(f"{k} {v:.2f}" for k, v in medians.items()), file=sys.stderr)
    names = ["bf16 reference", "bf16 native", "bf16 widened", "bf16 row kernel", "bf16 default"]
    table, summary = [], []
    for rows in args.rows:
        for mode in args.modes:
            runs = [r["ms"] for r in results if r["rows"] == rows and r["mode"] == mode]
            row: list[str] = [str(rows), mode, f"{min(r['fp32'] for r in runs):.2f}"]
            entry: dict[str, Any] = {"rows": rows, "mode": mode}
            for name in names:
                ratios = sorted(r[name] / r["fp32"] for r in runs)
                entry[name] = {"ratio_low": ratios[0], "ratio_high": ratios[-1]}
                row.append(f"{ratios[0]:.2f}-{ratios[-1]:.2f}x" if len(ratios) > 1
                           else f"{ratios[0]:.2f}x")
            faster = min(("bf16 native", "bf16 widened", "bf16 row kernel"),
                         key=lambda n: sum(r[n] for r in runs))
            entry["faster_fused_path"] = faster
            # Without bf16 arithmetic "native" is ATen's slow generic loop, so the crossover
            # that carries over to such processors is widened vs row kernel.
            wide = sum(r["bf16 widened"] for r in runs)
            rowk = sum(r["bf16 row kernel"] for r in runs)
            entry["row_kernel_over_widened"] = rowk / wide
            row += [faster.removeprefix("bf16 "), f"{rowk / wide:.2f}x"]
            table.append(row)
            summary.append(entry)
    flags = cpu_features()
    f = args.features
    print_table(f"bf16 / fp32 twin, {f}->{f} r={RANK}, {torch.get_num_threads()} "
                f"threads, CPU {flags['capability']}, avx512_bf16={flags['avx512_bf16']} "
                f"(range over {args.repeats} repeats; goal <= 1.5x)",
                ["rows", "mode", "fp32 ms", *names, "faster fused", "row kernel/widened"], table)
    write_json(args.out, {"benchmark": "bf16_crossover", "features": f, "rank": RANK,
                          "cpu": flags,
                          "environment": environment(torch.device("cpu")),
                          "summary": summary, "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
