# SPDX-License-Identifier: Apache-2.0
"""AdaptedModel: a model with named adapters that can be added, switched, merged and saved.

The wrapper does everything that is the same for every method: it freezes the base, keeps the
set of active adapters, flips trainability, disables, deletes, merges and unloads, all by
walking the :class:`~peftreg.host.AdapterSlot` modules a method placed in the model. Methods only
create their modules (:meth:`PEFTMethod.inject`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import torch
from torch import nn

from peftreg.aliasing import check_no_base_tensors
from peftreg.base_access import access_for
from peftreg.config import MethodConfig
from peftreg.errors import AdapterError, ConfigError, TargetNotFoundError, UnsupportedOperationError
from peftreg.families import ModelFamily
from peftreg.host import AdapterHost, AdapterSlot, TrainableCopy, iter_slots
from peftreg.io.adapter_dir import save_adapter
from peftreg.io.formats import read_any
from peftreg.io.load import load_adapter
from peftreg.io.peft_format import save_peft_adapter
from peftreg.io.record import ADAPTER_NAME
from peftreg.io.refit import save_refitted
from peftreg.method import PEFTMethod
from peftreg.registry import Registry, default_registry
from peftreg.row_adapters import LowRankAdapter, RowPlan
from peftreg.signature import SIGNATURE_BASE, signature_class
from peftreg.targets import get_module, iter_base_modules, replace_module

# The destination mapping type of state_dict (as nn.Module types it).
_D = TypeVar("_D", bound=dict[str, Any])



def check_adapter_name(name: object) -> str:
    """Return ``name`` if it is a valid adapter name, else raise :class:`AdapterError`."""
    if not isinstance(name, str) or ADAPTER_NAME.fullmatch(name) is None:
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or '_'"
        )
    return name


@dataclasses.dataclass(frozen=True)
class QuantizedMergeReport:
    """The error a merge into 4-bit bases added by quantizing the merged weights again.

    Attributes:
        layers: layer path -> ``max_abs_error`` (largest ``|W_q - W|`` over the weight) and
            ``relative_error`` (``||W_q - W||_F / ||W||_F``), ``W`` the exact merged weight
            and ``W_q`` its requantized value.
        relative_error: the same over all layers together.
        max_abs_error: the largest over all layers.
    """

    layers: dict[str, dict[str, float]]
    relative_error: float
    max_abs_error: float

    @classmethod
    def of(cls, raw: dict[str, dict[str, float]]) -> QuantizedMergeReport:
        layers = {path: {"max_abs_error": e["max_abs_error"],
                         "relative_error": math.sqrt(e["squared_error"] / e["squared_norm"])
                         if e["squared_norm"] > 0 else math.sqrt(e["squared_error"])}
                  for path, e in raw.items()}
        num = sum(e["squared_error"] for e in raw.values())
        den = sum(e["squared_norm"] for e in raw.values())
        return cls(layers, math.sqrt(num / den) if den > 0 else math.sqrt(num),
                   max((e["max_abs_error"] for e in raw.values()), default=0.0))


@dataclasses.dataclass
class AdapterRecord:
    """What the wrapper knows about one adapter.

    Attributes:
        name: the adapter name.
        config: its method config.
        method: the method that created it.
        targets: module paths the method adapted.
        saved_modules: module paths trained and saved whole (``modules_to_save``).
        trainable: whether its parameters train when it is active.
    """

    name: str
    config: MethodConfig
    method: PEFTMethod
    targets: list[str]
    saved_modules: list[str]
    trainable: bool = True


@dataclasses.dataclass(frozen=True)
class AdapterSummaryRow:
    """One line of :meth:`AdaptedModel.summary`."""

    name: str
    method: str
    active: bool
    merged: bool
    trainable: bool
    adapter_params: int
    saved_module_params: int
    targets: int

    @property
    def params(self) -> int:
        """Adapter plus saved-module parameters."""
        return self.adapter_params + self.saved_module_params


@dataclasses.dataclass(frozen=True)
class AdapterSummary:
    """Parameter counts per adapter, relative to the base model."""

    base_params: int
    rows: tuple[AdapterSummaryRow, ...]

    def percent(self, row: AdapterSummaryRow) -> float:
        """``row``'s parameters as a percentage of the base model's."""
        return 100.0 * row.params / max(self.base_params, 1)

    def __str__(self) -> str:
        header = (f"{'adapter':<16}{'method':<14}{'active':<8}{'merged':<8}"
                  f"{'trainable params':>18}{'% of base':>11}{'targets':>9}")
        lines = [header, "-" * len(header)]
        for row in self.rows:
            lines.append(
                f"{row.name:<16}{row.method:<14}{'yes' if row.active else 'no':<8}"
                f"{'yes' if row.merged else 'no':<8}{row.params:>18,}"
                f"{self.percent(row):>10.4f}%{row.targets:>9}"
            )
        lines.append(f"base model parameters: {self.base_params:,}")
        return "\n".join(lines)


class AdaptedModel(nn.Module):
    """A model plus named adapters of any installed methods.

    Attribute lookups not found on the wrapper fall through to the wrapped model, so
    ``adapted.config`` or ``adapted.generate`` work for HF models. The instance's class is
    ``Adapted<WrappedClass>``, a subclass made per wrapped class (:mod:`peftreg.signature`), whose
    ``forward`` shows the wrapped model's signature to frameworks that read it (``Trainer``).

    :meth:`state_dict` holds the adapters' tensors only (saved-module copies included): the
    frozen base is not state a checkpoint needs, and it may hold tied tensors that safetensors
    refuses to write twice. ``model.model.state_dict()`` is the whole model. ``load_state_dict``
    accepts such an adapters-only dict, also with ``strict=True``: a missing frozen base tensor
    is not reported, a missing adapter tensor is.

    Args:
        model: the model to adapt; it is modified in place (adapter slots are inserted).
        registry: where methods and model families come from (default: installed plugins).
    """

    def __init__(self, model: nn.Module, *, registry: Registry | None = None) -> None:
        super().__init__()
        if isinstance(model, AdaptedModel):
            raise AdapterError("the model is already an AdaptedModel; add adapters to it")
        self.model = model
        self._registry = registry if registry is not None else default_registry()
        self._family = self._registry.describe_model(model)
        self._records: dict[str, AdapterRecord] = {}
        # Adapters prepared for hot-swapping: their tensors may be padded past their config.
        self._hotswap_ready: set[str] = set()
        self._active: list[str] = []
        self._merged: list[str] = []
        self._disabled = False
        self.register_load_state_dict_post_hook(_forgive_missing_base_keys)
        if not hasattr(type(self), SIGNATURE_BASE):
            self.__class__ = signature_class(type(self), type(model))

    def __getstate__(self) -> dict[str, Any]:
        # The registry holds plugin modules, which cannot be pickled; a copy re-resolves it.
        state = self.__dict__.copy()
        state["_registry"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.__dict__.get("_registry") is None:
            self.__dict__["_registry"] = default_registry()

    def __deepcopy__(self, memo: dict[int, Any]) -> AdaptedModel:
        memo[id(self._registry)] = self._registry  # share the registry, copy everything else
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy.deepcopy(value, memo)
        return clone

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, adapter_names: Sequence[str | None] | None = None,
                **kwargs: Any) -> Any:
        """Call the wrapped model; ``adapter_names`` (one per batch row) runs it as
        :meth:`per_row_adapters` does, and is not passed on to the model."""
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self.per_row_adapters(adapter_names):
            return self.model(*args, **kwargs)

    # -- checkpoint state ----------------------------------------------------------------------

    def _adapter_module_paths(self) -> list[str]:
        names = {id(m): n for n, m in self.named_modules(remove_duplicate=False)}
        return [names[id(slot.adapter_module(name))]
                for _, slot in iter_slots(self.model) for name in slot.adapter_names()]

    # The overloads are nn.Module's, so this stays a valid override without an ignore.
    @overload
    def state_dict(self, *, destination: _D, prefix: str = ..., keep_vars: bool = ...
                   ) -> _D: ...

    @overload
    def state_dict(self, *, prefix: str = ..., keep_vars: bool = ...) -> dict[str, Any]: ...

    def state_dict(self, *args: Any, destination: Any = None,
                   prefix: str = "", keep_vars: bool = False) -> Any:
        """The adapters' tensors (every adapter, saved-module copies included), keyed as in
        ``nn.Module.state_dict``; the frozen base is left out (``model.model.state_dict()`` has
        it). What ``Trainer`` writes as a checkpoint and reads back on resume."""
        if args:  # torch's deprecated positional form: (destination, prefix, keep_vars)
            state = super().state_dict(*args)
            prefix = args[1] if len(args) > 1 else ""
        else:
            state = super().state_dict(destination=destination, prefix=prefix,
                                       keep_vars=keep_vars)
        keep = tuple(f"{prefix}{path}." for path in self._adapter_module_paths())
        for key in [k for k in state if k.startswith(prefix) and not k.startswith(keep)]:
            del state[key]
        return state

    def _base_state_keys(self) -> set[str]:
        keep = tuple(f"{path}." for path in self._adapter_module_paths())
        return {k for k in nn.Module.state_dict(self, keep_vars=True) if not k.startswith(keep)}

    # -- introspection -------------------------------------------------------------------------

    @property
    def registry(self) -> Registry:
        """The registry this wrapper resolves methods with."""
        return self._registry

    @property
    def family(self) -> ModelFamily | None:
        """The model's structure as described by a family plugin, if any."""
        return self._family

    @property
    def adapters(self) -> dict[str, AdapterRecord]:
        """Every adapter by name (a copy of the mapping)."""
        return dict(self._records)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapter names, in application order."""
        return list(self._active)

    @property
    def merged_adapters(self) -> list[str]:
        """Adapters currently folded into the base weights, in merge order."""
        return list(self._merged)

    def record(self, name: str) -> AdapterRecord:
        """The record of adapter ``name``; raises :class:`AdapterError` if unknown."""
        record = self._records.get(name)
        if record is None:
            raise AdapterError(
                f"no adapter named {name!r}; adapters: {', '.join(self._records) or 'none'}"
            )
        return record

    # -- adding --------------------------------------------------------------------------------

    def add_adapter(
        self,
        name: str,
        config: MethodConfig,
        *,
        activate: bool = True,
        trainable: bool = True,
    ) -> AdapterRecord:
        """Create adapter ``name`` from ``config`` with freshly initialised weights.

        Args:
            name: new adapter name (letters, digits, ``_``, ``-``).
            config: a config of any installed method.
            activate: make it the (only) active adapter.
            trainable: let its parameters train when active.

        Raises:
            AdapterError: the name is invalid or taken, or adapters are merged.
            TargetNotFoundError: the config selects nothing in the model.
            UnknownMethodError: no installed method reads this config.
        """
        check_adapter_name(name)
        if name in self._records:
            raise AdapterError(f"an adapter named {name!r} already exists; delete it first")
        if self._merged:
            raise AdapterError("adapters are merged into the weights; unmerge before adding")
        if not isinstance(config, MethodConfig):
            raise ConfigError(f"expected a MethodConfig, got {type(config).__name__}")
        method = self._registry.method_for(config)
        if not self._records:
            for p in self.model.parameters():
                p.requires_grad_(False)
        try:
            targets = method.inject(self.model, name, config, self._family)
            check_no_base_tensors(self.model, name, method.name)
            saved = self._add_saved_modules(name, config, targets)
        except BaseException:
            self._purge(name)
            raise
        record = AdapterRecord(name, config, method, list(targets), saved, trainable)
        self._records[name] = record
        if activate or len(self._records) == 1:
            self._active = [name]
        self._apply_state()
        return record

    def _add_saved_modules(self, name: str, config: MethodConfig, targets: list[str]) -> list[str]:
        paths: list[str] = []
        base_modules = list(iter_base_modules(self.model))
        for entry in config.modules_to_save:
            hits = [p for p, _ in base_modules if p == entry or p.endswith("." + entry)]
            # A module inside a trainable copy is reported too; keep the outermost match only.
            hits = [p for p in hits if not any(p.startswith(o + ".") for o in hits)]
            if not hits:
                raise TargetNotFoundError(
                    f"modules_to_save entry {entry!r} matches no module; top-level modules: "
                    f"{', '.join(n for n, _ in self.model.named_children())}"
                )
            for path in hits:
                clash = [t for t in targets if t == path or t.startswith(path + ".")
                         or path.startswith(t + ".")]
                if clash:
                    raise ConfigError(
                        f"modules_to_save entry {entry!r} ({path}) overlaps adapted modules "
                        f"{clash[:5]}; a module is either adapted or saved whole"
                    )
                slot = get_module(self.model, path)
                if not isinstance(slot, TrainableCopy):
                    if isinstance(slot, AdapterSlot):
                        raise ConfigError(f"modules_to_save entry {path!r} is already adapted")
                    slot = TrainableCopy(slot)
                    replace_module(self.model, path, slot)
                slot.add_copy(name)
                paths.append(path)
        return paths

    # -- switching -----------------------------------------------------------------------------

    def set_active(self, names: str | Sequence[str]) -> None:
        """Make ``names`` the active adapters (applied in the given order).

        Only active adapters compute; only active, trainable adapters have
        ``requires_grad=True``.
        """
        wanted = [names] if isinstance(names, str) else list(names)
        for name in wanted:
            self.record(name)
        if len(set(wanted)) != len(wanted):
            raise AdapterError(f"adapter names repeat in {wanted}")
        if self._merged and wanted != self._active:
            raise AdapterError("adapters are merged into the weights; unmerge before switching")
        self._active = wanted
        self._apply_state()

    @contextlib.contextmanager
    def per_row_adapters(self, names: Sequence[str | None]) -> Iterator[None]:
        """Inside the ``with`` block, row ``i`` of every batch uses adapter ``names[i]`` alone.

        One batch serves several LoRA adapters over the shared base model (S-LoRA / Punica
        batching): each adapted layer computes its base output once and adds every row's own
        low-rank update in one batched op. ``None`` means the base model for that row. Each row's
        result equals running the model with only that adapter active; a layer the row's adapter
        does not adapt gives the base output. The active-adapter setting is ignored meanwhile.
        With gradients enabled and trainable adapters, the batch trains every row's adapter
        at once: each adapter gets the gradient of its own rows, as if trained alone on them,
        with its own LoRA dropout on its rows in training mode.

        Works for any model whose adapted layers see the batch as their first input dimension
        (or as flattened rows). Also available as ``model(..., adapter_names=[...])``.

        Args:
            names: one adapter name (or ``None``) per batch row.

        Raises:
            AdapterError: an unknown adapter name, or no names.
            UnsupportedOperationError: a named adapter is not LoRA on Linear layers or has
                ``modules_to_save``, or adapters are merged.
        """
        rows = tuple(names)
        if not rows:
            raise AdapterError("per_row_adapters needs one adapter name (or None) per row")
        if self._merged:
            raise UnsupportedOperationError(
                f"per-row adapters need unmerged weights, but {self._merged} are merged; call "
                "unmerge() first")
        named = list(dict.fromkeys(n for n in rows if n is not None))
        records = [self.record(name) for name in named]
        # One walk over the model for every named adapter: a walk per adapter made this setup
        # quadratic in the number of adapters (2 s of a 64-adapter training step).
        slots = list(iter_slots(self.model))
        modules: dict[str, list[tuple[str, AdapterSlot, nn.Module]]] = {n: [] for n in named}
        for path, slot in slots:
            for name in slot.adapter_names():
                if name in modules:
                    modules[name].append((path, slot, slot.adapter_module(name)))
        for record in records:
            self._check_per_row(record, modules[record.name])
        hosts = [slot for _, slot in slots if isinstance(slot, AdapterHost)]
        plan = RowPlan(rows)  # one index per batch, shared by every layer
        for host in hosts:
            host.row_adapters = plan
        # Every named trainable adapter trains on its rows, active or not. The flags stay set
        # after the block, because the backward runs after it and autograd skips leaves that
        # no longer require grad; the next change of the active adapters resets them.
        for name in named:
            if self._records[name].trainable:
                for _, _, module in modules[name]:
                    for p in module.parameters():
                        p.requires_grad_(True)
        try:
            yield
        finally:
            for host in hosts:
                host.row_adapters = None

    def _check_per_row(self, record: AdapterRecord,
                       modules: list[tuple[str, AdapterSlot, nn.Module]]) -> None:
        method = record.method.name
        if record.saved_modules:
            raise UnsupportedOperationError(
                f"adapter {record.name!r} ({method}) cannot be served per row: it trains whole "
                f"modules ({', '.join(record.saved_modules)}, modules_to_save)")
        for path, slot, module in modules:
            if not (isinstance(slot, AdapterHost) and isinstance(module, LowRankAdapter)
                    and module.low_rank_factors() is not None):
                raise UnsupportedOperationError(
                    f"adapter {record.name!r} ({method}) cannot be served per row: only LoRA "
                    f"adapters on Linear layers can, and {path or 'the model'} holds a "
                    f"{type(module).__name__}")

    def set_trainable(self, name: str, trainable: bool = True) -> None:
        """Allow or forbid training of adapter ``name``."""
        self.record(name).trainable = trainable
        self._apply_state()

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the base model alone inside the ``with`` block (merged adapters are unfolded)."""
        merged = list(self._merged)
        for name in reversed(merged):
            self._unmerge_one(name)
        self._disabled = True
        self._apply_state()
        try:
            yield
        finally:
            self._disabled = False
            self._apply_state()
            for name in merged:
                self._merge_one(name)

    def _apply_state(self) -> None:
        for _, slot in iter_slots(self.model):
            slot.set_active(self._active)
            slot.set_disabled(self._disabled)
        for record in self._records.values():
            train = record.trainable and record.name in self._active
            for p in self.adapter_parameters(record.name):
                p.requires_grad_(train)

    # -- parameters and state ------------------------------------------------------------------

    def _adapter_modules(self, name: str) -> Iterator[tuple[str, AdapterSlot, nn.Module]]:
        for path, slot in iter_slots(self.model):
            if name in slot.adapter_names():
                yield path, slot, slot.adapter_module(name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Every parameter belonging to adapter ``name`` (saved modules included)."""
        return [p for _, _, module in self._adapter_modules(name) for p in module.parameters()]

    def adapter_state_dict(self, name: str, *, unsaved: bool = False
                           ) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors keyed as in a saved file (no adapter name in keys).

        With ``unsaved``, instead the tensors it holds but does not save (non-persistent
        buffers, such as the initial factors a base-rewriting LoRA init keeps), under the keys
        they would have."""
        self.record(name)
        state: dict[str, torch.Tensor] = {}
        for path, slot, module in self._adapter_modules(name):
            prefix = slot.saved_key_prefix(path)
            tensors = module.state_dict()
            if unsaved:
                tensors = {k: b for k, b in module.named_buffers() if k not in tensors}
            for key, tensor in tensors.items():
                full = f"{prefix}.{key}" if prefix else key
                if full in state:
                    raise AdapterError(f"two tensors of adapter {name!r} share the key {full!r}")
                state[full] = tensor
        return state

    def base_parameter_count(self) -> int:
        """Parameters of the model without any adapter or saved-module copy.

        A tensor shared by several modules (tied input and output embeddings) counts once.
        """
        total = 0
        seen: set[int] = set()
        for _, module in iter_base_modules(self.model):
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
            weight = getattr(module, "weight", None)
            if (isinstance(weight, torch.Tensor) and not isinstance(weight, nn.Parameter)
                    and hasattr(module, "in_features") and hasattr(module, "out_features")):
                # A quantized layer keeps its weight as packed buffers: count the logical size.
                out_f, in_f = access_for(module).shape
                total += out_f * in_f
        return total

    def summary(self) -> AdapterSummary:
        """Trainable parameter counts per adapter, with percentages of the base model."""
        rows = []
        for name, record in self._records.items():
            adapter = saved = 0
            for path, _, module in self._adapter_modules(name):
                count = sum(p.numel() for p in module.parameters())
                if path in record.saved_modules:
                    saved += count
                else:
                    adapter += count
            rows.append(AdapterSummaryRow(
                name=name, method=record.method.name, active=name in self._active,
                merged=name in self._merged, trainable=record.trainable,
                adapter_params=adapter, saved_module_params=saved,
                targets=len(record.targets),
            ))
        return AdapterSummary(self.base_parameter_count(), tuple(rows))

    # -- deleting ------------------------------------------------------------------------------

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` and its parameters (unmerging it first if merged).

        Adapters merged after it are unmerged first (a layer unfolds newest first) and merged
        again once it is gone, where the stacking contract allows; those it does not allow stay
        unmerged.
        """
        self.record(name)
        remerge: list[str] = []
        if name in self._merged:
            remerge = self._merged[self._merged.index(name) + 1:]
            self.unmerge([name])
        self._purge(name)
        del self._records[name]
        self._hotswap_ready.discard(name)
        self._active = [n for n in self._active if n != name]
        self._apply_state()
        for other in remerge:
            with contextlib.suppress(UnsupportedOperationError):
                self._merge_one(other)

    def _purge(self, name: str) -> None:
        for path, slot in list(iter_slots(self.model)):
            if name in slot.adapter_names():
                slot.remove_adapter(name)
            if not slot.adapter_names():
                slot.detach(self.model, path)

    # -- merging -------------------------------------------------------------------------------

    def _check_mergeable(self, name: str) -> PEFTMethod:
        method = self.record(name).method
        if not method.capabilities.mergeable:
            raise UnsupportedOperationError(
                f"adapter {name!r} uses method {method.name!r}, which cannot be merged into the "
                "base weights"
            )
        return method

    def _merge_one(self, name: str) -> None:
        self._check_mergeable(name).merge(self.model, name)
        self._merged.append(name)

    def _unmerge_one(self, name: str) -> None:
        self._check_mergeable(name).unmerge(self.model, name)
        self._merged.remove(name)

    def merge(self, names: Sequence[str] | None = None, *,
              keep_quantized: bool = False) -> QuantizedMergeReport | None:
        """Fold adapters (default: the active ones) into the base weights.

        Adapters merge in their application (active) order whatever order ``names`` lists,
        as the stacking contract requires (see :meth:`peftreg.host.AdapterHost.merge`).

        Args:
            names: the adapters to merge.
            keep_quantized: on a 4-bit base, quantize the merged weight again (same block
                size and double quantization) instead of making the layer dense; the original
                codes are kept, so :meth:`unmerge` restores them exactly. The requantization
                error is returned.

        Returns:
            With ``keep_quantized``, a :class:`QuantizedMergeReport` of the error the
            requantization added, per 4-bit layer and in total; otherwise ``None``.

        Raises:
            UnsupportedOperationError: one of them belongs to a method that cannot merge, or
                the stacking contract refuses the combination; nothing is merged then.
        """
        targets = list(self._active if names is None else names)
        for name in targets:
            self._check_mergeable(name)
            if name not in self._active:
                raise AdapterError(f"adapter {name!r} is not active; only active ones merge")
        hosts = [(path, slot) for path, slot in iter_slots(self.model)
                 if isinstance(slot, AdapterHost)]
        for _, host in hosts:
            host.keep_quantized = keep_quantized
        done: list[str] = []
        try:
            for name in sorted(targets, key=self._active.index):
                if name not in self._merged:
                    self._merge_one(name)
                    done.append(name)
        except BaseException:
            for name in reversed(done):
                self._unmerge_one(name)
            raise
        finally:
            for _, host in hosts:
                host.keep_quantized = False
        if not keep_quantized:
            return None
        return QuantizedMergeReport.of({path: host.requantize_errors[name]
                                        for path, host in hosts for name in targets
                                        if name in host.requantize_errors})

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        """Undo :meth:`merge` (default: every merged adapter), newest first.

        Merged adapters unfold in reverse merge order, so unmerging one also unmerges every
        adapter merged after it (each layer's merged adapters lead its active order).
        """
        targets = set(self._merged if names is None else names)
        hits = [i for i, n in enumerate(self._merged) if n in targets]
        if not hits:
            return
        for name in reversed(self._merged[hits[0]:]):
            self._unmerge_one(name)

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters and return the plain model without any adapter module.

        Active adapters' saved-module copies replace the originals. The wrapper holds no
        adapters afterwards.
        """
        self.merge()
        for path, slot in sorted(iter_slots(self.model), key=lambda ps: -ps[0].count(".")):
            slot.detach(self.model, path, keep_trained=True)
        return self._release()

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original model."""
        self.unmerge()
        for path, slot in sorted(iter_slots(self.model), key=lambda ps: -ps[0].count(".")):
            slot.detach(self.model, path)
        return self._release()

    def _release(self) -> nn.Module:
        self._records.clear()
        self._active = []
        self._merged = []
        for p in self.model.parameters():
            p.requires_grad_(True)
        return self.model

    # -- saving --------------------------------------------------------------------------------

    def save_adapter(
        self,
        directory: str | Path,
        name: str | None = None,
        *,
        format: Literal["peftreg", "peft"] = "peftreg",
        task_type: str | None = None,
        as_method: str | None = None,
        rank: int | None = None,
        original_base: bool = False,
    ) -> Path:
        """Save one adapter (default: the only active one) to ``directory``.

        Args:
            directory: the target directory.
            name: the adapter to save.
            format: ``"peftreg"`` (see :func:`peftreg.io.adapter_dir.save_adapter`) or
                ``"peft"``, Hugging Face PEFT's layout (see
                :func:`peftreg.io.peft_format.save_peft_adapter`): adapter ``default`` goes in
                ``directory`` itself, any other adapter ``X`` in ``directory/X``.
            task_type: PEFT's ``task_type`` (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...); only for
                ``format="peft"``.
            as_method, rank: with ``format="peft"``, write a mergeable adapter as an adapter of
                method ``as_method`` (``"lora"``) of rank ``rank``, refitted to the updates it
                makes, so that servers that only run that method can serve it; the refit's
                error is recorded in the config (see :func:`peftreg.io.refit.save_refitted`).
            original_base: with ``format="peft"``, write the adapter so that it applies to the
                base model as it was before the adapter was created, for a method whose
                initialisation rewrote the base weights (LoRA's PiSSA and OLoRA: a plain LoRA
                of twice the rank, as PEFT's ``path_initial_model_for_weight_conversion``
                writes it). Other adapters are written as they are.

        Returns:
            The directory the adapter's files were written to.
        """
        name = name or self._single_active()
        if name in self._hotswap_ready:
            raise AdapterError(
                f"adapter {name!r} is prepared for hot-swapping (its tensors are padded to the "
                "largest rank it can take), so its file would not match its config; save the "
                "adapters you swap into it, or the model before prepare_hotswap")
        if (as_method is None) != (rank is None):
            raise AdapterError("as_method and rank go together: the method to refit the "
                               "adapter as, and the rank of the refit")
        if as_method is not None and rank is not None:
            if format != "peft":
                raise AdapterError("as_method writes PEFT's format; pass format='peft'")
            return save_refitted(self, directory, name, method=as_method, rank=rank,
                                 task_type=task_type)[0]
        if original_base and (format != "peft" or as_method is not None):
            raise AdapterError("original_base writes PEFT's format (format='peft'), without "
                               "as_method")
        if format == "peft":
            return save_peft_adapter(self, directory, name, task_type=task_type,
                                     original_base=original_base)
        if format != "peftreg":
            raise AdapterError(f"unknown adapter format {format!r}; use 'peftreg' or 'peft'")
        if task_type is not None:
            raise AdapterError("task_type is written only in PEFT's format (format='peft')")
        return save_adapter(self, directory, name)

    def load_adapter(
        self,
        directory: str | Path,
        name: str | None = None,
        *,
        activate: bool = True,
        trainable: bool = False,
        method: str | None = None,
    ) -> AdapterRecord:
        """Load a saved adapter as ``name`` (default: its saved name); see
        :func:`peftreg.io.load.load_adapter`. A Hugging Face PEFT adapter directory
        (``adapter_config.json``, no ``adapter.json``) is recognised and converted on the way;
        ``method`` reads it as another method that reads the same PEFT type (``"qlora"``)."""
        return load_adapter(self, directory, name, activate=activate, trainable=trainable,
                            method=method)

    def prepare_hotswap(self, name: str, max_rank: int) -> None:
        """Make adapter ``name`` ready for :meth:`hotswap_adapter` with saved adapters of rank
        up to ``max_rank`` (LoRA: factors zero-padded to ``max_rank``, the scale held in a
        tensor). Call it before ``torch.compile``; it changes no output."""
        record = self.record(name)
        record.method.prepare_hotswap(self.model, name, max_rank)
        self._hotswap_ready.add(name)

    def hotswap_adapter(self, directory: str | Path, name: str) -> AdapterRecord:
        """Replace the weights of the loaded adapter ``name`` by those saved in ``directory``
        (either format), in place, so that a ``torch.compile``d model runs the new adapter
        without recompiling (PEFT's ``hotswap_adapter``, for every method that can).

        The saved adapter must be of the same method and adapt the same modules; a rank or
        scale change needs :meth:`prepare_hotswap` first.

        Raises:
            UnsupportedOperationError: it does not fit in place; the adapter is unchanged.
            AdapterFileError: the directory fails its format's checks.
        """
        record = self.record(name)
        saved = read_any(directory, self.registry, model=self.model, family=self._family)
        if saved.config.method != record.method.name:
            raise UnsupportedOperationError(
                f"{directory}: a {saved.config.method} adapter cannot replace the weights of "
                f"{record.method.name} adapter {name!r}")
        if name in self._merged:
            raise UnsupportedOperationError(f"adapter {name!r} is merged; unmerge it before "
                                            "swapping its weights")
        record.method.hotswap(self.model, name, saved.config, saved.tensors,
                              self.adapter_state_dict(name))
        self._records[name] = dataclasses.replace(record, config=saved.config)
        return self._records[name]

    def _single_active(self) -> str:
        if len(self._active) != 1:
            raise AdapterError(
                f"name the adapter to save: {len(self._active)} adapters are active"
            )
        return self._active[0]


def _forgive_missing_base_keys(module: nn.Module, incompatible: Any) -> None:
    # load_state_dict post hook: an adapters-only dict (what state_dict returns) lacks the frozen
    # base by design. The keys are those of the outermost load call, so this wrapper may sit
    # below a prefix (DDP's "module."): match a base key at any dotted suffix.
    if not isinstance(module, AdaptedModel) or not incompatible.missing_keys:
        return
    base = module._base_state_keys()

    def is_base(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[i:]) in base for i in range(len(parts)))

    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not is_base(k)]


def adapt(
    model: nn.Module,
    config: MethodConfig,
    adapter_name: str = "default",
    *,
    registry: Registry | None = None,
) -> AdaptedModel:
    """Wrap ``model`` and add one adapter: the usual first call.

    Args:
        model: a ``torch.nn.Module`` (plain or HF ``transformers``); modified in place.
        config: the adapter's method config, e.g. ``LoraConfig(r=8, target_modules=[...])``.
        adapter_name: its name.
        registry: method registry (default: installed plugins).

    Returns:
        The :class:`AdaptedModel`, with the adapter active and trainable.
    """
    adapted = AdaptedModel(model, registry=registry)
    adapted.add_adapter(adapter_name, config)
    return adapted


def host_for(model: nn.Module, path: str) -> AdapterHost:
    """Return the :class:`AdapterHost` at ``path``, wrapping the module there if needed.

    Method plugins call this from :meth:`PEFTMethod.inject`.
    """
    module = get_module(model, path)
    if isinstance(module, AdapterHost):
        return module
    if isinstance(module, AdapterSlot):
        raise ConfigError(f"module {path!r} is saved whole by another adapter; cannot adapt it")
    host = AdapterHost(module)
    replace_module(model, path, host)
    return host
