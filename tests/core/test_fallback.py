"""Without the compiled extension peftreg still works, and says once why and how to build."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import warnings
import torch
import peftreg
from peftreg import ops
from peftreg.reference_model import ReferenceTransformer
assert not ops.has_extension()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = peftreg.adapt(ReferenceTransformer(), peftreg.config_for("lora", r=4,
                          target_modules="all-linear"))
    ids = torch.randint(0, 128, (2, 8))
    for _ in range(3):
        model(ids, labels=ids)["loss"].backward()
messages = [str(w.message) for w in caught if isinstance(w.message, ops.PeftregFallbackWarning)]
print(len(messages))
print(messages[0] if messages else "")
"""


def test_plain_pytorch_path_warns_exactly_once():
    env = {**os.environ, "PEFTREG_EXTENSION": "off"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=120, check=False, env=env)
    assert result.returncode == 0, result.stderr
    count, message = result.stdout.strip().split("\n", 1)
    assert count == "1", result.stdout
    assert "PEFTREG_EXTENSION=off" in message and "build_ext" in message, message
    assert message.count("build_ext") == 1, message  # how to build is said once
