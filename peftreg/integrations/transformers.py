# SPDX-License-Identifier: Apache-2.0
"""Training an :class:`~peftreg.AdaptedModel` with the Hugging Face ``Trainer``, unchanged.

Two pieces, both optional and independent of each other:

- :func:`prepare_for_trainer` makes the model look to ``Trainer`` like the model it wraps.
  ``Trainer`` reads the model's ``forward`` signature to decide which batch columns to keep
  (``remove_unused_columns``), which of them are labels (``find_labels`` on the *class*), whether
  the model accepts ``num_items_in_batch`` and whether it can return a loss. ``AdaptedModel``'s
  own ``forward(*args, **kwargs)`` hides all of that, so without this step the default
  ``remove_unused_columns=True`` drops every column and training stops with "The batch received
  was empty". The function gives the instance a per-wrapped-class subclass whose ``forward`` has
  the wrapped model's signature; nothing else changes (state dict, parameters, adapters).
- ``SaveAdapterCallback`` writes the trained adapter(s) with
  :meth:`AdaptedModel.save_adapter` (atomic) into every checkpoint folder the ``Trainer`` makes,
  as ``checkpoint-<step>/adapters/<name>/``, and at the end of training into
  ``<output_dir>/adapters/<name>/``. ``Trainer`` itself still saves the whole state dict
  (``model.safetensors``), which is what it reads back for ``resume_from_checkpoint`` and
  ``load_best_model_at_end``; the adapter directory is what :func:`peftreg.load` reads.

``transformers`` is imported only when ``SaveAdapterCallback`` is first used, so this module
imports without it; using the callback then raises an ``ImportError`` saying what to install.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from peftreg.errors import AdapterError
from peftreg.integrations import find_adapted_model
from peftreg.model import AdaptedModel

__all__ = ["ADAPTERS_FOLDER", "SaveAdapterCallback", "find_adapted_model", "prepare_for_trainer"]

ADAPTERS_FOLDER = "adapters"
"""Sub-folder of a checkpoint (or of ``output_dir``) that receives the adapter directories."""

_TRAINER_CLASSES: dict[tuple[type, type], type] = {}
_CALLBACK_CLASS: type | None = None


# -- the model as Trainer sees it --------------------------------------------------------------


def _rebuild(base: type, wrapped: type) -> AdaptedModel:
    # Unpickling and deepcopy call this; the state is applied afterwards by nn.Module.__setstate__.
    cls = _trainer_class(base, wrapped)
    return cls.__new__(cls)


def _trainer_class(base: type, wrapped: type) -> type:
    """The subclass of ``base`` whose ``forward`` carries ``wrapped.forward``'s signature."""
    cls = _TRAINER_CLASSES.get((base, wrapped))
    if cls is not None:
        return cls
    signature = inspect.signature(wrapped.forward)

    def forward(self: AdaptedModel, *args: Any, **kwargs: Any) -> Any:
        return base.forward(self, *args, **kwargs)

    def __reduce_ex__(self: AdaptedModel, protocol: int) -> tuple[Any, ...]:
        # The class is made at run time, so pickle cannot name it; rebuild it from its two bases.
        reduced = object.__reduce_ex__(self, max(protocol, 2))
        return (_rebuild, (base, wrapped), *reduced[2:])

    # Trainer inspects this signature (with ``self``, as on the wrapped class).
    forward.__signature__ = signature  # type: ignore[attr-defined]
    forward.__doc__ = f"Call the wrapped ``{wrapped.__qualname__}`` (its signature is shown)."
    name = f"Adapted{wrapped.__name__}"
    cls = type(name, (base,), {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"{base.__name__} around a ``{wrapped.__qualname__}``, as ``Trainer`` sees it "
                   "(made by :func:`peftreg.integrations.transformers.prepare_for_trainer`).",
        "forward": forward,
        "__reduce_ex__": __reduce_ex__,
        "_peftreg_trainer_base": base,
    })
    _TRAINER_CLASSES[(base, wrapped)] = cls
    return cls


def prepare_for_trainer(model: AdaptedModel) -> AdaptedModel:
    """Make ``model`` present its wrapped model's ``forward`` signature to ``Trainer``.

    The object is changed in place (its class becomes ``Adapted<WrappedClass>``, a subclass of
    its current class) and returned, so ``Trainer(model=prepare_for_trainer(model), ...)``
    works. Calling it again is harmless, also after ``fully_shard``. Parameters, buffers,
    state dict keys and adapters are untouched, and ``isinstance(model, AdaptedModel)`` stays
    true. The run-time class rebuilds itself when unpickled or deep-copied (``__reduce_ex__``),
    so it adds no obstacle to either.

    Args:
        model: an adapted model (``peftreg.adapt(...)`` or ``peftreg.load(...)``).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not an :class:`AdaptedModel`.
    """
    if not isinstance(model, AdaptedModel):
        raise TypeError(
            f"prepare_for_trainer expects a peftreg AdaptedModel, got {type(model).__name__}"
        )
    if hasattr(type(model), "_peftreg_trainer_base"):
        # Already prepared, possibly subclassed again since (FSDP2's fully_shard does that):
        # the wrapped model cannot have changed, so neither has the signature.
        return model
    model.__class__ = _trainer_class(type(model), type(model.model))
    return model


# -- saving adapters from Trainer ----------------------------------------------------------


class _SaveAdapterLogic:
    """What ``SaveAdapterCallback`` does; mixed into ``transformers.TrainerCallback`` lazily.

    Args:
        adapter_name: the adapter(s) to save. ``None`` saves every adapter that trains (active
            and trainable) at the time of saving.
        save_final: also save into ``<output_dir>/adapters/<name>/`` when training ends.
    """

    def __init__(self, adapter_name: str | Sequence[str] | None = None, *,
                 save_final: bool = True) -> None:
        if adapter_name is None or isinstance(adapter_name, str):
            self.adapter_names = None if adapter_name is None else [adapter_name]
        else:
            self.adapter_names = list(adapter_name)
        self.save_final = save_final

    def names_to_save(self, model: AdaptedModel) -> list[str]:
        """The adapters :meth:`save` writes for ``model``.

        Raises:
            AdapterError: a named adapter does not exist, or ``None`` was given and no adapter
                is training.
        """
        if self.adapter_names is not None:
            for name in self.adapter_names:
                model.record(name)
            return list(self.adapter_names)
        records = model.adapters
        names = [n for n in model.active_adapters if records[n].trainable]
        if not names:
            raise AdapterError(
                "SaveAdapterCallback: no active, trainable adapter to save; name one with "
                "SaveAdapterCallback(adapter_name=...)"
            )
        return names

    def save(self, model: nn.Module, folder: str | Path) -> list[Path]:
        """Write the adapters of ``model`` to ``folder/adapters/<name>/``; return the paths."""
        adapted = find_adapted_model(model)
        return [adapted.save_adapter(Path(folder) / ADAPTERS_FOLDER / name, name)
                for name in self.names_to_save(adapted)]

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       **kwargs: Any) -> Any:
        # Fail before the first step, not at the first checkpoint.
        if model is not None:
            self.names_to_save(find_adapted_model(model))
        return control

    def on_save(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                **kwargs: Any) -> Any:
        # Trainer calls this on every process after writing checkpoint-<step>; the processes
        # that write checkpoints (args.should_save) write the adapters too.
        if model is not None and args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self.save(model, folder)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                     **kwargs: Any) -> Any:
        if self.save_final and model is not None and args.should_save:
            self.save(model, args.output_dir)
        return control


if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ below builds it
    from transformers import TrainerCallback

    class SaveAdapterCallback(_SaveAdapterLogic, TrainerCallback):
        """A ``transformers.TrainerCallback`` that saves peftreg adapters into checkpoints."""


def _callback_class() -> type:
    global _CALLBACK_CLASS
    if _CALLBACK_CLASS is None:
        try:
            from transformers import TrainerCallback
        except ImportError as exc:
            raise ImportError(
                "peftreg.integrations.transformers.SaveAdapterCallback needs the optional "
                "'transformers' package: pip install transformers"
            ) from exc
        _CALLBACK_CLASS = type("SaveAdapterCallback", (_SaveAdapterLogic, TrainerCallback), {
            "__module__": __name__,
            "__qualname__": "SaveAdapterCallback",
            "__doc__": "A ``transformers.TrainerCallback`` that saves peftreg adapters into "
                       "Trainer checkpoints.\n\n" + (_SaveAdapterLogic.__doc__ or "")
                       .split("\n\n", 1)[-1],
        })
    return _CALLBACK_CLASS


def __getattr__(name: str) -> Any:
    # PEP 562: SaveAdapterCallback subclasses transformers.TrainerCallback, so it is made on
    # first access; importing this module does not import transformers.
    if name == "SaveAdapterCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "SaveAdapterCallback"])
