# SPDX-License-Identifier: Apache-2.0
"""Glue between :class:`~peftreg.AdaptedModel` and training frameworks.

Each submodule covers one framework and imports it only when used, so ``import peftreg`` and
``import peftreg.integrations`` never pull in optional packages:

- :mod:`peftreg.integrations.transformers`: Hugging Face ``Trainer`` support
  (:func:`~peftreg.integrations.transformers.prepare_for_trainer`, ``SaveAdapterCallback``).
- :mod:`peftreg.integrations.distributed`: ``torch.distributed`` helpers (saving on the main
  process, the parameters a DDP/FSDP wrapper should see).

See docs/integrations.md.
"""

from __future__ import annotations

__all__: list[str] = []
