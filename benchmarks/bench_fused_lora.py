# SPDX-License-Identifier: Apache-2.0
"""Fused LoRA linear (peftreg::lora_linear) vs the plain-PyTorch reference (vs HF peft if present).

Usage::

    python benchmarks/bench_fused_lora.py [--quick] [--device cpu|cuda] [--base dense|nf4]
                                          [--out PATH]

For each shape (rows x in -> out, rank r), dtype (fp32, bf16) and mode (``fwd`` under no_grad;
``fwd+bwd`` as in LoRA training: frozen weight and bias, gradients for x, A and B) it times

* ``fused``: :func:`peftreg.ops.lora.lora_linear` (needs the compiled extension);
* ``reference``: :func:`peftreg.ops.reference.lora_linear`, the unfused PyTorch expression;
* ``default``: what a LoRA layer runs in the default (``auto``) kernel mode:
  ``LORA_LINEAR.run``, the fused op or the reference by the measured crossover (docs/ops.md);
  ``reference/default`` must stay >= 0.97 on every shape;
* ``peft``: HF peft's LoRA ``Linear`` around an ``nn.Linear``, when ``peft`` imports;
* ``reference again``: the reference a second time, as its own candidate: ``reference/again``
  is this run's noise floor (the same code measured against itself), the yardstick for
  reading a ratio near 1;

and prints medians with ratios (``> 1x`` means fused is faster) and writes JSON to ``--out``
(default ``benchmarks/results/fused_lora.json``). ``--quick`` runs two shapes briefly (< 1 min).

``--base nf4`` times QLoRA's layer instead (``peftreg::nf4_lora_linear``: an NF4 base with double
quantization, block 64, frozen, plus the LoRA update): ``fused`` is the op, ``reference`` its
plain-PyTorch maths, ``default`` the kernel mode's choice, and two unfused QLoRA layers built
on our compiled dequantize and torch's products, with the LoRA update in PyTorch:

* ``dequant+matmul``: bitsandbytes' ``MatMul4Bit`` order. The forward decodes the weight, and
  so does the backward for the input gradient: between the two passes the layer holds only its
  4-bit codes, which is what makes QLoRA's memory;
* ``dense kept``: decodes once and lets autograd keep the dense weight for the backward, i.e.
  ``out x in`` dense values per layer alive from forward to backward (a whole model's worth
  during training): the speed bought by giving up 4-bit storage in training.

The goal (issue 17) is ``fused`` faster than ``dequant+matmul`` in ``fwd+bwd``; the JSON's
``goals`` says where it is met. ``peft`` is PEFT's LoRA layer on a bitsandbytes ``Linear4bit``
(NF4, double quantization, block 64), where both import.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _harness import environment, fmt_ms, fmt_ratio, print_table, time_side_by_side, write_json

from peftreg import ops
from peftreg.ops import lora as lora_ops
from peftreg.ops import nf4 as nf4_ops
from peftreg.ops import reference

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fused_lora.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCALING_ALPHA = 32.0  # alpha; scaling = alpha / r as in the LoRA paper


@dataclass(frozen=True)
class Shape:
    rows: int
    in_features: int
    out_features: int
    rank: int

    def __str__(self) -> str:
        return f"{self.rows}x{self.in_features}->{self.out_features} r={self.rank}"


# CPU shapes stay small enough for a laptop; bf16 matmuls are slow on CPUs without bf16 units.
SHAPES = {
    ("cpu", True): [Shape(128, 1024, 1024, 16), Shape(1, 4096, 4096, 16)],
    ("cpu", False): [Shape(1, 4096, 4096, 16), Shape(128, 1024, 1024, 16),
                     Shape(512, 2048, 2048, 16), Shape(2048, 1024, 1024, 64)],
    ("cuda", True): [Shape(2048, 4096, 4096, 16), Shape(1, 4096, 4096, 16)],
    ("cuda", False): [Shape(1, 4096, 4096, 16), Shape(16, 4096, 4096, 16),
                      Shape(2048, 4096, 4096, 16), Shape(8192, 4096, 4096, 64),
                      Shape(4096, 4096, 11008, 16)],
}


@dataclass
class Problem:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    grad_out: torch.Tensor


def make_problem(shape: Shape, dtype: torch.dtype, device: torch.device) -> Problem:
    gen = torch.Generator().manual_seed(0)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    i, o, r = shape.in_features, shape.out_features, shape.rank
    return Problem(
        x=randn(shape.rows, i), weight=randn(o, i, scale=1 / math.sqrt(i)), bias=randn(o),
        lora_a=randn(r, i, scale=1 / math.sqrt(i)), lora_b=randn(o, r, scale=1 / math.sqrt(r)),
        scaling=SCALING_ALPHA / r, grad_out=randn(shape.rows, o),
    )


Forward = Callable[[torch.Tensor], torch.Tensor]


def functional_impl(fn: Callable[..., torch.Tensor], p: Problem
                    ) -> tuple[Forward, list[torch.Tensor]]:
    a = p.lora_a.detach().clone().requires_grad_()
    b = p.lora_b.detach().clone().requires_grad_()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return fn(x, p.weight, p.bias, a, b, p.scaling)

    return forward, [a, b]


class Nf4Base:
    """``p.weight`` quantized to NF4 (block 64, double quantization) as the NF4 ops take it."""

    def __init__(self, p: Problem) -> None:
        from peftreg.quant import NF4Tensor

        self.storage = NF4Tensor.quantize(p.weight.float(), 64, True)
        s = self.storage
        out_f, in_f = p.weight.shape
        self.args = (s.codes, s.absmax, s.nested_absmax, s.offset, s.blocksize,
                     s.nested_blocksize, out_f, in_f)
        self.dense = torch.empty(out_f, in_f, dtype=p.weight.dtype, device=p.weight.device)


def nf4_impls(p: Problem, with_fused: bool) -> dict[str, tuple[Forward, list[torch.Tensor]]]:
    """QLoRA's layer four ways (module doc); each gets its own trainable A and B."""
    base = Nf4Base(p)
    args = base.args

    def fused(x: torch.Tensor, _w: torch.Tensor, bias: torch.Tensor, a: torch.Tensor,
              b: torch.Tensor, s: float) -> torch.Tensor:
        return nf4_ops.LORA_LINEAR(x, *args, bias, a, b, s, None, 0.0, None)

    def default(x: torch.Tensor, _w: torch.Tensor, bias: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor, s: float) -> torch.Tensor:
        return nf4_ops.LORA_LINEAR.run(x, *args, bias, a, b, s, None, 0.0, None)

    def plain(x: torch.Tensor, _w: torch.Tensor, bias: torch.Tensor, a: torch.Tensor,
              b: torch.Tensor, s: float) -> torch.Tensor:
        return reference.nf4_lora_linear(x, *args, bias, a, b, s)

    def dequant_matmul(x: torch.Tensor, _w: torch.Tensor, bias: torch.Tensor, a: torch.Tensor,
                       b: torch.Tensor, s: float) -> torch.Tensor:
        update = torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)
        return _DecodeEachPass.apply(x, base, bias) + s * update

    def dense_kept(x: torch.Tensor, _w: torch.Tensor, bias: torch.Tensor, a: torch.Tensor,
                   b: torch.Tensor, s: float) -> torch.Tensor:
        weight = base.storage.dequantize(out=base.dense)  # autograd keeps it for the backward
        update = torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)
        return torch.nn.functional.linear(x, weight, bias) + s * update

    impls = {"reference": functional_impl(plain, p)}
    if with_fused:
        impls["fused"] = functional_impl(fused, p)
        impls["default"] = functional_impl(default, p)
        impls["dequant+matmul"] = functional_impl(dequant_matmul, p)
        impls["dense kept"] = functional_impl(dense_kept, p)
    return impls


class _DecodeEachPass(torch.autograd.Function):
    """``x @ dequant(W)^T + bias`` decoding W in the forward and again in the backward, as
    bitsandbytes' MatMul4Bit does: no dense weight outlives either pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: Nf4Base, bias: torch.Tensor) -> torch.Tensor:
        ctx.base = base
        return torch.nn.functional.linear(x, base.storage.dequantize(out=base.dense), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        weight = ctx.base.storage.dequantize(out=ctx.base.dense)
        return grad @ weight, None, None


def peft_bnb_impl(p: Problem) -> tuple[Forward, list[torch.Tensor]]:
    """PEFT's LoRA layer on a bitsandbytes NF4 ``Linear4bit`` (raises ImportError without
    either); the weight is quantized by bitsandbytes itself."""
    import bitsandbytes as bnb

    out_features, in_features = p.weight.shape
    base = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=p.weight.dtype,
                             quant_type="nf4", compress_statistics=True)
    base.weight = bnb.nn.Params4bit(p.weight.detach().float().cpu().clone(), requires_grad=False,
                                    quant_type="nf4", compress_statistics=True, blocksize=64)
    base.bias = torch.nn.Parameter(p.bias.detach().clone(), requires_grad=False)
    base = base.to(p.weight.device)
    return _peft_around(base, p)


def peft_impl(p: Problem) -> tuple[Forward, list[torch.Tensor]]:
    """HF peft's LoRA layer with the same weights (raises ImportError without peft)."""
    out_features, in_features = p.weight.shape
    base = torch.nn.Linear(in_features, out_features, device=p.weight.device,
                           dtype=p.weight.dtype)
    with torch.no_grad():
        base.weight.copy_(p.weight)
        base.bias.copy_(p.bias)
    return _peft_around(base, p)


def _peft_around(base: torch.nn.Module, p: Problem) -> tuple[Forward, list[torch.Tensor]]:
    """PEFT's LoRA on ``base`` with the problem's A and B."""
    import peft

    rank = p.lora_a.shape[0]

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = base

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    config = peft.LoraConfig(r=rank, lora_alpha=p.scaling * rank, lora_dropout=0.0,
                             target_modules=["proj"], bias="none")
    try:  # keep adapters in the base dtype (recent peft upcasts them to fp32 by default)
        model = peft.get_peft_model(Holder(), config, autocast_adapter_dtype=False)
    except TypeError:
        model = peft.get_peft_model(Holder(), config)
    layer = model.base_model.model.proj
    lora_a = layer.lora_A["default"].weight
    lora_b = layer.lora_B["default"].weight
    with torch.no_grad():
        lora_a.copy_(p.lora_a)
        lora_b.copy_(p.lora_b)
    return model, [lora_a, lora_b]


def _default_path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """What a LoRA layer runs by default: the op's kernel choice (``Op.run``, auto mode)."""
    return lora_ops.LORA_LINEAR.run(x, weight, bias, lora_a, lora_b, scaling, None, 0.0, None)


def _default_choice(p: Problem, mode: str) -> str:
    """Which path the default takes for this problem and mode: ``fused`` or ``plain``."""
    x = p.x.detach().requires_grad_(mode != "fwd")
    a = p.lora_a.detach().requires_grad_(mode != "fwd")
    with torch.set_grad_enabled(mode != "fwd"):
        fused = lora_ops.LORA_LINEAR.use_compiled(x, p.weight, p.bias, a, p.lora_b, p.scaling,
                                                  None, 0.0, None)
    return "fused" if fused else "plain"


def step_fn(forward: Forward, trainable: list[torch.Tensor], p: Problem, mode: str
            ) -> Callable[[], object]:
    if mode == "fwd":
        def run_fwd() -> object:
            with torch.no_grad():
                return forward(p.x)
        return run_fwd
    x = p.x.detach().clone().requires_grad_()
    inputs = [x, *trainable]

    def run_fwd_bwd() -> object:
        y = forward(x)
        return torch.autograd.grad(y, inputs, p.grad_out)
    return run_fwd_bwd


def run(shapes: list[Shape], dtypes: list[str], modes: list[str], device: torch.device,
        min_run_time: float, base: str = "dense"
        ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    skipped: dict[str, str] = {}
    op_name = "lora_linear" if base == "dense" else "nf4_lora_linear"
    if not ops.has_extension():
        skipped["fused"] = ops.extension_error() or "extension unavailable"
    elif not ops.kernel_available(op_name, device.type):
        skipped["fused"] = f"the extension has no {device.type} kernel for {op_name}"
    try:
        import peft  # noqa: F401
        if base == "nf4":
            import bitsandbytes  # noqa: F401
    except ImportError as exc:
        skipped["peft"] = f"peft{' or bitsandbytes' if base == 'nf4' else ''} is not " \
                          f"installed ({exc})"
    results: list[dict[str, Any]] = []
    for shape in shapes:
        for dtype_name in dtypes:
            p = make_problem(shape, DTYPES[dtype_name], device)
            impls: dict[str, tuple[Forward, list[torch.Tensor]]]
            if base == "nf4":
                impls = nf4_impls(p, "fused" not in skipped)
            else:
                impls = {"reference": functional_impl(reference.lora_linear, p),
                         "reference again": functional_impl(reference.lora_linear, p)}
                if "fused" not in skipped:
                    impls["fused"] = functional_impl(lora_ops.lora_linear, p)
                    impls["default"] = functional_impl(_default_path, p)
            if "peft" not in skipped:
                try:
                    impls["peft"] = peft_impl(p) if base == "dense" else peft_bnb_impl(p)
                except Exception as exc:  # an incompatible peft must not stop the benchmark
                    skipped["peft"] = f"{type(exc).__name__}: {exc}"
            max_diff = None
            if "fused" in impls:
                with torch.no_grad():
                    ref_y = impls["reference"][0](p.x).float()
                    max_diff = (impls["fused"][0](p.x).float() - ref_y).abs().max().item()
            for mode in modes:
                steps = {impl: step_fn(forward, trainable, p, mode)
                         for impl, (forward, trainable) in impls.items()}
                timings = time_side_by_side(steps, device, min_run_time=min_run_time)
                chosen = (_default_choice(p, mode) if "default" in impls and base == "dense"
                          else None)
                for impl, timing in timings.items():
                    results.append({"shape": str(shape), **vars(shape), "base": base,
                                    "dtype": dtype_name,
                                    "mode": mode, "impl": impl, "default_is": chosen,
                                    "max_abs_diff_vs_reference": max_diff, **timing.to_dict()})
                    print(f"  {shape!s:28} {dtype_name:5} {mode:8} {impl:10} "
                          f"{timing.median_ms:9.3f} ms", file=sys.stderr)
    return results, skipped


def summarise(results: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """Print the table; return the goal verdicts (QLoRA base: fused vs dequant+matmul)."""
    def median(shape: str, dtype: str, mode: str, impl: str) -> float | None:
        for r in results:
            if (r["shape"], r["dtype"], r["mode"], r["impl"]) == (shape, dtype, mode, impl):
                return r["median_ms"]
        return None

    keys = list(dict.fromkeys((r["shape"], r["dtype"], r["mode"]) for r in results))
    with_peft = any(r["impl"] == "peft" for r in results)
    with_dequant = any(r["impl"] == "dequant+matmul" for r in results)
    base = next((r.get("base", "dense") for r in results), "dense")
    rows, goals = [], []
    for shape, dtype, mode in keys:
        ref, fus, dfl, hf, dqm, kept, again = (
            median(shape, dtype, mode, i) for i in
            ("reference", "fused", "default", "peft", "dequant+matmul", "dense kept",
             "reference again"))
        chosen = next((r.get("default_is") for r in results
                       if (r["shape"], r["dtype"], r["mode"]) == (shape, dtype, mode)), None)
        row = [shape, dtype, mode, fmt_ms(ref), fmt_ms(fus), fmt_ratio(ref, fus), fmt_ms(dfl),
               fmt_ratio(ref, dfl), chosen or "-"]
        row += [fmt_ratio(ref, again)] if again is not None else []
        row += [fmt_ms(hf), fmt_ratio(hf, fus)] if with_peft else []
        row += [fmt_ms(dqm), fmt_ratio(dqm, fus), fmt_ratio(kept, fus)] if with_dequant else []
        rows.append(row)
        if with_dequant and mode == "fwd+bwd":
            met = None if fus is None or dqm is None else fus < dqm
            goals.append({"goal": "fused QLoRA fwd+bwd faster than dequantize-then-matmul",
                          "shape": shape, "dtype": dtype, "fused_ms": fus,
                          "dequant_matmul_ms": dqm,
                          "ratio": None if met is None else dqm / fus, "met": met})
    columns = ["shape", "dtype", "mode", "reference ms", "fused ms", "reference/fused",
               "default ms", "reference/default", "default is"]
    columns += ["reference/again"] if base == "dense" else []
    columns += ["peft ms", "peft/fused"] if with_peft else []
    columns += (["dequant+matmul ms", "dequant+matmul/fused", "dense kept/fused"]
                if with_dequant else [])
    layer = "LoRA linear" if base == "dense" else "QLoRA linear (NF4 base)"
    print_table(f"peftreg fused {layer} on {device} (median; ratio > 1x: fused faster)",
                columns, rows)
    if goals:
        print_table("goal: fused QLoRA fwd+bwd faster than dequantize-then-matmul",
                    ["shape", "dtype", "dequant+matmul/fused", "verdict"],
                    [[g["shape"], g["dtype"], "-" if g["ratio"] is None else f"{g['ratio']:.2f}x",
                      {True: "met", False: "NOT met", None: "not measured"}[g["met"]]]
                     for g in goals])
    return goals


def parse_shape(text: str) -> Shape:
    """``ROWSxINxOUTxR`` (e.g. ``128x4096x4096x16``) as a :class:`Shape`."""
    try:
        rows, in_f, out_f, rank = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape {text!r} is not ROWSxINxOUTxR (four integers, e.g. 128x4096x4096x16)"
        ) from None
    return Shape(rows, in_f, out_f, rank)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two shapes, short timings")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"],
                        default=["fwd", "fwd+bwd"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 is steadier on a busy machine")
    parser.add_argument("--base", choices=["dense", "nf4"], default="dense",
                        help="the frozen base: a dense weight (LoRA) or NF4 (QLoRA)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                        help="ROWSxINxOUTxR shapes instead of the built-in list")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds of timing per candidate (default 0.2 quick, 1.0 full)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output path (default benchmarks/results/fused_lora.json, "
                             "fused_qlora.json for --base nf4)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    shapes = args.shapes or SHAPES[(device.type, args.quick)]
    min_run_time = args.min_run_time or (0.2 if args.quick else 1.0)
    out = args.out or (DEFAULT_OUT if args.base == "dense"
                       else DEFAULT_OUT.with_name("fused_qlora.json"))
    results, skipped = run(shapes, args.dtypes, args.modes, device, min_run_time, args.base)
    goals = summarise(results, device)
    for impl, reason in skipped.items():
        print(f"{impl}: skipped ({reason})")
    write_json(out, {"benchmark": "fused_lora" if args.base == "dense" else "fused_qlora",
                     "base": args.base, "quick": args.quick,
                     "environment": environment(device), "skipped": skipped,
                     "goals": goals, "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
