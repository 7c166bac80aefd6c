# SPDX-License-Identifier: Apache-2.0
"""LoRA: low-rank adaptation (Hu et al. 2021).

A frozen weight ``W`` (out x in) is adapted as ``W + (alpha / r) * B @ A`` with ``A`` (r x in)
random and ``B`` (out x r) zero, so training starts exactly at the base model (paper section 4.1).
With ``use_rslora`` the scale is ``alpha / sqrt(r)`` (Kalajdzievski 2023), which keeps the update's
magnitude stable as the rank grows. Each adapted matrix adds ``r * (in + out)`` parameters.

On a Linear base with the compiled extension built, the forward and backward run as one
``peftreg::lora_linear`` op; otherwise plain PyTorch computes the same thing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftreg.plugin import (
    LORA_LINEAR,
    Capabilities,
    ConfigError,
    FittedAdapter,
    LayerAdapter,
    LayerUpdate,
    Linear4bit,
    MethodConfig,
    ModelFamily,
    PeftCodec,
    PEFTMethod,
    TargetedConfig,
    UnsafePatternError,
    UnsupportedOperationError,
    base_access,
    compile_pattern,
    hookimpl,
    host_for,
    iter_slots,
    lora_dropout,
    merge_weight,
    new_dropout_seed,
    pattern_fullmatch,
    select_targets,
)
from peftreg_plugins.lora_peft import LoraPeftCodec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class LoraConfig(TargetedConfig):
    """Config of a LoRA adapter.

    Attributes:
        r: rank of the update (> 0).
        lora_alpha: scale numerator; the update is multiplied by ``lora_alpha / r``.
        lora_dropout: dropout probability on the LoRA path's input, in [0, 1).
        use_rslora: scale by ``lora_alpha / sqrt(r)`` instead.
        init_lora_weights: ``"kaiming"`` (Kaiming-uniform A, as nn.Linear) or ``"gaussian"``
            (A ~ N(0, 1/r)), B zero either way; or, on dense Linear layers, ``"pissa"`` (A and B
            from the top ``r`` singular triplets of W, Meng et al. 2024) or ``"olora"`` (from
            W's QR decomposition, Buyukakyuz 2024). Those two rewrite the base weight to the
            residual ``W - scaling * B A`` when the adapter is created, as HF PEFT does.
        rank_pattern: per-module rank overrides, keyed by module name, suffix or regex.
        alpha_pattern: per-module ``lora_alpha`` overrides, same keys.
        adapter_dtype: dtype of A and B (``"float32"``, ``"bfloat16"``, ``"float16"``); ``None``
            follows the base weight.
        target_modules, exclude_modules, layers_to_transform, layers_pattern: see
            :class:`peftreg.plugin.TargetedConfig`; when ``target_modules`` is ``None`` the model
            family's query and value projections are adapted (the paper's choice).
        modules_to_save: see :class:`peftreg.MethodConfig`.
    """

    method: ClassVar[str] = "lora"

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: Literal["kaiming", "gaussian", "pissa", "olora"] = "kaiming"
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    adapter_dtype: Literal["float32", "bfloat16", "float16"] | None = None

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise self.error("r", "rank must be > 0", self.r)
        if self.lora_alpha <= 0 or not math.isfinite(self.lora_alpha):
            raise self.error("lora_alpha", "must be a finite number > 0", self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise self.error("lora_dropout", "must be in [0, 1)", self.lora_dropout)
        for key, rank in self.rank_pattern.items():
            if rank <= 0:
                raise self.error("rank_pattern", f"rank for {key!r} must be > 0", rank)
        for key, alpha in self.alpha_pattern.items():
            if alpha <= 0:
                raise self.error("alpha_pattern", f"alpha for {key!r} must be > 0", alpha)
        for field in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field):
                try:  # keys are names or regexes, from users and files: bounded time
                    compile_pattern(key, f"{type(self).__name__}.{field}")
                except UnsafePatternError as exc:
                    raise self.error(field, f"key {exc.problem}") from exc

    def rank_and_scale(self, path: str) -> tuple[int, float]:
        """Rank and scaling for the module at ``path`` (after per-module overrides)."""
        r = int(_pattern_value(self.rank_pattern, path, self.r))
        alpha = _pattern_value(self.alpha_pattern, path, self.lora_alpha)
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


def _pattern_value(pattern: dict[str, Any], path: str, default: float) -> float:
    for key, value in pattern.items():
        if path == key or path.endswith("." + key) or pattern_fullmatch(key, path):
            return value
    return default


def weight_placement(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype new adapter weights for ``base`` should use.

    A dense layer's weight decides; a quantized layer (no floating weight) names its
    ``compute_dtype``.
    """
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.device, weight.dtype
    tensors = [*base.parameters(), *base.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    return device, getattr(base, "compute_dtype", torch.float32)


class LoraLinear(LayerAdapter):
    """LoRA factors for one ``nn.Linear``: ``y = base(x) + scaling * B(A(dropout(x)))``."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, init: str,
                 dtype: torch.dtype | None) -> None:
        super().__init__()
        device, base_dtype = weight_placement(base)
        view = base_access(base)
        kw: dict[str, Any] = {"device": device, "dtype": dtype or base_dtype}
        self.lora_A = nn.Linear(view.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, view.out_features, bias=False, **kw)
        # Dropout on the LoRA path's input. Both paths draw the same counter-based mask from a
        # per-call seed (peftreg.ops.reference.lora_dropout): the fused op regenerates it in its
        # backward instead of saving it, and the plain path gives identical numbers.
        self.dropout_p = float(dropout)
        self.r, self.scaling = r, scaling
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scaling * B @ A`` (only for merging; the forward never builds it)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.weight
        x_lora = x.to(a.dtype)
        if self.training and self.dropout_p > 0:
            x_lora = lora_dropout(x_lora, self.dropout_p, new_dropout_seed())
        low = self.lora_B(self.lora_A(x_lora))
        return y + (low * self.scaling).to(y.dtype)

    def fused_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if isinstance(self.scaling, torch.Tensor):
            # A hot-swappable adapter keeps its scale in a tensor, which the fused op (taking
            # a number) would turn back into a graph constant: the plain path keeps it a tensor.
            return None
        a, b = self.lora_A.weight, self.lora_B.weight
        quantized = getattr(base, "supports_fused_lora", None)  # 4-bit bases (QLoRA)
        if quantized is not None:
            if not quantized(x, a, b):
                return None
        elif not (isinstance(base, nn.Linear) and base.weight.dtype == x.dtype == a.dtype):
            return None
        # Dropout runs inside the op: its mask comes from a seed and is regenerated in the
        # backward, so neither the mask nor dropout(x) is kept for the backward.
        p = self.dropout_p if self.training else 0.0
        if quantized is not None:
            return base.forward_with_lora(x, a, b, self.scaling, p)  # type: ignore[operator]
        seed = new_dropout_seed() if p > 0 else None
        # The compiled op or plain PyTorch, by kernel mode and measured crossover (docs/ops.md).
        return LORA_LINEAR.run(x, base.weight, base.bias, a, b, float(self.scaling), None, p,
                               seed)

    def merge_into(self, base: nn.Module) -> None:
        w = merge_weight(base)
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        w = merge_weight(base)
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))

    # peftreg.row_adapters.LowRankAdapter: per-row multi-adapter serving (lora_multi_add).
    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A.weight, self.lora_B.weight, float(self.scaling)

    # -- hot-swapping (AdaptedModel.prepare_hotswap / hotswap_adapter) ---------------------

    @property
    def hotswap_ready(self) -> bool:
        """Whether the factors are padded and the scale a tensor (:meth:`pad_for_hotswap`)."""
        return isinstance(self.scaling, torch.Tensor)

    def pad_for_hotswap(self, max_rank: int) -> None:
        """Zero-pad A and B to ``max_rank`` (the update is unchanged) and hold the scale in a
        buffer, so adapters of any rank up to ``max_rank`` and any alpha swap in without
        changing a shape or a Python number a compiled graph depends on."""
        if max_rank < self.r:
            raise ConfigError(f"max_rank {max_rank} is below the adapter's rank {self.r}")
        with torch.no_grad():
            for factor, grow in ((self.lora_A, 0), (self.lora_B, 1)):
                old = factor.weight
                shape = list(old.shape)
                shape[grow] = max_rank
                new = torch.zeros(shape, dtype=old.dtype, device=old.device)
                new.narrow(grow, 0, self.r).copy_(old)
                factor.weight = nn.Parameter(new, requires_grad=old.requires_grad)
            self.lora_A.out_features = self.lora_B.in_features = max_rank
        scale = float(self.scaling)
        del self.scaling
        # Not persistent: the saved keys stay those of an unprepared adapter.
        self.register_buffer("scaling", torch.tensor(scale, dtype=torch.float32,
                                                     device=self.lora_A.weight.device),
                             persistent=False)
        self.r = max_rank

    def swap_in(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Write factors of rank ``a.shape[0] <= r`` and their scale in place."""
        with torch.no_grad():
            self.lora_A.weight.zero_()
            self.lora_B.weight.zero_()
            self.lora_A.weight[: a.shape[0]].copy_(a)
            self.lora_B.weight[:, : b.shape[1]].copy_(b)
            if isinstance(self.scaling, torch.Tensor):
                self.scaling.fill_(scale)


BASE_REWRITING_INITS = ("pissa", "olora")


def check_rewritable(base: nn.Module, init: str, path: str) -> None:
    """Refuse a base-rewriting init on anything but a dense floating nn.Linear."""
    weight = getattr(base, "weight", None)
    if not isinstance(base, nn.Linear) or not isinstance(weight, torch.Tensor) or \
            not weight.is_floating_point():
        where = f" {path!r} is" if path else " got"
        raise UnsupportedOperationError(
            f"LoraConfig.init_lora_weights = {init!r} needs dense nn.Linear bases (it rewrites "
            f"the base weight);{where} a {type(base).__name__}")


def init_from_base(adapter: LoraLinear, base: nn.Module, init: str) -> None:
    """PiSSA or OLoRA: A and B from a decomposition of the base weight, which keeps the
    residual ``W - scaling * B A`` (so the layer starts where it was, up to rounding).

    PiSSA (Meng et al. 2024): ``W = U S V^T``, ``A = sqrt(S_r / scaling) V_r^T``,
    ``B = U_r sqrt(S_r / scaling)``. OLoRA (Buyukakyuz 2024): ``W = Q R``, ``A = R[:r]``,
    ``B = Q[:, :r]``. Both in float32, as HF PEFT computes them.
    """
    check_rewritable(base, init, "")
    weight = merge_weight(base)
    r, scaling = adapter.r, adapter.scaling
    w = weight.detach().float()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s[:r] / scaling)
        a, b = torch.diag(root) @ vh[:r], u[:, :r] @ torch.diag(root)
    else:
        q, rr = torch.linalg.qr(w)
        a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    with torch.no_grad():
        adapter.lora_A.weight.copy_(a)
        adapter.lora_B.weight.copy_(b)
        weight.copy_((w - scaling * b @ a).to(weight.dtype))
    # The initial factors are what was taken out of the base: with them the trained adapter can
    # be rewritten to apply to the original weight (PEFT's path_initial_model_for_weight_
    # conversion). Not saved: loading onto the original base decomposes it again, which
    # recomputes them, so a file holds only what a plain LoRA file holds.
    adapter.register_buffer("lora_A_init", adapter.lora_A.weight.detach().clone(),
                            persistent=False)
    adapter.register_buffer("lora_B_init", adapter.lora_B.weight.detach().clone(),
                            persistent=False)


class LoraEmbedding(LayerAdapter):
    """LoRA factors for one ``nn.Embedding``: the update ``scaling * (B @ A)^T`` is a table.

    A is zero and B random here (the transpose of the Linear case), so the product still starts
    at zero while gradients reach B from the first step.
    """

    def __init__(self, base: nn.Embedding, r: int, scaling: float, dtype: torch.dtype | None
                 ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": base.weight.device, "dtype": dtype or base.weight.dtype}
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base.num_embeddings, **kw))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, r, **kw))
        self.r, self.scaling = r, scaling
        self.padding_idx = base.padding_idx

    def delta_weight(self) -> torch.Tensor:
        """The dense table update, shape (num_embeddings, embedding_dim)."""
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(x, self.lora_embedding_A.T, padding_idx=self.padding_idx)
        return y + (rows @ self.lora_embedding_B.T * self.scaling).to(y.dtype)

    def merge_into(self, base: nn.Module) -> None:
        w = merge_weight(base)
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        w = merge_weight(base)
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))


def _default_targets(family: ModelFamily | None) -> list[str] | None:
    if family is None or "q" not in family.roles or "v" not in family.roles:
        return None
    return [family.roles["q"], family.roles["v"]]


class LoraMethod(PEFTMethod[LoraConfig]):
    """Low-rank updates on Linear and Embedding weights; mergeable, no inference cost."""

    name: ClassVar[str] = "lora"
    config_cls = LoraConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=True, compilable=True)
    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Embedding, Linear4bit)
    suggested_learning_rate: ClassVar[float] = 2e-3
    peft_codec: ClassVar[PeftCodec] = LoraPeftCodec()
    size_field: ClassVar[str | None] = "r"

    def inject(self, model: nn.Module, adapter_name: str, config: LoraConfig,
               family: ModelFamily | None) -> list[str]:
        paths = select_targets(model, config, self.supported, family, _default_targets(family))
        dtype = _DTYPES[config.adapter_dtype] if config.adapter_dtype else None
        if config.init_lora_weights in BASE_REWRITING_INITS:  # refuse before rewriting any
            for path in paths:
                check_rewritable(host_for(model, path).base, config.init_lora_weights, path)
        for path in paths:
            host = host_for(model, path)
            r, scaling = config.rank_and_scale(path)
            base = host.base
            if isinstance(base, nn.Embedding):
                host.adapters[adapter_name] = LoraEmbedding(base, r, scaling, dtype)
            else:
                adapter = LoraLinear(
                    base, r, scaling, config.lora_dropout, config.init_lora_weights, dtype)
                if config.init_lora_weights in BASE_REWRITING_INITS:
                    init_from_base(adapter, base, config.init_lora_weights)
                host.adapters[adapter_name] = adapter
        return paths

    def prepare_hotswap(self, model: nn.Module, adapter_name: str, max_rank: int) -> None:
        """Pad every Linear LoRA of the adapter to ``max_rank`` with the scale in a tensor."""
        if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank <= 0:
            raise ConfigError(f"max_rank must be a positive integer, got {max_rank!r}")
        layers = _lora_layers(model, adapter_name)
        low = [p for p, layer in layers.items() if isinstance(layer, LoraLinear) and
               layer.r > max_rank]
        if low:
            raise ConfigError(f"max_rank {max_rank} is below the rank of {', '.join(low)}")
        for layer in layers.values():
            if isinstance(layer, LoraLinear) and not layer.hotswap_ready:
                layer.pad_for_hotswap(max_rank)

    def hotswap(self, model: nn.Module, adapter_name: str, config: LoraConfig,
                tensors: Mapping[str, torch.Tensor],
                current: Mapping[str, torch.Tensor]) -> None:
        """Swap in a saved LoRA of the same modules: any rank up to the padded one and any
        alpha once :meth:`prepare_hotswap` ran, the same rank and scale otherwise. Everything
        is checked before anything is written."""
        layers = _lora_layers(model, adapter_name)
        linear = {p: layer for p, layer in layers.items() if isinstance(layer, LoraLinear)}
        if len(linear) != len(layers):
            # Embedding LoRA keeps its shapes: the same-shape copy of the base class.
            return super().hotswap(model, adapter_name, config, tensors, current)
        saved = {k.rsplit(".lora_A.weight", 1)[0] for k in tensors if k.endswith(".lora_A.weight")}
        if saved != set(linear):
            raise UnsupportedOperationError(
                f"the saved adapter adapts other modules than adapter {adapter_name!r}: only in "
                f"it {sorted(saved - set(linear))[:4]}, only in the model "
                f"{sorted(set(linear) - saved)[:4]}")
        plan = []
        for path in sorted(linear):
            layer = linear[path]
            a, b = tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"]
            r, scale = config.rank_and_scale(path)
            if a.shape[0] != r or b.shape[1] != r:
                raise UnsupportedOperationError(f"{path}: factors of rank {a.shape[0]} where "
                                                f"the config says {r}")
            if not layer.hotswap_ready and (r != layer.r or not math.isclose(
                    scale, float(layer.scaling), rel_tol=1e-12)):
                raise UnsupportedOperationError(
                    f"{path}: rank {r} and scale {scale:g} differ from the loaded {layer.r} and "
                    f"{float(layer.scaling):g}; call prepare_hotswap(name, max_rank) before "
                    "compiling to swap adapters of other ranks or alphas")
            if r > layer.r:
                raise UnsupportedOperationError(f"{path}: rank {r} is above the prepared "
                                                f"maximum {layer.r}")
            if a.shape[1] != layer.lora_A.weight.shape[1] or \
                    b.shape[0] != layer.lora_B.weight.shape[0]:
                raise UnsupportedOperationError(f"{path}: factors of shape {tuple(b.shape)} @ "
                                                f"{tuple(a.shape)} do not fit the layer")
            plan.append((layer, a, b, scale))
        for layer, a, b, scale in plan:
            layer.swap_in(a, b, scale)

    def fit_updates(self, updates: Mapping[str, LayerUpdate], rank: int,
                    config: MethodConfig | None = None) -> FittedAdapter:
        """The best rank-``rank`` LoRA for each dense update (Eckart-Young: its truncated SVD,
        split evenly between the factors, ``B = U sqrt(S)``, ``A = sqrt(S) V^T``), at scale 1
        (``lora_alpha = r``). A layer whose update has lower rank gets zero rows to fill ``r``.
        Bias updates have no LoRA counterpart: they are left out, and the caller's error
        report counts them."""
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ConfigError(f"rank must be a positive integer, got {rank!r}")
        tensors: dict[str, torch.Tensor] = {}
        fitted: dict[str, LayerUpdate] = {}
        for path, update in updates.items():
            u, sv, vh = torch.linalg.svd(update.weight.double(), full_matrices=False)
            k = min(rank, sv.shape[0])
            root = sv[:k].sqrt()
            b = update.weight.new_zeros(update.weight.shape[0], rank)
            a = update.weight.new_zeros(rank, update.weight.shape[1])
            b[:, :k] = u[:, :k] * root
            a[:k] = root[:, None] * vh[:k]
            tensors[f"{path}.lora_A.weight"] = a.float()
            tensors[f"{path}.lora_B.weight"] = b.float()
            fitted[path] = LayerUpdate(b @ a, None)
        saved = list(config.modules_to_save) if config is not None else []
        new = LoraConfig(r=rank, lora_alpha=float(rank), lora_dropout=0.0,
                         target_modules=list(updates), modules_to_save=saved)
        return FittedAdapter(new, tensors, fitted)

    def parameter_count(
        self, model: nn.Module, config: LoraConfig, family: ModelFamily | None
    ) -> int:
        """``sum over adapted matrices of r * (d_in + d_out)`` (paper section 4)."""
        total = 0
        for path in select_targets(model, config, self.supported, family,
                                   _default_targets(family)):
            out_f, in_f = base_access(model.get_submodule(path)).shape
            r, _ = config.rank_and_scale(path)
            total += r * (in_f + out_f)
        return total


def loraplus_param_groups(model: nn.Module, *, lr: float, loraplus_lr_ratio: float,
                          loraplus_lr_embedding: float = 1e-6,
                          loraplus_weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ (Hayou et al. 2024): the B factors learn
    ``loraplus_lr_ratio`` times faster than the A factors.

    Grouped as HF PEFT's ``create_loraplus_optimizer`` groups them, so the two libraries train
    alike: factors of LoRA on embeddings at ``loraplus_lr_embedding``; B factors and every other
    one-dimensional trainable tensor at ``lr * loraplus_lr_ratio`` (biases and normalisation
    weights among them without weight decay); everything else (A factors, saved heads) at
    ``lr``. Only parameters that require gradients are included.

    Raises:
        ConfigError: a learning rate is not positive or the ratio is below 1.
    """
    if not lr > 0 or not loraplus_lr_embedding > 0:
        raise ConfigError(f"LoRA+ learning rates must be positive (lr={lr!r}, "
                          f"loraplus_lr_embedding={loraplus_lr_embedding!r})")
    if not loraplus_lr_ratio >= 1:
        raise ConfigError(f"loraplus_lr_ratio is the ratio of B's rate to A's and must be at "
                          f"least 1, got {loraplus_lr_ratio!r}")
    norms = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)
    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    groups: dict[str, list[nn.Parameter]] = {"a": [], "b": [], "b_no_decay": [], "embedding": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = owners.get(id(param))
        if isinstance(owner, LoraEmbedding):
            groups["embedding"].append(param)
        elif "lora_B" in name.split(".") or param.ndim == 1:
            no_decay = name.endswith("bias") or isinstance(owner, norms) or \
                type(owner).__name__.endswith("RMSNorm")
            groups["b_no_decay" if no_decay else "b"].append(param)
        else:
            groups["a"].append(param)
    return [
        {"params": groups["a"], "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": loraplus_weight_decay,
         "lr": loraplus_lr_embedding},
        {"params": groups["b"], "weight_decay": loraplus_weight_decay,
         "lr": lr * loraplus_lr_ratio},
        {"params": groups["b_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: Callable[..., torch.optim.Optimizer],
                              *, lr: float, loraplus_lr_ratio: float, **kwargs: Any
                              ) -> torch.optim.Optimizer:
    """An optimizer of class ``optimizer_cls`` over :func:`loraplus_param_groups` (the keyword
    arguments ``loraplus_lr_embedding`` and ``loraplus_weight_decay`` go to the groups, the
    rest to the optimizer)."""
    groups = loraplus_param_groups(
        model, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_lr_embedding=kwargs.pop("loraplus_lr_embedding", 1e-6),
        loraplus_weight_decay=kwargs.pop("loraplus_weight_decay", 0.0))
    return optimizer_cls(groups, lr=lr, **kwargs)


def _lora_layers(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    return {path: slot.adapters[adapter_name] for path, slot in iter_slots(model)
            if adapter_name in slot.adapters}


@hookimpl
def peftreg_register_methods() -> list[PEFTMethod[Any]]:
    """Provide LoRA."""
    return [LoraMethod()]
