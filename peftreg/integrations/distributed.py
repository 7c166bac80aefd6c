# SPDX-License-Identifier: Apache-2.0
"""``torch.distributed`` helpers for adapters: what DDP synchronises, saving once.

Nothing here is needed to train: an :class:`~peftreg.AdaptedModel` goes into
``DistributedDataParallel`` or FSDP2's ``fully_shard`` as it is. Because the base is frozen
(``requires_grad=False``), DDP's reducer registers only the adapter parameters and all-reduces
only their gradients, and FSDP2 reduce-scatters only theirs. Two things still need care:

- Build the wrapper *after* choosing the active adapters: DDP fixes the set of parameters it
  reduces at construction, and :meth:`AdaptedModel.set_active` changes ``requires_grad``.
- Save from one process. :func:`save_on_main_process` writes on rank 0 while the others wait,
  and under FSDP2 first gathers the sharded adapter tensors (a collective, so every rank
  calls it).

A 4-bit (QLoRA) base keeps its NF4 storage in buffers, which FSDP2 does not shard; call
:func:`make_nf4_shardable` before ``fully_shard`` so that it does.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from peftreg.errors import AdapterError, PeftregError
from peftreg.integrations import find_adapted_model
from peftreg.io.adapter_dir import write_adapter_dir
from peftreg.nn.linear4bit import Linear4bit

__all__ = ["adapter_parameters_for_ddp", "is_main_process", "make_nf4_shardable",
           "save_on_main_process"]


def is_main_process(group: dist.ProcessGroup | None = None) -> bool:
    """True on rank 0 of ``group`` (default: the world), and when not running distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank(group) == 0


def adapter_parameters_for_ddp(model: nn.Module) -> list[nn.Parameter]:
    """The parameters DDP (or FSDP2) will synchronise: those of the training adapters.

    That is every parameter of the active, trainable adapters (saved-module copies included),
    in ``model.parameters()`` order, which is what ``DistributedDataParallel`` registers when
    nothing else requires a gradient. Hand them to the optimizer.

    Args:
        model: an adapted model, possibly wrapped (DDP, ``torch.compile``).

    Raises:
        AdapterError: another parameter also requires a gradient, so DDP would synchronise
            it too; freeze it, or pass ``[p for p in model.parameters() if p.requires_grad]``
            to the optimizer if it is meant to train.
    """
    adapted = find_adapted_model(model)
    records = adapted.adapters
    wanted: set[int] = set()
    for name in adapted.active_adapters:
        if records[name].trainable:
            wanted.update(id(p) for p in adapted.adapter_parameters(name))
    extra = [n for n, p in adapted.named_parameters() if p.requires_grad and id(p) not in wanted]
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise AdapterError(
            f"{len(extra)} parameters outside the training adapters require a gradient and would "
            f"be synchronised too: {shown}"
        )
    return [p for p in adapted.parameters() if id(p) in wanted]


def _full_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor cannot have FSDP2-sharded parameters
        return state, False
    sharded = any(isinstance(t, DTensor) for t in state.values())
    if sharded:
        # full_tensor() is an all-gather: every rank must reach this line, in the same order.
        state = {k: t.full_tensor() if isinstance(t, DTensor) else t for k, t in state.items()}
    return state, sharded


def save_on_main_process(
    model: nn.Module,
    directory: str | Path,
    name: str | None = None,
    *,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Save adapter ``name`` once, from rank 0; every rank returns when the files are complete.

    Call it on every process. Outside ``torch.distributed`` it simply saves. Under FSDP2 the
    sharded adapter tensors are gathered first (only the adapter's, never the base's). Rank 0's
    success or failure is broadcast, so a failed write raises on every rank instead of leaving
    the others waiting.

    Args:
        model: the adapted model, possibly wrapped (DDP, ``torch.compile``, FSDP2).
        directory: the adapter directory to write (see docs/format.md).
        name: the adapter (default: the only active one).
        group: the process group (default: the world); its rank 0 writes.

    Returns:
        ``directory`` as a ``Path``, on every rank.

    Raises:
        AdapterError: no such adapter, or no ``name`` while several are active.
        PeftregError: rank 0 failed to write (on the other ranks; rank 0 re-raises its own
            error).
    """
    adapted = find_adapted_model(model)
    if name is None:
        if len(adapted.active_adapters) != 1:
            raise AdapterError(
                f"name the adapter to save: {len(adapted.active_adapters)} adapters are active")
        name = adapted.active_adapters[0]
    record = adapted.record(name)
    if not (dist.is_available() and dist.is_initialized()):
        return adapted.save_adapter(directory, name)

    tensors, sharded = _full_tensors(adapted.adapter_state_dict(name))
    error: BaseException | None = None
    if is_main_process(group):
        try:
            if sharded:
                write_adapter_dir(
                    directory, adapter_name=name, config=record.config,
                    tensors={k: t.detach().to("cpu").contiguous() for k, t in tensors.items()},
                    source=adapted.registry.source(record.method.name),
                    targets=record.targets, saved_modules=record.saved_modules,
                    numerics_version=record.method.numerics_version)
            else:
                adapted.save_adapter(directory, name)
        except Exception as exc:  # reported to the other ranks below, then re-raised
            error = exc
    # The broadcast is also the barrier: nobody returns before rank 0 has finished writing.
    outcome: list[str | None] = [None if error is None else f"{type(error).__name__}: {error}"]
    source_rank = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast_object_list(outcome, src=source_rank, group=group)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise PeftregError(f"saving adapter {name!r} on the main process failed: {outcome[0]}")
    return Path(directory)


def make_nf4_shardable(model: nn.Module) -> list[str]:
    """Put every 4-bit base layer of ``model`` in the layout FSDP2 shards; call before
    ``fully_shard``.

    :class:`~peftreg.nn.Linear4bit` keeps its NF4 storage in buffers, which ``fully_shard``
    leaves whole on every rank. :meth:`Linear4bit.make_shardable` moves it into frozen uint8
    parameters of whole quantization groups, so each rank keeps about ``1 / world`` of the
    4-bit base and FSDP2 gathers a layer group's weights only while it runs (forward and
    backward). Outputs and saved files are unchanged. Layers already shardable are counted
    too; calling it twice is harmless.

    Args:
        model: an adapted or plain model, not yet sharded.

    Returns:
        The paths of the 4-bit layers, in ``named_modules()`` order.
    """
    paths = []
    for path, module in model.named_modules():
        if isinstance(module, Linear4bit):
            module.make_shardable()
            paths.append(path)
    return paths
