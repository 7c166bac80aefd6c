# SPDX-License-Identifier: Apache-2.0
"""IA3, Houlsby and multi-adapter LoRA: fused ops vs plain PyTorch (vs HF peft where it applies).

Usage::

    python benchmarks/bench_adapters.py [--quick] [--device cpu|cuda] [--out PATH]
        [--only multi,ia3,houlsby] [--dtypes fp32,bf16]

Three tables, each a median over repeated runs with ratios (``> 1x``: the fused op is faster):

* ``multi``: one batch of rows spread over 8 LoRA adapters (ranks 8 and 16) on one Linear layer,
  inference. ``fused`` is ``peftreg::lora_multi_add`` (one op for every row); ``loop`` is a loop
  over the adapters, each taking its sub-batch of rows (what HF peft does for mixed batches);
  ``peft`` is HF peft's own LoRA layer called with ``adapter_names=`` per row. Timed twice: the
  adapter part only (given the base output) and the whole layer (base product included, where
  the shared base GEMM dilutes the difference). peft is whole-layer only.
* ``ia3``: a Linear layer with (IA)^3 scaling of its output or input, ``fwd`` (no_grad) and
  ``fwd+bwd`` (IA3 training: gradients for x and the scale); ``fused`` is
  ``peftreg::ia3_linear``, ``plain`` the PyTorch expression (peftreg.ops.reference).
* ``houlsby``: the bottleneck adapter with residual (``m = hidden / 16``, GELU), same modes, all
  adapter weights trainable; ``fused`` is ``peftreg::houlsby_adapter``.

In the IA3 and Houlsby tables ``default`` is what the plugins run in the default (``auto``)
kernel mode: the op's ``run``, fused or plain by the measured crossover (docs/ops.md);
``plain/default`` must stay >= 0.97.

JSON goes to ``--out`` (default ``benchmarks/results/adapters.json``). ``--quick`` runs one small
case per table briefly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _harness import (
    environment,
    fmt_ms,
    fmt_ratio,
    print_table,
    time_callable,
    time_side_by_side,
    write_json,
)

from peftreg import ops
from peftreg.ops import adapters, reference

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "adapters.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
N_ADAPTERS = 8


def _randn(gen: torch.Generator, *size: int, scale: float = 1.0, dtype: torch.dtype,
           device: torch.device) -> torch.Tensor:
    return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)


# --- multi-adapter LoRA --------------------------------------------------------------------


def multi_problem(rows: int, features: int, dtype: torch.dtype, device: torch.device
                  ) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    ranks = [8 if k % 2 else 16 for k in range(N_ADAPTERS)]
    r_max = max(ranks)
    a = torch.zeros(N_ADAPTERS, r_max, features, dtype=dtype, device=device)
    # B stored (n, r, out) and used as its transposed view, as peftreg.row_adapters stacks it.
    bt = torch.zeros(N_ADAPTERS, r_max, features, dtype=dtype, device=device)
    for k, r in enumerate(ranks):
        a[k, :r] = _randn(gen, r, features, scale=features ** -0.5, dtype=dtype, device=device)
        bt[k, :r] = _randn(gen, r, features, scale=r ** -0.5, dtype=dtype, device=device)
    b = bt.transpose(1, 2)
    scaling = torch.tensor([16.0 / r for r in ranks], device=device)
    # Rows spread evenly over the adapters, in a shuffled order (requests arrive mixed).
    index = torch.arange(rows) % N_ADAPTERS
    index = index[torch.randperm(rows, generator=gen)].to(device)
    return {
        "x": _randn(gen, rows, features, dtype=dtype, device=device),
        "weight": _randn(gen, features, features, scale=features ** -0.5, dtype=dtype,
                         device=device),
        "bias": _randn(gen, features, dtype=dtype, device=device),
        "a": a, "b": b, "scaling": scaling, "ranks": ranks, "index": index,
    }


def loop_update(base: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    """Per-adapter sub-batches, as HF peft's mixed-batch forward does."""
    out = base.clone()
    x, index = p["x"], p["index"]
    for k, r in enumerate(p["ranks"]):
        rows = (index == k).nonzero().flatten()
        sub = x[rows]
        update = F.linear(F.linear(sub, p["a"][k, :r]), p["b"][k, :, :r]) * p["scaling"][k]
        out[rows] += update.to(out.dtype)
    return out


def peft_mixed(p: dict[str, Any]) -> Callable[[], torch.Tensor] | str:
    """HF peft's LoRA layer with the same 8 adapters, called with ``adapter_names``."""
    try:
        import peft
    except ImportError as exc:
        return f"peft is not installed ({exc})"
    weight = p["weight"]
    features = weight.shape[0]

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(features, features, device=weight.device,
                                        dtype=weight.dtype)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    holder = Holder()
    with torch.no_grad():
        holder.proj.weight.copy_(weight)
        holder.proj.bias.copy_(p["bias"])
    model = None
    for k, r in enumerate(p["ranks"]):
        config = peft.LoraConfig(r=r, lora_alpha=16.0, target_modules=["proj"])
        if model is None:
            model = peft.get_peft_model(holder, config, adapter_name=f"a{k}",
                                        autocast_adapter_dtype=False)
        else:
            model.add_adapter(f"a{k}", config)
    assert model is not None
    layer = model.base_model.model.proj
    with torch.no_grad():
        for k, r in enumerate(p["ranks"]):
            layer.lora_A[f"a{k}"].weight.copy_(p["a"][k, :r])
            layer.lora_B[f"a{k}"].weight.copy_(p["b"][k, :, :r])
    model.eval()
    names = [f"a{k}" for k in p["index"].tolist()]

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(p["x"], adapter_names=names)

    return run


def bench_multi(cases: list[tuple[int, int]], dtypes: list[str], device: torch.device,
                min_run_time: float) -> list[dict[str, Any]]:
    results = []
    for rows, features in cases:
        for dtype_name in dtypes:
            p = multi_problem(rows, features, DTYPES[dtype_name], device)
            with torch.no_grad():
                base = F.linear(p["x"], p["weight"], p["bias"])
            fns: dict[tuple[str, str], Callable[[], torch.Tensor]] = {
                ("adapter", "loop"): lambda p=p, base=base: loop_update(base, p),
                ("adapter", "fused"): lambda p=p, base=base: adapters.lora_multi_add(
                    base, p["x"], p["a"], p["b"], p["scaling"], p["index"]),
                ("layer", "loop"): lambda p=p: loop_update(
                    F.linear(p["x"], p["weight"], p["bias"]), p),
                ("layer", "fused"): lambda p=p: adapters.lora_multi_add(
                    F.linear(p["x"], p["weight"], p["bias"]), p["x"], p["a"], p["b"],
                    p["scaling"], p["index"]),
            }
            peft_run = peft_mixed(p)
            if callable(peft_run):
                fns[("layer", "peft")] = peft_run
            else:
                print(f"  peft skipped: {peft_run}", file=sys.stderr)
            with torch.no_grad():
                expected = fns[("layer", "loop")]().float()
                diffs = {impl: (fn().float() - expected).abs().max().item()
                         for (part, impl), fn in fns.items() if part == "layer"}
            for (part, impl), fn in fns.items():
                def timed(fn: Callable[[], torch.Tensor] = fn) -> object:
                    with torch.no_grad():
                        return fn()
                t = time_callable(timed, device, min_run_time=min_run_time)
                results.append({"table": "multi", "case": f"{rows} rows, {features}x{features}",
                                "rows": rows, "features": features, "dtype": dtype_name,
                                "mode": part, "impl": impl,
                                "max_abs_diff_vs_loop": diffs.get(impl), **t.to_dict()})
                print(f"  multi {rows}x{features} {dtype_name} {part:7} {impl:6} "
                      f"{t.median_ms:9.3f} ms", file=sys.stderr)
    return results


# --- IA3 and Houlsby -----------------------------------------------------------------------


def saved_for_backward_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()``.

    Counted with saved-tensor hooks, so it covers torch's own ops and the custom ops' setup
    contexts alike; inputs that both paths save (x, weights) count on both sides.
    """
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total



def bench_layer(table: str, cases: list[tuple[int, int, int]], dtypes: list[str],
                device: torch.device, min_run_time: float) -> list[dict[str, Any]]:
    results = []
    for rows, in_f, out_f in cases:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            gen = torch.Generator().manual_seed(0)
            x = _randn(gen, rows, in_f, dtype=dtype, device=device)
            variants: dict[str, tuple[Callable[..., torch.Tensor], list[torch.Tensor], Any]] = {}
            if table == "ia3":
                w = _randn(gen, out_f, in_f, scale=in_f ** -0.5, dtype=dtype, device=device)
                b = _randn(gen, out_f, dtype=dtype, device=device)
                for side, n in (("output", out_f), ("input", in_f)):
                    scale = (torch.rand(n, generator=gen) + 0.5).to(device=device, dtype=dtype)
                    flag = side == "input"
                    variants[side] = (lambda x_, s_, f_, w=w, b=b, flag=flag: f_(
                        x_, w, b, s_, flag), [scale], out_f)
                impls = {"fused": adapters.ia3_linear, "plain": reference.ia3_linear,
                         "default": adapters.IA3_LINEAR.run}
            else:
                m = max(1, in_f // 16)
                wd = _randn(gen, m, in_f, scale=in_f ** -0.5, dtype=dtype, device=device)
                bd = _randn(gen, m, dtype=dtype, device=device)
                wu = _randn(gen, in_f, m, scale=m ** -0.5, dtype=dtype, device=device)
                bu = _randn(gen, in_f, dtype=dtype, device=device)
                variants["gelu"] = (lambda x_, wd_, bd_, wu_, bu_, f_: f_(
                    x_, wd_, bd_, wu_, bu_), [wd, bd, wu, bu], in_f)
                impls = {"fused": lambda *a: adapters.houlsby_adapter(*a, "gelu"),
                         "plain": lambda *a: reference.houlsby_adapter(*a, "gelu")[0],
                         "default": lambda *a: adapters.HOULSBY_ADAPTER.run(*a, "gelu")[0]}
            for variant, (call, params, width) in variants.items():
                g = _randn(gen, rows, width, dtype=dtype, device=device)
                for mode in ("fwd", "fwd+bwd"):
                    steps, inputs = {}, {}
                    for impl, fn in impls.items():
                        leaves = [t.detach().clone().requires_grad_(mode != "fwd")
                                  for t in params]
                        xin = x.detach().clone().requires_grad_(mode != "fwd")
                        inputs[impl] = (leaves, xin)

                        def step(fn: Any = fn, leaves: list = leaves, xin: torch.Tensor = xin,
                                 mode: str = mode, call: Any = call, g: torch.Tensor = g
                                 ) -> object:
                            if mode == "fwd":
                                with torch.no_grad():
                                    return call(xin, *leaves, fn)
                            y = call(xin, *leaves, fn)
                            return torch.autograd.grad(y, [xin, *leaves], g)

                        steps[impl] = step
                    timings = time_side_by_side(steps, device, min_run_time=min_run_time)
                    for impl, fn in impls.items():
                        leaves, xin = inputs[impl]
                        t = timings[impl]
                        saved = None
                        if mode != "fwd":
                            saved = saved_for_backward_bytes(
                                lambda fn=fn, leaves=leaves, xin=xin, call=call: call(
                                    xin, *leaves, fn))
                        results.append({"table": table, "case": f"{rows}x{in_f}->{width}",
                                        "variant": variant, "rows": rows, "in": in_f,
                                        "out": width, "dtype": dtype_name, "mode": mode,
                                        "impl": impl, "saved_for_backward_bytes": saved,
                                        **t.to_dict()})
                        print(f"  {table} {rows}x{in_f} {variant:6} {dtype_name} {mode:7} "
                              f"{impl:5} {t.median_ms:9.3f} ms", file=sys.stderr)
    return results


# --- reporting -----------------------------------------------------------------------------


def _median(results: list[dict[str, Any]], **key: Any) -> float | None:
    for r in results:
        if all(r.get(k) == v for k, v in key.items()):
            return r["median_ms"]
    return None


def summarise(results: list[dict[str, Any]]) -> None:
    multi = [r for r in results if r["table"] == "multi"]
    if multi:
        rows = []
        for case, dtype in dict.fromkeys((r["case"], r["dtype"]) for r in multi):
            k = {"table": "multi", "case": case, "dtype": dtype}
            loop_a = _median(results, **k, mode="adapter", impl="loop")
            fused_a = _median(results, **k, mode="adapter", impl="fused")
            loop_l = _median(results, **k, mode="layer", impl="loop")
            fused_l = _median(results, **k, mode="layer", impl="fused")
            peft_l = _median(results, **k, mode="layer", impl="peft")
            rows.append([case, dtype, fmt_ms(loop_a), fmt_ms(fused_a),
                         fmt_ratio(loop_a, fused_a), fmt_ms(loop_l), fmt_ms(fused_l),
                         fmt_ratio(loop_l, fused_l), fmt_ms(peft_l), fmt_ratio(peft_l, fused_l)])
        print_table(f"Multi-adapter LoRA, {N_ADAPTERS} adapters, inference (ms; ratio > 1: "
                    "fused faster)",
                    ["case", "dtype", "adapter loop", "adapter fused", "loop/fused",
                     "layer loop", "layer fused", "loop/fused", "layer peft", "peft/fused"],
                    rows)
    for table in ("ia3", "houlsby"):
        part = [r for r in results if r["table"] == table]
        if not part:
            continue
        rows = []
        for case, variant, dtype, mode in dict.fromkeys(
                (r["case"], r["variant"], r["dtype"], r["mode"]) for r in part):
            k = {"table": table, "case": case, "variant": variant, "dtype": dtype, "mode": mode}
            plain = _median(results, **k, impl="plain")
            fused = _median(results, **k, impl="fused")
            default = _median(results, **k, impl="default")
            saved = {r["impl"]: r["saved_for_backward_bytes"] for r in results
                     if all(r.get(key) == v for key, v in k.items())}
            mib = {i: "-" if b is None else f"{b / 2**20:.2f}" for i, b in saved.items()}
            rows.append([case, variant, dtype, mode, fmt_ms(plain), fmt_ms(fused),
                         fmt_ratio(plain, fused), fmt_ms(default), fmt_ratio(plain, default),
                         mib.get("plain", "-"), mib.get("fused", "-")])
        print_table(f"{table}: fused op vs plain PyTorch (ms; MiB saved for backward)",
                    ["case", "variant", "dtype", "mode", "plain", "fused", "plain/fused",
                     "default", "plain/default", "saved plain", "saved fused"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 is steadier on a busy machine")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", default="multi,ia3,houlsby")
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for op in ("lora_multi_add", "ia3_linear", "houlsby_adapter"):
        if not (ops.has_extension() and ops.kernel_available(op, device.type)):
            print(f"peftreg::{op} has no compiled {device.type} kernel: "
                  f"{ops.extension_error() or 'not built for this device'}", file=sys.stderr)
            return 1
    tables = set(args.only.split(","))
    min_run_time = 0.1 if args.quick else 0.4
    dtypes = ["fp32"] if args.quick else ["fp32", "bf16"]
    if args.dtypes:
        dtypes = args.dtypes.split(",")
    big = device.type == "cuda"
    multi_cases = [(32, 1024)] if args.quick else (
        [(8, 4096), (64, 4096), (2048, 4096)] if big else [(8, 1024), (64, 1024), (512, 1024)])
    layer_cases = [(256, 512, 512)] if args.quick else (
        [(4096, 4096, 4096)] if big else [(512, 1024, 1024), (2048, 768, 768)])
    results: list[dict[str, Any]] = []
    if "multi" in tables:
        results += bench_multi(multi_cases, dtypes, device, min_run_time)
    if "ia3" in tables:
        results += bench_layer("ia3", layer_cases, dtypes, device, min_run_time)
    if "houlsby" in tables:
        results += bench_layer("houlsby", layer_cases, dtypes, device, min_run_time)
    summarise(results)
    write_json(args.out, {"benchmark": "adapters", "environment": environment(device),
                          "quick": args.quick, "results": results})
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
