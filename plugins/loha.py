# SPDX-License-Identifier: Apache-2.0
"""LoHa: low-rank Hadamard-product adaptation (Hyeon-Woo et al. 2022, FedPara).

A frozen weight ``W`` (out x in) is adapted as ``W + (alpha / r) * (W1a W1b) * (W2a W2b)``, the
element-wise (Hadamard) product of two rank-``r`` products (paper eq. 2). The product of two
rank-``r`` matrices has rank up to ``r^2``, so LoHa reaches a higher rank than LoRA with the same
``2 r (in + out)`` parameters. ``W2b`` starts at zero and the others Kaiming-uniform (as
``nn.Linear``), so training starts exactly at the base model.

Conventions follow HF PEFT's ``LoHaConfig`` (the scale ``alpha / r``, ``rank_dropout`` on rows of
the update with the surviving rows rescaled to keep the mean, ``module_dropout`` skipping the
whole adapter for a step) and so do the tensor names and shapes: ``hada_w1_a`` (out x r),
``hada_w1_b`` (r x in), ``hada_w2_a`` (out x r), ``hada_w2_b`` (r x in), saved as
``<module path>.hada_w1_a`` and so on.

The module also holds what LoHa shares with LoKr (``peftreg_plugins.lokr``): the LyCORIS
config fields and the per-module rank and alpha overrides.
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
    TargetedConfig,
    UnsafePatternError,
    UnsupportedOperationError,
    base_access,
    compile_pattern,
    hookimpl,
    host_for,
    merge_weight,
    pattern_fullmatch,
    select_targets,
)


@dataclasses.dataclass
class LycorisConfig(TargetedConfig):
    """Fields LoHa and LoKr share (HF PEFT's ``LycorisConfig`` plus the rank and dropouts).

    Attributes:
        r: rank of the factors (> 0).
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        rank_dropout: in training, the probability of dropping each output row of the update.
        module_dropout: in training, the probability of skipping the whole adapter for a call.
        init_weights: ``True`` starts at the base model (one factor zero); ``False`` draws every
            factor at random (for tests).
        rank_pattern: per-module rank overrides; a key matches a module path that ends with it
            after a ``.`` (or equals it), read as a regex, as PEFT matches them.
        alpha_pattern: per-module ``alpha`` overrides, same keys.
    """

    r: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init_weights: bool = True
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise self.error("r", "rank must be > 0", self.r)
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise self.error("alpha", "must be a finite number > 0", self.alpha)
        for field in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise self.error(field, "must be in [0, 1)", getattr(self, field))
        for key, rank in self.rank_pattern.items():
            if rank <= 0:
                raise self.error("rank_pattern", f"rank for {key!r} must be > 0", rank)
        for key, alpha in self.alpha_pattern.items():
            if not math.isfinite(alpha) or alpha <= 0:
                raise self.error("alpha_pattern", f"alpha for {key!r} must be > 0", alpha)
        for field in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field):
                try:  # keys come from users and files: bounded-time matching
                    compile_pattern(_suffix_regex(key), f"{type(self).__name__}.{field}")
                except UnsafePatternError as exc:
                    raise self.error(field, f"key {exc.problem}") from exc

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """Rank and alpha for the module at ``path`` (after per-module overrides)."""
        return (int(_pattern_value(self.rank_pattern, path, self.r)),
                float(_pattern_value(self.alpha_pattern, path, self.alpha)))


def _suffix_regex(key: str) -> str:
    # PEFT's rule: the key, as a regex, matches the whole path or a dot-separated tail of it.
    return rf"(?:.*\.)?(?:{key})"


def _pattern_value(pattern: dict[str, Any], path: str, default: float) -> float:
    for key, value in pattern.items():
        if pattern_fullmatch(_suffix_regex(key), path):
            return value
    return default


def row_dropout(delta: torch.Tensor, p: float, rescale: bool) -> torch.Tensor:
    """Drop whole output rows of a dense update with probability ``p`` (LyCORIS rank dropout).

    With ``rescale`` the kept rows are divided by the kept fraction, so the update's mean stays;
    a draw that drops every row leaves a zero update rather than dividing by zero.
    """
    keep = (torch.rand(delta.shape[0], device=delta.device) > p).to(delta.dtype)
    if rescale:
        keep = keep / keep.mean().clamp_min(torch.finfo(delta.dtype).tiny)
    return delta * keep.view(-1, *([1] * (delta.dim() - 1)))


def skip_module(training: bool, p: float) -> bool:
    """Whether LyCORIS module dropout skips this call (only in training, with probability p)."""
    return training and p > 0 and bool(torch.rand(()) <= p)


def new_factor(rows: int, cols: int, like: Any) -> nn.Parameter:
    """An uninitialised factor on the base's device and in its compute dtype."""
    return nn.Parameter(torch.empty(rows, cols, device=like.device, dtype=like.dtype))


def kaiming_(p: torch.Tensor) -> None:
    """``nn.Linear``'s default init (PEFT's choice for the LyCORIS factors)."""
    nn.init.kaiming_uniform_(p, a=math.sqrt(5))


class DenseUpdateLayer(LayerAdapter):
    """What LoHa and LoKr layers share: both build their dense update ``delta_weight()`` (with
    rank and module dropout while training), add ``x delta^T`` to the base output, and merge
    by adding it to the weight. Subclasses set ``rank_dropout``, ``module_dropout`` and
    ``rank_dropout_scale`` (whether rank dropout rescales the kept rows)."""

    rank_dropout: float
    module_dropout: float
    rank_dropout_scale: bool

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _update(self) -> torch.Tensor | None:
        # The update for this call (None: module dropout skips the adapter).
        if skip_module(self.training, self.module_dropout):
            return None
        delta = self.delta_weight()
        if self.training and self.rank_dropout > 0:
            delta = row_dropout(delta, self.rank_dropout, rescale=self.rank_dropout_scale)
        return delta

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = self._update()
        if delta is None:
            return y
        return y + F.linear(x.to(delta.dtype), delta).to(y.dtype)

    def merge_into(self, base: nn.Module) -> None:
        w = merge_weight(base)
        w.copy_((w.float() + self.delta_weight().float().reshape(w.shape)).to(w.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        w = merge_weight(base)
        w.copy_((w.float() - self.delta_weight().float().reshape(w.shape)).to(w.dtype))


class HadamardProduct(torch.autograd.Function):
    """``scale * (w1a @ w1b) * (w2a @ w2b)`` keeping only the four factors for the backward.

    Plain autograd would keep both dense products ``w1a @ w1b`` and ``w2a @ w2b`` (each the size
    of the weight) for the element-wise product's backward, on top of the update itself, which
    the layer's matmul keeps. The backward recomputes them from the factors instead: two
    rank-``r`` matmuls, against the two dense tensors held per layer until the backward.
    """

    @staticmethod
    def forward(ctx: Any, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor,
                w2b: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        # d/dW1 of (W1 * W2) is grad * W2, then through W1 = w1a @ w1b; likewise for W2.
        g1 = grad * (w2a @ w2b)
        grad_w1a, grad_w1b = g1 @ w1b.T, w1a.T @ g1
        del g1
        g2 = grad * (w1a @ w1b)
        return grad_w1a, grad_w1b, g2 @ w2b.T, w2a.T @ g2, None


class LohaLinear(DenseUpdateLayer):
    """LoHa factors for one ``nn.Linear``: ``y = base(x) + x ((w1a w1b) * (w2a w2b))^T s``."""

    def __init__(self, base: nn.Module, r: int, alpha: float, rank_dropout: float,
                 module_dropout: float, init_weights: bool) -> None:
        super().__init__()
        view = base_access(base)  # shapes and dtype only; nothing of the base is kept
        self._make_factors(*view.shape, view, r, alpha, rank_dropout, module_dropout,
                           init_weights)

    def _make_factors(self, out_f: int, in_f: int, like: Any, r: int, alpha: float,
                      rank_dropout: float, module_dropout: float, init_weights: bool) -> None:
        self.hada_w1_a = new_factor(out_f, r, like)
        self.hada_w1_b = new_factor(r, in_f, like)
        self.hada_w2_a = new_factor(out_f, r, like)
        self.hada_w2_b = new_factor(r, in_f, like)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.rank_dropout_scale = True  # PEFT's LoHa always rescales
        with torch.no_grad():
            for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b):
                kaiming_(p)
            if init_weights:
                # One zero factor makes the product zero while every factor still gets gradients
                # once it moves.
                nn.init.zeros_(self.hada_w2_b)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scaling * (w1a @ w1b) * (w2a @ w2b)``, shape (out, in)."""
        return HadamardProduct.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a,
                                     self.hada_w2_b, self.scaling)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


class LohaConv2d(LohaLinear):
    """LoHa factors for one ``nn.Conv2d``, over its flattened kernel (PEFT's default layout).

    The update is ``(out, in / groups * kh * kw)``, reshaped to the kernel and applied as a
    convolution with the base's stride, padding, dilation and groups. (PEFT's
    ``use_effective_conv2d`` Tucker form is not implemented.)
    """

    def __init__(self, base: nn.Conv2d, r: int, alpha: float, rank_dropout: float,
                 module_dropout: float, init_weights: bool, label: str = "") -> None:
        LayerAdapter.__init__(self)
        if base.padding_mode != "zeros":
            raise UnsupportedOperationError(
                f"loha on {label or 'a Conv2d'}: padding_mode {base.padding_mode!r} is not "
                "supported (PEFT applies the update with zero padding)")
        kh, kw = base.kernel_size
        self.kernel_shape = (base.out_channels, base.in_channels // base.groups, kh, kw)
        self.stride, self.dilation, self.groups = base.stride, base.dilation, base.groups
        self.padding: Any = base.padding  # a tuple, or "same" / "valid"
        self._make_factors(base.out_channels, self.kernel_shape[1] * kh * kw, base.weight, r,
                           alpha, rank_dropout, module_dropout, init_weights)

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = self._update()
        if delta is None:
            return y
        kernel = delta.reshape(self.kernel_shape)
        out = F.conv2d(x.to(kernel.dtype), kernel, None, self.stride, self.padding,
                       self.dilation, self.groups)
        return y + out.to(y.dtype)


def adapted_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of the update matrix for a Linear or (flattened) Conv2d base."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.out_channels, module.in_channels // module.groups * kh * kw
    return base_access(module).shape


@dataclasses.dataclass
class LohaConfig(LycorisConfig):
    """Config of a LoHa adapter (see :class:`LycorisConfig` for the fields).

    ``target_modules=None`` takes the model family's query and value projections, as PEFT's
    defaults for LoHa do.
    """

    method: ClassVar[str] = "loha"


def default_targets(family: ModelFamily | None) -> list[str] | None:
    """The family's query and value projections (PEFT's LyCORIS defaults), or None."""
    if family is None or "q" not in family.roles or "v" not in family.roles:
        return None
    return [family.roles["q"], family.roles["v"]]


# -- Hugging Face PEFT's format (peft_type LOHA; the LyCORIS part is shared with LoKr) ---------

LYCORIS_MAPPED: Final = frozenset({
    "r", "alpha", "rank_dropout", "module_dropout", "rank_pattern", "alpha_pattern",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "modules_to_save"})
LYCORIS_IGNORED: Final = {
    "init_weights": "initialisation only (the file holds the trained factors)",
    "use_effective_conv2d": "changes only convolutions with kernels larger than 1x1, whose "
                            "files then hold Tucker cores (hada_t1, hada_t2, lokr_t2), which "
                            "are refused as unknown tensors",
}
LYCORIS_EXPORTED: Final = frozenset({
    "r", "alpha", "rank_dropout", "module_dropout", "rank_pattern", "alpha_pattern",
    "init_weights", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "modules_to_save"})
LOHA_LEAVES: Final = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def peft_rank(doc: Mapping[str, Any], path: str) -> int:
    """The rank a PEFT LyCORIS document gives the module at ``path`` (its rank_pattern first)."""
    return int(_pattern_value(doc.get("rank_pattern") or {}, path, doc.get("r", 8)))


def lycoris_fields(ctx: PeftImport) -> dict[str, Any]:
    """The LyCORIS config fields of a PEFT LOHA/LOKR document (the keys mean the same here,
    pattern keys included: both libraries match them as a regex on a dotted path tail)."""
    doc = ctx.doc
    fields: dict[str, Any] = {k: doc[k] for k in ("r", "alpha", "rank_dropout", "module_dropout")
                              if k in doc}
    for key in ("rank_pattern", "alpha_pattern"):
        value = doc.get(key) or {}
        if not isinstance(value, dict):
            raise ctx.config_error(f"{key} must be an object, got {value!r}")
        fields[key] = dict(value)
    return fields


def lycoris_body(ctx: PeftExport, found: ModuleTensors) -> dict[str, Any]:
    """PEFT's LOHA/LOKR keys for a peftreg LoHa/LoKr config (PEFT's defaults included)."""
    config: Any = ctx.config
    alpha = config.alpha
    body: dict[str, Any] = ctx.target_fields(found)
    body.update({
        "r": config.r, "alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "rank_dropout": config.rank_dropout, "module_dropout": config.module_dropout,
        "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
        "use_effective_conv2d": False, "init_weights": True,
        "layers_to_transform": None, "layers_pattern": None,
    })
    return body


class LohaPeftCodec(PeftCodec):
    """PEFT's LOHA documents: four factors per Linear layer, under the same leaf names."""

    peft_type = "LOHA"
    keys = PeftKeys(mapped=LYCORIS_MAPPED, ignored=LYCORIS_IGNORED)
    exported_fields = LYCORIS_EXPORTED

    def read(self, ctx: PeftImport, tensors: Mapping[str, torch.Tensor]
             ) -> tuple[dict[str, Any], ModuleTensors]:
        found = ctx.read_modules(tensors, LOHA_LEAVES)
        for path, parts in found.adapted.items():
            prefix = f"base_model.model.{path}"
            missing = [leaf for leaf in LOHA_LEAVES if leaf not in parts]
            if missing:
                ctx.tensor_problem(f"{prefix}.{missing[0]}", "missing: LoHa needs all four "
                                   f"factors {', '.join(LOHA_LEAVES)}")
                continue
            w1a, w1b, w2a, w2b = (parts[leaf] for leaf in LOHA_LEAVES)
            if any(t.dim() != 2 for t in (w1a, w1b, w2a, w2b)) or not (
                    w1a.shape == w2a.shape and w1b.shape == w2b.shape
                    and w1a.shape[1] == w1b.shape[0]):
                ctx.tensor_problem(f"{prefix}.hada_w1_a", "the factors' shapes "
                                   f"{[tuple(t.shape) for t in (w1a, w1b, w2a, w2b)]} are not "
                                   "(out, r), (r, in), (out, r), (r, in)")
        fields = ctx.target_fields(found)
        fields.update(lycoris_fields(ctx))
        return fields, found

    def write(self, ctx: PeftExport) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        found = ctx.modules(LOHA_LEAVES)
        return lycoris_body(ctx, found), found.tensors


class LohaMethod(PEFTMethod[LohaConfig]):
    """Hadamard products of low-rank factors on Linear weights; mergeable."""

    name: ClassVar[str] = "loha"
    config_cls = LohaConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=True)
    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d, Linear4bit)
    # Measured: 30 AdamW steps on the tiny Llama of the tests (all-linear, r=8), rates 3e-4 to
    # 1e-1: the loss is lowest at the same rate as for LoRA (3e-2 there), so LoRA's suggestion.
    suggested_learning_rate: ClassVar[float] = 2e-3
    size_field: ClassVar[str | None] = "r"
    peft_codec: ClassVar[PeftCodec] = LohaPeftCodec()
    api_level: ClassVar[int] = 2  # the PEFT codec

    def inject(self, model: nn.Module, adapter_name: str, config: LohaConfig,
               family: ModelFamily | None) -> list[str]:
        paths = select_targets(model, config, self.supported, family, default_targets(family))
        for path in paths:
            host = host_for(model, path)
            r, alpha = config.rank_and_alpha(path)
            args = (r, alpha, config.rank_dropout, config.module_dropout, config.init_weights)
            base = host.base
            host.adapters[adapter_name] = (
                LohaConv2d(base, *args, label=f"{adapter_name!r} on {path!r}")
                if isinstance(base, nn.Conv2d) else LohaLinear(base, *args))
        return paths

    def parameter_count(self, model: nn.Module, config: LohaConfig,
                        family: ModelFamily | None) -> int:
        """``2 r (d_in + d_out)`` per adapted matrix (two rank-r products); a Conv2d counts
        ``d_in = in_channels / groups * kh * kw``."""
        total = 0
        for path in select_targets(model, config, self.supported, family,
                                   default_targets(family)):
            out_f, in_f = adapted_shape(model.get_submodule(path))
            total += 2 * config.rank_and_alpha(path)[0] * (in_f + out_f)
        return total


@hookimpl
def peftreg_register_methods() -> list[PEFTMethod[Any]]:
    """Provide LoHa."""
    return [LohaMethod()]
