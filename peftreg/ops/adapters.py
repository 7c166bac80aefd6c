# SPDX-License-Identifier: Apache-2.0
"""Typed wrappers over the IA3, Houlsby and multi-LoRA ops (``torch.ops.peftreg.*``).

The maths lives in the kernels (csrc/fused/adapters_*); these functions normalise arguments,
check that a compiled kernel exists for the tensors' device, and call the op. The same maths in
plain PyTorch, with the same signatures, is in :mod:`peftreg.ops.reference`.
"""

from __future__ import annotations

import torch

from peftreg import ops as _ops

__all__ = ["houlsby_adapter", "ia3_linear", "lora_multi_add"]


def _require(op: str, device: torch.device, caller: str) -> None:
    if not _ops.has_extension():
        raise _ops.ExtensionUnavailableError(
            f"peftreg.ops.adapters.{caller} needs the compiled extension: "
            f"{_ops.extension_error()}")
    if not torch.compiler.is_compiling():
        # While compiling, the fake kernel validates; the device check is for eager calls.
        _ops.require_kernel(op, device)


def ia3_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               scale: torch.Tensor, scale_input: bool) -> torch.Tensor:
    """A linear layer with (IA)^3 scaling fused into its product (Liu et al. 2022, sec. 3.3).

    ``scale_input=False`` computes ``(x @ weight^T + bias) * scale`` (keys, values);
    ``scale_input=True`` computes ``(x * scale) @ weight^T + bias`` (feed-forward input).
    Differentiable in every tensor argument.

    Args:
        x: ``(..., in_features)``.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
        scale: the vector ``l``, any shape with ``out_features`` (output scaling) or
            ``in_features`` (input scaling) elements; plugins store ``(out, 1)`` / ``(1, in)``.
        scale_input: which side is scaled.

    Returns:
        ``(..., out_features)`` with ``x``'s dtype.

    Raises:
        ExtensionUnavailableError: no compiled kernel for ``x``'s device.
        RuntimeError: mismatched shapes, dtypes or devices (the message names the argument).
    """
    _require("ia3_linear", x.device, "ia3_linear")
    return torch.ops.peftreg.ia3_linear.default(x, weight, bias, scale.reshape(-1),
                                                bool(scale_input))


def houlsby_adapter(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None,
                    w_up: torch.Tensor, b_up: torch.Tensor | None,
                    activation: str) -> torch.Tensor:
    """The Houlsby bottleneck with its residual as one op (Houlsby et al. 2019, sec. 2.1).

    Computes ``h + act(h @ w_down^T + b_down) @ w_up^T + b_up``; differentiable in every tensor
    argument. The backward keeps only ``h`` and the ``(rows x bottleneck)`` pre-activation.

    Args:
        h: the adapted sub-layer's output, ``(..., hidden)``.
        w_down: ``(bottleneck, hidden)``; b_down: ``(bottleneck,)`` or None.
        w_up: ``(hidden, bottleneck)``; b_up: ``(hidden,)`` or None.
        activation: ``"relu"``, ``"gelu"`` (exact erf form, as ``nn.GELU()``), ``"silu"`` or
            ``"tanh"``.

    Returns:
        Tensor shaped like ``h``.

    Raises:
        ExtensionUnavailableError: no compiled kernel for ``h``'s device.
        RuntimeError: bad shapes, dtypes, devices or activation (named in the message).
    """
    _require("houlsby_adapter", h.device, "houlsby_adapter")
    out, _z = torch.ops.peftreg.houlsby_adapter.default(h, w_down, b_down, w_up, b_up,
                                                        activation)
    return out


def lora_multi_add(base: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, scaling: torch.Tensor,
                   index: torch.Tensor) -> torch.Tensor:
    """Add each row's own LoRA update to ``base`` in one op (S-LoRA / Punica batching).

    Row ``i`` (of the flattened leading dimensions) gets
    ``base[i] + scaling[k] * (x[i] @ lora_a[k]^T) @ lora_b[k]^T`` with ``k = index[i]``, or
    ``base[i]`` unchanged for ``k = -1``. Adapters of lower rank are zero-padded to ``r``.

    Inference only: it has no backward, and it refuses to run when autograd would need one.

    Args:
        base: base layer output ``(..., out_features)``.
        x: layer input ``(..., in_features)``.
        lora_a: ``(adapters, r, in_features)``.
        lora_b: ``(adapters, out_features, r)``.
        scaling: ``(adapters,)`` per-adapter scale (``alpha / r``).
        index: adapter per row: shape ``x.shape[:-1]``, or ``(x.shape[0],)`` for one adapter
            per sequence (broadcast over the other leading dimensions); integer, -1 = none.

    Returns:
        Tensor shaped like ``base``.

    Raises:
        ExtensionUnavailableError: no compiled kernel for ``x``'s device.
        RuntimeError: a gradient is required, or bad shapes/dtypes/indices (named).
    """
    _require("lora_multi_add", x.device, "lora_multi_add")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (base, x, lora_a, lora_b,
                                                                 scaling)):
        raise RuntimeError(
            "peftreg.ops.adapters.lora_multi_add is inference-only (no backward): call it under "
            "torch.no_grad() / torch.inference_mode(), or with tensors that do not require grad")
    lead = x.shape[:-1]
    if index.dim() == 1 and len(lead) > 1 and index.shape[0] == lead[0]:
        index = index.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)
    return torch.ops.peftreg.lora_multi_add.default(base, x, lora_a, lora_b, scaling,
                                                    index.to(torch.int64))
