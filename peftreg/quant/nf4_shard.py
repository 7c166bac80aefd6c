# SPDX-License-Identifier: Apache-2.0
"""NF4 storage cut into whole quantization groups, so FSDP2 can shard it on dim 0.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter on dim 0 with
``torch.chunk`` semantics (``ceil(rows / world)`` rows per rank, the last ranks padded) and
all-gathers the rows back before the module runs. It never touches buffers, which is where
:class:`~peftreg.nn.Linear4bit` keeps its NF4 storage, so a sharded QLoRA model would hold the
whole 4-bit base on every rank.

:func:`to_groups` lays the storage out as three uint8 matrices that share their row count: row
``g`` of each holds *group* ``g`` (``group_blocks`` consecutive quantization blocks: one
double-quantization group of ``nested_blocksize`` blocks, or one block without double
quantization):

* ``codes``: ``(groups, group_blocks * blocksize / 2)``, the packed 4-bit codes;
* ``absmax``: ``(groups, group_blocks)`` uint8 codes, or ``(groups, 4 * group_blocks)`` (the
  bytes of the float32 scales) without double quantization;
* ``nested_absmax``: ``(groups, 4)``, the bytes of each group's float32 second-level scale
  (double quantization only).

Every row is self-contained, so a dim-0 chunk of each matrix (what a rank holds) is a run of
whole groups that decodes on its own (:func:`decode_rows`) with the 0-dim ``offset`` (4 bytes,
left replicated). Everything is uint8 so no dtype cast reaches the bytes: FSDP2's mixed
precision casts only floating parameters, and ``Module.half()`` likewise. The last group is
zero-padded to a full row; :func:`from_groups` returns views (no copy) of the unpadded prefix,
which is what lets autograd keep FSDP2's gathered storage instead of a copy of it.

The serialized format (docs/format.md, "NF4 storage") is unchanged: this is an in-memory layout.
"""

from __future__ import annotations

import math

import torch

from peftreg.quant.nf4_tensor import NF4FormatError, NF4Tensor

__all__ = ["GROUP_FIELDS", "decode_rows", "from_groups", "group_blocks", "groups_of",
           "rows_of_rank", "to_groups"]

#: The NF4 fields :func:`to_groups` regroups (``offset`` stays a 0-dim tensor).
GROUP_FIELDS: tuple[str, ...] = ("codes", "absmax", "nested_absmax")


def group_blocks(double_quant: bool, nested_blocksize: int) -> int:
    """Blocks per group (per row): a double-quantization group, else a single block."""
    return int(nested_blocksize) if double_quant else 1


def groups_of(numel: int, blocksize: int, double_quant: bool, nested_blocksize: int) -> int:
    """Rows of the grouped layout for a tensor of ``numel`` elements."""
    blocks = -(-int(numel) // int(blocksize))
    return -(-blocks // group_blocks(double_quant, nested_blocksize))


def _padded_rows(flat: torch.Tensor, rows: int) -> torch.Tensor:
    """``flat`` (uint8, 1-D) zero-padded to a multiple of ``rows`` and viewed ``(rows, -1)``."""
    width = -(-flat.numel() // rows) if rows else 0
    out = flat.new_zeros(rows * width)
    out[:flat.numel()] = flat
    return out.view(rows, width)


def to_groups(storage: NF4Tensor) -> dict[str, torch.Tensor]:
    """The grouped uint8 matrices of ``storage`` (new tensors; ``storage`` is not changed).

    Returns:
        ``{"codes", "absmax"}`` plus ``"nested_absmax"`` with double quantization, each
        ``(groups, width)`` uint8 and contiguous (see the module docstring).
    """
    k = group_blocks(storage.double_quant, storage.nested_blocksize)
    rows = groups_of(storage.numel, storage.blocksize, storage.double_quant,
                     storage.nested_blocksize)
    code_width = k * storage.blocksize // 2
    codes = storage.codes.reshape(-1)
    padded = codes.new_zeros(rows * code_width)
    padded[:codes.numel()] = codes
    out = {"codes": padded.view(rows, code_width)}
    absmax = storage.absmax.reshape(-1).contiguous()
    scale_bytes = absmax.view(torch.uint8)  # float32 scales travel as their bytes
    width = k * absmax.element_size()
    padded = scale_bytes.new_zeros(rows * width)
    padded[:scale_bytes.numel()] = scale_bytes
    out["absmax"] = padded.view(rows, width)
    if storage.double_quant:
        if storage.nested_absmax is None:
            raise NF4FormatError("uint8 absmax codes need nested_absmax (double quantization)")
        nested = storage.nested_absmax.reshape(-1).contiguous().view(torch.uint8)
        if nested.numel() != 4 * rows:
            raise NF4FormatError(f"nested_absmax holds {nested.numel() // 4} scales; the weight "
                                 f"has {rows} double-quantization groups")
        out["nested_absmax"] = nested.view(rows, 4).clone()
    return out


def from_groups(groups: dict[str, torch.Tensor | None], shape: torch.Size, dtype: torch.dtype,
                blocksize: int, nested_blocksize: int,
                offset: torch.Tensor | None) -> NF4Tensor:
    """The :class:`NF4Tensor` whose tensors are views of ``groups`` (the inverse of
    :func:`to_groups`; no copy, so the record shares the matrices' storage).

    Raises:
        NF4FormatError: a matrix is missing, not uint8 and contiguous, or too small for
            ``shape``; the message names it.
    """
    numel = math.prod(shape)
    blocks = -(-numel // blocksize)
    nested_absmax = groups.get("nested_absmax")
    double_quant = nested_absmax is not None
    fields: dict[str, torch.Tensor] = {}
    wanted = {"codes": (numel + 1) // 2, "absmax": blocks if double_quant else 4 * blocks}
    if double_quant:
        wanted["nested_absmax"] = 4 * -(-blocks // nested_blocksize)
    for name, count in wanted.items():
        matrix = groups.get(name)
        if matrix is None:
            raise NF4FormatError(f"grouped NF4 storage: '{name}' is missing")
        if matrix.dtype != torch.uint8 or not matrix.is_contiguous():
            raise NF4FormatError(f"grouped NF4 storage: '{name}' must be contiguous uint8, "
                                 f"found {matrix.dtype} with strides {tuple(matrix.stride())}")
        if matrix.numel() < count:
            raise NF4FormatError(f"grouped NF4 storage: '{name}' holds {matrix.numel()} bytes; "
                                 f"shape {list(shape)} needs {count}")
        fields[name] = matrix.view(-1)[:count]
    absmax = fields["absmax"] if double_quant else fields["absmax"].view(torch.float32)
    nested = fields["nested_absmax"].view(torch.float32) if double_quant else None
    return NF4Tensor(codes=fields["codes"].view(-1, 1), absmax=absmax, shape=torch.Size(shape),
                     dtype=dtype, blocksize=int(blocksize), nested_absmax=nested,
                     offset=offset if double_quant else None,
                     nested_blocksize=int(nested_blocksize))


def rows_of_rank(rows: int, world: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of the rows rank ``rank`` of ``world`` holds under FSDP2's dim-0
    sharding (``torch.chunk``: ``ceil(rows / world)`` each, so the last ranks may hold fewer
    or none)."""
    per_rank = -(-rows // world) if world > 0 else rows
    start = min(rows, rank * per_rank)
    return start, min(rows, start + per_rank)


def decode_rows(groups: dict[str, torch.Tensor | None], start: int, numel: int,
                blocksize: int, nested_blocksize: int, offset: torch.Tensor | None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode a run of whole groups on its own: what one rank's shard holds.

    Args:
        groups: the rows a rank holds (each matrix's dim-0 chunk, as FSDP2 cuts it).
        start: the index of the first row in the whole layout.
        numel: elements of the whole dense tensor (to drop the last group's padding).
        blocksize, nested_blocksize, offset: those of the whole tensor.
        dtype: the dtype to decode to.

    Returns:
        The 1-D slice of the flattened dense tensor that these groups hold (empty for none).
    """
    double_quant = groups.get("nested_absmax") is not None
    per_row = group_blocks(double_quant, nested_blocksize) * blocksize
    codes = groups["codes"]
    if codes is None:
        raise NF4FormatError("grouped NF4 storage: 'codes' is missing")
    rows = codes.shape[0]
    first = start * per_row
    count = max(0, min(numel, (start + rows) * per_row) - first)
    if count == 0:
        return torch.empty(0, dtype=dtype, device=codes.device)
    shard = {name: None if t is None else t.contiguous() for name, t in groups.items()}
    return from_groups(shard, torch.Size((count,)), dtype, blocksize, nested_blocksize,
                       offset).dequantize(dtype)
