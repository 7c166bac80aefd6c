# SPDX-License-Identifier: Apache-2.0
"""LoKr: Kronecker-product adaptation (Yeh et al. 2024, LyCORIS).

A frozen weight ``W`` (out x in) is adapted as ``W + (alpha / r) * kron(W1, W2)``. The output
width is factored as ``out = a * b`` and the input width as ``in = c * d`` by
:func:`factorization` (the divisor pair nearest the square root, or the one containing
``decompose_factor``), so ``W1`` is ``a x c`` and ``W2`` is ``b x d``. ``W2`` is kept full when
``r >= max(b, d) / 2`` and otherwise as the rank-``r`` product ``W2a W2b``; ``W1`` is full unless
``decompose_both`` is set and ``r < max(a, c) / 2``, when it is ``W1a W1b``. These are HF PEFT's
rules (``peft.tuners.lokr``), as are the names and shapes of the saved tensors: ``lokr_w1``
(a x c) or ``lokr_w1_a`` (a x r) and ``lokr_w1_b`` (r x c); ``lokr_w2`` (b x d) or ``lokr_w2_a``
(b x r) and ``lokr_w2_b`` (r x d). On an ``nn.Conv2d`` (``in = in_channels / groups``) ``W2``
also carries the kernel: ``lokr_w2`` is (b x d x kh x kw), ``lokr_w2_b`` (r x d kh kw).

At the start ``W1`` (or ``W1a``) is zero and the rest Kaiming-uniform, so the model equals the
base; ``init_weights="lycoris"`` zeroes ``W2`` (or ``W2b``) instead, as the LyCORIS repository
does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Final, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftreg.plugin import (
    Capabilities,
    ConfigError,
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
    select_targets,
)
from peftreg_plugins.loha import (
    LYCORIS_EXPORTED,
    LYCORIS_IGNORED,
    LYCORIS_MAPPED,
    DenseUpdateLayer,
    LycorisConfig,
    default_targets,
    kaiming_,
    lycoris_body,
    lycoris_fields,
    new_factor,
    peft_rank,
)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m * n == dimension`` (PEFT's rule).

    When ``factor`` divides ``dimension`` the split is ``(factor, dimension // factor)``
    (ordered as given, so ``m`` may exceed ``n``). Otherwise divisors ``m`` are tried upwards
    from 1 while ``m + n`` does not grow and ``m`` stays at most ``factor`` (no bound for
    ``-1``), which ends at the divisor pair nearest the square root, returned with
    ``m <= n``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        other = dimension // candidate
        if candidate + other > m + n or candidate > bound:
            break
        m, n = candidate, other
    return (n, m) if m > n else (m, n)


@dataclasses.dataclass(frozen=True)
class KronShapes:
    """Factor shapes of one layer: ``out = a * b``, ``in = c * d``, and which are low-rank.

    For a Conv2d, ``in`` is ``in_channels / groups`` and ``kernel`` its ``(kh, kw)``: ``W2``
    carries the kernel, full as ``(b, d, kh, kw)`` or low-rank with ``W2b`` ``(r, d kh kw)``.
    """

    a: int
    b: int
    c: int
    d: int
    r: int
    full_w1: bool
    full_w2: bool
    kernel: tuple[int, ...] = ()

    @classmethod
    def of(cls, out_features: int, in_features: int, r: int, decompose_both: bool,
           decompose_factor: int, kernel: tuple[int, ...] = ()) -> KronShapes:
        a, b = factorization(out_features, decompose_factor)
        c, d = factorization(in_features, decompose_factor)
        return cls(a, b, c, d, r,
                   full_w1=not (decompose_both and r < max(a, c) / 2),
                   full_w2=not r < max(b, d) / 2, kernel=tuple(kernel))

    @property
    def kernel_size(self) -> int:
        """Elements of one kernel (1 for a Linear layer)."""
        return math.prod(self.kernel)

    def parameter_count(self) -> int:
        """Numbers in the factors: full ``a c`` or ``r (a + c)`` for W1, full ``b d k`` or
        ``r (b + d k)`` for W2 (``k`` kernel elements, 1 for a Linear layer)."""
        k = self.kernel_size
        w1 = self.a * self.c if self.full_w1 else self.r * (self.a + self.c)
        w2 = self.b * self.d * k if self.full_w2 else self.r * (self.b + self.d * k)
        return w1 + w2


@dataclasses.dataclass
class LokrConfig(LycorisConfig):
    """Config of a LoKr adapter (:class:`~peftreg_plugins.loha.LycorisConfig` fields, plus:).

    Attributes:
        decompose_both: also write ``W1`` as a rank-``r`` product when ``r < max(a, c) / 2``.
        decompose_factor: the factor to split widths by (``-1``: nearest the square root); a
            value that divides no adapted width falls back to the square-root search bounded
            by it, as PEFT does.
        rank_dropout_scale: rescale the kept rows under ``rank_dropout`` (PEFT's default: no).
        init_weights: ``True`` (``W1`` zero), ``"lycoris"`` (``W2`` zero) or ``False`` (all
            random, for tests).
    """

    method: ClassVar[str] = "lokr"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | Literal["lycoris"] = True  # type: ignore[assignment]

    def validate(self) -> None:
        super().validate()
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise self.error("decompose_factor", "must be -1 (square root) or a positive integer",
                             self.decompose_factor)

    def shapes(self, path: str, out_features: int, in_features: int,
               kernel: tuple[int, ...] = ()) -> KronShapes:
        """The factor shapes for the module at ``path``."""
        r, _ = self.rank_and_alpha(path)
        return KronShapes.of(out_features, in_features, r, self.decompose_both,
                             self.decompose_factor, kernel)


class LokrLinear(DenseUpdateLayer):
    """LoKr factors for one ``nn.Linear``: ``y = base(x) + x (s kron(W1, W2))^T``."""

    def __init__(self, base: nn.Module, shapes: KronShapes, alpha: float, config: LokrConfig
                 ) -> None:
        super().__init__()
        # A Conv2d's weight is 4-D: its dtype and device are read from it directly.
        view: Any = base.weight if isinstance(base, nn.Conv2d) else base_access(base)
        s = shapes
        if s.full_w1:
            self.lokr_w1 = new_factor(s.a, s.c, view)
        else:
            self.lokr_w1_a = new_factor(s.a, s.r, view)
            self.lokr_w1_b = new_factor(s.r, s.c, view)
        if s.full_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(s.b, s.d, *s.kernel, device=view.device,
                                                    dtype=view.dtype))
        else:
            self.lokr_w2_a = new_factor(s.b, s.r, view)
            self.lokr_w2_b = new_factor(s.r, s.d * s.kernel_size, view)
        self.shapes, self.alpha, self.scaling = s, alpha, alpha / s.r
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout
        self.rank_dropout_scale = config.rank_dropout_scale
        with torch.no_grad():
            for p in self.parameters():
                kaiming_(p)
            init = config.init_weights
            if init is True:
                nn.init.zeros_(self.lokr_w1 if s.full_w1 else self.lokr_w1_a)
            elif init == "lycoris":
                nn.init.zeros_(self.lokr_w2 if s.full_w2 else self.lokr_w2_b)

    def w1(self) -> torch.Tensor:
        """The left Kronecker factor (a x c)."""
        return self.lokr_w1 if self.shapes.full_w1 else self.lokr_w1_a @ self.lokr_w1_b

    def w2(self) -> torch.Tensor:
        """The right Kronecker factor (b x d)."""
        return self.lokr_w2 if self.shapes.full_w2 else self.lokr_w2_a @ self.lokr_w2_b

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scaling * kron(W1, W2)``: (out, in) for a Linear layer,
        (out, in / groups * kh * kw) for a Conv2d (reshape to the kernel to apply it)."""
        w1, w2 = self.w1(), self.w2()
        if w2.dim() == 4:  # a full conv W2: W1 spans channels only
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2) * self.scaling
        return delta.reshape(delta.shape[0], -1)

    def extra_repr(self) -> str:
        s = self.shapes
        return (f"w1={s.a}x{s.c}{'' if s.full_w1 else f' (rank {s.r})'}, "
                f"w2={s.b}x{s.d}{'' if s.full_w2 else f' (rank {s.r})'}, "
                f"scaling={self.scaling:g}")


class LokrConv2d(LokrLinear):
    """LoKr factors for one ``nn.Conv2d`` (PEFT's layout without ``use_effective_conv2d``):
    the update is reshaped to the kernel and applied with the base's stride, padding,
    dilation and groups."""

    def __init__(self, base: nn.Conv2d, shapes: KronShapes, alpha: float, config: LokrConfig,
                 label: str = "") -> None:
        if base.padding_mode != "zeros":
            raise UnsupportedOperationError(
                f"lokr on {label or 'a Conv2d'}: padding_mode {base.padding_mode!r} is not "
                "supported (PEFT applies the update with zero padding)")
        super().__init__(base, shapes, alpha, config)
        self.kernel_shape = tuple(base.weight.shape)
        self.stride, self.dilation, self.groups = base.stride, base.dilation, base.groups
        self.padding: Any = base.padding  # a tuple, or "same" / "valid"

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = self._update()
        if delta is None:
            return y
        kernel = delta.reshape(self.kernel_shape)
        out = F.conv2d(x.to(kernel.dtype), kernel, None, self.stride, self.padding,
                       self.dilation, self.groups)
        return y + out.to(y.dtype)


def _checked_shapes(config: LokrConfig, path: str, module: nn.Module) -> KronShapes:
    if isinstance(module, nn.Conv2d):
        out_f, in_f = module.out_channels, module.in_channels // module.groups
        shapes = config.shapes(path, out_f, in_f, tuple(module.kernel_size))
    else:
        out_f, in_f = base_access(module).shape
        shapes = config.shapes(path, out_f, in_f)
    if config.decompose_factor > 0 and (shapes.a, shapes.c) == (1, 1):
        # Both widths prime (or the factor search gave nothing): kron(1x1, W2) is a dense
        # (out x in) W2, which is full fine-tuning of the layer, not LoKr.
        raise ConfigError(
            f"LokrConfig.decompose_factor: {config.decompose_factor} gives no Kronecker "
            f"split of {path!r} ({out_f} x {in_f}); choose a factor that divides its widths")
    return shapes


# -- Hugging Face PEFT's format (peft_type LOKR) ------------------------------------------------

LOKR_LEAVES: Final = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_LOKR_FIELDS: Final = ("decompose_both", "decompose_factor", "rank_dropout_scale")


def _factor(ctx: PeftImport, prefix: str, parts: Mapping[str, torch.Tensor], name: str
            ) -> tuple[int, int, bool] | None:
    """``(rows, cols, full)`` of factor ``name`` (``lokr_w1`` or ``lokr_w2``), or None after
    recording why it cannot be read (a full conv ``lokr_w2`` is 4-D: its kernel is not in
    ``cols``)."""
    full, a, b = parts.get(name), parts.get(f"{name}_a"), parts.get(f"{name}_b")
    dims = (2, 4) if name == "lokr_w2" else (2,)
    if full is not None and a is None and b is None and full.dim() in dims:
        return full.shape[0], full.shape[1], True
    if full is None and a is not None and b is not None and a.dim() == b.dim() == 2 \
            and a.shape[1] == b.shape[0]:
        return a.shape[0], b.shape[1], False
    shapes = {k: tuple(t.shape) for k, t in parts.items() if k.startswith(name)}
    ctx.tensor_problem(f"{prefix}.{name}", f"expected either {name} (2-D, or 4-D for a "
                       f"convolution's W2) or {name}_a and {name}_b of a matching rank, got "
                       f"{shapes or 'none'}")
    return None


def _kernel(ctx: PeftImport, path: str, parts: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The kernel a file's factors carry: from a full 4-D W2, else from the model's module."""
    full = parts.get("lokr_w2")
    if full is not None and full.dim() == 4:
        return tuple(full.shape[2:])
    module = None
    if ctx.model is not None:
        try:
            module = ctx.model.get_submodule(path)
        except AttributeError:
            module = None
    return tuple(module.kernel_size) if isinstance(module, nn.Conv2d) else ()


class LokrPeftCodec(PeftCodec):
    """PEFT's LOKR documents: a full or low-rank pair of Kronecker factors per Linear layer."""

    peft_type = "LOKR"
    keys = PeftKeys(mapped=LYCORIS_MAPPED | set(_LOKR_FIELDS), ignored={
        **LYCORIS_IGNORED,
        "init_weights": "initialisation only (True, 'lycoris' or False pick which factor "
                        "starts at zero; the file holds the trained factors)"})
    exported_fields = LYCORIS_EXPORTED | set(_LOKR_FIELDS)

    def read(self, ctx: PeftImport, tensors: Mapping[str, torch.Tensor]
             ) -> tuple[dict[str, Any], ModuleTensors]:
        doc = ctx.doc
        found = ctx.read_modules(tensors, LOKR_LEAVES)
        for path, parts in found.adapted.items():
            prefix = f"base_model.model.{path}"
            w1, w2 = _factor(ctx, prefix, parts, "lokr_w1"), _factor(ctx, prefix, parts,
                                                                     "lokr_w2")
            if w1 is None or w2 is None:
                continue
            r = peft_rank(doc, path)
            kernel = _kernel(ctx, path, parts)
            d = w2[1] if w2[2] else w2[1] // max(math.prod(kernel), 1)
            got = (w1[0], w2[0], w1[1], d, w1[2], w2[2])
            rule = KronShapes.of(w1[0] * w2[0], w1[1] * d, r,
                                 bool(doc.get("decompose_both", False)),
                                 int(doc.get("decompose_factor", -1)), kernel)
            if got != (rule.a, rule.b, rule.c, rule.d, rule.full_w1, rule.full_w2):
                ctx.tensor_problem(f"{prefix}.lokr_w1", f"factors W1 {w1[0]}x{w1[1]} "
                                   f"({'full' if w1[2] else 'low-rank'}) and W2 {w2[0]}x{w2[1]} "
                                   f"({'full' if w2[2] else 'low-rank'}) are not what LoKr's "
                                   f"rules give for r={r} and this config")
        fields = ctx.target_fields(found)
        fields.update(lycoris_fields(ctx))
        fields.update({k: doc[k] for k in _LOKR_FIELDS if k in doc})
        return fields, found

    def write(self, ctx: PeftExport) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config: Any = ctx.config
        found = ctx.modules(LOKR_LEAVES)
        body = lycoris_body(ctx, found)
        body.update({k: getattr(config, k) for k in _LOKR_FIELDS})
        return body, found.tensors


class LokrMethod(PEFTMethod[LokrConfig]):
    """Kronecker products of small factors on Linear weights; mergeable."""

    name: ClassVar[str] = "lokr"
    config_cls = LokrConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=True)
    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d, Linear4bit)
    # Measured as for LoHa (tiny Llama, all-linear, r=8, 30 AdamW steps): lowest loss at 5e-2
    # against LoRA's 3e-2, so about 1.5x LoRA's suggestion.
    suggested_learning_rate: ClassVar[float] = 3e-3
    size_field: ClassVar[str | None] = "r"
    peft_codec: ClassVar[PeftCodec] = LokrPeftCodec()
    api_level: ClassVar[int] = 2  # the PEFT codec

    def inject(self, model: nn.Module, adapter_name: str, config: LokrConfig,
               family: ModelFamily | None) -> list[str]:
        paths = select_targets(model, config, self.supported, family, default_targets(family))
        plans = [(p, _checked_shapes(config, p, model.get_submodule(p))) for p in paths]
        for path, shapes in plans:
            host = host_for(model, path)
            _, alpha = config.rank_and_alpha(path)
            base = host.base
            host.adapters[adapter_name] = (
                LokrConv2d(base, shapes, alpha, config, f"{adapter_name!r} on {path!r}")
                if isinstance(base, nn.Conv2d) else LokrLinear(base, shapes, alpha, config))
        return paths

    def parameter_count(self, model: nn.Module, config: LokrConfig,
                        family: ModelFamily | None) -> int:
        """Per adapted matrix: ``a c`` or ``r (a + c)`` for W1 plus ``b d`` or ``r (b + d)``
        for W2, with ``out = a b`` and ``in = c d`` from :func:`factorization`."""
        return sum(_checked_shapes(config, p, model.get_submodule(p)).parameter_count()
                   for p in select_targets(model, config, self.supported, family,
                                           default_targets(family)))


@hookimpl
def peftreg_register_methods() -> list[PEFTMethod[Any]]:
    """Provide LoKr."""
    return [LokrMethod()]
