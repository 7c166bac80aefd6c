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
from typing import ClassVar

from torch import nn

from peftreg.config import MethodConfig
from peftreg.families import ModelFamily
from peftreg.host import AdapterHost, iter_slots


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a method can do; shown by ``peftreg methods`` and checked by the model wrapper.

    Attributes:
        mergeable: the adapter can be folded into the base weights (and unfolded again).
        quantized_base: the method works on (or creates) a quantized frozen base.
        inference_latency: the adapter adds computation at inference even when merged where
            possible (true for methods that cannot merge or that add tokens).
    """

    mergeable: bool
    quantized_base: bool = False
    inference_latency: bool = False


class PEFTMethod(abc.ABC):
    """A parameter-efficient fine-tuning method.

    Subclasses set the three class variables and implement :meth:`inject`.

    Attributes:
        name: the registry name; must equal ``config_cls.method``.
        config_cls: the :class:`~peftreg.config.MethodConfig` subclass this method reads.
        capabilities: see :class:`Capabilities`.
        suggested_learning_rate: an AdamW learning rate that suits the method's defaults; used
            by ``peftreg compare`` when no rate is given (methods differ by orders of magnitude:
            prompt tuning needs far larger steps than LoRA).
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    capabilities: ClassVar[Capabilities]
    suggested_learning_rate: ClassVar[float] = 1e-3

    @abc.abstractmethod
    def inject(
        self,
        model: nn.Module,
        adapter_name: str,
        config: MethodConfig,
        family: ModelFamily | None,
    ) -> list[str]:
        """Add adapter ``adapter_name`` to ``model`` in place.

        The method creates its trainable modules (fresh, initialised as its paper says) and puts
        them into :class:`~peftreg.host.AdapterHost` or other
        :class:`~peftreg.host.AdapterSlot` modules. It must not change any base weight. Freezing
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
            for _, slot in iter_slots(model):
                if isinstance(slot, AdapterHost) and adapter_name in slot.adapters:
                    slot.merge(adapter_name)
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
        self, model: nn.Module, config: MethodConfig, family: ModelFamily | None
    ) -> int | None:
        """Closed-form number of trainable parameters ``config`` adds to ``model``.

        Used by :mod:`peftreg.testing` to check an implementation against its paper; return
        ``None`` if there is no closed form. ``model`` is the unadapted model and ``family`` its
        description (the same one :meth:`inject` receives). Parameters of
        ``modules_to_save`` copies are not included.
        """
        return None

    def describe(self) -> str:
        """One line for listings (defaults to the first line of the class docstring)."""
        doc = (type(self).__doc__ or "").strip().splitlines()
        return doc[0] if doc else self.name
