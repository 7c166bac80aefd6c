# SPDX-License-Identifier: Apache-2.0
"""``Linear4bit``: a linear layer whose frozen weight is stored as NF4 (QLoRA's base layer).

The weight lives in buffers (codes, scales, second-level scales) so ``module.to(device)``,
``state_dict()`` and safetensors work without pickling; ``state_dict()`` emits bitsandbytes'
serialized layout (``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``, ``bias``), and
``load_state_dict`` accepts it, from a peftreg or a bitsandbytes ``Linear4bit``. The forward is
the fused ``peftreg::nf4_linear`` op (the weight is decoded tile by tile inside the product,
never materialised) or, when no compiled kernel exists for the device, dequantize-then-matmul
in plain PyTorch after one warning (the kernel mode of :mod:`peftreg.ops._op`). Gradients flow
to the input (and to the bias if it requires grad); the weight is frozen.

For FSDP2, :meth:`Linear4bit.make_shardable` moves the storage into frozen uint8 parameters cut
into whole quantization groups (:mod:`peftreg.quant.nf4_shard`), which ``fully_shard`` shards
and all-gathers like any other parameter; the state dict keeps bitsandbytes' layout until
FSDP2 shards the layer (then it holds the rank's rows, as FSDP2's state dicts do).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from peftreg.errors import UnsupportedOperationError
from peftreg.ops import nf4 as nf4_ops
from peftreg.ops.lora import new_dropout_seed
from peftreg.quant import nf4_shard
from peftreg.quant.nf4_tensor import QUANT_STATE_SUFFIX, NF4FormatError, NF4Tensor

__all__ = ["Linear4bit"]

# Buffer name of each NF4Tensor field (a buffer name cannot contain a dot; state_dict() maps
# them to bitsandbytes' dotted keys).
_BUFFERS: dict[str, str] = {
    "codes": "weight",
    "absmax": "weight_absmax",
    "nested_absmax": "weight_nested_absmax",
    "offset": "weight_offset",
}


class Linear4bit(nn.Module):
    """``y = x @ W^T + b`` with ``W`` frozen in NF4 (4.127 bits per weight with double quant).

    Build one from a trained layer with :meth:`from_linear`; construct directly (zero weight)
    only to load a state dict into.

    Args:
        in_features: input width.
        out_features: output width.
        bias: whether the layer has a bias (kept in ``compute_dtype``).
        blocksize: NF4 block size (power of two, 32..4096).
        double_quant: double-quantize the block scales (QLoRA section 3).
        compute_dtype: dtype of the product (inputs are cast to it, outputs cast back).
        weight_dtype: dtype the weight had before quantization (what :meth:`dequantize` returns).
        device: where to allocate.

    Attributes:
        peftreg_linear: True, so ``target_modules="all-linear"`` counts this layer.
        shardable: whether the storage is in FSDP2's shardable layout (see
            :meth:`make_shardable`).
    """

    peftreg_linear: ClassVar[bool] = True
    # The NF4 storage, registered as buffers by _set_storage (declared for the type checker).
    weight: torch.Tensor
    weight_absmax: torch.Tensor
    weight_nested_absmax: torch.Tensor | None
    weight_offset: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16,
                 weight_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.compute_dtype = compute_dtype
        self.shardable = False
        storage = NF4Tensor.zeros((self.out_features, self.in_features), weight_dtype, blocksize,
                                  double_quant, device=device)
        self._set_storage(storage)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=compute_dtype,
                                                 device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16) -> Linear4bit:
        """Quantize ``linear``'s weight to NF4; the bias is kept (in ``compute_dtype``).

        The new layer is on ``linear``'s device. The bias keeps ``linear.bias.requires_grad``.
        """
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
                    weight_dtype=weight.dtype, device=weight.device)
        layer._set_storage(NF4Tensor.quantize(weight, blocksize, double_quant))
        if linear.bias is not None and layer.bias is not None:  # built with a bias above
            with torch.no_grad():
                layer.bias.copy_(linear.bias.detach().to(compute_dtype))
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    # --- the NF4 storage ------------------------------------------------------------------------

    def _set_storage(self, storage: NF4Tensor) -> None:
        if self.shardable:
            tensors: dict[str, torch.Tensor | None] = dict(nf4_shard.to_groups(storage))
            tensors.setdefault("nested_absmax", None)
            tensors["offset"] = storage.offset
        else:
            tensors = storage.tensors()
        for field, tensor in tensors.items():
            name = _BUFFERS[field]
            self._buffers.pop(name, None)
            self._parameters.pop(name, None)
            if self.shardable and field in nf4_shard.GROUP_FIELDS:
                # Frozen parameters, not buffers: FSDP2 shards and gathers parameters only.
                self.register_parameter(
                    name, None if tensor is None else nn.Parameter(tensor, requires_grad=False))
            else:
                self.register_buffer(name, tensor)
        self.weight_dtype = storage.dtype
        self.blocksize = storage.blocksize
        self.nested_blocksize = storage.nested_blocksize

    def make_shardable(self) -> Linear4bit:
        """Keep the NF4 storage in a layout FSDP2 (``fully_shard``) can shard; returns self.

        The codes and scales become frozen uint8 parameters of whole quantization groups
        (:mod:`peftreg.quant.nf4_shard`; same bytes plus the padding of the last group), so a
        rank holds about ``1 / world`` of the 4-bit weight between forwards and ``fully_shard``
        gathers it for the forward and the backward. Outputs, ``state_dict()`` (bitsandbytes'
        layout) and :meth:`dequantize` are unchanged. Call it before ``fully_shard``; once
        sharded, ``state_dict()`` holds this rank's rows as ``DTensor``s (no communication) and
        ``self.nf4.to_state_dict()`` gathers bitsandbytes' layout.
        """
        if not self.shardable:
            storage = self.nf4
            self.shardable = True
            self._set_storage(storage)
        return self

    @property
    def nf4(self) -> NF4Tensor:
        """The weight's storage record (sharing this module's tensors).

        With :meth:`make_shardable` under FSDP2, outside the forward the tensors are sharded
        ``DTensor``s: this gathers them (a collective, so every rank must call it together).
        """
        shape = torch.Size((self.out_features, self.in_features))
        if self.shardable:
            groups = {field: _full(getattr(self, _BUFFERS[field]))
                      for field in nf4_shard.GROUP_FIELDS}
            return nf4_shard.from_groups(groups, shape, self.weight_dtype, self.blocksize,
                                         self.nested_blocksize, self.weight_offset)
        return NF4Tensor(codes=self.weight, absmax=self.weight_absmax,
                         shape=shape, dtype=self.weight_dtype, blocksize=self.blocksize,
                         nested_absmax=self.weight_nested_absmax, offset=self.weight_offset,
                         nested_blocksize=self.nested_blocksize)

    @property
    def double_quant(self) -> bool:
        return self.weight_absmax.dtype == torch.uint8

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``(out_features, in_features)`` (default dtype: ``weight_dtype``)."""
        return self.nf4.dequantize(dtype)

    def memory_bytes(self) -> int:
        """Bytes held by the layer: NF4 storage, the two code tables (serialized with the
        weight) and the bias. Under FSDP2 with :meth:`make_shardable`, this rank's shard of the
        storage (with the padding of the last group)."""
        tables = 16 * 4 + (256 * 4 if self.double_quant else 0)
        bias = 0 if self.bias is None else _local_bytes(self.bias)
        storage = sum(_local_bytes(getattr(self, name)) for name in _BUFFERS.values()
                      if getattr(self, name) is not None)
        return storage + tables + bias

    # --- forward --------------------------------------------------------------------------------

    def _weight_args(self) -> tuple[Any, ...]:
        """The quantized weight's fields in the NF4 schemas' order (codes .. in_features)."""
        if self.shardable:
            w = self.nf4  # views of the rows FSDP2 gathered (or of the unsharded parameters)
            fields = (w.codes, w.absmax, w.nested_absmax, w.offset)
        else:
            fields = (self.weight, self.weight_absmax, self.weight_nested_absmax,
                      self.weight_offset)
        return (*fields, self.blocksize, self.nested_blocksize, self.out_features,
                self.in_features)

    def _compute_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(self.compute_dtype)
        bias = self._compute_bias()
        y = nf4_ops.LINEAR.run(xc, *self._weight_args(), bias)
        return y.to(x.dtype)

    def supports_fused_lora(self, x: torch.Tensor, lora_a: torch.Tensor,
                            lora_b: torch.Tensor) -> bool:
        """Whether :meth:`forward_with_lora` takes these tensors: A and B in the compute dtype
        (the op itself chooses between its kernel and plain PyTorch)."""
        return lora_a.dtype == self.compute_dtype and lora_b.dtype == self.compute_dtype

    def forward_with_lora(self, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          scaling: float, dropout_p: float = 0.0) -> torch.Tensor:
        """This layer plus a LoRA update in one op (QLoRA's layer, ``peftreg::nf4_lora_linear``).

        ``forward(x) + scaling * (x_l A^T) B^T`` with every sum in float32 and one rounding to
        the compute dtype (then cast to x's dtype, as :meth:`forward`); call only when
        :meth:`supports_fused_lora` is true. ``dropout_p`` applies dropout to the LoRA path's
        input inside the op (a fresh seed per call; the mask is never stored). The kernel mode
        picks the compiled op or the same maths in plain PyTorch.
        """
        xc = x.to(self.compute_dtype)
        seed = new_dropout_seed() if dropout_p > 0 else None
        y = nf4_ops.LORA_LINEAR.run(xc, *self._weight_args(), self._compute_bias(), lora_a,
                                    lora_b, float(scaling), None, float(dropout_p), seed)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")

    # --- module plumbing --------------------------------------------------------------------------

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
               ) -> Linear4bit:
        # Module.to(dtype) / .half() would cast the float32 scales: keep the NF4 buffers'
        # dtypes and apply only the device part of the change.
        saved = {name: self._buffers.pop(name) for name in _BUFFERS.values()
                 if name in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in saved.items():
                if tensor is not None:
                    moved = fn(tensor)
                    if moved.dtype != tensor.dtype:
                        moved = tensor.to(moved.device)
                    tensor = moved
                self._buffers[name] = tensor
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        if self.shardable and _is_dtensor(self.weight):
            # Sharded by FSDP2: this rank's rows as DTensors under the attribute names, as FSDP2
            # gives every sharded parameter. Gathering here would be a hidden collective, and
            # callers that state_dict() on one rank (or drop the base keys, as AdaptedModel
            # does) would hang; self.nf4.to_state_dict() gathers bitsandbytes' layout.
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        # bitsandbytes' order: weight, bias, then the quant state of the weight.
        weight_state = self.nf4.to_state_dict(prefix + "weight")
        destination[prefix + "weight"] = weight_state.pop(prefix + "weight")
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for key, value in weight_state.items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        weight_key = prefix + "weight"
        ours = [k for k in state_dict if k == weight_key or k.startswith(weight_key + ".")]
        if ours and self.shardable and _is_dtensor(self.weight):
            raise UnsupportedOperationError(
                f"'{weight_key}': loading an NF4 state dict into a layer FSDP2 has sharded; "
                "load it before fully_shard")
        if not ours:
            missing_keys.extend([weight_key, f"{weight_key}.{QUANT_STATE_SUFFIX}"])
        else:
            storage = NF4Tensor.from_state_dict(state_dict, weight_key,
                                                device=self.weight_absmax.device)
            if tuple(storage.shape) != (self.out_features, self.in_features):
                raise NF4FormatError(
                    f"NF4 state dict: key '{weight_key}.{QUANT_STATE_SUFFIX}': shape "
                    f"{list(storage.shape)} does not match this layer "
                    f"({self.out_features}, {self.in_features})")
            self._set_storage(storage)
        bias_key = prefix + "bias"
        if self.bias is not None:
            if bias_key in state_dict:
                value = state_dict[bias_key]
                if tuple(value.shape) != (self.out_features,):
                    error_msgs.append(f"size mismatch for {bias_key}: copying a param with "
                                      f"shape {tuple(value.shape)}, expected "
                                      f"({self.out_features},)")
                else:
                    with torch.no_grad():
                        self.bias.copy_(value.to(self.bias.dtype))
            else:
                missing_keys.append(bias_key)
        elif bias_key in state_dict:
            unexpected_keys.append(bias_key)
        known = set(ours) | {bias_key}
        for key in state_dict:
            if key.startswith(prefix) and key not in known and "." not in key[len(prefix):]:
                unexpected_keys.append(key)


def _is_dtensor(tensor: torch.Tensor | None) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (what FSDP2 leaves in a sharded module)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor cannot have FSDP2-sharded parameters
        return False
    return isinstance(tensor, DTensor)


def _full(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A sharded FSDP2 parameter gathered (a collective); any other tensor as it is."""
    if tensor is None:
        return None
    if _is_dtensor(tensor):
        return tensor.full_tensor()  # type: ignore[attr-defined]
    return tensor.detach() if isinstance(tensor, nn.Parameter) else tensor


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if _is_dtensor(tensor) else tensor  # type: ignore[attr-defined]
    return local.numel() * local.element_size()
