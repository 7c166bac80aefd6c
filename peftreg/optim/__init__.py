# SPDX-License-Identifier: Apache-2.0
"""Optimizers whose state can leave the fast memory tier (issue 7; docs/optim.md).

:class:`PagedAdamW` keeps AdamW's moments in pages under a resident-bytes budget;
:func:`save_optimizer` / :func:`load_optimizer` checkpoint any optimizer atomically.
"""

from __future__ import annotations

from peftreg.ops.paged import PagingError
from peftreg.optim.checkpoint import OptimizerCheckpointError, load_optimizer, save_optimizer
from peftreg.optim.paged_adamw import PagedAdamW

__all__ = [
    "OptimizerCheckpointError",
    "PagedAdamW",
    "PagingError",
    "load_optimizer",
    "save_optimizer",
]
