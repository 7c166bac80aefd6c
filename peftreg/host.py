# SPDX-License-Identifier: Apache-2.0
"""Modules that hold adapters inside a model.

Methods never subclass a base layer (HF PEFT's ``LoraLayer`` style); they contribute small
per-adapter modules, and the core wraps the targeted base module in one :class:`AdapterHost` that
runs whichever adapters are active. Several methods can therefore sit on one base module, and
switching, disabling, deleting and merging work the same way for all of them.

Everything that holds adapters is an :class:`AdapterSlot`, so the model wrapper can walk a model
and address every adapter by name without knowing any method.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftreg.base_access import BaseAccess, dense_linear
from peftreg.errors import TargetNotFoundError, UnsupportedOperationError

if TYPE_CHECKING:
    from peftreg.row_adapters import RowPlan


def _child(module: nn.Module, name: str) -> nn.Module | None:
    """``module``'s child ``name``, looking through an adapter slot into the module it wraps:
    a module's path stays the same whether or not an enclosing module holds adapters."""
    child = module._modules.get(name)
    if child is None and isinstance(module, AdapterSlot):
        inner = module.wrapped()
        if inner is not None:
            child = inner._modules.get(name)
    return child


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (``""`` is the model itself), seeing through slots."""
    module = model
    for name in path.split(".") if path else ():
        child = _child(module, name)
        if child is None:
            raise TargetNotFoundError(f"model has no module {path!r}")
        module = child
    return module


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``path`` in ``model`` (inside a slot's wrapped module if that is
    where the path leads)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = get_module(model, parent_path)
    if isinstance(parent, AdapterSlot) and leaf not in parent._modules:
        inner = parent.wrapped()
        if inner is not None:
            parent = inner
    setattr(parent, leaf, new)


class LayerAdapter(nn.Module):
    """One adapter's trainable part on one base module (for example LoRA's A and B).

    A method plugin subclasses this and overrides the hooks it needs. The host applies, in
    order: every active adapter's :meth:`adapt_input`, the base module, then every active
    adapter's :meth:`adapt_output`. The full stacking contract (what each adapter receives, how
    merging composes) is in :meth:`AdapterHost.forward` and :meth:`AdapterHost.merge`.
    """

    def changes_input(self) -> bool:
        """Whether :meth:`adapt_input` is not the identity (the stacking contract uses it).

        The default says so whenever a subclass overrides :meth:`adapt_input`; override this
        when the override is the identity for some instances (IA3 scales only feed-forward
        inputs).
        """
        return type(self).adapt_input is not LayerAdapter.adapt_input

    def reads_base(self) -> bool:
        """Whether the adapter's output depends on the base's stored weights (it holds a
        :class:`~peftreg.base_access.BaseAccess`), so merging an adapter before it would change
        what it computes."""
        return any(isinstance(v, BaseAccess) for v in vars(self).values())

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        """Transform the base module's input (identity by default)."""
        return x

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Transform the base module's output ``y`` given its input ``x`` (identity by default)."""
        return y

    def fused_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Compute base plus this adapter in one step, or return ``None`` to use the hooks.

        Called only when this adapter is the only active, unmerged adapter on the host.
        """
        return None

    def merge_into(self, base: nn.Module) -> None:
        """Fold this adapter into ``base``'s weights in place."""
        raise UnsupportedOperationError(f"{type(self).__name__} cannot be merged")

    def unmerge_from(self, base: nn.Module) -> None:
        """Undo :meth:`merge_into`."""
        raise UnsupportedOperationError(f"{type(self).__name__} cannot be unmerged")


class AdapterSlot(nn.Module):
    """Anything in a model that holds per-adapter modules addressed by adapter name.

    Attributes:
        adapters: one module per adapter name.
        active: the active adapter names, in application order.
        disabled: every adapter is bypassed while true.
    """

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False

    def adapter_names(self) -> list[str]:
        """Names of the adapters this slot holds."""
        return list(self.adapters.keys())

    def set_active(self, names: Sequence[str]) -> None:
        """Make ``names`` (in order) the active adapters; names this slot lacks are ignored."""
        self.active = tuple(n for n in names if n in self.adapters)

    def set_disabled(self, disabled: bool) -> None:
        """Bypass every adapter while ``disabled`` is true."""
        self.disabled = disabled

    def remove_adapter(self, name: str) -> None:
        """Drop the adapter ``name`` and its parameters."""
        del self.adapters[name]
        self.active = tuple(n for n in self.active if n != name)

    def adapter_module(self, name: str) -> nn.Module:
        """The module whose parameters make up adapter ``name`` here (its saved state)."""
        return self.adapters[name]

    def unwrap(self) -> nn.Module:
        """The module that replaces this slot when adapters are unloaded."""
        raise NotImplementedError

    def wrapped(self) -> nn.Module | None:
        """The model's own module this slot stands in for (what target selection sees), or
        ``None`` for a slot that was added to the model rather than wrapped around a module."""
        raise NotImplementedError

    def saved_key_prefix(self, path: str) -> str:
        """Prefix of this slot's tensor names in a saved adapter (its path by default)."""
        return path

    def detach(self, model: nn.Module, path: str, *, keep_trained: bool = False) -> None:
        """Take this slot out of ``model`` (where it sits at ``path``).

        Args:
            model: the root model.
            path: this slot's path in ``model``.
            keep_trained: put back the trained replacement (:meth:`unwrap`) rather than the
                original module (:meth:`wrapped`).
        """
        replacement = self.unwrap() if keep_trained else self.wrapped()
        if replacement is None:
            raise UnsupportedOperationError(f"the adapter slot at {path!r} wraps no module")
        replace_module(model, path, replacement)


class AdapterHost(AdapterSlot):
    """Wraps a base module and applies the active :class:`LayerAdapter` s around it.

    Attributes:
        base: the original module (frozen by the model wrapper).
        adapters: one :class:`LayerAdapter` per adapter name.
    """

    base: nn.Module

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.merged: list[str] = []
        # Merging into a 4-bit base: False makes the layer the dense layer it computes; True
        # requantizes the merged weight and keeps the codes it replaced, so unmerge restores
        # them exactly (AdaptedModel.merge(keep_quantized=True) sets it for the merge).
        self.keep_quantized = False
        self.requantize_errors: dict[str, dict[str, float]] = {}
        self._replaced_bases: list[tuple[str, nn.Module]] = []
        # The batch's per-row plan while AdaptedModel.per_row_adapters is in effect (else
        # None); peftreg.row_adapters owns the rest of that mode's state.
        self.row_adapters: RowPlan | None = None

    # -- AdapterSlot ---------------------------------------------------------------------------

    def remove_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        super().remove_adapter(name)

    def unwrap(self) -> nn.Module:
        return self.base

    def wrapped(self) -> nn.Module:
        return self.base

    # -- merging -------------------------------------------------------------------------------

    def merge(self, name: str, where: str = "") -> None:
        """Fold adapter ``name`` into the base weights (no-op if already merged).

        The stacking contract: the merged adapters of a layer are always a leading part of its
        active order, folded in that order, so that the layer computes what it computed
        unmerged. Merging is refused (:class:`UnsupportedOperationError`, nothing changed) when

        * an active adapter before ``name`` is not merged (merge in application order);
        * ``name`` transforms the layer's input and another active adapter follows it: the
          later one reads the transformed input, which a merged base no longer exposes;
        * an unmerged active adapter after ``name`` reads the base weights (through
          :class:`~peftreg.base_access.BaseAccess`): folding ``name`` would change them.

        Args:
            name: the adapter to merge.
            where: the layer's path, for error messages.
        """
        if name in self.merged:
            return
        adapter: LayerAdapter = self.adapters[name]  # type: ignore[assignment]
        problem = self.merge_problem(name)
        if problem:
            layer = f" on {where!r}" if where else ""
            raise UnsupportedOperationError(f"cannot merge adapter {name!r}{layer}: {problem}")
        if BaseAccess(self).quantized and self.keep_quantized:
            self._merge_requantized(name, adapter)
        else:
            if BaseAccess(self).quantized:
                # Folding an update into packed 4-bit codes is impossible: the layer becomes the
                # dense layer it computes (unmerge keeps it dense; see docs/plugins.md).
                self.base = dense_linear(self.base)
            with torch.no_grad():
                adapter.merge_into(self.base)
        self.merged.append(name)

    def _merge_requantized(self, name: str, adapter: LayerAdapter) -> None:
        """Merge into a dense copy of the 4-bit base, quantize the result again with the same
        settings, and keep the replaced base for :meth:`unmerge`; record the error the
        requantization adds (against the exact merged weight)."""
        original = self.base
        dense = dense_linear(original)
        with torch.no_grad():
            adapter.merge_into(dense)
            requantized = type(original).from_linear(  # type: ignore[attr-defined]
                dense, blocksize=original.blocksize, double_quant=original.double_quant,
                compute_dtype=original.compute_dtype)
            exact = dense.weight.double()
            error = requantized.dequantize(torch.float32).double() - exact
        requantized.requires_grad_(False)
        self.requantize_errors[name] = {
            "max_abs_error": error.abs().max().item(),
            "squared_error": error.square().sum().item(),
            "squared_norm": exact.square().sum().item(),
        }
        self._replaced_bases.append((name, original))
        self.base = requantized

    def merge_problem(self, name: str) -> str | None:
        """Why :meth:`merge` would refuse ``name`` now (``None`` when it would not)."""
        adapter: LayerAdapter = self.adapters[name]  # type: ignore[assignment]
        order = list(self.active)
        if name not in order:
            return "it is not active on this layer"
        position = order.index(name)
        pending = [n for n in order[:position] if n not in self.merged]
        if pending:
            return (f"adapter {pending[0]!r} comes before it on this layer and is not merged; "
                    "merge adapters in their application order (the merged adapters of a layer "
                    "must lead its order)")
        later = order[position + 1:]
        if later and adapter.changes_input():
            return (f"it transforms the layer's input and {later[0]!r} comes after it, which "
                    "reads that transformed input; a merged base would hand it the "
                    "untransformed one")
        readers = [n for n in later if self.adapters[n].reads_base()]  # type: ignore[operator]
        if readers:
            return (f"adapter {readers[0]!r} after it reads the base weights, which the merge "
                    "would change; merge it first (put it earlier in the active order) or keep "
                    "both unmerged")
        return None

    def unmerge(self, name: str) -> None:
        """Undo :meth:`merge` for ``name``; adapters merged after it are unmerged first."""
        if name not in self.merged:
            return
        while self.merged:
            last = self.merged.pop()
            adapter: LayerAdapter = self.adapters[last]  # type: ignore[assignment]
            if self._replaced_bases and self._replaced_bases[-1][0] == last:
                # A requantized merge: the kept codes come back exactly; the adapter's own
                # unmerge runs on a throwaway dense copy, to clear any state it kept.
                self.base = self._replaced_bases.pop()[1]
                self.requantize_errors.pop(last, None)
                with torch.no_grad():
                    adapter.unmerge_from(dense_linear(self.base))
            else:
                with torch.no_grad():
                    adapter.unmerge_from(self.base)
            if last == name:
                break

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run the active, unmerged adapters around the (possibly merged) base.

        With active unmerged adapters ``a_1 .. a_n`` in order: ``x_n = a_n.adapt_input(...
        a_1.adapt_input(x))``, ``y_0 = base(x_n)``, ``y_i = a_i.adapt_output(x_n, y_{i-1})``.
        Every adapter's ``adapt_output`` receives the input the base received. An adapter that
        reads its base through :class:`~peftreg.base_access.BaseAccess` sees the base as stored,
        i.e. with the merged adapters folded in and without the unmerged ones.
        """
        if self.disabled:
            if self.merged:
                raise UnsupportedOperationError(
                    "adapters are merged into the weights; unmerge them before disabling"
                )
            return self.base(x, *args, **kwargs)
        if self.row_adapters is not None:
            from peftreg.row_adapters import per_row_forward

            return per_row_forward(self, self.row_adapters, x, *args, **kwargs)
        running: list[LayerAdapter] = [
            self.adapters[n] for n in self.active if n not in self.merged]  # type: ignore[misc]
        if not running:
            return self.base(x, *args, **kwargs)
        if len(running) == 1 and not args and not kwargs:
            fused = running[0].fused_forward(self.base, x)
            if fused is not None:
                return fused
        for adapter in running:
            x = adapter.adapt_input(x)
        y = self.base(x, *args, **kwargs)
        for adapter in running:
            y = adapter.adapt_output(x, y)
        return y

    def extra_repr(self) -> str:
        return f"active={list(self.active)}, merged={self.merged}, disabled={self.disabled}"


class TrainableCopy(AdapterSlot):
    """Keeps a frozen original module and one trainable copy of it per adapter.

    This is how ``modules_to_save`` works: a classification head trained with an adapter is saved
    and switched with that adapter. The first active adapter that has a copy is used.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original

    def add_copy(self, name: str) -> nn.Module:
        """Create adapter ``name``'s trainable copy of the original module."""
        clone = copy.deepcopy(self.original)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.adapters[name] = clone
        return clone

    def unwrap(self) -> nn.Module:
        if self.active and not self.disabled:
            return self.adapters[self.active[0]]
        return self.original

    def wrapped(self) -> nn.Module:
        return self.original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.unwrap()(*args, **kwargs)


class InputAdapter(nn.Module):
    """One adapter that rewrites a model's call arguments (prompt and prefix tuning).

    Subclasses implement :meth:`transform_inputs`; they live in an :class:`InputSlot`.
    """

    def transform_inputs(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Return the keyword arguments ``model`` is to be called with instead of ``kwargs``."""
        raise NotImplementedError


class InputSlot(AdapterSlot):
    """Holds a model's :class:`InputAdapter` s and applies them before each call of the model.

    It is attached to the root model as the child ``peftreg_input_adapters`` and runs from a
    forward pre-hook, so the model's own forward is unchanged. Positional arguments are turned
    into keywords (by the forward's signature) before the adapters see them.
    """

    ATTRIBUTE = "peftreg_input_adapters"

    def __init__(self) -> None:
        super().__init__()
        self._handle: Any = None

    @classmethod
    def attached_to(cls, model: nn.Module) -> InputSlot:
        """The slot of ``model``, created and attached on first use."""
        slot = getattr(model, cls.ATTRIBUTE, None)
        if isinstance(slot, InputSlot):
            return slot
        slot = cls()
        setattr(model, cls.ATTRIBUTE, slot)
        slot._handle = model.register_forward_pre_hook(slot._pre_hook, with_kwargs=True)
        return slot

    def _pre_hook(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        running = [self.adapters[n] for n in self.active]
        if self.disabled or not running:
            return None
        kwargs = _as_keywords(model, args, kwargs)
        for adapter in running:
            kwargs = adapter.transform_inputs(model, kwargs)  # type: ignore[operator]
        return (), kwargs

    def unwrap(self) -> nn.Module:
        raise UnsupportedOperationError("input adapters (prompt/prefix) cannot be merged")

    def wrapped(self) -> None:
        return None

    def saved_key_prefix(self, path: str) -> str:
        # Model-wide adapters are saved under their own names ("prompt_embeddings"), not under
        # the attribute the slot happens to occupy.
        return ""

    def detach(self, model: nn.Module, path: str, *, keep_trained: bool = False) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        parent_path, _, leaf = path.rpartition(".")
        delattr(get_module(model, parent_path), leaf)


def _as_keywords(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    if not args:
        return dict(kwargs)
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [p.name for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(positional):
        raise TypeError(f"{type(model).__name__}.forward takes {len(positional)} positional "
                        f"arguments but {len(args)} were given")
    out = dict(zip(positional, args, strict=False))
    out.update(kwargs)
    return out


def iter_slots(model: nn.Module) -> Iterator[tuple[str, AdapterSlot]]:
    """Yield ``(path, slot)`` for every adapter slot in ``model``, outermost first.

    Paths are the model's own (as :func:`get_module` reads them): a slot inside the module that
    another slot wraps is named as if the outer slot were not there, so paths, and the tensor
    names of saved adapters, do not depend on the order in which adapters were added.
    """
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, AdapterSlot]]:
        for name, child in module._modules.items():
            if child is None:
                continue
            path = prefix + name
            if not isinstance(child, AdapterSlot):
                yield from walk(child, path + ".")
                continue
            if id(child) not in seen:
                seen.add(id(child))
                yield path, child
            inner = child.wrapped()
            if inner is not None:
                yield from walk(inner, path + ".")

    if isinstance(model, AdapterSlot):
        seen.add(id(model))
        yield "", model
        inner = model.wrapped()
        if inner is not None:
            yield from walk(inner, "")
        return
    yield from walk(model, "")
