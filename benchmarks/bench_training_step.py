"""Training-step time, adapter overhead and peak memory: peftreg LoRA/QLoRA vs HF PEFT.

Model: a random-init Llama-style decoder (hidden 512, intermediate 1376, 4 layers, vocab 4096),
batch 8 x 128 tokens, LoRA r=16 (alpha 32) on every linear layer except the output head; one step
= forward, backward, AdamW step. Step times come from one process that takes the cases' steps in
turn (so a shared machine's slow drifts hit every case alike); peak memory from one process per
case, with glibc told to return freed blocks at once so the resident set follows live memory.

Cases, in fp32 and in bf16:
* floor: the frozen base alone in plain PyTorch, forward plus input gradients (no adapters);
* floor, peftreg kernels: the same with every adapted linear layer run by peftreg's fused op with
  rank 0, i.e. the base product exactly as peftreg computes it (on CPUs without bf16 arithmetic
  peftreg widens bf16 products to fp32, so in bf16 this floor is far below torch's);
* peftreg LoRA, fused ops (the default) and the plain-PyTorch path (PEFTREG_KERNELS=reference);
* HF PEFT LoRA;
* peftreg QLoRA (NF4 + double quantization) fused and plain, and PEFT + bitsandbytes QLoRA.

"over floor" is the step minus the torch floor; for peftreg's fused rows "over own floor" is the
step minus the peftreg-kernels floor: what the adapters themselves add. Peak memory is the rise
of the resident memory during one step after a warm-up step.

    python benchmarks/bench_training_step.py [--dtype float32|bfloat16|both] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, print_table, write_json

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "floor": "frozen base, torch (floor)",
    "floor_kernels": "frozen base, peftreg kernels",
    "lora_fused": "peftreg LoRA, default kernels (auto)",
    "lora_plain": "peftreg LoRA, plain PyTorch",
    "peft_lora": "HF PEFT LoRA",
    "qlora_fused": "peftreg QLoRA, default kernels (auto)",
    "qlora_plain": "peftreg QLoRA, plain PyTorch",
    "peft_qlora": "PEFT + bitsandbytes QLoRA",
}


def make_base(dtype: torch.dtype):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376,
                                      num_hidden_layers=4, num_attention_heads=8,
                                      num_key_value_heads=8, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).to(dtype)


class _RankZeroKernelLinear(torch.nn.Module):
    """A frozen Linear computed by peftreg::lora_linear with a rank-0 update: the base product
    exactly as peftreg's fused kernel computes it, adapters excluded."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        w = linear.weight
        self.register_buffer("a", w.new_zeros(0, linear.in_features))
        self.register_buffer("b", w.new_zeros(linear.out_features, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from peftreg.ops.lora import lora_linear

        return lora_linear(x, self.linear.weight, self.linear.bias, self.a, self.b, 0.0)


def build(case: str, dtype: torch.dtype):
    """(model, inputs): the frozen floors take inputs_embeds that require grad."""
    import peftreg

    compute = "bfloat16" if dtype == torch.bfloat16 else "float32"
    if case in ("floor", "floor_kernels"):
        model = make_base(dtype)
        model.requires_grad_(False)
        if case == "floor_kernels":
            for name, module in list(model.named_modules()):
                if name.rsplit(".", 1)[-1] in TARGETS:
                    parent = model.get_submodule(name.rsplit(".", 1)[0])
                    setattr(parent, name.rsplit(".", 1)[-1], _RankZeroKernelLinear(module))
        return model, True
    if case in ("lora_fused", "lora_plain"):
        config = peftreg.config_for("lora", r=16, lora_alpha=32, target_modules=TARGETS)
        return peftreg.adapt(make_base(dtype), config), False
    if case in ("qlora_fused", "qlora_plain"):
        config = peftreg.config_for("qlora", r=16, lora_alpha=32, target_modules=TARGETS,
                                    compute_dtype=compute)
        return peftreg.adapt(make_base(dtype), config), False
    import peft

    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    if case == "peft_lora":
        return peft.get_peft_model(make_base(dtype), lora), False
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        make_base(torch.float32).save_pretrained(tmp)
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quant, dtype=dtype, device_map="cpu")
    return peft.get_peft_model(model, lora), False


def _make_step(case: str, dtype: torch.dtype):
    """A closure running one training step of ``case`` (model built here, batch fixed)."""
    from peftreg.ops import kernels

    model, embeds_in = build(case, dtype)
    ids = torch.randint(0, 4096, (8, 128), generator=torch.Generator().manual_seed(0))
    if embeds_in:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        batch = {"inputs_embeds": embeds, "labels": ids}
    else:
        batch = {"input_ids": ids, "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    mode = "reference" if case.endswith("_plain") else "auto"

    def step() -> None:
        with kernels(mode):
            model(**batch).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def time_interleaved(cases: list[str], dtype: torch.dtype, rounds: int) -> dict:
    """Median step time per case, the cases' steps taken in turn (A, B, C, A, B, C, ...) so
    that slow drifts of a shared machine hit every case alike."""
    steps = {}
    for case in cases:
        steps[case], _ = _make_step(case, dtype)
        steps[case]()  # warm-up
    times: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(rounds):
        for case in cases:
            start = time.perf_counter()
            steps[case]()
            times[case].append(1000 * (time.perf_counter() - start))
    return {case: {"step_ms": statistics.median(t), "min_ms": min(t), "rounds": rounds}
            for case, t in times.items()}


def peak_memory(case: str, dtype: torch.dtype) -> dict:
    """Resident-memory rise over one training step after a warm-up step (own process)."""
    from peftreg.compare.memory import PeakMemory

    step, trainable = _make_step(case, dtype)
    step()
    with PeakMemory() as peak:
        step()
    return {"peak_mb": peak.increase / 2**20, "trainable": trainable}


def _subprocess(args: list[str], env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, __file__, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": reason[:100]}
    return json.loads(lines[-1])


# glibc returns every block of 64 KiB or more to the system when it is freed (a fixed mmap
# threshold), so the resident set follows live memory and one case's allocator cache cannot
# hide another's peak.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed steps per case (default 15 in fp32, 2 in bf16)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of case keys")
    parser.add_argument("--timing", help=argparse.SUPPRESS)
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "training_step.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.timing:
        dtype = getattr(torch, args.dtype)
        print(json.dumps(time_interleaved(args.timing.split(","), dtype, args.rounds)))
        return
    if args.memory:
        print(json.dumps(peak_memory(args.memory, getattr(torch, args.dtype))))
        return

    rows, records = [], []
    cases = args.cases.split(",")
    for dtype in ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]:
        rounds = args.rounds or (15 if dtype == "float32" else 2)
        print(f"{dtype}: timing {len(cases)} cases, {rounds} rounds ...", flush=True)
        timing = _subprocess(["--timing", ",".join(cases), "--dtype", dtype,
                              "--rounds", str(rounds)])
        results = {}
        for case in cases:
            print(f"{dtype}: memory of {CASES[case]} ...", flush=True)
            memory = _subprocess(["--memory", case, "--dtype", dtype], _MALLOC_ENV)
            results[case] = {"case": case, "dtype": dtype, **timing.get(case, timing), **memory}
        floor = results.get("floor", {}).get("step_ms")
        own_floor = results.get("floor_kernels", {}).get("step_ms")
        for case, r in results.items():
            records.append(r)
            if "error" in r or "step_ms" not in r:
                rows.append([dtype, CASES[case], "n/a", "", "", "", r.get("error", "")[:60]])
                continue
            over = f"{r['step_ms'] - floor:+.0f}" if floor and "floor" not in case else "-"
            own = (f"{r['step_ms'] - own_floor:+.0f}"
                   if own_floor and case.endswith("_fused") else "-")
            peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "n/a"
            rows.append([dtype, CASES[case], f"{r['step_ms']:.0f}", f"{r['min_ms']:.0f}", over,
                         own, peak])
    print_table("Training step (batch 8 x 128, LoRA r=16 on every linear layer but the head)",
                ["dtype", "case", "median ms", "min ms", "over floor ms", "over own floor ms",
                 "peak MiB"], rows)
    write_json(args.out, {"environment": environment(torch.device("cpu")), "results": records})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
