# SPDX-License-Identifier: Apache-2.0
"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024), also on a 4-bit base (QDoRA).

A frozen weight ``W`` (out x in) is split into a magnitude and a direction: the adapted layer
uses ``W' = m * (W + s B A) / ||W + s B A||``, the norm taken per output row (the paper's
eq. 5 with PEFT's row convention), ``m`` (out) trainable and initialised to the row norms of
``W``, ``A`` and ``B`` LoRA factors (``B`` zero), so training starts at the base model. As the
paper's section 4.3 suggests, the norm is a constant for the backward: gradients reach ``m``,
``A`` and ``B`` only through ``m / ||.||`` times the LoRA-style output.

The layer never builds the dense ``W + s B A``. Row ``i``'s squared norm is

    ||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T

with ``||W_i||^2`` cached (``W`` is frozen; the cache follows a replaced, moved or rewritten
base), ``W A^T`` computed by running the base layer on the ``r`` rows of ``A`` (on a 4-bit base
that is the 4-bit product, no dense copy of the weight) and ``A A^T`` only ``r x r``; it is
computed once per weight update. The bias is not rescaled, and with dropout the rescaled base
part is ``W dropout(x)``, both as HF PEFT does (``LoraConfig(use_dora=True)``). On an
embedding table the normalised matrix is the transposed table (PEFT's orientation).

Alone on a layer without dropout, the step is LoRA's kernel for ``x W^T + b + s B A x``
followed by an in-place per-column rescale (:class:`_Rescale`) whose backward derives what it
needs from the output, so the step keeps no (rows, out) tensor beyond the output itself.

DoRA is not additive (it rescales what the base computed), so it holds a base view and the
stacking contract keeps earlier adapters from merging under it (docs/plugins.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Final

import torch
import torch.nn.functional as F
from torch import nn

from peftreg.plugin import (
    ALL_LINEAR,
    LORA_LINEAR,
    BaseAccess,
    Capabilities,
    LayerAdapter,
    Linear4bit,
    ModelFamily,
    ModuleTensors,
    PeftCodec,
    PeftExport,
    PeftImport,
    PeftKeys,
    PEFTMethod,
    UnsupportedOperationError,
    base_access,
    hookimpl,
    host_for,
    is_off,
    lora_dropout,
    merge_weight,
    new_dropout_seed,
    select_targets,
)
from peftreg_plugins.lora import LoraConfig
from peftreg_plugins.lora_peft import (
    EMBEDDING_PAIR,
    LINEAR_PAIR,
    LoraPeftCodec,
    check_pairs,
    lora_body,
    lora_fields,
)
from peftreg_plugins.lora_peft import KEYS as LORA_KEYS
from peftreg_plugins.qlora import QLoraConfig, quantize_base

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class DoraConfig(LoraConfig):
    """Config of a DoRA adapter: the LoRA fields (rank, scale, dropout, init, patterns, dtype)
    with the magnitude vector added. See :class:`peftreg_plugins.lora.LoraConfig`; Linear layers
    (dense or 4-bit) and Embeddings can be targeted (an Embedding takes no dropout, as in
    PEFT)."""

    method: ClassVar[str] = "dora"

    def validate(self) -> None:
        super().validate()
        if self.init_lora_weights in ("pissa", "olora"):
            raise self.error("init_lora_weights", "PiSSA and OLoRA inits are LoRA's only",
                             self.init_lora_weights)


@dataclasses.dataclass
class QDoraConfig(QLoraConfig):
    """Config of QDoRA: DoRA on a base quantized to 4-bit NF4 as QLoRA quantizes it (every
    :class:`peftreg_plugins.qlora.QLoraConfig` field)."""

    method: ClassVar[str] = "qdora"


def _weight_key(module: nn.Module) -> tuple[Any, ...]:
    """What identifies the stored base weight: the module, its weight tensor's storage and its
    version counter (in-place writes such as a merge bump it), dtype and device."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return (id(module),)
    try:
        version = weight._version
    except RuntimeError:  # an inference-mode tensor: it cannot be written in place either
        version = -1
    return (id(module), id(weight), weight.data_ptr(), version, weight.dtype, weight.device)


def _tensor_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """A tensor's identity and version counter (an optimizer step or a load bumps it)."""
    try:
        version = tensor._version
    except RuntimeError:  # an inference-mode tensor: it cannot be written in place either
        version = -1
    return (id(tensor), tensor.data_ptr(), version, tensor.dtype, tensor.device)


class _Rescale(torch.autograd.Function):
    """``out = c * t + (1 - c) * bias`` per output column, ``c = m / norm``, in place on ``t``.

    ``t`` is the layer's ``x W^T + b + s B A x`` (rows, out); ``norm`` is a constant (the
    paper's section 4.3). The backward needs ``z = t - b`` for ``dL/dm = sum_rows(g z) / norm``;
    instead of keeping ``t`` it derives ``z = (out - b) / c`` from the output, which the
    autograd graph usually holds anyway (the next layer reads it), so no (rows, out) tensor is
    kept beyond LoRA's own. Where some ``c`` is zero that row of ``z`` is lost in ``out``, and
    ``t`` is kept instead (out of place).
    """

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                bias: torch.Tensor | None, derive: bool) -> torch.Tensor:
        scale = magnitude / norm
        c = scale.to(t.dtype)
        shift = None if bias is None else bias.to(t.dtype) * (1 - c)
        if derive and t._base is None:
            out = t.mul_(c)
            if shift is not None:
                out.add_(shift)
            ctx.mark_dirty(t)
        else:  # a view (some ops return their output reshaped) cannot be rescaled in place
            out = t * c if shift is None else torch.addcmul(shift, t, c)
        ctx.derive = derive
        ctx.save_for_backward(out if derive else t, scale, norm, bias)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kept, scale, norm, bias = ctx.saved_tensors
        need_t, need_m, _, need_bias, _ = ctx.needs_input_grad
        c = scale.to(grad.dtype)
        grad_t = grad * c if need_t else None
        grad_m = grad_bias = None
        if need_m:
            z = kept if bias is None else kept - bias.to(kept.dtype)
            rows = (grad * z).reshape(-1, z.shape[-1]).sum(0, dtype=torch.float32)
            # kept is the output c * z when derived: divide c out again (c * norm = m).
            denom = (scale * norm if ctx.derive else norm).float()
            grad_m = (rows / denom).to(scale.dtype)
        if need_bias:
            grad_bias = (grad * (1 - c)).reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)
        return grad_t, grad_m, None, grad_bias, None


def no_zero_scale(magnitude: torch.Tensor, norm: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every ``c = m / norm`` is nonzero in ``dtype`` (the rescale can then derive its
    backward's input from its output)."""
    with torch.no_grad():
        return bool(((magnitude / norm).to(dtype) != 0).all())


def _rescale(t: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
             bias: torch.Tensor | None, derive: bool | None = None) -> torch.Tensor:
    if derive is None:
        derive = no_zero_scale(magnitude, norm, t.dtype)
    return _Rescale.apply(t, magnitude, norm, bias, derive)  # type: ignore[no-any-return]


class _DoraLayer(LayerAdapter):
    """What DoRA's linear and embedding layers share: the row norm of ``W + s B A`` from a
    cached ``||W_i||^2`` and the cross terms, once per weight update, and the rescale inputs.

    ``W`` here is the matrix DoRA normalises (out x in for a linear layer; the transposed table,
    dim x vocabulary, for an embedding), ``A`` (r x in) and ``B`` (out x r) its factors.
    """

    base_view: BaseAccess
    scaling: float
    lora_magnitude_vector: nn.Parameter
    _row_sq: tuple[tuple[Any, ...], torch.Tensor] | None
    _norm: tuple[tuple[Any, ...], torch.Tensor] | None
    _nonzero: tuple[tuple[Any, ...], bool] | None
    _merged_norm: torch.Tensor | None
    # The stored weight's axis that holds DoRA's rows: 0 for a linear weight (out x in), 1 for
    # an embedding table (vocabulary x dim, the transpose of the matrix DoRA normalises).
    _row_axis: ClassVar[int] = 0

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` in DoRA's orientation."""
        raise NotImplementedError

    def _base_row_sq(self) -> torch.Tensor:
        """``||W_i||^2`` per row, cached until the stored base changes."""
        raise NotImplementedError

    def _base_cross(self, a: torch.Tensor) -> torch.Tensor:
        """``W A^T`` (rows x r), computed without a dense copy of ``W``."""
        raise NotImplementedError

    def _norm_dtype(self) -> torch.dtype:
        return torch.promote_types(self._factors()[0].dtype, torch.float32)

    def weight_norm(self) -> torch.Tensor:
        """``||W + s B A||`` per row of ``W`` (DoRA's orientation), detached, in float32
        (float64 for float64 adapters), without building ``W + s B A``.

        The expanded square can cancel when a row of ``W + s B A`` is nearly zero; it is clamped
        at the size of its own rounding error so the norm stays positive and finite.
        """
        dtype = self._norm_dtype()
        with torch.no_grad():
            a, b = (t.detach() for t in self._factors())
            b = b.to(dtype)
            s = float(self.scaling)
            w_sq = self._base_row_sq()
            wa = self._base_cross(a).to(dtype)
            af = a.to(dtype)
            cross = (wa * b).sum(dim=1)
            quad = ((b @ (af @ af.T)) * b).sum(dim=1)
            squared = w_sq + (2 * s) * cross + (s * s) * quad
            floor = torch.finfo(dtype).eps * (w_sq + (s * s) * quad)
            squared = torch.maximum(squared, floor.clamp_min(torch.finfo(dtype).tiny))
            return squared.sqrt()

    def cached_norm(self) -> torch.Tensor:
        """:meth:`weight_norm`, recomputed only when ``A``, ``B`` or the stored base changed
        (an optimizer step, a load, a merge below): once per step however many forward calls
        the step makes (gradient accumulation, checkpointing, generation)."""
        key = (*_weight_key(self.base_view.module),
               *(_tensor_key(t) for t in self._factors()), float(self.scaling))
        if self._norm is None or self._norm[0] != key:
            self._norm = (key, self.weight_norm())
        return self._norm[1]

    def _scale_inputs(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor | None, bool]:
        """``m``, the detached row norm in ``m``'s dtype, the base bias in ``dtype`` and whether
        no ``m / norm`` is zero: looked at once per weight update, because reading a device
        tensor's value waits for the device."""
        magnitude = self.lora_magnitude_vector
        norm = self.cached_norm().to(magnitude.dtype)
        key = (self._norm[0] if self._norm else None, _tensor_key(magnitude), dtype)
        if self._nonzero is None or self._nonzero[0] != key:
            self._nonzero = (key, no_zero_scale(magnitude, norm, dtype))
        return magnitude, norm, self.base_view.bias(dtype), self._nonzero[1]

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``s B A`` in the stored weight's layout (merging only)."""
        raise NotImplementedError

    def _per_row(self, factor: torch.Tensor) -> torch.Tensor:
        """``factor`` (one entry per DoRA row) shaped to broadcast over the stored weight."""
        return factor[:, None] if self._row_axis == 0 else factor[None, :]

    def merge_into(self, base: nn.Module) -> None:
        w = merge_weight(base)
        norm = self.weight_norm().float()
        factor = self._per_row(_merge_factor(self.lora_magnitude_vector, norm))
        self._merged_norm = norm
        w.copy_((factor * (w.float() + self.delta_weight())).to(w.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        norm = self._merged_norm
        if norm is None:
            raise UnsupportedOperationError("dora: unmerge without a merge")
        w = merge_weight(base)
        factor = self._per_row(self.lora_magnitude_vector.detach().float() / norm.to(w.device))
        w.copy_((w.float() / factor - self.delta_weight()).to(w.dtype))
        self._merged_norm = None


class DoraLinear(_DoraLayer):
    """DoRA for one linear layer (dense or 4-bit): LoRA factors plus a magnitude vector.

    Saved tensors: ``lora_A.weight`` (r x in), ``lora_B.weight`` (out x r) and
    ``lora_magnitude_vector`` (out), PEFT's names and shapes.
    """

    def __init__(self, view: BaseAccess, r: int, scaling: float, dropout: float, init: str,
                 dtype: torch.dtype | None) -> None:
        super().__init__()
        out_f, in_f = view.shape
        kw: dict[str, Any] = {"device": view.device, "dtype": dtype or view.dtype}
        self.lora_A = nn.Linear(in_f, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, out_f, bias=False, **kw)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self.base_view = view  # registers nothing: the base stays the host's
        self.r, self.scaling, self.dropout_p = r, scaling, float(dropout)
        self._row_sq: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._norm: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._nonzero: tuple[tuple[Any, ...], bool] | None = None
        self._merged_norm: torch.Tensor | None = None
        # B is zero, so this is ||W_i|| computed exactly as the forward computes it: the first
        # forward's m / ||.|| is exactly one and the model starts at the base.
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm().to(kw["dtype"]))

    # -- the row norm ----------------------------------------------------------------------------

    def _base_row_sq(self) -> torch.Tensor:
        """``||W_i||^2`` per row, cached until the stored base changes."""
        module = self.base_view.module
        key = (*_weight_key(module), self._norm_dtype())
        if self._row_sq is None or self._row_sq[0] != key:
            w = self.base_view.weight(self._norm_dtype())
            self._row_sq = (key, (w * w).sum(dim=1))
        return self._row_sq[1]

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight, self.lora_B.weight

    def _base_cross(self, a: torch.Tensor) -> torch.Tensor:
        return self._base_product(a).T

    def _base_product(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ W^T`` without the bias, computed by the base itself (the 4-bit product on a
        quantized base, the stored weight without a copy on a dense one)."""
        module = self.base_view.module
        if isinstance(module, nn.Linear):
            return F.linear(rows.to(module.weight.dtype), module.weight)
        out = module(rows)
        bias = self.base_view.bias(out.dtype)
        return out - bias if bias is not None else out

    def delta_weight(self) -> torch.Tensor:
        """The dense ``s B A`` (merging only; the forward never builds it)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    # -- forward ---------------------------------------------------------------------------------

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.weight
        x_lora = x.to(a.dtype)
        if self.training and self.dropout_p > 0:
            # PEFT rescales ``W dropout(x)``, not the base output: y - W d + c (W d + s B A d).
            x_lora = lora_dropout(x_lora, self.dropout_p, new_dropout_seed())
            dropped = self._base_product(x_lora).to(a.dtype)
            magnitude, norm, _, _ = self._scale_inputs(a.dtype)
            scale = magnitude / norm
            low = self.lora_B(self.lora_A(x_lora))
            update = (scale - 1) * dropped + scale * low * self.scaling
            return y + update.to(y.dtype)
        low = self.lora_B(self.lora_A(x_lora))
        dtype = torch.promote_types(y.dtype, a.dtype)
        combined = torch.add(y.to(dtype), low.to(dtype), alpha=float(self.scaling))
        return _rescale(combined, *self._scale_inputs(dtype)).to(y.dtype)

    def fused_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``c * (x W^T + s B A x) + (1 - c) b`` with the base and LoRA products in LoRA's
        kernel (plain PyTorch or the compiled op, as LoRA picks) and the rescale in place."""
        if isinstance(self.scaling, torch.Tensor) or (self.training and self.dropout_p > 0):
            return None
        a, b = self.lora_A.weight, self.lora_B.weight
        quantized = getattr(base, "supports_fused_lora", None)  # 4-bit bases (QDoRA)
        if quantized is not None:
            if not quantized(x, a, b):
                return None
            combined = base.forward_with_lora(x, a, b, float(self.scaling), 0.0)  # type: ignore[operator]
        elif isinstance(base, nn.Linear) and base.weight.dtype == x.dtype == a.dtype:
            combined = LORA_LINEAR.run(x, base.weight, base.bias, a, b, float(self.scaling),
                                       None, 0.0, None)
        else:
            return None
        return _rescale(combined, *self._scale_inputs(combined.dtype))

    # -- merging ---------------------------------------------------------------------------------



class DoraEmbedding(_DoraLayer):
    """DoRA for one embedding table ``E`` (vocabulary x dim), as PEFT applies it: the matrix DoRA
    normalises is ``E^T`` (dim x vocabulary), so the magnitude has one entry per embedding
    dimension and each norm runs over the vocabulary; the looked-up rows are scaled per column.

    Saved tensors: LoRA's ``lora_embedding_A`` (r x vocabulary, zero) and ``lora_embedding_B``
    (dim x r, normal), and ``lora_magnitude_vector`` (dim), PEFT's names and shapes.
    """

    def __init__(self, view: BaseAccess, r: int, scaling: float, dtype: torch.dtype | None
                 ) -> None:
        super().__init__()
        num, dim = view.shape
        kw: dict[str, Any] = {"device": view.device, "dtype": dtype or view.dtype}
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num, **kw))
        self.lora_embedding_B = nn.Parameter(torch.randn(dim, r, **kw))
        self.base_view = view
        self.r, self.scaling = r, scaling
        self.padding_idx = getattr(view.module, "padding_idx", None)
        self._row_sq = self._norm = self._nonzero = None
        self._merged_norm: torch.Tensor | None = None
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm().to(kw["dtype"]))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B

    def _base_row_sq(self) -> torch.Tensor:
        key = (*_weight_key(self.base_view.module), self._norm_dtype())
        if self._row_sq is None or self._row_sq[0] != key:
            table = self.base_view.weight(self._norm_dtype())
            self._row_sq = (key, (table * table).sum(dim=0))
        return self._row_sq[1]

    def _base_cross(self, a: torch.Tensor) -> torch.Tensor:
        table = self.base_view.weight()  # a view of the stored table, no copy
        return (a.to(table.dtype) @ table).T

    def delta_weight(self) -> torch.Tensor:
        """The dense table update ``s (B A)^T``, (vocabulary, dim) (merging only)."""
        b, a = self.lora_embedding_B.float(), self.lora_embedding_A.float()
        return (b @ a).T * self.scaling

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_embedding_A, self.lora_embedding_B
        low = F.embedding(x, a.T, padding_idx=self.padding_idx) @ b.T
        dtype = torch.promote_types(y.dtype, a.dtype)
        combined = torch.add(y.to(dtype), low.to(dtype), alpha=float(self.scaling))
        return _rescale(combined, *self._scale_inputs(dtype)).to(y.dtype)

    _row_axis: ClassVar[int] = 1


def _merge_factor(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    factor = magnitude.detach().float() / norm
    if not bool(torch.isfinite(factor).all()) or bool((factor == 0).any()):
        raise UnsupportedOperationError(
            "dora: lora_magnitude_vector has zero or non-finite entries relative to the row "
            "norm; merging could not be undone")
    return factor


_SUPPORTED: tuple[type[nn.Module], ...] = (nn.Linear, Linear4bit)
_DORA_SUPPORTED: tuple[type[nn.Module], ...] = (*_SUPPORTED, nn.Embedding)

# -- PEFT's format: a LORA document with use_dora: true ------------------------------------------

MAGNITUDE: Final = "lora_magnitude_vector"
LEAVES: Final = (*LINEAR_PAIR, *EMBEDDING_PAIR, MAGNITUDE)

KEYS: Final = PeftKeys(
    mapped=LORA_KEYS.mapped | {"use_dora"},
    ignored=LORA_KEYS.ignored,
    refused={k: v for k, v in LORA_KEYS.refused.items() if k != "use_dora"},
)


class DoraPeftCodec(PeftCodec):
    """PEFT's LORA documents with ``use_dora: true`` (same tensors as LoRA's, plus
    ``<module path>.lora_magnitude_vector``), and DoRA adapters written as them."""

    peft_type = "LORA"
    keys = KEYS
    exported_fields = LoraPeftCodec.exported_fields

    def claims(self, doc: Mapping[str, Any]) -> bool:
        return not is_off(doc.get("use_dora"))

    def read(self, ctx: PeftImport, tensors: Mapping[str, torch.Tensor]
             ) -> tuple[dict[str, Any], ModuleTensors]:
        found = ctx.read_modules(tensors, LEAVES)
        check_pairs(ctx, found)
        for path, parts in found.adapted.items():
            key = f"base_model.model.{path}.{MAGNITUDE}"
            magnitude = parts.get(MAGNITUDE)
            b_name = LINEAR_PAIR[1] if LINEAR_PAIR[1] in parts else EMBEDDING_PAIR[1]
            b = parts.get(b_name)
            if magnitude is None:
                ctx.tensor_problem(key, "missing: a DoRA layer needs its magnitude vector")
            elif b is not None and tuple(magnitude.shape) != (b.shape[0],):
                ctx.tensor_problem(key, f"shape {tuple(magnitude.shape)} does not fit "
                                   f"{b_name} of shape {tuple(b.shape)} (it must be "
                                   f"({b.shape[0]},), one entry per output row)")
        fields = ctx.target_fields(found)
        fields.update(lora_fields(ctx))
        return fields, found

    def write(self, ctx: PeftExport) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        found = ctx.modules(LEAVES)
        body = lora_body(ctx, found)
        body["use_dora"] = True
        return body, found.tensors


class QDoraPeftCodec(DoraPeftCodec):
    """QDoRA adapters written as PEFT writes them: DoRA's document (``use_dora: true``), the
    quantization left out, as PEFT leaves it to the base model's own config.

    It claims no document on load: DoRA's codec reads every ``use_dora`` directory, onto the
    base the model has. A user who wants QDoRA's 4-bit base quantizes the model first
    (:func:`peftreg_plugins.qlora.quantize_base` with a :class:`QDoraConfig`), and the loaded
    DoRA layers then sit on the 4-bit layers with the same numbers as QDoRA's.
    """

    exported_fields = DoraPeftCodec.exported_fields | {
        "blocksize", "double_quant", "compute_dtype", "quantize"}

    def claims(self, doc: Mapping[str, Any]) -> bool:
        return False



def _default_targets(family: ModelFamily | None) -> list[str] | None:
    if family is None or "q" not in family.roles or "v" not in family.roles:
        return None
    return [family.roles["q"], family.roles["v"]]


def _count(model: nn.Module, config: LoraConfig, paths: list[str]) -> int:
    total = 0
    for path in paths:
        view = base_access(model.get_submodule(path))
        out_f, in_f = view.shape
        r, _ = config.rank_and_scale(path)
        # An embedding's magnitude has one entry per dimension (its second axis).
        total += r * (in_f + out_f) + (in_f if isinstance(view.module, nn.Embedding) else out_f)
    return total


def _add_layers(model: nn.Module, adapter_name: str, config: DoraConfig | QDoraConfig,
                paths: list[str], dtype: torch.dtype | None) -> list[str]:
    """A DoRA layer on each of ``paths`` (dense or 4-bit linear bases, embeddings)."""
    for path in paths:
        host = host_for(model, path)
        r, scaling = config.rank_and_scale(path)
        view = base_access(host)
        layer: _DoraLayer
        if isinstance(view.module, nn.Embedding):
            layer = DoraEmbedding(view, r, scaling, dtype)  # PEFT has no dropout there either
        else:
            layer = DoraLinear(view, r, scaling, config.lora_dropout, config.init_lora_weights,
                               dtype)
        host.adapters[adapter_name] = layer
    return paths


class DoraMethod(PEFTMethod[DoraConfig]):
    """Weight-decomposed low-rank updates (magnitude and direction); mergeable."""

    name: ClassVar[str] = "dora"
    config_cls = DoraConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=True)
    peft_codec: ClassVar[PeftCodec] = DoraPeftCodec()
    api_level: ClassVar[int] = 2
    # The paper trains DoRA with LoRA's settings (its section 5 and appendix tables use the
    # same or half the LoRA rate); LoRA's measured default suits it.
    suggested_learning_rate: ClassVar[float] = 2e-3
    size_field: ClassVar[str | None] = "r"

    def _targets(self, model: nn.Module, config: DoraConfig,
                 family: ModelFamily | None) -> list[str]:
        return select_targets(model, config, _DORA_SUPPORTED, family,
                              _default_targets(family))

    def inject(self, model: nn.Module, adapter_name: str, config: DoraConfig,
               family: ModelFamily | None) -> list[str]:
        paths = self._targets(model, config, family)
        dtype = _DTYPES[config.adapter_dtype] if config.adapter_dtype else None
        return _add_layers(model, adapter_name, config, paths, dtype)

    def parameter_count(self, model: nn.Module, config: DoraConfig,
                        family: ModelFamily | None) -> int:
        """``sum over adapted matrices of r * (d_in + d_out) + d_out`` (factors and magnitude)."""
        return _count(model, config, self._targets(model, config, family))


class QDoraMethod(PEFTMethod[QDoraConfig]):
    """DoRA on a 4-bit NF4 base (QDoRA); merging densifies the base."""

    name: ClassVar[str] = "qdora"
    config_cls = QDoraConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=True, quantized_base=True)
    peft_codec: ClassVar[PeftCodec] = QDoraPeftCodec()
    api_level: ClassVar[int] = 2
    suggested_learning_rate: ClassVar[float] = 2e-3
    size_field: ClassVar[str | None] = "r"

    def _targets(self, model: nn.Module, config: QDoraConfig,
                 family: ModelFamily | None) -> list[str]:
        return select_targets(model, config, _SUPPORTED, family, ALL_LINEAR)

    def inject(self, model: nn.Module, adapter_name: str, config: QDoraConfig,
               family: ModelFamily | None) -> list[str]:
        paths = self._targets(model, config, family)
        quantize_base(model, config, family)
        compute = _DTYPES[config.compute_dtype]
        dtype = _DTYPES[config.adapter_dtype] if config.adapter_dtype else compute
        return _add_layers(model, adapter_name, config, paths, dtype)

    def parameter_count(self, model: nn.Module, config: QDoraConfig,
                        family: ModelFamily | None) -> int:
        """As DoRA: ``r * (d_in + d_out) + d_out`` per adapted matrix."""
        return _count(model, config, self._targets(model, config, family))


@hookimpl
def peftreg_register_methods() -> list[PEFTMethod[Any]]:
    """Provide DoRA and QDoRA."""
    return [DoraMethod(), QDoraMethod()]
