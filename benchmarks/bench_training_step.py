"""Training-step time and peak memory: peftreg LoRA/QLoRA vs HF PEFT (+ bitsandbytes).

Model: a random-init Llama-style decoder (hidden 512, intermediate 1376, 4 layers, vocab 4096),
batch 8 x 128 tokens, LoRA r=16 on q, k, v, o; one step = forward, backward, AdamW step.
Rows: the frozen base alone (forward + input gradients, the floor), peftreg LoRA, HF PEFT LoRA,
peftreg QLoRA (NF4 + double quant), PEFT + bitsandbytes QLoRA; each in fp32 and bf16 compute.
Peak memory is the rise of the process's resident memory during the timed steps.

    python benchmarks/bench_training_step.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, print_table, write_json

import peftreg
from peftreg.compare.memory import PeakMemory

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_base(dtype: torch.dtype):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376,
                                      num_hidden_layers=4, num_attention_heads=8,
                                      num_key_value_heads=8, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).to(dtype)


def timed_steps(model, batch, steps: int, warmup: int) -> tuple[float, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        out = model(**batch)
        out.loss.backward()
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
    return 1000 * statistics.median(times), peak.increase / 2**20


def floor(dtype, batch, steps, warmup):
    """The frozen base alone: forward and the backward pass to the input, no weight gradients
    and no optimizer (what every method pays before its adapters add anything)."""
    model = make_base(dtype)
    model.requires_grad_(False)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    return timed_steps(model, {"inputs_embeds": embeds, "labels": batch["labels"]}, steps,
                       warmup)


def peftreg_model(method: str, dtype):
    base = make_base(dtype)
    if method == "lora":
        config = peftreg.config_for("lora", r=16, lora_alpha=32, target_modules=TARGETS)
    else:
        config = peftreg.config_for("qlora", r=16, lora_alpha=32, target_modules=TARGETS,
                                    compute_dtype="bfloat16" if dtype == torch.bfloat16
                                    else "float32")
    return peftreg.adapt(base, config)


def peft_lora(dtype):
    import peft

    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    return peft.get_peft_model(make_base(dtype), config)


def peft_bnb_qlora(dtype):
    import peft
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        make_base(torch.float32).save_pretrained(tmp)
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quant, dtype=dtype, device_map="cpu")
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps, bf16 only")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "training_step.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    steps, warmup = (2, 1) if args.quick else (3, 1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (8, 128), generator=gen)
    batch = {"input_ids": ids, "labels": ids}
    rows, records = [], []
    dtypes = {"float32": [torch.float32], "bfloat16": [torch.bfloat16],
              "both": [torch.float32, torch.bfloat16]}[args.dtype]
    for dtype in ([torch.bfloat16] if args.quick else dtypes):
        name = str(dtype).removeprefix("torch.")
        floor_ms, floor_mb = floor(dtype, batch, steps, warmup)
        cases = {"peftreg LoRA": lambda d=dtype: peftreg_model("lora", d),
                 "HF PEFT LoRA": lambda d=dtype: peft_lora(d),
                 "peftreg QLoRA": lambda d=dtype: peftreg_model("qlora", d),
                 "PEFT + bnb QLoRA": lambda d=dtype: peft_bnb_qlora(d)}
        rows.append([name, "frozen base (floor)", f"{floor_ms:.0f}", "-", f"{floor_mb:.0f}"])
        records.append({"dtype": name, "case": "floor", "step_ms": floor_ms, "peak_mb": floor_mb})
        for label, build in cases.items():
            try:
                model = build()
            except Exception as exc:  # a peer that does not install or run here
                rows.append([name, label, "n/a", "", f"{type(exc).__name__}: {exc}"[:60]])
                continue
            ms, mb = timed_steps(model, batch, steps, warmup)
            overhead = ms - floor_ms
            rows.append([name, label, f"{ms:.0f}", f"{overhead:+.0f}", f"{mb:.0f}"])
            records.append({"dtype": name, "case": label, "step_ms": ms, "overhead_ms": overhead,
                            "peak_mb": mb})
            del model
    print_table("Training step (batch 8 x 128, r=16 on q,k,v,o)",
                ["dtype", "case", "step ms", "over floor ms", "peak MiB"], rows)
    write_json(args.out, {"environment": environment(torch.device("cpu")),
                          "results": records})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
