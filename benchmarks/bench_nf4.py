# SPDX-License-Identifier: Apache-2.0
"""NF4 4-bit storage and the fused 4-bit linear: peftreg vs bitsandbytes vs torchao vs PyTorch.

Usage::

    python benchmarks/bench_nf4.py [--quick] [--device cpu|cuda] [--shapes OUTxIN ...]
                                   [--tasks TASK ...] [--out PATH]

For each weight shape (out x in; 4096x4096 plus the small Llama-style 512x512, 1376x512 and
512x1376) it times, side by side in one run:

* ``quantize+dq``: NF4 quantization with double quantization (block 64, nested block 256);
* ``dequantize``: dequantization into a preallocated bf16 output, with the effective bandwidth
  (codes + scales read, output written) and its fraction of two measured copies on the same
  device: a bf16 copy of the output (``copy``), and a byte copy that reads and writes as many
  bytes in total as the dequantize moves (``copy same bytes``). Issue 17's GPU goal is a
  dequantize at 80% or more of the second; the JSON's ``bandwidth`` records it per shape (on a
  GPU, use a weight well past the L2 cache, e.g. ``--shapes 16384x16384``);
* ``fwd b=1 eval`` / ``fwd b=1 autograd``: a 4-bit linear layer (bf16 compute) on one input
  row under ``no_grad``, and with the input requiring grad (forward only);
* ``fwd b=256`` / ``fwd+bwd b=256``: 256 rows, forward under ``no_grad``, and forward plus the
  input gradient (the weight is frozen), also for a dense bf16 ``nn.Linear``.

Implementations: ``peftreg`` (compiled kernels), ``bnb`` (bitsandbytes, when it imports),
``torchao`` (its NF4Tensor, when it imports), ``reference`` (peftreg's plain-PyTorch maths:
dequantize, then matmul) and ``dense`` (bf16 ``nn.Linear``). Ratios ``x/peftreg`` > 1 mean
peftreg is faster. The goals of the NF4 issue are checked on the 4096x4096 shape and reported
as met or not. ``--quick`` times only 4096x4096, briefly (< 1 minute; on a CPU it leaves out
the dense and bitsandbytes batch-256 input gradients, ~30 s per call there); JSON goes to
``--out`` (default ``benchmarks/results/nf4.json``). ``--shapes`` and ``--tasks`` replace the
shape list and the task list (e.g. only ``dequantize`` for a bandwidth run).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _harness import environment, fmt_ms, fmt_ratio, print_table, time_callable, write_json

from peftreg import ops
from peftreg.nn import Linear4bit
from peftreg.ops import kernels, reference
from peftreg.quant import NF4Tensor

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "nf4.json"
BLOCKSIZE = 64
SHAPES = {True: [(4096, 4096)], False: [(4096, 4096), (512, 512), (1376, 512), (512, 1376)]}
TASKS = ["quantize+dq", "dequantize", "fwd b=1 eval", "fwd b=1 autograd", "fwd b=256",
         "fwd+bwd b=256"]
IMPLS = ["peftreg", "bnb", "torchao", "reference", "dense"]
# (task, competitor, how the ratio competitor/peftreg must compare, bound, wording)
GOALS = [
    ("quantize+dq", "bnb", ">=", 10.0, "quantize >= 10x faster than bitsandbytes"),
    ("dequantize", "bnb", ">=", 1 / 1.1, "dequantize within 1.1x of bitsandbytes"),
    ("fwd b=1 eval", "bnb", ">=", 1 / 1.1, "batch-1 eval forward within 1.1x of bitsandbytes"),
    ("fwd b=1 autograd", "bnb", ">=", 20.0,
     "batch-1 forward with autograd >= 20x faster than bitsandbytes"),
    ("fwd b=256", "dense", ">=", 1 / 1.2, "batch-256 forward within 1.2x of dense bf16"),
    ("fwd+bwd b=256", "dense", ">=", 1 / 1.2,
     "batch-256 forward+input-grad within 1.2x of dense bf16"),
]


def _import_bnb() -> Any:
    import bitsandbytes
    import bitsandbytes.functional

    return bitsandbytes


def _import_torchao() -> Any:
    from torchao.dtypes.nf4tensor import linear_nf4, to_nf4

    return to_nf4, linear_nf4


class Problem:
    """One weight shape: the dense layer, its quantized copies, inputs and upstream grads."""

    def __init__(self, out_f: int, in_f: int, device: torch.device, skipped: dict[str, str]
                 ) -> None:
        gen = torch.Generator().manual_seed(0)
        self.shape = (out_f, in_f)
        self.device = device
        self.weight = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).to(device)
        self.dense = torch.nn.Linear(in_f, out_f, bias=False, device=device,
                                     dtype=torch.bfloat16)
        with torch.no_grad():
            self.dense.weight.copy_(self.weight)
        self.dense.weight.requires_grad_(False)
        self.x1 = torch.randn(1, in_f, generator=gen).to(device, torch.bfloat16)
        self.x256 = torch.randn(256, in_f, generator=gen).to(device, torch.bfloat16)
        self.g256 = torch.randn(256, out_f, generator=gen).to(device, torch.bfloat16)
        self.out = torch.empty(out_f, in_f, dtype=torch.bfloat16, device=device)
        self.ours = Linear4bit.from_linear(self._fp32_linear(), BLOCKSIZE, True, torch.bfloat16)
        self.bnb_layer = None
        if "bnb" not in skipped:
            bnb = _import_bnb()
            layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(self.weight.clone().cpu(), requires_grad=False,
                                             quant_type="nf4", compress_statistics=True,
                                             blocksize=BLOCKSIZE)
            self.bnb_layer = layer.to(device).eval()
        self.torchao_weight = None
        if "torchao" not in skipped:
            to_nf4, _ = _import_torchao()
            self.torchao_weight = to_nf4(self.weight.to(torch.bfloat16), BLOCKSIZE, 256)

    def _fp32_linear(self) -> torch.nn.Linear:
        linear = torch.nn.Linear(self.shape[1], self.shape[0], bias=False, device=self.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
        return linear


def _forward_fns(p: Problem, skipped: dict[str, str]) -> dict[str, Callable[[torch.Tensor],
                                                                            torch.Tensor]]:
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"peftreg": p.ours, "dense": p.dense}

    def ref(x: torch.Tensor) -> torch.Tensor:
        with kernels("reference"):
            return p.ours(x)

    fns["reference"] = ref
    if p.bnb_layer is not None:
        fns["bnb"] = p.bnb_layer
    if p.torchao_weight is not None and "torchao" not in skipped:
        _, linear_nf4 = _import_torchao()
        weight = p.torchao_weight

        def torchao_forward(x: torch.Tensor) -> torch.Tensor:
            return linear_nf4(x, weight)

        fns["torchao"] = torchao_forward
    return fns


def _task_callables(task: str, p: Problem, skipped: dict[str, str], quick: bool
                    ) -> dict[str, Callable[[], object]]:
    """The callables to time for one task, by implementation."""
    fns: dict[str, Callable[[], object]] = {}
    if task == "quantize+dq":
        fns["peftreg"] = lambda: NF4Tensor.quantize(p.weight, BLOCKSIZE, True)

        def ref_quantize() -> object:
            _, absmax = reference.nf4_quantize(p.weight, BLOCKSIZE)
            return reference.nf4_double_quantize(absmax, 256)

        fns["reference"] = ref_quantize
        if "bnb" not in skipped:
            functional = _import_bnb().functional
            fns["bnb"] = lambda: functional.quantize_4bit(
                p.weight, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        if "torchao" not in skipped:
            to_nf4, _ = _import_torchao()
            w16 = p.weight.to(torch.bfloat16)
            fns["torchao"] = lambda: to_nf4(w16, BLOCKSIZE, 256)
        return fns
    if task == "dequantize":
        storage = p.ours.nf4
        fns["peftreg"] = lambda: storage.dequantize(out=p.out)
        fns["reference"] = lambda: p.out.copy_(reference.nf4_dequantize(
            storage.codes, storage.absmax, storage.nested_absmax, storage.offset, BLOCKSIZE, 256,
            list(p.shape), torch.bfloat16))
        if p.bnb_layer is not None:
            functional = _import_bnb().functional
            state = p.bnb_layer.weight.quant_state
            codes = p.bnb_layer.weight.data
            state.dtype = torch.bfloat16
            # bitsandbytes' CPU backend has no out= kernel; its result is copied into p.out.
            fns["bnb"] = lambda: p.out.copy_(functional.dequantize_4bit(codes, state))
        if p.torchao_weight is not None:
            weight = p.torchao_weight
            fns["torchao"] = lambda: p.out.copy_(weight.get_original_weight())
        source = torch.empty_like(p.out)
        fns["copy"] = lambda: p.out.copy_(source)
        # Reads plus writes equal the dequantize's codes + scales read and output written.
        same = max(1, dequantize_bytes(p) // 2)
        src_bytes = torch.empty(same, dtype=torch.uint8, device=p.device)
        dst_bytes = torch.empty_like(src_bytes)
        fns["copy same bytes"] = lambda: dst_bytes.copy_(src_bytes)
        return fns
    forwards = _forward_fns(p, skipped)
    if task == "fwd b=1 eval":
        for impl, f in forwards.items():
            fns[impl] = _no_grad(f, p.x1)
    elif task == "fwd b=1 autograd":
        x = p.x1.clone().requires_grad_()
        for impl, f in forwards.items():
            fns[impl] = _with_grad(f, x)
    elif task == "fwd b=256":
        for impl, f in forwards.items():
            if not (quick and impl == "reference"):
                fns[impl] = _no_grad(f, p.x256)
    elif task == "fwd+bwd b=256":
        x = p.x256.clone().requires_grad_()
        for impl, f in forwards.items():
            # A dense bf16 input gradient takes ~30 s per call on CPUs without bf16 matmul
            # units (bitsandbytes dequantizes and does the same), too slow for --quick.
            if not (quick and impl != "peftreg" and device_is_cpu(p)):
                fns[impl] = _fwd_bwd(f, x, p.g256)
    return fns


def dequantize_bytes(p: Problem) -> int:
    """Bytes a dequantize moves: the codes and scales read plus the bf16 output written."""
    return p.ours.nf4.nbytes + 2 * p.shape[0] * p.shape[1]


def device_is_cpu(p: Problem) -> bool:
    return p.device.type == "cpu"


def _no_grad(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return f(x)
    return run


def _with_grad(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        return f(x)
    return run


def _fwd_bwd(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, g: torch.Tensor
             ) -> Callable[[], object]:
    def run() -> object:
        return torch.autograd.grad(f(x), x, g)
    return run


def run(shapes: list[tuple[int, int]], device: torch.device, quick: bool,
        tasks: list[str] | None = None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    skipped: dict[str, str] = {}
    if not ops.has_extension():
        raise SystemExit(f"peftreg's compiled extension is unavailable: {ops.extension_error()}")
    try:
        _import_bnb()
    except Exception as exc:  # any failure: benchmark without it
        skipped["bnb"] = f"bitsandbytes unavailable ({type(exc).__name__}: {exc})"
    try:
        _import_torchao()
    except Exception as exc:
        skipped["torchao"] = f"torchao unavailable ({type(exc).__name__}: {exc})"
    warmup, min_run_time = (1, 0.05) if quick else (2, 0.5)
    results: list[dict[str, Any]] = []
    for shape in shapes:
        p = Problem(*shape, device, skipped)
        label = f"{shape[0]}x{shape[1]}"
        for task in tasks or TASKS:
            for impl, fn in _task_callables(task, p, skipped, quick).items():
                try:
                    timing = time_callable(fn, device, warmup=warmup, min_run_time=min_run_time)
                except Exception as exc:  # a peer failing on a shape must not stop the run
                    results.append({"shape": label, "task": task, "impl": impl,
                                    "error": f"{type(exc).__name__}: {exc}"})
                    print(f"  {label:10} {task:18} {impl:10} failed: {exc}", file=sys.stderr)
                    continue
                results.append({"shape": label, "task": task, "impl": impl, **timing.to_dict()})
                print(f"  {label:10} {task:18} {impl:10} {timing.median_ms:10.3f} ms",
                      file=sys.stderr)
        n = shape[0] * shape[1]
        moved = dequantize_bytes(p)
        results.append({"shape": label, "task": "dequantize", "impl": "bytes",
                        "dequantize_bytes": moved, "copy_bytes": 4 * n,
                        "copy_same_bytes": 2 * max(1, moved // 2)})
        del p
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results, skipped


def _median(results: list[dict[str, Any]], shape: str, task: str, impl: str) -> float | None:
    for r in results:
        if (r["shape"], r["task"], r["impl"]) == (shape, task, impl) and "median_ms" in r:
            return r["median_ms"]
    return None


def summarise(results: list[dict[str, Any]], device: torch.device
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Print the tables; return the goal verdicts and the bandwidth records."""
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    rows = []
    for shape in shapes:
        for task in TASKS:
            ours = _median(results, shape, task, "peftreg")
            row = [shape, task, fmt_ms(ours)]
            for impl in IMPLS[1:]:
                other = _median(results, shape, task, impl)
                row += [fmt_ms(other), fmt_ratio(other, ours)]
            rows.append(row)
    columns = ["shape", "task", "peftreg ms"]
    for impl in IMPLS[1:]:
        columns += [f"{impl} ms", f"{impl}/peftreg"]
    print_table(f"NF4 on {device} (median; ratio > 1x: peftreg faster)", columns, rows)

    bandwidth_rows, bandwidth = [], []
    for shape in shapes:
        info = next((r for r in results if r["shape"] == shape and r["impl"] == "bytes"), None)
        ours = _median(results, shape, "dequantize", "peftreg")
        copy = _median(results, shape, "dequantize", "copy")
        same = _median(results, shape, "dequantize", "copy same bytes")
        if info is None or ours is None or copy is None:
            continue
        ours_gbps = info["dequantize_bytes"] / ours / 1e6
        copy_gbps = info["copy_bytes"] / copy / 1e6
        same_gbps = None if same is None else info["copy_same_bytes"] / same / 1e6
        fraction = None if same_gbps is None else ours_gbps / same_gbps
        bandwidth.append({"shape": shape, "dequantize_gbps": ours_gbps, "copy_gbps": copy_gbps,
                          "copy_same_bytes_gbps": same_gbps, "fraction_of_copy": fraction,
                          "goal": "dequantize >= 80% of the measured copy bandwidth",
                          "met": None if fraction is None else fraction >= 0.8})
        bandwidth_rows.append([shape, f"{ours_gbps:.2f}", f"{copy_gbps:.2f}",
                               f"{ours_gbps / copy_gbps:.2f}",
                               "-" if same_gbps is None else f"{same_gbps:.2f}",
                               "-" if fraction is None else f"{fraction:.2f}",
                               "-" if fraction is None else
                               ("met" if fraction >= 0.8 else "NOT met")])
    print_table("dequantize into preallocated bf16: effective bandwidth (goal: >= 0.80 of the "
                "same-bytes copy)",
                ["shape", "peftreg GB/s", "bf16 copy GB/s", "fraction", "same-bytes copy GB/s",
                 "fraction", "goal"], bandwidth_rows)

    verdicts = []
    shape = "4096x4096"
    goal_rows = []
    for task, other, _, bound, wording in GOALS:
        ours = _median(results, shape, task, "peftreg")
        theirs = _median(results, shape, task, other)
        if ours is None or theirs is None:
            verdict = {"goal": wording, "ratio": None, "met": None}
            goal_rows.append([wording, "-", "not measured"])
        else:
            ratio = theirs / ours
            verdict = {"goal": wording, "ratio": ratio, "met": ratio >= bound}
            goal_rows.append([wording, f"{ratio:.2f}x (need >= {bound:.2f}x)",
                              "met" if ratio >= bound else "NOT met"])
        verdicts.append(verdict)
    print_table(f"goals on {shape} (competitor/peftreg ratios)", ["goal", "measured", "verdict"],
                goal_rows)
    return verdicts, bandwidth


def parse_shape(text: str) -> tuple[int, int]:
    """``OUTxIN`` (e.g. ``4096x4096``) as a weight shape."""
    try:
        out_f, in_f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape {text!r} is not OUTxIN (two integers, e.g. 4096x4096)") from None
    return out_f, in_f


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4096x4096 only, short timings")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                        help="OUTxIN weight shapes instead of the built-in list")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None,
                        help="a subset of the tasks (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results, skipped = run(args.shapes or SHAPES[args.quick], device, args.quick, args.tasks)
    verdicts, bandwidth = summarise(results, device)
    for impl, reason in skipped.items():
        print(f"{impl}: skipped ({reason})")
    write_json(args.out, {"benchmark": "nf4", "quick": args.quick,
                          "environment": environment(device), "skipped": skipped,
                          "goals": verdicts, "bandwidth": bandwidth, "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
