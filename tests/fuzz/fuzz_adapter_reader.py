"""Coverage-guided fuzz target for the adapter-directory reader (atheris / libFuzzer).

Each input is split into an ``adapter.json`` text and a tensor file. The harness writes them
into a scratch adapter directory (fixing up the tensor file name and checksum when the JSON
asks for one, so the fuzzer reaches the safetensors parser and the tensor checks instead of
stopping at the checksum) and reads it with :func:`peftreg.io.adapter_dir.read_adapter_dir`;
the same bytes are also read as a PEFT directory. The only acceptable outcomes are a result or
one of peftreg's documented errors (:class:`peftreg.PeftregError` subclasses); anything else
is a bug and ends the run with the input saved as a crash file.

Run (bounded)::

    python tests/fuzz/fuzz_adapter_reader.py -max_total_time=60 [corpus_dir]

``--seed-corpus DIR`` writes valid inputs (real saved adapters) to ``DIR`` first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

SPLIT = 4  # the first 4 bytes: little-endian length of the JSON part
TENSOR_NAME = "adapter.0123456789abcdef.safetensors"


def _registry():
    from peftreg import default_registry

    return default_registry()


def encode(config_text: bytes, tensor_bytes: bytes) -> bytes:
    """Build one fuzz input from an ``adapter.json`` text and a tensor file."""
    return struct.pack("<I", len(config_text)) + config_text + tensor_bytes


def _decode(data: bytes) -> tuple[bytes, bytes]:
    if len(data) < SPLIT:
        return data, b""
    (n,) = struct.unpack("<I", data[:SPLIT])
    rest = data[SPLIT:]
    n = min(n, len(rest))
    return rest[:n], rest[n:]


def _fix_up(config_text: bytes, tensor_bytes: bytes) -> bytes:
    """Point a JSON config at the tensor file with a valid checksum, when it has a place."""
    try:
        meta = json.loads(config_text)
    except (ValueError, RecursionError):
        return config_text
    if isinstance(meta, dict) and isinstance(meta.get("tensors"), dict):
        meta["tensors"]["file"] = TENSOR_NAME
        meta["tensors"]["sha256"] = hashlib.sha256(tensor_bytes).hexdigest()
        return json.dumps(meta).encode()
    return config_text


class Harness:
    """Reads fuzz inputs in one reused scratch directory."""

    def __init__(self) -> None:
        from peftreg import PeftregError
        from peftreg.io.adapter_dir import read_adapter_dir
        from peftreg.io.peft_format import read_peft_dir

        self.allowed = PeftregError
        self.read_ours, self.read_peft = read_adapter_dir, read_peft_dir
        self.registry = _registry()
        self.root = Path(tempfile.mkdtemp(prefix="peftreg-fuzz-"))
        # The reader only reads, so each input simply overwrites the same four files.
        (self.root / "ours").mkdir()
        (self.root / "peft").mkdir()
        self.executions = 0

    def one(self, data: bytes) -> None:
        self.executions += 1
        config_text, tensor_bytes = _decode(data)
        ours, peft = self.root / "ours", self.root / "peft"
        (ours / "adapter.json").write_bytes(_fix_up(config_text, tensor_bytes))
        (ours / TENSOR_NAME).write_bytes(tensor_bytes)
        (peft / "adapter_config.json").write_bytes(config_text)
        (peft / "adapter_model.safetensors").write_bytes(tensor_bytes)
        for read, directory in ((self.read_ours, ours), (self.read_peft, peft)):
            try:
                read(directory, self.registry)
            except self.allowed:
                pass

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def write_seed_corpus(directory: Path) -> int:
    """Save a few real adapters (several methods, both formats) as fuzz inputs."""
    import torch

    import peftreg
    from peftreg.reference_model import ReferenceConfig, ReferenceTransformer

    directory.mkdir(parents=True, exist_ok=True)
    configs = [peftreg.config_for("lora", r=2, target_modules=["q_proj", "v_proj"]),
               peftreg.config_for("ia3", target_modules=["k_proj"], feedforward_modules=None),
               peftreg.config_for("lora", r=1, target_modules=["o_proj"], use_rslora=True)]
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, config in enumerate(configs):
            torch.manual_seed(i)
            model = peftreg.adapt(ReferenceTransformer(ReferenceConfig(
                vocab_size=17, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                intermediate_size=8, max_positions=8)), config)
            saved = model.save_adapter(Path(tmp) / f"a{i}")
            meta = (saved / "adapter.json").read_bytes()
            tensors = next(saved.glob("adapter.*.safetensors")).read_bytes()
            (directory / f"seed-peftreg-{i}").write_bytes(encode(meta, tensors))
            count += 1
            if config.method == "lora":
                peft_dir = model.save_adapter(Path(tmp) / f"p{i}", format="peft")
                (directory / f"seed-peft-{i}").write_bytes(encode(
                    (peft_dir / "adapter_config.json").read_bytes(),
                    (peft_dir / "adapter_model.safetensors").read_bytes()))
                count += 1
    return count


def main(argv: list[str]) -> None:
    import atheris

    # Instrument first: modules imported before this block get no coverage feedback.
    with atheris.instrument_imports(include=["peftreg.io", "peftreg.config"]):
        import peftreg.io.adapter_dir
        import peftreg.io.peft_format
        import peftreg.io.validate  # noqa: F401

    if "--seed-corpus" in argv:
        at = argv.index("--seed-corpus")
        where = Path(argv[at + 1])
        print(f"wrote {write_seed_corpus(where)} seed inputs to {where}", flush=True)
        argv = argv[:at] + argv[at + 2:]
    harness = Harness()
    # libFuzzer prints "Done N runs in T second(s)" when -max_total_time or -runs ends it.
    atheris.Setup(argv, harness.one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
