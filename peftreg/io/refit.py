# SPDX-License-Identifier: Apache-2.0
"""Writing a mergeable adapter as another method's adapter in PEFT's format (served as a LoRA).

LoRA-only servers and PEFT-LoRA consumers cannot run DoRA, IA3, LoHa, LoKr or VeRA adapters.
Every mergeable adapter, though, makes a dense update to each layer it adapts; a method with
``fit_updates`` (LoRA: truncated SVD) re-expresses those updates, and the result is written
through that method's PEFT codec. How far the refit is from the original is measured per layer
and in total and written into the exported ``adapter_config.json`` under
``peftreg_conversion`` (PEFT ignores keys it does not know).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftreg.errors import UnsupportedOperationError
from peftreg.io.peft_format import codec_for_method, guess_task_type, to_peft, write_peft_dir
from peftreg.updates import layer_updates, relative_errors

if TYPE_CHECKING:
    from peftreg.model import AdaptedModel

__all__ = ["CONVERSION_KEY", "save_refitted"]

#: The adapter_config.json key holding the refit's provenance and errors.
CONVERSION_KEY = "peftreg_conversion"


def save_refitted(model: AdaptedModel, directory: str | Path, name: str, *, method: str,
                  rank: int, task_type: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Write adapter ``name`` of ``model`` as a ``method`` adapter of rank ``rank`` in PEFT's
    format (``directory`` itself for ``default``, ``directory/name`` otherwise).

    Returns:
        The directory written and the conversion record stored in its config: the source
        method, the rank, and the relative Frobenius error of the refit in total and per
        layer (bias changes, which LoRA cannot carry, count as error).

    Raises:
        UnsupportedOperationError: the adapter is not mergeable, adapts a non-linear layer, or
            ``method`` cannot express dense updates or has no PEFT codec.
    """
    record = model.record(name)
    target = model.registry.get(method)
    codec = codec_for_method(model.registry, method)
    updates = layer_updates(model, name)
    fitted = target.fit_updates(updates, rank, record.config)
    if fitted is None:
        raise UnsupportedOperationError(
            f"method {method!r} cannot express dense weight updates (its plugin does not "
            "implement fit_updates)")
    errors = relative_errors(updates, fitted.fitted)
    tensors = dict(fitted.tensors)
    saved = tuple(p + "." for p in record.saved_modules)
    tensors.update({k: v.detach().cpu().contiguous()
                    for k, v in model.adapter_state_dict(name).items() if k.startswith(saved)})
    if task_type is None and codec.needs_task_type:
        task_type = guess_task_type(model.model)
    doc, out = to_peft(fitted.config, tensors, registry=model.registry, family=model.family,
                       task_type=task_type)
    conversion = {"from_method": record.method.name, "to_method": method, "rank": rank,
                  "relative_error": errors["total"],
                  "layer_relative_errors": errors["layers"]}
    doc[CONVERSION_KEY] = conversion
    path = Path(directory) if name == "default" else Path(directory) / name
    return write_peft_dir(path, doc, out), conversion
