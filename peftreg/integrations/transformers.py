# SPDX-License-Identifier: Apache-2.0
"""Training an :class:`~peftreg.AdaptedModel` with the Hugging Face ``Trainer``, unchanged.

An adapted model needs nothing to train under ``Trainer``: its class shows the wrapped model's
``forward`` signature (:mod:`peftreg.signature`), so ``Trainer`` keeps the right batch columns
and finds the labels, and its ``state_dict`` holds the adapters only, so ``Trainer``'s
checkpoints (``model.safetensors``) are adapter-sized, save on models with tied embeddings and
resume with ``resume_from_checkpoint``.

What this module adds:

- ``SaveAdapterCallback`` writes the trained adapter(s) with
  :meth:`AdaptedModel.save_adapter` (atomic) into every checkpoint folder the ``Trainer`` makes,
  as ``checkpoint-<step>/adapters/<name>/``, and at the end of training into
  ``<output_dir>/adapters/<name>/``: a directory :func:`peftreg.load` reads into a fresh base
  model (``Trainer``'s own ``model.safetensors`` is keyed for the wrapper and read back by
  ``Trainer`` itself).
- :func:`prepare_for_trainer` is deprecated: it did what every ``AdaptedModel`` now does, and
  only warns.

``transformers`` is imported only when ``SaveAdapterCallback`` is first used, so this module
imports without it; using the callback then raises an ``ImportError`` saying what to install.
"""

from __future__ import annotations

import warnings
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

_CALLBACK_CLASS: type | None = None


def prepare_for_trainer(model: AdaptedModel) -> AdaptedModel:
    """Deprecated: return ``model`` unchanged, with a ``DeprecationWarning``.

    Every :class:`AdaptedModel` now shows its wrapped model's ``forward`` signature to
    ``Trainer`` by itself; remove the call.

    Args:
        model: an adapted model.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not an :class:`AdaptedModel`.
    """
    warnings.warn(
        "peftreg.integrations.transformers.prepare_for_trainer is no longer needed: an "
        "AdaptedModel shows its wrapped model's forward signature to Trainer by itself. "
        "Remove the call; it will be removed in a future release.",
        DeprecationWarning, stacklevel=2)
    if not isinstance(model, AdaptedModel):
        raise TypeError(
            f"prepare_for_trainer expects a peftreg AdaptedModel, got {type(model).__name__}"
        )
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
