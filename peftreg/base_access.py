# SPDX-License-Identifier: Apache-2.0
"""How a layer adapter reads the base module it sits on, without owning it.

An adapter that needs its base (DoRA needs the base weight's row norms and its bias) must not
store the base module as an attribute: ``self.base_layer = base`` registers it as a submodule, so
the base would be trained, counted and saved with the adapter. :class:`BaseAccess` is a plain
object (not a module, not a tensor), so holding one registers nothing. It reads the host's
*current* base on every call, so it follows a base that is replaced (QLoRA densifies its 4-bit
base when merging) or moved with ``.to()``.

Injection refuses an adapter that owns the base's tensors anyway (see :mod:`peftreg.aliasing`).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from peftreg.errors import UnsupportedOperationError


class _HasBase(Protocol):
    base: nn.Module


class BaseAccess:
    """Read-only access to the base module of one :class:`~peftreg.host.AdapterHost`.

    Obtain it with :func:`peftreg.plugin.base_access` inside :meth:`PEFTMethod.inject` and keep
    it on the adapter (``self.base_view = access``). Every read returns detached tensors: the
    base is frozen, and gradients reach only the adapter's own parameters.

    What it reads is the base *as stored now*: adapters merged before this one on the same layer
    are part of it (see the stacking contract in docs/plugins.md).
    """

    def __init__(self, host: _HasBase) -> None:
        self._host = host

    @property
    def module(self) -> nn.Module:
        """The base module itself (dense ``nn.Linear``/``nn.Embedding`` or a quantized layer)."""
        return self._host.base

    @property
    def quantized(self) -> bool:
        """Whether the base stores its weight quantized (it has a ``dequantize`` method)."""
        return callable(getattr(self.module, "dequantize", None))

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's logical shape: ``(out_features, in_features)`` for linear layers,
        ``(num_embeddings, embedding_dim)`` for embeddings."""
        module = self.module
        if isinstance(module, nn.Embedding):
            return module.num_embeddings, module.embedding_dim
        out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
        if isinstance(out_f, int) and isinstance(in_f, int):
            return out_f, in_f
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return int(weight.shape[0]), int(weight.shape[1])
        raise UnsupportedOperationError(
            f"base access: a {type(module).__name__} has no 2-D weight shape")

    @property
    def in_features(self) -> int:
        """Input width (second entry of :attr:`shape`)."""
        return self.shape[1]

    @property
    def out_features(self) -> int:
        """Output width (first entry of :attr:`shape`)."""
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        """Device of the base's tensors."""
        for tensor in (*self.module.parameters(), *self.module.buffers()):
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the base computes in: its floating weight's dtype, or a quantized layer's
        ``compute_dtype``."""
        weight = getattr(self.module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return weight.dtype
        compute = getattr(self.module, "compute_dtype", None)
        return compute if isinstance(compute, torch.dtype) else torch.float32

    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight as a dense, detached tensor of :attr:`shape`.

        Args:
            dtype: dtype of the result (default :attr:`dtype`). A quantized base is dequantized
                (a new tensor each call); a dense one is returned as a view when no cast is
                needed, so never write to it.
        """
        module = self.module
        if self.quantized:
            dense = module.dequantize(dtype or self.dtype)  # type: ignore[operator]
            if not isinstance(dense, torch.Tensor):
                raise UnsupportedOperationError(
                    f"base access: {type(module).__name__}.dequantize returned "
                    f"{type(dense).__name__}, not a tensor")
            return dense.detach()
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise UnsupportedOperationError(
                f"base access: a {type(module).__name__} has no weight tensor")
        return weight.detach().to(dtype or weight.dtype)

    def bias(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The base bias, detached (``None`` when the base has none)."""
        bias = getattr(self.module, "bias", None)
        if not isinstance(bias, torch.Tensor):
            return None
        return bias.detach().to(dtype or bias.dtype)

    def __repr__(self) -> str:
        return f"BaseAccess({type(self.module).__name__}, shape={self.shape})"


def merge_weight(module: nn.Module) -> torch.Tensor:
    """The dense floating weight of ``module`` to fold an update into (``merge_into``).

    The host densifies a quantized base before merging, so this is always a plain tensor.

    Raises:
        UnsupportedOperationError: the module has no floating ``weight`` tensor.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise UnsupportedOperationError(
            f"cannot merge into a {type(module).__name__}: it has no floating weight tensor")
    return weight


def merge_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias tensor of ``module`` to fold into (``None`` when it has none)."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def dense_linear(module: nn.Module) -> nn.Linear:
    """A frozen ``nn.Linear`` computing what the quantized linear ``module`` computes, with its
    dequantized weight (what merging into a quantized base starts from).

    The dense layer takes the dtype the weight had before quantization (``weight_dtype``, the
    dtype of the activations around it), not the 4-bit layer's compute dtype: the quantized
    layer casts its input to the compute dtype and its output back, a plain ``nn.Linear`` does
    not, so a bfloat16 dense layer in a float32 model would refuse its input."""
    access = access_for(module)
    original = getattr(access.module, "weight_dtype", None)
    dtype = original if isinstance(original, torch.dtype) else access.dtype
    weight, bias = access.weight(dtype), access.bias(dtype)
    dense = nn.Linear(access.in_features, access.out_features, bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    dense.requires_grad_(False)
    return dense


class _Holder:
    def __init__(self, base: nn.Module) -> None:
        self.base = base


def access_for(target: nn.Module) -> BaseAccess:
    """:class:`BaseAccess` for ``target``: an adapter host (its base, followed when replaced)
    or a bare base module (that module, for reading shapes and dtypes while building)."""
    if isinstance(getattr(target, "base", None), nn.Module):
        return BaseAccess(target)  # type: ignore[arg-type]  # checked: it has a module .base
    return BaseAccess(_Holder(target))
