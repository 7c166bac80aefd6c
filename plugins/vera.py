# SPDX-License-Identifier: Apache-2.0
"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024).

Every adapted Linear layer shares one pair of frozen random projections, ``A`` (r x in) and
``B`` (out x r), and trains only two vectors: ``lambda_d`` (r) and ``lambda_b`` (out), so the
layer computes ``W x + lambda_b * (B (lambda_d * (A x)))`` (paper eq. 2). ``lambda_b`` starts at
zero (the model starts at the base) and ``lambda_d`` at ``d_initial``.

As in HF PEFT (``VeraConfig``), one pair is drawn per adapter at the largest input and output
width among the targets, and each layer uses its leading block (``A[:, :in]``, ``B[:out, :]``).
The pair is drawn from a CPU generator seeded with ``projection_prng_key`` (``A`` first, then
``B``), each from a Kaiming-uniform distribution with bound ``sqrt(6 / fan_in)`` (``fan_in`` the
second dimension), so the same key reproduces PEFT's projections bit for bit and an adapter
saved without them (``save_projection=False``) can be rebuilt from its config.

The projections are stored once per adapter, in a model-wide slot whose tensors are saved as
``vera_A`` and ``vera_B`` (PEFT's ``base_model.vera_A`` / ``base_model.vera_B``); the vectors
as ``<module path>.vera_lambda_b`` / ``.vera_lambda_d``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Final

import torch
import torch.nn.functional as F
from torch import nn

from peftreg.plugin import (
    AdapterSlot,
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
    UnsupportedOperationError,
    base_access,
    get_module,
    hookimpl,
    host_for,
    lora_dropout,
    merge_weight,
    new_dropout_seed,
    select_targets,
)

_MAX_KEY = 2**64  # torch.Generator.manual_seed takes 64-bit seeds


@dataclasses.dataclass
class VeraConfig(TargetedConfig):
    """Config of a VeRA adapter (defaults as HF PEFT's ``VeraConfig``).

    Attributes:
        r: rank of the shared projections (> 0); VeRA uses far larger ranks than LoRA since a
            layer trains only ``r + out_features`` numbers.
        projection_prng_key: seed of the generator drawing the shared projections.
        save_projection: save the projections with the adapter; without them they are drawn
            again from ``projection_prng_key`` when the adapter is loaded.
        vera_dropout: dropout probability on the adapter path's input, in [0, 1).
        d_initial: initial value of every ``lambda_d`` entry.
        target_modules: Linear layers (dense or 4-bit); ``None`` takes the model family's query
            and value projections.
    """

    method: ClassVar[str] = "vera"

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise self.error("r", "rank must be > 0", self.r)
        if not 0 <= self.projection_prng_key < _MAX_KEY:
            raise self.error("projection_prng_key", "must be in 0..2**64-1",
                             self.projection_prng_key)
        if not 0.0 <= self.vera_dropout < 1.0:
            raise self.error("vera_dropout", "must be in [0, 1)", self.vera_dropout)
        if not math.isfinite(self.d_initial):
            raise self.error("d_initial", "must be a finite number", self.d_initial)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt(2), fan-in = ``shape[1]``) drawn from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, in_features: int, out_features: int, key: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared ``(A, B)`` for projection key ``key`` at the given sizes, in float32 on the
    CPU: what PEFT draws for the same ``projection_prng_key``."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    a = _kaiming_uniform((r, in_features), generator)
    b = _kaiming_uniform((out_features, r), generator)
    return a, b


class VeraProjections(nn.Module):
    """One adapter's frozen projections (buffers, persistent when they are saved)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, persistent: bool) -> None:
        super().__init__()
        self.register_buffer("vera_A", a, persistent=persistent)
        self.register_buffer("vera_B", b, persistent=persistent)

    def blocks(self, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The leading ``A[:, :in]`` and ``B[:out, :]`` a layer of that shape uses."""
        a, b = self.vera_A, self.vera_B
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            raise UnsupportedOperationError("vera: the shared projections are missing")
        return a[:, :in_features], b[:out_features, :]


class VeraSlot(AdapterSlot):
    """Model-wide holder of every VeRA adapter's projections, the root's child
    :attr:`ATTRIBUTE`; its tensors are saved without a path prefix (``vera_A``)."""

    ATTRIBUTE = "peftreg_vera"

    @classmethod
    def attached_to(cls, model: nn.Module) -> VeraSlot:
        """The slot of ``model``, created and attached on first use."""
        slot = getattr(model, cls.ATTRIBUTE, None)
        if isinstance(slot, VeraSlot):
            return slot
        slot = cls()
        setattr(model, cls.ATTRIBUTE, slot)
        return slot

    def saved_key_prefix(self, path: str) -> str:
        return ""

    def wrapped(self) -> None:
        return None

    def unwrap(self) -> nn.Module:
        raise UnsupportedOperationError("VeRA's shared projections stand in for no module")

    def detach(self, model: nn.Module, path: str, *, keep_trained: bool = False) -> None:
        # Merged or not, the projections leave with the adapters: the layers' own weights
        # hold whatever was merged.
        parent_path, _, leaf = path.rpartition(".")
        delattr(get_module(model, parent_path), leaf)


class VeraLinear(LayerAdapter):
    """VeRA's vectors for one linear layer; the projections are read from the shared slot."""

    def __init__(self, out_features: int, in_features: int, shared: VeraProjections, r: int,
                 dropout: float, d_initial: float, device: torch.device, dtype: torch.dtype
                 ) -> None:
        super().__init__()
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=device,
                                                     dtype=dtype))
        # A tuple, so the shared module is not registered here (it is the slot's, saved once).
        self._shared = (shared,)
        self.in_features, self.out_features = in_features, out_features
        self.dropout_p = float(dropout)

    def sliced_projections(self, dtype: torch.dtype, device: torch.device
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's blocks of the shared ``A`` (r x in) and ``B`` (out x r)."""
        a, b = self._shared[0].blocks(self.out_features, self.in_features)
        return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lam_b, lam_d = self.vera_lambda_b, self.vera_lambda_d
        a, b = self.sliced_projections(lam_d.dtype, lam_d.device)
        x_v = x.to(lam_d.dtype)
        if self.training and self.dropout_p > 0:
            x_v = lora_dropout(x_v, self.dropout_p, new_dropout_seed())
        update = lam_b * F.linear(lam_d * F.linear(x_v, a), b)
        return (y + update).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``diag(lambda_b) B diag(lambda_d) A`` (out x in), float32."""
        a, b = self.sliced_projections(torch.float32, self.vera_lambda_b.device)
        return (self.vera_lambda_b.float()[:, None] * b) @ (self.vera_lambda_d.float()[:, None]
                                                            * a)

    def merge_into(self, base: nn.Module) -> None:
        w = merge_weight(base)
        w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        w = merge_weight(base)
        w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))


_SUPPORTED: tuple[type[nn.Module], ...] = (nn.Linear, Linear4bit)

# -- PEFT's format (peft_type VERA) --------------------------------------------------------------

LEAVES: Final = ("vera_lambda_b", "vera_lambda_d")
# PEFT keeps the shared pair on its tuner, outside base_model.model.
PROJECTIONS: Final = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}
FIELDS: Final = ("r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial")

KEYS: Final = PeftKeys(
    mapped=frozenset({*FIELDS, "target_modules", "modules_to_save", "layers_to_transform",
                      "layers_pattern"}),
    ignored={"init_weights": "initialisation only: the file holds the trained vectors"},
    refused={
        "fan_in_fan_out": "the base layer stores its weight transposed (GPT-2 Conv1D), which "
                          "peftreg's VeRA does not adapt",
        "bias": "the adapter also trains the base layers' biases, which the file holds as "
                "tensors VeRA cannot place",
    },
)


class VeraPeftCodec(PeftCodec):
    """PEFT's VERA documents: ``<module path>.vera_lambda_b`` / ``.vera_lambda_d`` and, with
    ``save_projection``, the shared ``base_model.vera_A`` / ``base_model.vera_B``."""

    peft_type = "VERA"
    keys = KEYS
    exported_fields = frozenset({*FIELDS, "target_modules", "exclude_modules",
                                 "modules_to_save", "layers_to_transform", "layers_pattern"})

    def read(self, ctx: PeftImport, tensors: Mapping[str, torch.Tensor]
             ) -> tuple[dict[str, Any], ModuleTensors]:
        doc = ctx.doc
        shared = {ours: tensors[key] for key, ours in PROJECTIONS.items() if key in tensors}
        found = ctx.read_modules({k: t for k, t in tensors.items() if k not in PROJECTIONS},
                                 LEAVES)
        fields = ctx.target_fields(found)
        fields.update({k: doc[k] for k in FIELDS if k in doc})
        r = fields.get("r", VeraConfig.r)
        if doc.get("save_projection", True):
            for key, ours in PROJECTIONS.items():
                if ours not in shared:
                    ctx.tensor_problem(key, "missing: save_projection is true, so the file "
                                       "must hold the shared projections")
        elif shared:
            # PEFT ignores them too (its buffers are then not part of the state): the
            # projections come from projection_prng_key.
            warnings.warn(f"{ctx.weights_path}: save_projection is false, so the projections "
                          "in the file are ignored and drawn from projection_prng_key",
                          UserWarning, stacklevel=5)
            shared = {}
        a, b = shared.get("vera_A"), shared.get("vera_B")
        if a is not None and (a.dim() != 2 or a.shape[0] != r):
            ctx.tensor_problem("base_model.vera_A", f"shape {tuple(a.shape)}: must be (r, in) "
                               f"with r = {r}")
        if b is not None and (b.dim() != 2 or b.shape[1] != r):
            ctx.tensor_problem("base_model.vera_B", f"shape {tuple(b.shape)}: must be (out, r) "
                               f"with r = {r}")
        for path, parts in found.adapted.items():
            d, lam_b = parts.get("vera_lambda_d"), parts.get("vera_lambda_b")
            prefix = f"base_model.model.{path}"
            if d is None or lam_b is None:
                ctx.tensor_problem(f"{prefix}.{LEAVES[1] if d is None else LEAVES[0]}",
                                   "missing: a VeRA layer needs both vectors")
            elif tuple(d.shape) != (r,):
                ctx.tensor_problem(f"{prefix}.vera_lambda_d", f"shape {tuple(d.shape)}: must "
                                   f"be (r,) with r = {r}")
            elif b is not None and lam_b.shape[0] > b.shape[0]:
                ctx.tensor_problem(f"{prefix}.vera_lambda_b", f"{lam_b.shape[0]} outputs, "
                                   f"more than base_model.vera_B's {b.shape[0]} rows")
        found.tensors.update(shared)
        return fields, found

    def write(self, ctx: PeftExport) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config: Any = ctx.config
        shared = {key: ctx.tensors[ours] for key, ours in PROJECTIONS.items()
                  if ours in ctx.tensors}
        inner = dataclasses.replace(ctx, tensors={k: t for k, t in ctx.tensors.items()
                                                  if k not in PROJECTIONS.values()})
        found = inner.modules(LEAVES)
        # PEFT's VeraConfig has no exclude_modules: with one, the adapted paths are written.
        targets = inner.target_fields(found, exact=config.exclude_modules is not None)
        targets.pop("exclude_modules")
        body: dict[str, Any] = {"fan_in_fan_out": False, "bias": "none", "init_weights": True,
                                "layers_to_transform": None, "layers_pattern": None}
        body.update(targets)
        body.update({k: getattr(config, k) for k in FIELDS})
        out = dict(found.tensors)
        out.update({key: t.contiguous() for key, t in shared.items()})
        return body, out



def _default_targets(family: ModelFamily | None) -> list[str] | None:
    if family is None or "q" not in family.roles or "v" not in family.roles:
        return None
    return [family.roles["q"], family.roles["v"]]


class VeraMethod(PEFTMethod[VeraConfig]):
    """Shared frozen random projections with trained scaling vectors; mergeable."""

    name: ClassVar[str] = "vera"
    config_cls = VeraConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=True)
    peft_codec: ClassVar[PeftCodec] = VeraPeftCodec()
    api_level: ClassVar[int] = 2
    # The paper (appendix, Tables 8-10) trains VeRA with rates 10 to 100 times LoRA's
    # (about 1e-2 for the vectors); only r + out numbers per layer move.
    suggested_learning_rate: ClassVar[float] = 1e-2
    size_field: ClassVar[str | None] = "r"

    def _targets(self, model: nn.Module, config: VeraConfig,
                 family: ModelFamily | None) -> list[str]:
        return select_targets(model, config, _SUPPORTED, family, _default_targets(family))

    def inject(self, model: nn.Module, adapter_name: str, config: VeraConfig,
               family: ModelFamily | None) -> list[str]:
        paths = self._targets(model, config, family)
        views = {path: base_access(model.get_submodule(path)) for path in paths}
        shapes = [view.shape for view in views.values()]
        out_max = max(s[0] for s in shapes)
        in_max = max(s[1] for s in shapes)
        first = next(iter(views.values()))
        device, dtype = first.device, first.dtype
        a, b = projections(config.r, in_max, out_max, config.projection_prng_key)
        shared = VeraProjections(a.to(device=device, dtype=dtype),
                                 b.to(device=device, dtype=dtype), config.save_projection)
        VeraSlot.attached_to(model).adapters[adapter_name] = shared
        for path in paths:
            host = host_for(model, path)
            view = base_access(host)
            out_f, in_f = view.shape
            host.adapters[adapter_name] = VeraLinear(
                out_f, in_f, shared, config.r, config.vera_dropout, config.d_initial,
                view.device, view.dtype)
        return paths

    def parameter_count(self, model: nn.Module, config: VeraConfig,
                        family: ModelFamily | None) -> int:
        """``sum over adapted matrices of r + d_out`` (the projections are frozen)."""
        return sum(config.r + base_access(model.get_submodule(p)).out_features
                   for p in self._targets(model, config, family))


@hookimpl
def peftreg_register_methods() -> list[PEFTMethod[Any]]:
    """Provide VeRA."""
    return [VeraMethod()]
