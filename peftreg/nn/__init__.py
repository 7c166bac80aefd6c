# SPDX-License-Identifier: Apache-2.0
"""Layers built on peftreg's compiled ops: :class:`Linear4bit` (a frozen NF4 linear layer)."""

from __future__ import annotations

from peftreg.nn.linear4bit import Linear4bit

__all__ = ["Linear4bit"]
