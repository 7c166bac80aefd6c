# SPDX-License-Identifier: Apache-2.0
"""The hooks a peftreg plugin can implement.

A plugin is any module or object listed in the ``peftreg`` entry-point group whose functions
carry the :data:`hookimpl` marker. Hooks are always called with keyword arguments, so an
implementation may accept only the arguments it needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from peftreg.compare.tasks import TaskSpec
    from peftreg.families import ModelFamily
    from peftreg.method import PEFTMethod

PROJECT = "peftreg"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def peftreg_register_methods() -> list[PEFTMethod]:
    """Return the PEFT methods this plugin provides.

    Called once per plugin when the registry loads. Results of all plugins are merged. Each
    element must be a :class:`peftreg.plugin.PEFTMethod` instance whose ``name`` is unique
    across the installation: a name that is already taken is refused and reported with both
    distribution names (a built-in method is never replaced). Anything else returned is
    reported as a failure of this plugin and ignored; the other plugins keep working.

    Returns:
        A list of method instances (may be empty).
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def peftreg_describe_model(model: nn.Module) -> ModelFamily | None:
    """Describe the structure of ``model`` if this plugin recognises it.

    Called when a method needs to know a model's layout (its blocks, output head, attention and
    feed-forward modules). The first non-``None`` answer wins; third-party plugins are asked
    before built-in ones, so an integrator can override a built-in description.

    Args:
        model: the user's model (not yet adapted, or with adapters already in place).

    Returns:
        A :class:`peftreg.plugin.ModelFamily`, or ``None`` when this plugin does not know the model.
    """
    raise NotImplementedError


@hookspec
def peftreg_register_tasks() -> list[TaskSpec]:
    """Return the comparison tasks this plugin provides for ``peftreg compare --model NAME``
    (and ``peftreg analyze``).

    Each element is a :class:`peftreg.plugin.TaskSpec`: a name, a one-line description and a
    ``build(**sizes)`` function returning a :class:`peftreg.plugin.Task` (a pretrained model
    shipped offline, its data, loss and held-out metric). ``sizes`` are the command's
    ``steps``, ``batch_size``, ``max_length``, ``seed``, ``test_per_class`` and optionally
    ``train_size``. A name that is already taken (``minilm``, ``smollm2`` or another plugin's)
    is refused and reported, as is anything that is not a ``TaskSpec``.

    Returns:
        A list of task specs (may be empty).
    """
    raise NotImplementedError
