# SPDX-License-Identifier: Apache-2.0
"""QLoRA (Dettmers et al. 2023): LoRA adapters on a frozen base stored in 4-bit NormalFloat.

The targeted base Linear layers (by default every linear layer except the output head, as in
the paper) are replaced by :class:`peftreg.nn.Linear4bit` (NF4 with double quantization, about
4.13 bits per weight at block 64); LoRA factors in the compute dtype sit on top. Gradients flow
through the 4-bit product to the adapters only: the quantized weight is never materialised as a
dense matrix during training.

Quantization replaces the base layers for good: deleting the adapter leaves them 4-bit.
Merging densifies the adapted layers (dequantize, then add the LoRA update), so
``merge_and_unload()`` returns a dense model; :func:`requantize` turns its merged layers back into
4-bit ones and reports the error that adds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from peftreg.plugin import (
    ALL_LINEAR,
    AdapterHost,
    Capabilities,
    Linear4bit,
    ModelFamily,
    ModuleTensors,
    PeftCodec,
    PeftImport,
    PEFTMethod,
    TargetedConfig,
    TargetNotFoundError,
    base_access,
    hookimpl,
    host_for,
    output_head_paths,
    replace_module,
    select_targets,
)
from peftreg.plugin import (
    dense_linear as sdk_dense_linear,
)
from peftreg_plugins.lora import LoraConfig, LoraLinear
from peftreg_plugins.lora_peft import LoraPeftCodec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class QLoraConfig(LoraConfig):
    """Config of a QLoRA adapter: every LoRA field, plus the quantization of the base.

    Attributes:
        blocksize: NF4 block size (a power of two in 32..4096; the paper uses 64).
        double_quant: quantize the per-block scales again (8-bit, blocks of 256).
        compute_dtype: dtype the 4-bit product and the LoRA factors compute in.
        quantize: ``"all-linear"`` quantizes every linear layer except the output head (the
            paper's setting); ``"targets"`` only the layers LoRA adapts.
        target_modules: as for LoRA, but ``None`` means ``"all-linear"`` (the paper adapts every
            linear layer).
    """

    method: ClassVar[str] = "qlora"

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quantize: Literal["all-linear", "targets"] = "all-linear"

    def validate(self) -> None:
        super().validate()
        b = self.blocksize
        if b < 32 or b > 4096 or b & (b - 1):
            raise self.error("blocksize", "must be a power of two in 32..4096", b)
        if self.init_lora_weights in ("pissa", "olora"):
            raise self.error("init_lora_weights", "rewrites the base weight, which a 4-bit "
                             "base cannot hold exactly; initialise on the dense model",
                             self.init_lora_weights)


class _QuantizeSpec(TargetedConfig):
    """Target spec for the layers to quantize (``"all-linear"`` minus excluded ones)."""


def _quantize_paths(model: nn.Module, config: QLoraConfig, family: ModelFamily | None,
                    lora_paths: list[str]) -> list[str]:
    if config.quantize == "targets":
        return lora_paths
    spec = _QuantizeSpec(target_modules=ALL_LINEAR)
    paths = select_targets(model, spec, (nn.Linear, Linear4bit), family)
    heads = output_head_paths(model, family)
    return [p for p in paths if p not in heads]


def _quantize(model: nn.Module, path: str, config: QLoraConfig) -> Linear4bit:
    module = model.get_submodule(path)
    host = module if isinstance(module, AdapterHost) else None
    base = host.base if host is not None else module
    if isinstance(base, Linear4bit):
        return base
    if not isinstance(base, nn.Linear):
        raise TargetNotFoundError(f"QLoRA can only quantize nn.Linear; {path!r} is a "
                                          f"{type(base).__name__}")
    quantized = Linear4bit.from_linear(base, blocksize=config.blocksize,
                                       double_quant=config.double_quant,
                                       compute_dtype=_DTYPES[config.compute_dtype])
    if host is not None:
        host.base = quantized
    else:
        replace_module(model, path, quantized)
    return quantized


def quantize_base(model: nn.Module, config: QLoraConfig,
                  family: ModelFamily | None = None) -> list[str]:
    """Replace the layers ``config`` quantizes by :class:`Linear4bit` (what injection does
    first); useful to build the 4-bit base model itself, e.g. for comparisons and tests.

    Returns:
        The quantized layer paths.
    """
    lora_paths = select_targets(model, config, (nn.Linear, Linear4bit), family, ALL_LINEAR)
    paths = _quantize_paths(model, config, family, lora_paths)
    for path in paths:
        _quantize(model, path, config)
    return paths


class QLoraPeftCodec(LoraPeftCodec):
    """QLoRA in PEFT's format: a PEFT LoRA trained on a 4-bit base is a plain ``LORA``
    document (the quantization belongs to the base model, bitsandbytes' config, not to the
    adapter), so the tensors and keys are LoRA's.

    Read only when the load names ``"qlora"`` (LoRA reads LORA documents otherwise): the base
    is then quantized with the QLoRA config's defaults (NF4, block 64, double quantization,
    bfloat16 compute). An export drops those fields, which PEFT keeps in the base model's
    ``BitsAndBytesConfig``.
    """

    explicit_only = True
    exported_fields = LoraPeftCodec.exported_fields | {
        "blocksize", "double_quant", "compute_dtype", "quantize"}

    def read(self, ctx: PeftImport, tensors: Mapping[str, torch.Tensor]
             ) -> tuple[dict[str, Any], ModuleTensors]:
        fields, found = super().read(ctx, tensors)
        fields.update(_quantization_of(ctx, list(found.adapted)))
        return fields, found


def _quantization_of(ctx: PeftImport, adapted: list[str]) -> dict[str, Any]:
    """QLoRA fields describing a base that is already 4-bit (taken as it is: only the adapted
    layers still dense are quantized, like the others); none for a dense base."""
    layers = {path: m for path, m in ctx.base_modules() if isinstance(m, Linear4bit)}
    if not layers:
        return {}
    kinds = {(m.blocksize, m.weight_nested_absmax is not None, m.compute_dtype)
             for m in layers.values()}
    if len(kinds) > 1:
        raise ctx.config_error(
            "the model's 4-bit layers differ in block size, double quantization or compute "
            f"dtype ({sorted(str(k) for k in kinds)}), which one QLoRA config cannot describe; "
            "load it as 'lora' (LoRA adapts 4-bit layers as they are)")
    blocksize, double_quant, dtype = kinds.pop()
    names = {v: k for k, v in _DTYPES.items()}
    if dtype not in names:
        raise ctx.config_error(f"the model's 4-bit layers compute in {dtype}, not a QLoRA "
                               f"compute_dtype ({', '.join(_DTYPES)})")
    return {"blocksize": blocksize, "double_quant": double_quant,
            "compute_dtype": names[dtype], "quantize": "targets"}


class QLoraMethod(PEFTMethod[QLoraConfig]):
    """LoRA on a 4-bit NF4 base with double quantization; merging densifies the base."""

    name: ClassVar[str] = "qlora"
    config_cls = QLoraConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=True, quantized_base=True,
                                                       compilable=True)
    suggested_learning_rate: ClassVar[float] = 2e-3
    size_field: ClassVar[str | None] = "r"
    peft_codec: ClassVar[PeftCodec] = QLoraPeftCodec()

    def _targets(self, model: nn.Module, config: QLoraConfig,
                 family: ModelFamily | None) -> list[str]:
        return select_targets(model, config, (nn.Linear, Linear4bit), family, ALL_LINEAR)

    def inject(self, model: nn.Module, adapter_name: str, config: QLoraConfig,
               family: ModelFamily | None) -> list[str]:
        lora_paths = self._targets(model, config, family)
        quantize_base(model, config, family)
        dtype = _DTYPES[config.compute_dtype]
        for path in lora_paths:
            host = host_for(model, path)
            r, scaling = config.rank_and_scale(path)
            adapter_dtype = _DTYPES[config.adapter_dtype] if config.adapter_dtype else dtype
            host.adapters[adapter_name] = LoraLinear(
                host.base, r, scaling, config.lora_dropout, config.init_lora_weights,
                adapter_dtype)
        return lora_paths

    def parameter_count(
        self, model: nn.Module, config: QLoraConfig, family: ModelFamily | None
    ) -> int:
        """``sum over adapted matrices of r * (d_in + d_out)``, as LoRA."""
        total = 0
        for path in self._targets(model, config, family):
            out_f, in_f = base_access(model.get_submodule(path)).shape
            r, _ = config.rank_and_scale(path)
            total += r * (in_f + out_f)
        return total


def dense_linear(layer: Linear4bit) -> nn.Linear:
    """A dense ``nn.Linear`` (compute dtype) holding ``layer``'s dequantized weight."""
    return sdk_dense_linear(layer)


def requantize(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
               paths: list[str] | None = None) -> dict[str, float]:
    """Quantize dense Linear layers of a merged model back to NF4.

    Args:
        model: typically the result of ``merge_and_unload()``.
        blocksize: NF4 block size.
        double_quant: quantize the scales too.
        paths: layers to quantize (default: every ``nn.Linear`` except the output head).

    Returns:
        The relative Frobenius error each layer's weight gained, by path.
    """
    if paths is None:
        heads = output_head_paths(model, None)
        paths = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and p not in heads]
    errors = {}
    for path in paths:
        dense = model.get_submodule(path)
        if not isinstance(dense, nn.Linear):
            raise TargetNotFoundError(f"requantize: {path!r} is a {type(dense).__name__}, not an "
                                      "nn.Linear")
        quantized = Linear4bit.from_linear(dense, blocksize=blocksize, double_quant=double_quant,
                                           compute_dtype=dense.weight.dtype)
        original = dense.weight.detach().float()
        diff = quantized.dequantize().float() - original
        errors[path] = float(diff.norm() / original.norm().clamp_min(1e-12))
        replace_module(model, path, quantized)
    return errors


@hookimpl
def peftreg_register_methods() -> list[PEFTMethod[Any]]:
    """Provide QLoRA."""
    return [QLoraMethod()]
