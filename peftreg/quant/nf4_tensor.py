# SPDX-License-Identifier: Apache-2.0
"""NF4 storage record: a 4-bit quantized tensor in bitsandbytes' byte format.

An :class:`NF4Tensor` holds what a QLoRA base weight needs (Dettmers et al. 2023, section 3):
packed 4-bit codes, one scale per block (float32, or uint8 codes with double quantization plus
the second-level float32 scales and the offset), the code tables, the dense shape and dtype, and
the block sizes. :meth:`NF4Tensor.to_state_dict` / :meth:`NF4Tensor.from_state_dict` convert to
and from a flat dict of tensors with exactly bitsandbytes' serialized keys (docs/format.md,
"NF4 storage"), so a bitsandbytes checkpoint loads without requantizing and safetensors can hold
the result. Nothing is pickled: the metadata is UTF-8 JSON in a uint8 tensor, as bitsandbytes
stores it.

Quantizing and dequantizing use the compiled ops (:mod:`peftreg.ops.nf4`) when the extension has
them for the tensor's device, else the plain-PyTorch maths (:mod:`peftreg.ops.reference`) after
one warning (the kernel mode of :mod:`peftreg.ops._op`); both give identical bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import torch

from peftreg.errors import PeftregError
from peftreg.ops import nf4 as nf4_ops
from peftreg.ops import nf4_codes

__all__ = ["QUANT_STATE_SUFFIX", "NF4FormatError", "NF4Tensor"]

#: Key suffix of the JSON metadata tensor (bitsandbytes' packed quant state for NF4).
QUANT_STATE_SUFFIX: Final[str] = "quant_state.bitsandbytes__nf4"
_QUANT_STATE_PREFIX: Final[str] = "quant_state.bitsandbytes__"
_DTYPES: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}
_DTYPE_NAMES: Final[dict[torch.dtype, str]] = {v: k for k, v in _DTYPES.items()}


class NF4FormatError(PeftregError, ValueError):
    """An NF4 state dict is missing a key or holds a wrong dtype, shape or value."""


def _valid_blocksize(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and 32 <= value <= 4096
            and value & (value - 1) == 0)


@dataclass(eq=False)
class NF4Tensor:
    """A tensor stored as NF4 codes with blockwise scales (bitsandbytes' layout).

    Attributes:
        codes: uint8 ``((numel + 1) // 2, 1)``; element 2i in the high nibble of byte i.
        absmax: float32 ``(blocks,)``, or uint8 ``(blocks,)`` codes with double quantization.
        shape: shape of the dense tensor.
        dtype: dtype of the dense tensor it was quantized from (the default of
            :meth:`dequantize`); float32, bfloat16 or float16.
        blocksize: elements per block (power of two, 32..4096).
        nested_absmax: float32 ``(ceil(blocks / nested_blocksize),)`` with double quantization.
        offset: float32 0-dim tensor (the mean of the absmax) with double quantization.
        nested_blocksize: scales per second-level block (256 in bitsandbytes files).
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = 256

    quant_type: ClassVar[str] = "nf4"

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 nested_blocksize: int = 256, nearest_absmax_codes: bool = False) -> NF4Tensor:
        """Quantize ``weight`` (float32, bfloat16 or float16, finite values).

        The bytes equal bitsandbytes' ``quantize_4bit(..., quant_type="nf4")`` on CPU.

        Args:
            weight: the dense tensor, any shape.
            blocksize: elements per absmax block (bitsandbytes' default 64).
            double_quant: also quantize the absmax (QLoRA double quantization).
            nested_blocksize: scales per second-level block.
            nearest_absmax_codes: with double quantization, store the nearest 8-bit code of each
                scale instead of the one bitsandbytes picks (a slightly smaller scale error,
                measured in docs/format.md; no longer byte-identical to bitsandbytes).

        Raises:
            RuntimeError: NaN/inf in ``weight``, a bad block size or dtype.
        """
        w = weight.detach()
        codes, absmax = nf4_ops.QUANTIZE.run(w, int(blocksize))
        nested = offset = None
        if double_quant:
            absmax, nested, offset = nf4_ops.DOUBLE_QUANTIZE.run(
                absmax, int(nested_blocksize), bool(nearest_absmax_codes))
        return cls(codes=codes, absmax=absmax, shape=torch.Size(w.shape), dtype=w.dtype,
                   blocksize=int(blocksize), nested_absmax=nested, offset=offset,
                   nested_blocksize=int(nested_blocksize))

    @classmethod
    def zeros(cls, shape: Sequence[int], dtype: torch.dtype = torch.float32, blocksize: int = 64,
              double_quant: bool = True, nested_blocksize: int = 256,
              device: torch.device | str | None = None) -> NF4Tensor:
        """Storage of an all-zero tensor (a placeholder to load a state dict into)."""
        size = torch.Size(shape)
        n = math.prod(size)
        blocks = -(-n // blocksize)
        codes = torch.full(((n + 1) // 2, 1), 0x77, dtype=torch.uint8, device=device)
        if double_quant:
            return cls(codes=codes,
                       absmax=torch.full((blocks,), 127, dtype=torch.uint8, device=device),
                       shape=size, dtype=dtype, blocksize=blocksize,
                       nested_absmax=torch.zeros(-(-blocks // nested_blocksize), device=device),
                       offset=torch.zeros((), device=device), nested_blocksize=nested_blocksize)
        return cls(codes=codes, absmax=torch.zeros(blocks, device=device), shape=size,
                   dtype=dtype, blocksize=blocksize, nested_blocksize=nested_blocksize)

    # --- properties ---------------------------------------------------------------------------

    @property
    def double_quant(self) -> bool:
        """Whether the absmax are double-quantized (uint8 codes + nested scales + offset)."""
        return self.absmax.dtype == torch.uint8

    @property
    def numel(self) -> int:
        """Elements of the dense tensor."""
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def quant_map(self) -> torch.Tensor:
        """The 16 NF4 code points (float32), as serialized under ``<prefix>.quant_map``."""
        return nf4_codes.nf4_code(self.device)

    @property
    def nested_quant_map(self) -> torch.Tensor:
        """The 256-entry dynamic code of the double quantization (float32)."""
        return nf4_codes.dynamic_code(self.device)

    @property
    def nbytes(self) -> int:
        """Bytes of the per-tensor storage: codes, absmax, nested absmax and offset.

        The two code tables are constants of the format, shared by every tensor; they are
        serialized with each tensor but not counted here (bitsandbytes' per-parameter cost).
        """
        parts = [self.codes, self.absmax, self.nested_absmax, self.offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def bits_per_parameter(self) -> float:
        """``8 * nbytes / numel``: 4.127 with double quantization at block 64, 4.5 without."""
        return 8.0 * self.nbytes / max(self.numel, 1)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The tensor fields by name (for modules that register them as buffers)."""
        return {"codes": self.codes, "absmax": self.absmax, "nested_absmax": self.nested_absmax,
                "offset": self.offset}

    # --- conversion ---------------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense tensor in ``dtype`` (default: the dtype it was quantized from).

        Args:
            dtype: float32, bfloat16, float16 or float64.
            out: optional preallocated contiguous tensor of this shape and dtype to write into.
        """
        dtype = dtype or (out.dtype if out is not None else self.dtype)
        fields = (self.codes, self.absmax, self.nested_absmax, self.offset, self.blocksize,
                  self.nested_blocksize)
        if out is None:
            return nf4_ops.DEQUANTIZE.run(*fields, list(self.shape), dtype)
        nf4_ops.check_out(out, list(self.shape), dtype)
        nf4_ops.DEQUANTIZE_INTO.run(*fields, out)
        return out

    def to(self, device: torch.device | str) -> NF4Tensor:
        """The same storage on ``device`` (dtypes never change)."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return NF4Tensor(codes=self.codes.to(device), absmax=self.absmax.to(device),
                         shape=self.shape,
                         dtype=self.dtype, blocksize=self.blocksize,
                         nested_absmax=move(self.nested_absmax), offset=move(self.offset),
                         nested_blocksize=self.nested_blocksize)

    def metadata(self) -> dict[str, Any]:
        """The JSON fields of bitsandbytes' packed quant state, in its key order."""
        meta: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES.get(self.dtype, str(self.dtype).removeprefix("torch.")),
            "shape": list(self.shape),
        }
        if self.double_quant:
            if self.offset is None or self.nested_absmax is None:
                raise NF4FormatError("uint8 absmax codes need nested_absmax and offset (double "
                                     "quantization)")
            meta.update({
                "nested_blocksize": self.nested_blocksize,
                "nested_dtype": "float32",
                "nested_offset": float(self.offset.item()),
            })
        return meta

    def to_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """A flat dict in bitsandbytes' serialized layout under key ``prefix``.

        Keys: ``prefix`` (codes), ``prefix.absmax``, ``prefix.quant_map``, with double
        quantization ``prefix.nested_absmax`` and ``prefix.nested_quant_map``, and
        ``prefix.quant_state.bitsandbytes__nf4`` (uint8 UTF-8 JSON, see :meth:`metadata`).
        """
        out = {prefix: self.codes, f"{prefix}.absmax": self.absmax,
               f"{prefix}.quant_map": self.quant_map}
        if self.double_quant:
            if self.nested_absmax is None:
                raise NF4FormatError("uint8 absmax codes need nested_absmax (double "
                                     "quantization)")
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_quant_map
        blob = json.dumps(self.metadata()).encode("utf-8")
        out[f"{prefix}.{QUANT_STATE_SUFFIX}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], prefix: str = "weight",
                        device: torch.device | str | None = None) -> NF4Tensor:
        """Read and validate bitsandbytes-layout NF4 tensors stored under ``prefix``.

        Args:
            state: flat dict (a state dict or a safetensors file's contents); keys that do not
                start with ``prefix`` are ignored.
            prefix: the weight's key, e.g. ``"model.layers.0.mlp.up_proj.weight"``.
            device: where to put the tensors (default: where they are).

        Raises:
            NF4FormatError: a key is missing or unexpected, or a tensor has the wrong dtype,
                shape or values; the message names the key and the problem.
        """
        return _StateReader(state, prefix).read(device)


class _StateReader:
    """Validation of one serialized NF4 tensor; every error names the offending key."""

    def __init__(self, state: Mapping[str, torch.Tensor], prefix: str) -> None:
        self.state = state
        self.prefix = prefix

    def error(self, key: str, problem: str) -> NF4FormatError:
        return NF4FormatError(f"NF4 state dict: key '{key}': {problem}")

    def get(self, suffix: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        key = f"{self.prefix}.{suffix}" if suffix else self.prefix
        if key not in self.state:
            return self.missing(key)
        value = self.state[key]
        if not isinstance(value, torch.Tensor):
            raise self.error(key, f"expected a tensor, found {type(value).__name__}")
        if dtype is not None and value.dtype != dtype:
            raise self.error(key, f"has dtype {value.dtype}; expected {dtype}")
        return value

    def missing(self, key: str) -> torch.Tensor:
        raise self.error(key, "missing")

    def metadata(self) -> dict[str, Any]:
        start = f"{self.prefix}.{_QUANT_STATE_PREFIX}"
        found = [k for k in self.state if k.startswith(start)]
        key = f"{self.prefix}.{QUANT_STATE_SUFFIX}"
        if key not in self.state:
            if found:
                kind = found[0].removeprefix(start)
                raise self.error(found[0], f"unknown quant_type {kind!r}; only 'nf4' is "
                                           "supported")
            raise self.error(key, "missing (the JSON quant state of the NF4 weight)")
        blob = self.get(QUANT_STATE_SUFFIX, torch.uint8)
        try:
            meta = json.loads(bytes(blob.reshape(-1).cpu().tolist()).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise self.error(key, f"is not UTF-8 JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise self.error(key, f"holds JSON {type(meta).__name__}; expected an object")
        return meta

    def read(self, device: torch.device | str | None) -> NF4Tensor:
        key = f"{self.prefix}.{QUANT_STATE_SUFFIX}"
        meta = self.metadata()
        for field in ("quant_type", "blocksize", "dtype", "shape"):
            if field not in meta:
                raise self.error(key, f"JSON has no {field!r}")
        if meta["quant_type"] != "nf4":
            raise self.error(key, f"unknown quant_type {meta['quant_type']!r}; only 'nf4' is "
                                  "supported")
        blocksize = meta["blocksize"]
        if not _valid_blocksize(blocksize):
            raise self.error(key, f"blocksize {blocksize!r} is not a power of two from 32 to "
                                  "4096")
        if meta["dtype"] not in _DTYPES:
            raise self.error(key, f"dtype {meta['dtype']!r} is not one of {sorted(_DTYPES)}")
        shape = meta["shape"]
        if not (isinstance(shape, list) and all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise self.error(key, f"shape {shape!r} is not a list of non-negative integers")
        n = math.prod(shape)
        blocks = -(-n // blocksize)

        codes = self.get("", torch.uint8)
        if codes.numel() != (n + 1) // 2:
            raise self.error(self.prefix, f"holds {codes.numel()} code bytes but shape {shape} "
                                          f"needs (numel + 1) // 2 = {(n + 1) // 2}")
        quant_map = self.get("quant_map", torch.float32)
        if quant_map.shape != (16,) or not torch.equal(quant_map.cpu(), nf4_codes.nf4_code()):
            raise self.error(f"{self.prefix}.quant_map", "does not hold the 16 NF4 code points")

        double_quant = "nested_offset" in meta or f"{self.prefix}.nested_absmax" in self.state
        absmax = self.get("absmax", torch.uint8 if double_quant else torch.float32)
        if absmax.dim() != 1 or absmax.numel() != blocks:
            raise self.error(f"{self.prefix}.absmax", f"has shape {list(absmax.shape)}; "
                                                      f"expected ({blocks},): one per block")
        nested = offset = None
        nested_blocksize = 256
        if double_quant:
            for field in ("nested_blocksize", "nested_dtype", "nested_offset"):
                if field not in meta:
                    raise self.error(key, f"JSON has no {field!r} but the weight is "
                                          "double-quantized")
            nested_blocksize = meta["nested_blocksize"]
            if not _valid_blocksize(nested_blocksize):
                raise self.error(key, f"nested_blocksize {nested_blocksize!r} is not a power of "
                                      "two from 32 to 4096")
            if meta["nested_dtype"] != "float32":
                raise self.error(key, f"nested_dtype {meta['nested_dtype']!r}; expected "
                                      "'float32'")
            value = meta["nested_offset"]
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value)):
                raise self.error(key, f"nested_offset {value!r} is not a finite number")
            offset = torch.tensor(float(value), dtype=torch.float32)
            nested = self.get("nested_absmax", torch.float32)
            expected = -(-blocks // nested_blocksize)
            if nested.dim() != 1 or nested.numel() != expected:
                raise self.error(f"{self.prefix}.nested_absmax",
                                 f"has shape {list(nested.shape)}; expected ({expected},)")
            if not bool(torch.isfinite(nested).all()):
                raise self.error(f"{self.prefix}.nested_absmax", "contains NaN or infinity")
            nested_map = self.get("nested_quant_map", torch.float32)
            if nested_map.shape != (256,) or not torch.equal(nested_map.cpu(),
                                                             nf4_codes.dynamic_code()):
                raise self.error(f"{self.prefix}.nested_quant_map",
                                 "does not hold the 256-entry dynamic code of double "
                                 "quantization")
        elif not bool(torch.isfinite(absmax).all()):
            raise self.error(f"{self.prefix}.absmax", "contains NaN or infinity")

        known = {"", "absmax", "quant_map", QUANT_STATE_SUFFIX}
        if double_quant:
            known |= {"nested_absmax", "nested_quant_map"}
        for k in self.state:
            if k.startswith(f"{self.prefix}.") and k.removeprefix(f"{self.prefix}.") not in known:
                raise self.error(k, "unexpected key for an NF4 weight")

        def place(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().contiguous()
            return t.to(device) if device is not None else t

        def place_optional(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else place(t)

        return NF4Tensor(codes=place(codes.reshape(-1, 1)), absmax=place(absmax),
                         shape=torch.Size(shape), dtype=_DTYPES[meta["dtype"]],
                         blocksize=blocksize, nested_absmax=place_optional(nested),
                         offset=place_optional(offset),
                         nested_blocksize=nested_blocksize)
