from __future__ import annotations

import json
import os
import subprocess
import sys

import peftreg
from peftreg.cli import main
from peftreg_plugins.lora import LoraConfig


def test_methods_lists_lora_with_capabilities(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "peftreg (built-in)" in out
    assert "compiled" in out  # the kernel footer is always printed


def test_inspect_reports_method_tensors_and_size(make_tiny, tmp_path, capsys):
    model = peftreg.adapt(make_tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_adapter(tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "lora" and report["config"]["r"] == 2
    assert report["parameters"] == 2 * 2 * (32 + 32)
    assert report["tensors"]["layers.0.self_attn.q_proj.lora_A.weight"]["shape"] == [2, 32]
    assert report["size_on_disk"] > 0
    assert main(["inspect", str(tmp_path / "a")]) == 0
    assert "lora_B" in capsys.readouterr().out


def test_inspect_of_a_bad_directory_exits_2_with_the_reason(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "looked for adapter.json" in capsys.readouterr().err


def test_doctor_reports_extension_state(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and ("lora_linear" in out or "not available" in out)


def test_console_script_runs_in_a_subprocess():
    result = subprocess.run([sys.executable, "-m", "peftreg.cli", "methods"],
                            capture_output=True, text=True, timeout=120, check=False,
                            env=_wide_env())
    assert result.returncode == 0, result.stderr
    assert "lora" in result.stdout


def _wide_env():
    return {**os.environ, "COLUMNS": "250"}


def test_convert_round_trip_through_the_command_line(make_tiny, tmp_path, token_batch):
    import torch

    model = peftreg.adapt(make_tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for p in model.adapter_parameters("default"):
            p.normal_()
    model.save_adapter(tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "back"), "--to",
                 "peftreg"]) == 0
    again = peftreg.load(make_tiny(), tmp_path / "back")
    with torch.no_grad():
        assert torch.equal(again(token_batch)["logits"], model(token_batch)["logits"])
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--to", "peft"]) == 2
