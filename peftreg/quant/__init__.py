# SPDX-License-Identifier: Apache-2.0
"""Quantized storage formats: NF4 (4-bit NormalFloat, bitsandbytes' byte layout)."""

from __future__ import annotations

from peftreg.quant.nf4_tensor import QUANT_STATE_SUFFIX, NF4FormatError, NF4Tensor

__all__ = ["QUANT_STATE_SUFFIX", "NF4FormatError", "NF4Tensor"]
