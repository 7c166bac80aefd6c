# SPDX-License-Identifier: Apache-2.0
"""Checking a safetensors file completely before any tensor reaches a model.

The header is parsed and checked here (size, JSON, dtypes, offsets inside the data, no overlap,
byte counts that match the shapes) rather than trusting the reader, so that a truncated,
hostile or mislabelled file is refused with a message naming the file, the tensor and the
problem.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import sys
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes

from peftreg.errors import AdapterFileError

# Bytes per element of each safetensors dtype tag.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (json.loads would keep the last silently)."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


def loads_strict(text: str | bytes) -> object:
    """``json.loads`` that refuses duplicate keys at any depth.

    Two header entries for one tensor name would otherwise collapse to the last one, so what
    a reader sees would depend on the reader; refusing the file is the only safe answer.

    Raises:
        ValueError: a duplicate key (``DuplicateKeyError``, naming it) or invalid JSON.
    """
    return json.loads(text, object_pairs_hook=_no_duplicates)


def read_config_document(path: Path, what: str, limit: int, text: bytes | None = None
                         ) -> dict[str, object]:
    """Read ``what`` (an adapter config, named in messages): at most ``limit`` bytes of strict
    JSON (no repeated keys) holding one object. ``text`` is the document when it was found
    elsewhere (PEFT's interrupted export keeps it in the weights file).

    Raises:
        AdapterFileError: too large, not UTF-8, not JSON, a repeated key, or not an object;
            the message names the file.
    """
    if text is None:
        if path.stat().st_size > limit:
            raise AdapterFileError(f"{path}: larger than {limit} bytes")
        text = path.read_bytes()
    try:
        doc = loads_strict(text.decode("utf-8"))
    except DuplicateKeyError as exc:
        raise AdapterFileError(f"{path}: key {exc.args[0]!r} appears twice in one object"
                               ) from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterFileError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise AdapterFileError(f"{path}: not a {what} (a JSON object expected)")
    return doc


def memory_limit() -> int:
    """Bytes of physical memory, the ceiling for anything read whole into memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not POSIX: no cheap answer, no limit
        return sys.maxsize


def read_bounded(path: Path) -> bytes:
    """Read a whole file, refusing one larger than this machine's memory before reading it.

    Raises:
        AdapterFileError: unreadable or too large (naming the file).
    """
    try:
        size = path.stat().st_size
        if size > memory_limit():
            raise AdapterFileError(f"{path}: {size} bytes is more than this machine's "
                                   f"{memory_limit()} bytes of memory")
        return path.read_bytes()
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot read: {exc}") from exc


def parse_header(data: bytes, source: str) -> tuple[dict[str, dict], dict[str, str]]:
    """Validate the safetensors header of ``data``; return (tensor entries, metadata).

    Raises:
        AdapterFileError: naming ``source`` and the problem.
    """
    def fail(problem: str) -> AdapterFileError:
        return AdapterFileError(f"{source}: {problem}")

    if len(data) < 8:
        raise fail(f"file is {len(data)} bytes, too short to be safetensors")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise fail(f"header claims {header_len} bytes but the file has {len(data) - 8} after "
                   "the length field (truncated or not safetensors)")
    if header_len > MAX_HEADER_BYTES:
        raise fail(f"header of {header_len} bytes is larger than the {MAX_HEADER_BYTES} allowed")
    try:
        header = loads_strict(data[8:8 + header_len].decode("utf-8"))
    except DuplicateKeyError as exc:
        raise fail(f"header names {exc.args[0]!r} more than once (a tensor stored twice, or "
                   "a repeated metadata key)") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise fail(f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise fail("__metadata__ must map strings to strings")
    body = len(data) - 8 - header_len
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise fail(f"tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise fail(f"tensor {name!r}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                           for d in shape)):
            raise fail(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise fail(f"tensor {name!r}: data_offsets {offsets!r} must be two integers")
        start, end = offsets
        if not 0 <= start <= end <= body:
            raise fail(f"tensor {name!r}: data_offsets {offsets} fall outside the {body}-byte "
                       "data section")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - start != expected:
            raise fail(f"tensor {name!r}: {end - start} bytes stored but shape {shape} of "
                       f"{dtype} needs {expected}")
        spans.append((start, end, name))
    spans.sort()
    for (_, end0, name0), (start1, _, name1) in itertools.pairwise(spans):
        if start1 < end0:
            raise fail(f"tensors {name0!r} and {name1!r} overlap in the data section")
    # The format stores tensors back to back: bytes no tensor owns are a damaged or padded
    # file (safetensors' own reader refuses it too).
    covered = sum(end - start for start, end, _ in spans)
    if covered != body:
        raise fail(f"{body - covered} bytes of the {body}-byte data section belong to no tensor")
    return header, metadata


def read_safetensors(path: Path, data: bytes | None = None) -> tuple[dict[str, torch.Tensor],
                                                                       dict[str, str]]:
    """Read and check a safetensors file; every tensor must be floating point and finite.

    Args:
        path: the file (named in errors).
        data: its bytes, if already read.

    Returns:
        The tensors by name and the file's metadata.

    Raises:
        AdapterFileError: the file is unreadable, malformed, or holds non-float or non-finite
            tensors.
    """
    if data is None:
        data = read_bounded(path)
    _, metadata = parse_header(data, str(path))
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as exc:  # the reader's own error types vary across versions
        raise AdapterFileError(f"{path}: unreadable safetensors data: {exc}") from exc
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterFileError(
                f"{path}: tensor {name!r} has dtype {tensor.dtype}; adapter weights must be "
                "floating point"
            )
        # float8 has no isfinite kernel; widening is exact for every float8 value.
        wide = tensor.float() if tensor.element_size() == 1 else tensor
        if tensor.numel() and not bool(torch.isfinite(wide).all()):
            bad = int((~torch.isfinite(wide)).sum())
            raise AdapterFileError(f"{path}: tensor {name!r} holds {bad} NaN or infinite values")
    return tensors, metadata


def compare_to_expected(
    tensors: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    source: str,
) -> list[str]:
    """List every difference between a file's tensors and the model's adapter tensors.

    Returns:
        Problems, one line each (empty when the file fits): missing and unexpected keys and
        shape mismatches.
    """
    problems = []
    for key in sorted(set(expected) - set(tensors)):
        shape = tuple(expected[key].shape)
        problems.append(f"missing tensor {key!r} (model expects shape {shape})")
    for key in sorted(set(tensors) - set(expected)):
        problems.append(f"unexpected tensor {key!r} (shape {tuple(tensors[key].shape)}) that the "
                        "model has no place for")
    for key in sorted(set(tensors) & set(expected)):
        got, want = tuple(tensors[key].shape), tuple(expected[key].shape)
        if got != want:
            problems.append(f"tensor {key!r} has shape {got}, the model expects {want}")
    return [f"{source}: {p}" for p in problems]
