# SPDX-License-Identifier: Apache-2.0
"""(IA)^3: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022).

The method learns one vector per adapted Linear layer and rescales activations element-wise
with it (paper section 3.3): the outputs of the attention key and value projections
(``l_k``, ``l_v``) and the feed-forward activation, i.e. the input of the feed-forward down
projection (``l_ff``). The vectors start at one, so the adapted model equals the base exactly.

Because a per-channel scale commutes with the matrix product, the vectors fold into the weights:
an output scale ``l`` gives ``W' = diag(l) W`` and ``b' = l * b``; an input scale gives
``W' = W diag(l)`` with the bias unchanged. Each adapted layer adds ``out_features`` parameters
(output scaling) or ``in_features`` (feed-forward input scaling).

When the compiled extension is built, a layer whose only active adapter is (IA)^3 runs as one
``peftreg::ia3_linear`` op (the scale fused into the product, see docs/ops.md); otherwise, or with
``PEFTREG_KERNELS=reference``, plain PyTorch computes the same thing.

Parameter names and shapes follow HF PEFT's (``ia3_l``: ``(out, 1)`` or ``(1, in)``) so saved
keys read ``<module path>.ia3_l``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Final

import torch
from torch import nn

from peftreg.plugin import (
    IA3_LINEAR,
    Capabilities,
    ConfigError,
    LayerAdapter,
    Linear4bit,
    ModelFamily,
    ModelFamilyError,
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
    matches,
    merge_bias,
    merge_weight,
    select_targets,
)

# Scaling a weight by l and dividing it back out is exact to rounding for any l that keeps the
# merged weight a normal float; a channel whose scale has shrunk below this has been switched off
# (a zero scale would divide to inf/nan), so merging it could not be undone and is refused.
MIN_MERGE_SCALE: Final = 1e-6

# Model-family roles the paper rescales: key and value outputs, feed-forward activation.
_OUTPUT_ROLES: Final = ("k", "v")
_FEEDFORWARD_ROLE: Final = "ffn_down"


@dataclasses.dataclass
class IA3Config(TargetedConfig):
    """Config of an (IA)^3 adapter.

    Attributes:
        target_modules: the Linear layers to rescale (see :class:`peftreg.plugin.TargetedConfig`).
            ``None`` takes the model family's key, value and feed-forward down projections
            (roles ``k``, ``v``, ``ffn_down``), the paper's choice.
        feedforward_modules: which of the targets have their *input* scaled (the feed-forward
            activation) rather than their output; same matching rules as ``target_modules``.
            ``None`` means the family's ``ffn_down`` modules among the targets (none if the model
            has no family). Every entry must match at least one adapted module.
        init_ia3_weights: start every vector at one (the paper's init, the model starts equal to
            the base); ``False`` draws them uniformly from [0.5, 1.5], which tests use to get a
            non-trivial adapter without training.
        exclude_modules, layers_to_transform, layers_pattern: see
            :class:`peftreg.plugin.TargetedConfig`.
        modules_to_save: see :class:`peftreg.MethodConfig`.
    """

    method: ClassVar[str] = "ia3"

    feedforward_modules: list[str] | str | None = None
    init_ia3_weights: bool = True

    def validate(self) -> None:
        super().validate()
        value = self.feedforward_modules
        if isinstance(value, list):
            if not value:
                raise self.error("feedforward_modules", "must not be an empty list (use None)",
                                 value)
            if any(not v for v in value):
                raise self.error("feedforward_modules", "entries must be non-empty strings",
                                 value)
        elif isinstance(value, str):
            if value == "all-linear":
                raise self.error("feedforward_modules", "'all-linear' is only valid for "
                                 "target_modules", value)
            try:  # from users and files: bounded time
                compile_pattern(value, f"{type(self).__name__}.feedforward_modules")
            except UnsafePatternError as exc:
                raise self.error("feedforward_modules", exc.problem) from exc


class IA3Linear(LayerAdapter):
    """One learned scaling vector for one ``nn.Linear``.

    Attributes:
        ia3_l: shape ``(out_features, 1)`` when the output is scaled, ``(1, in_features)`` when
            the input is (feed-forward layers).
        is_feedforward: which of the two.
        label: ``"<adapter> on <module path>"``, for error messages.
    """

    def __init__(self, base: nn.Module, is_feedforward: bool, init_ones: bool = True,
                 label: str = "") -> None:
        super().__init__()
        # Through base access, so a quantized base (QLoRA's, under a stacked IA3) works too.
        view = base_access(base)
        shape = (1, view.in_features) if is_feedforward else (view.out_features, 1)
        kw: dict[str, Any] = {"device": view.device, "dtype": view.dtype}
        self.ia3_l = nn.Parameter(torch.ones(shape, **kw))
        if not init_ones:
            with torch.no_grad():
                self.ia3_l.uniform_(0.5, 1.5)
        self.is_feedforward = is_feedforward
        self.label = label or type(self).__name__

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_feedforward:
            return x
        return x * self.ia3_l.view(-1).to(x.dtype)

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.is_feedforward:
            return y
        return y * self.ia3_l.view(-1).to(y.dtype)

    def fused_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if type(base) is not nn.Linear:
            return None
        weight = base.weight
        if not (x.dtype == weight.dtype == self.ia3_l.dtype):
            return None
        # The compiled op or plain PyTorch, by kernel mode and measured crossover (docs/ops.md).
        return IA3_LINEAR.run(x, weight, base.bias, self.ia3_l.view(-1), self.is_feedforward)

    def _checked_scale(self, operation: str) -> torch.Tensor:
        scale = self.ia3_l.detach().float()
        if not bool(torch.isfinite(scale).all()):
            raise UnsupportedOperationError(
                f"ia3 adapter {self.label}: cannot {operation}: the scaling vector has "
                "non-finite entries")
        smallest = float(scale.abs().min())
        if smallest < MIN_MERGE_SCALE:
            raise UnsupportedOperationError(
                f"ia3 adapter {self.label}: cannot {operation}: a scaling entry is "
                f"{smallest:.3g} (below {MIN_MERGE_SCALE:g}), so dividing it back out of the "
                "weight would be unsafe; keep the adapter unmerged")
        return scale

    def merge_into(self, base: nn.Module) -> None:
        # Refused before touching the weight: a merge that cannot be undone is not allowed.
        scale = self._checked_scale("merge")
        w = merge_weight(base)
        w.copy_((w.float() * scale).to(w.dtype))
        bias = merge_bias(base)
        if bias is not None and not self.is_feedforward:
            bias.copy_((bias.float() * scale.view(-1)).to(bias.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        scale = self._checked_scale("unmerge")
        w = merge_weight(base)
        w.copy_((w.float() / scale).to(w.dtype))
        bias = merge_bias(base)
        if bias is not None and not self.is_feedforward:
            bias.copy_((bias.float() / scale.view(-1)).to(bias.dtype))

    def extra_repr(self) -> str:
        kind = "input (feed-forward)" if self.is_feedforward else "output"
        return f"scales={kind}, size={self.ia3_l.numel()}"


def _default_targets(family: ModelFamily | None) -> list[str]:
    """Full module paths of the family's k, v and ffn_down projections.

    Full paths, not relative names: BERT's ``output.dense`` is also a suffix of
    ``attention.output.dense``.
    """
    if family is None:
        raise ModelFamilyError(
            "ia3: IA3Config.target_modules is not set and no model family plugin describes this "
            "model, so the key, value and feed-forward down projections are unknown; set "
            "target_modules (and feedforward_modules) explicitly")
    paths: list[str] = []
    for role in (*_OUTPUT_ROLES, _FEEDFORWARD_ROLE):
        found = family.role_paths(role)
        if not found:
            raise ModelFamilyError(
                f"ia3: model family {family.name!r} has no {role!r} role, needed for the default "
                f"targets (roles k, v, ffn_down); set IA3Config.target_modules explicitly")
        paths.extend(found)
    return paths


def plan(model: nn.Module, config: IA3Config, family: ModelFamily | None
         ) -> list[tuple[str, bool]]:
    """Return ``(path, is_feedforward)`` for every module ``config`` adapts, in model order.

    Raises:
        ModelFamilyError: no explicit targets and the family cannot supply the defaults.
        TargetNotFoundError: the targets match nothing (or a listed name matches no module).
        ConfigError: a ``feedforward_modules`` entry matches none of the adapted modules.
    """
    defaults = _default_targets(family) if config.target_modules is None else None
    paths = select_targets(model, config, IA3Method.supported, family, defaults)
    spec = config.feedforward_modules
    if spec is None:
        ff_paths = set(family.role_paths(_FEEDFORWARD_ROLE)) if family else set()
        return [(p, p in ff_paths) for p in paths]
    entries: list[list[str] | str] = [[e] for e in spec] if isinstance(spec, list) else [spec]
    for entry in entries:
        if not any(matches(p, entry) for p in paths):
            shown = entry[0] if isinstance(entry, list) else entry
            raise ConfigError(
                f"IA3Config.feedforward_modules: entry {shown!r} matches none of the adapted "
                f"modules; every feed-forward module must also be a target (adapted: "
                f"{', '.join(paths[:20])}{', ...' if len(paths) > 20 else ''})")
    return [(p, matches(p, spec)) for p in paths]


class IA3PeftCodec(PeftCodec):
    """PEFT's IA3 documents (tensors ``<module path>.ia3_l``, the same in both libraries)."""

    peft_type = "IA3"
    keys = PeftKeys(
        mapped=frozenset({"target_modules", "feedforward_modules", "exclude_modules",
                          "modules_to_save"}),
        ignored={"init_ia3_weights": "initialisation only"},
        refused={"fan_in_fan_out": "the base layer stores its weight transposed (GPT-2 "
                                   "Conv1D), which peftreg's IA3 does not adapt"},
    )
    exported_fields = frozenset({"target_modules", "feedforward_modules", "exclude_modules",
                                 "layers_to_transform", "layers_pattern", "modules_to_save",
                                 "init_ia3_weights"})

    def read(self, ctx: PeftImport, tensors: Mapping[str, torch.Tensor]
             ) -> tuple[dict[str, Any], ModuleTensors]:
        found = ctx.read_modules(tensors, ("ia3_l",))
        for path, parts in found.adapted.items():
            t = parts["ia3_l"]
            if t.dim() != 2 or 1 not in t.shape:
                ctx.tensor_problem(f"base_model.model.{path}.ia3_l", f"shape {tuple(t.shape)} "
                                   "is neither (out_features, 1) nor (1, in_features)")
        # PEFT's IA3 has no layer filter.
        fields = ctx.target_fields(found, layer_filter=False)
        ff = ctx.doc.get("feedforward_modules")
        if ff is None:
            # PEFT saves its resolved list; without one, the tensors' orientation tells.
            ff = _input_scaled(found.adapted)
        elif isinstance(ff, list):
            # PEFT tests a plain string suffix here; the adapted paths it selects are exact.
            ff = [p for p in found.adapted if any(p.endswith(e) for e in ff)]
        # peftreg cannot say "no feed-forward module" (None means the family's choice); if the
        # family's choice differs from the file, the (1, in) / (out, 1) shapes differ and the
        # load reports it.
        fields["feedforward_modules"] = ff or None
        return fields, found

    def write(self, ctx: PeftExport) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        found = ctx.modules(("ia3_l",))
        ff = _input_scaled(found.adapted)
        # PEFT matches feedforward_modules by a plain string suffix and wants them to be a
        # subset of the targets, so with any, both are written as exact paths.
        body = ctx.target_fields(found, exact=bool(ff))
        body.update({"feedforward_modules": ff, "fan_in_fan_out": False,
                     "init_ia3_weights": True})
        return body, found.tensors


def _input_scaled(adapted: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """The modules whose ``ia3_l`` is ``(1, in)``: their input is scaled."""
    return [p for p, t in adapted.items() if t["ia3_l"].dim() == 2
            and t["ia3_l"].shape[0] == 1 and t["ia3_l"].shape[1] != 1]


class IA3Method(PEFTMethod[IA3Config]):
    """Learned scaling of key, value and feed-forward activations; mergeable, no inference cost."""

    name: ClassVar[str] = "ia3"
    config_cls = IA3Config
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=True, inference_latency=False)
    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, Linear4bit)
    suggested_learning_rate: ClassVar[float] = 1e-2
    peft_codec: ClassVar[PeftCodec] = IA3PeftCodec()

    def inject(self, model: nn.Module, adapter_name: str, config: IA3Config,
               family: ModelFamily | None) -> list[str]:
        planned = plan(model, config, family)
        for path, is_ff in planned:
            host = host_for(model, path)
            host.adapters[adapter_name] = IA3Linear(
                host.base, is_ff, config.init_ia3_weights,
                label=f"{adapter_name!r} on {path!r}")
        return [path for path, _ in planned]

    def parameter_count(
        self, model: nn.Module, config: IA3Config, family: ModelFamily | None
    ) -> int:
        """``sum of out_features over output-scaled layers + in_features over feed-forward
        layers`` (one scale per channel, paper section 3.3)."""
        total = 0
        for path, is_ff in plan(model, config, family):
            view = base_access(model.get_submodule(path))
            total += view.in_features if is_ff else view.out_features
        return total


@hookimpl
def peftreg_register_methods() -> list[PEFTMethod[Any]]:
    """Provide (IA)^3."""
    return [IA3Method()]
