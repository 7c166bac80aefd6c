# SPDX-License-Identifier: Apache-2.0
"""The interface every PEFT method implements.

A method is a small stateless object: it knows its config class and how to put its adapter
modules into a model for one adapter name. Everything that is common to all methods (freezing,
switching, disabling, deleting, saving) is done by the core over :class:`~peftreg.host.AdapterSlot`
modules, so a method only overrides what is specific to it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import ClassVar, Final, Generic, TypeVar

import torch
from torch import nn

from peftreg.config import MethodConfig
from peftreg.errors import UnsupportedOperationError
from peftreg.families import ModelFamily
from peftreg.host import AdapterHost, iter_slots
from peftreg.io.peft_codec import PeftCodec
from peftreg.updates import FittedAdapter, LayerUpdate

#: The plugin API level this peftreg provides. It rises by one whenever something a plugin may
#: rely on (the names in :mod:`peftreg.plugin` and what they promise) is added; a plugin built
#: for a higher level than the running peftreg is refused by name when the registry loads it.
#: Level 2 added ``PEFTMethod.peft_codec``; level 3 made module paths see through adapter slots
#: (``get_module``, ``replace_module``, ``iter_slots``), so a method may adapt modules inside
#: one another method already wraps.
API_LEVEL: Final = 3

C = TypeVar("C", bound=MethodConfig)


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a method can do; shown by ``peftreg methods`` and checked by the model wrapper.

    Attributes:
        mergeable: the adapter can be folded into the base weights (and unfolded again).
        quantized_base: the method works on (or creates) a quantized frozen base.
        inference_latency: the adapter adds computation at inference even when merged where
            possible (true for methods that cannot merge or that add tokens).
        compilable: ``torch.compile`` of an adapted model gives the eager outputs (the
            plugin's tests check it; the conformance kit's ``"compile"`` check runs only then).
    """

    mergeable: bool
    quantized_base: bool = False
    inference_latency: bool = False
    compilable: bool = False


class PEFTMethod(abc.ABC, Generic[C]):
    """A parameter-efficient fine-tuning method, generic in its config class.

    Subclasses (``class MyMethod(PEFTMethod[MyConfig])``) set the class variables and
    implement :meth:`inject`; ``inject``, ``parameter_count`` and the other methods then take
    ``MyConfig`` without any cast.

    Attributes:
        name: the registry name; must equal ``config_cls.method``.
        config_cls: the :class:`~peftreg.config.MethodConfig` subclass this method reads.
        capabilities: see :class:`Capabilities`.
        suggested_learning_rate: an AdamW learning rate that suits the method's defaults; used
            by ``peftreg compare`` when no rate is given (methods differ by orders of magnitude:
            prompt tuning needs far larger steps than LoRA).
        api_level: the :data:`API_LEVEL` the plugin was written against (default 1). A method
            asking for more than the running peftreg provides is refused when it registers,
            with a message naming its distribution.
        numerics_version: raised by the plugin whenever a release changes the numbers its
            adapters compute from the same saved tensors (a new init, a changed scale, a fixed
            formula). It is written into every saved adapter, and loading an adapter saved
            under another numerics version warns that results are not comparable.
        peft_codec: the method's translation to and from Hugging Face PEFT's adapter format
            (a :class:`~peftreg.io.peft_codec.PeftCodec`), or ``None`` when PEFT has no such
            method. With one, ``save_pretrained(..., format="peft")``, ``peftreg convert`` and
            loading PEFT directories work for the method (API level 2).
        size_field: the config field (an integer) that scales how many parameters the method
            trains (LoRA's ``r``, prompt tuning's ``num_virtual_tokens``), or ``None``;
            ``peftreg compare --budget params=N`` sizes the method through it (API level 2).
    """

    name: ClassVar[str]
    # Not a ClassVar: a ClassVar cannot use the class's type parameter.
    config_cls: type[C]
    capabilities: ClassVar[Capabilities]
    suggested_learning_rate: ClassVar[float] = 1e-3
    api_level: ClassVar[int] = 1
    numerics_version: ClassVar[int] = 1
    peft_codec: ClassVar[PeftCodec | None] = None
    size_field: ClassVar[str | None] = None

    @abc.abstractmethod
    def inject(
        self,
        model: nn.Module,
        adapter_name: str,
        config: C,
        family: ModelFamily | None,
    ) -> list[str]:
        """Add adapter ``adapter_name`` to ``model`` in place.

        The method creates its trainable modules (fresh, initialised as its paper says) and puts
        them into :class:`~peftreg.host.AdapterHost` or other
        :class:`~peftreg.host.AdapterSlot` modules. It must not change any base weight, unless
        the config asks for an initialisation that rewrites the base (PiSSA and OLoRA take the
        top of the weight's spectrum into the factors, as PEFT does); such a method checks
        everything before it writes, so a refusal leaves the base as it was. Freezing
        of the base and activation are done by the caller.

        Args:
            model: the model to adapt (may already hold other adapters).
            adapter_name: a validated, unused adapter name.
            config: an instance of :attr:`config_cls`.
            family: the model's structure if a family plugin recognised it, else ``None``.

        Returns:
            The module paths that were adapted.

        Raises:
            TargetNotFoundError: the config's targets match nothing in ``model``.
            ModelFamilyError: the method needs structure ``family`` does not provide.
        """

    def merge(self, model: nn.Module, adapter_name: str) -> None:
        """Fold ``adapter_name`` into the base weights of ``model``.

        The default merges every :class:`~peftreg.host.AdapterHost` holding the adapter; it is
        only called when ``capabilities.mergeable`` is true.
        """
        done: list[AdapterHost] = []
        try:
            for path, slot in iter_slots(model):
                if isinstance(slot, AdapterHost) and adapter_name in slot.adapters:
                    slot.merge(adapter_name, where=path)
                    done.append(slot)
        except BaseException:
            # All or nothing: a failure part-way must not leave some layers merged.
            for slot in reversed(done):
                slot.unmerge(adapter_name)
            raise

    def unmerge(self, model: nn.Module, adapter_name: str) -> None:
        """Undo :meth:`merge` (exact up to floating-point rounding)."""
        for _, slot in iter_slots(model):
            if isinstance(slot, AdapterHost) and adapter_name in slot.adapters:
                slot.unmerge(adapter_name)

    def parameter_count(
        self, model: nn.Module, config: C, family: ModelFamily | None
    ) -> int | None:
        """Closed-form number of trainable parameters ``config`` adds to ``model``.

        Used by :mod:`peftreg.testing` to check an implementation against its paper; return
        ``None`` if there is no closed form. ``model`` is the unadapted model and ``family`` its
        description (the same one :meth:`inject` receives). Parameters of
        ``modules_to_save`` copies are not included.
        """
        return None

    def prepare_hotswap(self, model: nn.Module, adapter_name: str, max_rank: int) -> None:
        """Make adapter ``adapter_name`` ready to take other saved adapters in place without a
        recompilation (:meth:`hotswap`): shapes fixed at their largest (a rank up to
        ``max_rank``), scalars held in tensors. The default does nothing (shapes and scalars
        are then taken as they are). (API level 2)"""

    def hotswap(self, model: nn.Module, adapter_name: str, config: C,
                tensors: Mapping[str, torch.Tensor],
                current: Mapping[str, torch.Tensor]) -> None:
        """Replace the weights of adapter ``adapter_name`` by a saved adapter's (``config``,
        ``tensors`` under the saved keys) in place: no module is added or replaced, so a
        ``torch.compile``d model runs the new weights without recompiling. ``current`` is
        the adapter's own tensors under the same keys (sharing storage with its parameters).

        The default copies every tensor into the adapter's tensor of the same key and shape.
        A method whose configs change shapes or scalars (LoRA's rank and alpha) overrides it
        together with :meth:`prepare_hotswap`. (API level 2)

        Raises:
            UnsupportedOperationError: the saved adapter does not fit in place (other targets,
                keys or shapes); nothing is changed then.
        """
        problems = [f"{k}: missing from the saved adapter" for k in current if k not in tensors]
        problems += [f"{k}: not a tensor of this adapter" for k in tensors if k not in current]
        problems += [f"{k}: shape {tuple(tensors[k].shape)} where the adapter has "
                     f"{tuple(v.shape)}" for k, v in current.items()
                     if k in tensors and tensors[k].shape != v.shape]
        if problems:
            raise UnsupportedOperationError(
                f"the saved adapter does not fit adapter {adapter_name!r} in place: "
                + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))
        with torch.no_grad():
            for key, target in current.items():
                target.copy_(tensors[key].to(dtype=target.dtype, device=target.device))

    def fit_updates(self, updates: Mapping[str, LayerUpdate], rank: int,
                    config: MethodConfig | None = None) -> FittedAdapter | None:
        """Express dense per-layer weight updates as an adapter of this method, or return
        ``None`` when the method cannot (the default).

        A method that implements it can stand in for any mergeable adapter
        (``peftreg convert SRC DST --to peft-<this method> --rank R``): LoRA does, by
        truncated SVD. ``rank`` bounds the new adapter's size per layer; ``config`` is the
        source adapter's config, for fields worth keeping (``modules_to_save``). (API level 2)
        """
        return None

    def describe(self) -> str:
        """One line for listings (defaults to the first line of the class docstring)."""
        doc = (type(self).__doc__ or "").strip().splitlines()
        return doc[0] if doc else self.name

