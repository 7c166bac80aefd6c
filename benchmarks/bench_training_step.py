"""Training-step time, adapter overhead and peak memory: peftreg LoRA/QLoRA vs HF PEFT.

Model: a random-init Llama-style decoder (hidden 512, intermediate 1376, 4 layers, vocab 4096),
batch 8 x 128 tokens, LoRA r=16 (alpha 32) on every linear layer except the output head; one step
= forward, backward, AdamW step. Every case runs in a fresh subprocess (so one case's allocator
caches do not hide another's memory), on the same seeds and batch, one after the other.

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
of the process's resident memory during the timed steps.

    python benchmarks/bench_training_step.py [--dtype float32|bfloat16|both] [--steps N]
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
    "lora_fused": "peftreg LoRA, fused",
    "lora_plain": "peftreg LoRA, plain PyTorch",
    "peft_lora": "HF PEFT LoRA",
    "qlora_fused": "peftreg QLoRA, fused",
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
        from peftreg.ops.fused import lora_linear

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


def run_case(case: str, dtype: torch.dtype, steps: int, warmup: int) -> dict:
    """Time ``steps`` training steps of one case in this process (called in a subprocess)."""
    from peftreg.compare.memory import PeakMemory

    if case.endswith("_plain"):
        from peftreg import kernels

        kernels.set_kernel_mode("reference")
    model, embeds_in = build(case, dtype)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (8, 128), generator=gen)
    if embeds_in:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        batch = {"inputs_embeds": embeds, "labels": ids}
    else:
        batch = {"input_ids": ids, "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        model(**batch).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    with PeakMemory() as peak:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return {"case": case, "step_ms": 1000 * statistics.median(times),
            "spread_ms": 1000 * (max(times) - min(times)), "steps": steps,
            "peak_mb": peak.increase / 2**20, "trainable": sum(p.numel() for p in params)}


def in_subprocess(case: str, dtype: str, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--one-case", case, "--dtype", dtype, "--steps", str(steps),
           "--warmup", str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"case": case, "error": reason[:100]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per case (default 8 in fp32, 2 in bf16)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of case keys")
    parser.add_argument("--one-case", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "training_step.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.one_case:
        dtype = getattr(torch, args.dtype)
        print(json.dumps(run_case(args.one_case, dtype, args.steps, args.warmup)))
        return

    rows, records = [], []
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    for dtype in dtypes:
        steps = args.steps or (8 if dtype == "float32" else 2)
        results = {}
        for case in args.cases.split(","):
            print(f"{dtype} {CASES[case]} ...", flush=True)
            results[case] = in_subprocess(case, dtype, steps, args.warmup)
        floor = results.get("floor", {}).get("step_ms")
        own_floor = results.get("floor_kernels", {}).get("step_ms")
        for case, r in results.items():
            r["dtype"] = dtype
            records.append(r)
            if "error" in r:
                rows.append([dtype, CASES[case], "n/a", "", "", "", r["error"][:60]])
                continue
            over = f"{r['step_ms'] - floor:+.0f}" if floor and "floor" not in case else "-"
            own = (f"{r['step_ms'] - own_floor:+.0f}"
                   if own_floor and case.endswith("_fused") else "-")
            rows.append([dtype, CASES[case], f"{r['step_ms']:.0f}", f"{r['spread_ms']:.0f}",
                         over, own, f"{r['peak_mb']:.0f}"])
    print_table("Training step (batch 8 x 128, LoRA r=16 on every linear layer but the head)",
                ["dtype", "case", "step ms", "spread ms", "over floor ms", "over own floor ms",
                 "peak MiB"], rows)
    write_json(args.out, {"environment": environment(torch.device("cpu")), "results": records})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
