# SPDX-License-Identifier: Apache-2.0
"""OFT: orthogonal fine-tuning (Qiu et al. 2023), with HF PEFT 0.21.2's conventions.

The frozen weight ``W`` (out x in) is multiplied by a learned orthogonal matrix on its input
side: the layer computes ``base(x R)`` for a block-diagonal ``R`` (in x in) of ``r`` blocks of
size ``b`` (``r * b == in_features``), so merging gives ``W' = W R^T``. An orthogonal ``R``
keeps the angles between the weight's neurons (the paper's hyperspherical energy), which is the
method's point.

Each block is the Cayley transform of a skew-symmetric ``Q`` whose ``b (b - 1) / 2`` free entries
(the strict upper triangle, row by row) are the trainable numbers. PEFT computes it in one of two
ways, and so does this module:

- ``use_cayley_neumann=True`` (PEFT's default): the truncated Neumann series
  ``I + 2 Q + 2 Q^2 + ... + 2 Q^(k-2) + Q^(k-1)`` for ``k = num_cayley_neumann_terms`` (PEFT's
  cut: ``I + 2 Q`` for ``k = 2``, and ``k = 3`` gives the ``k = 4`` series), which approximates
  ``(I + Q)(I - Q)^-1`` and is orthogonal only up to the truncation;
- ``use_cayley_neumann=False``: the exact ``(I - Q)(I + Q)^-1``.

(The two are transposes of each other for the same ``Q``; PEFT's numbers are matched in both.)
``Q`` starts at zero, so ``R = I`` and the model starts at the base.

``coft`` (constrained OFT, paper section 3.3) projects every block's ``Q`` back into a Frobenius
ball of radius ``eps / sqrt(r)`` before each use, writing the projected values into the
parameter as PEFT does. ``block_share`` trains one block used ``in / b`` times. ``module_dropout``
(the paper's multiplicative dropout) replaces ``floor(p * r)`` random blocks by the identity in
training; PEFT 0.21.2 creates that layer but never calls it on Linear layers, so training-mode
outputs with ``module_dropout > 0`` differ from PEFT's by design (evaluation is unaffected).

On an ``nn.Embedding`` the rows the table returns are rotated instead, ``embedding(x) R``
(``r * b`` is the embedding width), so merging gives ``W' = W R``.

The trainable tensor is saved as ``<module path>.oft_R.weight`` (``oft_embedding_R.weight`` on
an embedding) with shape ``(r, b (b - 1) / 2)`` (``(1, ...)`` with ``block_share``), PEFT's key
and shape.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Final

import torch
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
    UnsupportedOperationError,
    base_access,
    hookimpl,
    host_for,
    merge_weight,
    select_targets,
)


@dataclasses.dataclass
class OftConfig(TargetedConfig):
    """Config of an OFT adapter.

    Exactly one of ``r`` and ``oft_block_size`` is non-zero; the other follows from each layer's
    input width (``r * oft_block_size == in_features``), and a value that does not divide an
    adapted layer's input width is a :class:`ConfigError` naming the field and the layer (PEFT
    silently picks a nearby divisor instead).

    Attributes:
        r: number of blocks per layer (0: derived from ``oft_block_size``).
        oft_block_size: size of each block (0: derived from ``r``).
        use_cayley_neumann: the truncated Neumann series instead of the exact Cayley transform.
        num_cayley_neumann_terms: terms of that series (>= 2).
        coft: constrained OFT: keep each block's ``Q`` within Frobenius norm ``eps / sqrt(r)``.
        eps: the COFT radius (> 0); only read when ``coft`` is set.
        block_share: one block shared by all positions of the diagonal.
        module_dropout: in training, the fraction of blocks replaced by the identity.
        init_weights: ``True`` starts at ``R = I``; ``False`` draws ``Q`` from N(0, 0.1^2)
            (for tests).
        target_modules, exclude_modules, layers_to_transform, layers_pattern: see
            :class:`peftreg.plugin.TargetedConfig`; ``None`` takes the family's query and value
            projections (PEFT's defaults for OFT on these models).
    """

    method: ClassVar[str] = "oft"

    r: int = 0
    oft_block_size: int = 32
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    module_dropout: float = 0.0
    init_weights: bool = True

    def validate(self) -> None:
        super().validate()
        if self.r < 0:
            raise self.error("r", "must be >= 0", self.r)
        if self.oft_block_size < 0:
            raise self.error("oft_block_size", "must be >= 0", self.oft_block_size)
        if (self.r == 0) == (self.oft_block_size == 0):
            raise self.error(
                "oft_block_size", f"set exactly one of r and oft_block_size (the other is "
                f"in_features divided by it); got r={self.r}, oft_block_size="
                f"{self.oft_block_size}")
        if self.oft_block_size == 1 or (self.r == 0 and self.oft_block_size < 2):
            raise self.error("oft_block_size", "a block of size 1 has no free rotation; use >= 2",
                             self.oft_block_size)
        if self.num_cayley_neumann_terms < 2:
            raise self.error("num_cayley_neumann_terms",
                             "must be >= 2 (fewer terms give R = I whatever is trained)",
                             self.num_cayley_neumann_terms)
        if not math.isfinite(self.eps) or self.eps <= 0:
            raise self.error("eps", "must be a finite number > 0", self.eps)
        if not 0.0 <= self.module_dropout < 1.0:
            raise self.error("module_dropout", "must be in [0, 1)", self.module_dropout)

    def blocks(self, path: str, in_features: int) -> tuple[int, int]:
        """``(r, block_size)`` for a layer of input width ``in_features`` at ``path``.

        Raises:
            ConfigError: the given ``r`` or ``oft_block_size`` does not divide the width.
        """
        field, given = ("oft_block_size", self.oft_block_size) if self.r == 0 else ("r", self.r)
        if given > in_features or in_features % given:
            raise self.error(
                field, f"must divide the input width {in_features} of {path!r} "
                f"(r * oft_block_size == in_features)", given)
        other = in_features // given
        r, size = (other, given) if self.r == 0 else (given, other)
        if size < 2:
            raise self.error(field, f"gives blocks of size {size} for {path!r} (width "
                             f"{in_features}); a block needs size >= 2", given)
        return r, size


class OftRotation(nn.Module):
    """The trainable skew-symmetric generators of one layer's blocks (PEFT's ``oft_R``).

    Attributes:
        weight: ``(n_blocks, b (b - 1) / 2)``: each row is the strict upper triangle of one
            block's ``Q``, row by row (``n_blocks`` is 1 with ``block_share``).
    """

    rows: torch.Tensor
    cols: torch.Tensor

    def __init__(self, n_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.block_size = block_size
        n = block_size * (block_size - 1) // 2
        self.weight = nn.Parameter(torch.zeros(n_blocks, n, device=device, dtype=dtype))
        rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
        # Index tensors, not state: rebuilt from the block size, so not saved.
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def skew(self, vec: torch.Tensor) -> torch.Tensor:
        """The skew-symmetric blocks ``Q`` (n_blocks x b x b) from their upper triangles."""
        q = vec.new_zeros(vec.shape[0], self.block_size, self.block_size)
        q[:, self.rows, self.cols] = vec
        return q - q.transpose(-2, -1)


class OftLinear(LayerAdapter):
    """A block-diagonal orthogonal rotation of one ``nn.Linear``'s input: ``base(x R)``."""

    # The submodule holding the generators, named as PEFT names it for this layer type.
    ROTATION: ClassVar[str] = "oft_R"

    def __init__(self, base: nn.Module, r: int, block_size: int, config: OftConfig,
                 label: str = "") -> None:
        super().__init__()
        view = base_access(base)
        self.in_features = view.in_features  # the rotated width (an embedding's dim)
        self.r, self.block_size = r, block_size
        self.add_module(self.ROTATION, OftRotation(1 if config.block_share else r, block_size,
                                                   view.device, view.dtype))
        self.use_cayley_neumann = config.use_cayley_neumann
        self.num_terms = config.num_cayley_neumann_terms
        self.coft, self.eps = config.coft, config.eps
        self.block_share = config.block_share
        self.module_dropout = config.module_dropout
        self.label = label or type(self).__name__
        if not config.init_weights:
            with torch.no_grad():
                nn.init.normal_(self.generators().weight, mean=0.0, std=0.1)

    def generators(self) -> OftRotation:
        """The trainable generators (``oft_R``, or ``oft_embedding_R`` on an embedding)."""
        module = getattr(self, self.ROTATION)
        if not isinstance(module, OftRotation):  # pragma: no cover - set in __init__ only
            raise TypeError(f"{self.ROTATION} is not an OftRotation")
        return module

    # -- the rotation --------------------------------------------------------------------------

    def _project(self) -> None:
        # COFT: every block's Q scaled back onto the ball of radius eps / sqrt(n_blocks) when it
        # left it, written into the parameter itself (PEFT does the same before each use).
        gen = self.generators()
        w = gen.weight
        with torch.no_grad():
            q = gen.skew(w)
            radius = self.eps / math.sqrt(q.shape[0])
            norm = torch.linalg.matrix_norm(q, keepdim=True)
            q = torch.where(norm <= radius, q, q * (radius / norm))
            w.copy_(q[:, gen.rows, gen.cols])

    def blocks(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The orthogonal blocks ``R_i`` (n_blocks x b x b), computed in ``dtype``."""
        if self.coft:
            self._project()
        gen = self.generators()
        q = gen.skew(gen.weight if dtype is None else gen.weight.to(dtype))
        eye = torch.eye(self.block_size, device=q.device, dtype=q.dtype).expand_as(q)
        if not self.use_cayley_neumann:
            # (I - Q)(I + Q)^-1, i.e. X (I + Q) = I - Q, solved rather than inverted; in float32
            # for 16-bit adapters (the solvers have no 16-bit CPU kernels).
            wide, eye_w = (q.float(), eye.float()) if q.element_size() < 4 else (q, eye)
            return torch.linalg.solve(eye_w + wide, eye_w - wide, left=False).to(q.dtype)
        # The Neumann series of (I + Q)(I - Q)^-1 cut as PEFT 0.21.2 cuts it: I + 2 Q for
        # k = 2, else I + 2 Q + 2 Q^2 + ... + 2 Q^(k-2) + Q^(k-1) with at least the Q^3 term
        # (so k = 3 and k = 4 agree there).
        out = eye + 2 * q
        if self.num_terms > 2:
            power = q @ q
            out = out + 2 * power
            for _ in range(3, self.num_terms - 1):
                power = power @ q
                out = out + 2 * power
            out = out + power @ q
        return out

    def _dropped(self, blocks: torch.Tensor) -> torch.Tensor:
        count = int(self.module_dropout * blocks.shape[0])
        if not (self.training and count > 0 and blocks.shape[0] > 1):
            return blocks
        pick = torch.zeros(blocks.shape[0], device=blocks.device, dtype=blocks.dtype)
        pick[torch.randperm(blocks.shape[0], device=blocks.device)[:count]] = 1
        pick = pick.view(-1, 1, 1)
        eye = torch.eye(self.block_size, device=blocks.device, dtype=blocks.dtype)
        return (1 - pick) * blocks + pick * eye

    def rotation(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense block-diagonal ``R`` (in x in) the input is multiplied by."""
        blocks = self.blocks(dtype)
        if self.block_share:
            blocks = blocks.expand(self.in_features // self.block_size, -1, -1)
        return torch.block_diag(*blocks.unbind(0))

    # -- LayerAdapter ----------------------------------------------------------------------------

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` over the last dimension, block by block."""
        dtype = self.generators().weight.dtype
        blocks = self._dropped(self.blocks())
        n = self.in_features // self.block_size
        if blocks.shape[0] != n:  # block_share: one block for every position
            blocks = blocks.expand(n, -1, -1)
        xb = x.to(dtype).reshape(*x.shape[:-1], n, self.block_size)
        # Row vector times block: (x R)_c = sum_k x_k R_kc within each block.
        rotated = torch.einsum("...nk,nkc->...nc", xb, blocks)
        return rotated.reshape(x.shape).to(x.dtype)

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotate(x)

    def merge_into(self, base: nn.Module) -> None:
        w = merge_weight(base)
        rot = self.rotation(torch.float64)
        w.copy_((w.double() @ rot.T).to(w.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        w = merge_weight(base)
        rot = self.rotation(torch.float64)
        # W = W' R^-T: solve X R^T = W' (R is only near-orthogonal under the Neumann series).
        try:
            original = torch.linalg.solve(rot.T, w.double(), left=False)
        except RuntimeError as exc:  # torch.linalg.LinAlgError: a singular rotation
            raise UnsupportedOperationError(
                f"oft adapter {self.label}: cannot unmerge: the rotation is singular") from exc
        w.copy_(original.to(w.dtype))

    def extra_repr(self) -> str:
        shared = ", block_share" if self.block_share else ""
        return f"r={self.r}, block_size={self.block_size}{shared}"


class OftEmbedding(OftLinear):
    """The rotation on an ``nn.Embedding``'s output rows: ``embedding(x) R`` (PEFT's
    ``oft_embedding_R``); merging rotates the table, ``W' = W R``."""

    ROTATION: ClassVar[str] = "oft_embedding_R"

    def changes_input(self) -> bool:
        return False

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.rotate(y)

    def merge_into(self, base: nn.Module) -> None:
        w = merge_weight(base)
        w.copy_((w.double() @ self.rotation(torch.float64)).to(w.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        w = merge_weight(base)
        try:
            original = torch.linalg.solve(self.rotation(torch.float64), w.double(), left=False)
        except RuntimeError as exc:
            raise UnsupportedOperationError(
                f"oft adapter {self.label}: cannot unmerge: the rotation is singular") from exc
        w.copy_(original.to(w.dtype))


def _default_targets(family: ModelFamily | None) -> list[str] | None:
    if family is None or "q" not in family.roles or "v" not in family.roles:
        return None
    return [family.roles["q"], family.roles["v"]]


def _plan(model: nn.Module, config: OftConfig, family: ModelFamily | None
          ) -> list[tuple[str, int, int]]:
    paths = select_targets(model, config, OftMethod.supported, family, _default_targets(family))
    return [(p, *config.blocks(p, base_access(model.get_submodule(p)).in_features))
            for p in paths]


# -- Hugging Face PEFT's format (peft_type OFT, PEFT >= 0.16's oft_R.weight layout) -----------

OFT_LEAVES: Final = ("oft_R.weight", "oft_embedding_R.weight")
_OFT_FIELDS: Final = ("r", "oft_block_size", "module_dropout", "coft", "eps", "block_share",
                      "use_cayley_neumann", "num_cayley_neumann_terms")


def _block_size(n: int) -> int | None:
    """The ``b`` with ``b (b - 1) / 2 == n`` (b >= 2), or None."""
    b = (1 + math.isqrt(1 + 8 * n)) // 2
    return b if b >= 2 and b * (b - 1) // 2 == n else None


class OftPeftCodec(PeftCodec):
    """PEFT's OFT documents: one ``oft_R.weight`` (blocks x b (b - 1) / 2) per Linear layer."""

    peft_type = "OFT"
    keys = PeftKeys(
        mapped=frozenset({*_OFT_FIELDS, "target_modules", "exclude_modules",
                          "layers_to_transform", "layers_pattern", "modules_to_save"}),
        ignored={"init_weights": "initialisation only (the file holds the trained generators)"},
        refused={
            "fan_in_fan_out": "the base layer stores its weight transposed (GPT-2 Conv1D), "
                              "which peftreg's OFT does not adapt",
            "bias": "the adapter also trains the base layers' biases ('all' or 'oft_only'), "
                    "which peftreg's OFT does not",
        },
    )
    exported_fields = frozenset({*_OFT_FIELDS, "init_weights", "target_modules",
                                 "exclude_modules", "layers_to_transform", "layers_pattern",
                                 "modules_to_save"})

    def read(self, ctx: PeftImport, tensors: Mapping[str, torch.Tensor]
             ) -> tuple[dict[str, Any], ModuleTensors]:
        doc = ctx.doc
        r, size = int(doc.get("r", 0)), int(doc.get("oft_block_size", 0))
        shared = bool(doc.get("block_share", False))
        found = ctx.read_modules(tensors, OFT_LEAVES)
        for path, parts in found.adapted.items():
            if len(parts) != 1:
                ctx.tensor_problem(f"base_model.model.{path}.oft_R.weight", "a module has both "
                                   "oft_R and oft_embedding_R")
                continue
            (leaf, w), = parts.items()
            key = f"base_model.model.{path}.{leaf}"
            b = _block_size(w.shape[1]) if w.dim() == 2 else None
            if b is None:
                ctx.tensor_problem(key, f"shape {tuple(w.shape)} is not (blocks, b (b - 1) / 2) "
                                   "for a block size b >= 2")
            elif shared and w.shape[0] != 1:
                ctx.tensor_problem(key, f"block_share is set but it holds {w.shape[0]} blocks")
            elif (size and b != size) or (r and not shared and w.shape[0] != r):
                # PEFT replaces a size that does not divide a layer's width by a nearby
                # divisor; peftreg refuses such configs rather than adjust them.
                ctx.tensor_problem(key, f"holds {w.shape[0]} blocks of size {b}, not what "
                                   f"r={r}, oft_block_size={size} give: PEFT adjusted the "
                                   "config for this layer, which peftreg does not")
        fields = ctx.target_fields(found)
        fields.update({k: doc[k] for k in _OFT_FIELDS if k in doc})
        return fields, found

    def write(self, ctx: PeftExport) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config: Any = ctx.config
        found = ctx.modules(OFT_LEAVES)
        body = ctx.target_fields(found)
        body.update({k: getattr(config, k) for k in _OFT_FIELDS})
        body.update({"fan_in_fan_out": False, "bias": "none", "init_weights": True,
                     "layers_to_transform": None, "layers_pattern": None})
        return body, found.tensors


class OftMethod(PEFTMethod[OftConfig]):
    """Block-diagonal orthogonal rotations of Linear inputs; mergeable (W R^T)."""

    name: ClassVar[str] = "oft"
    config_cls = OftConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=True)
    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Embedding, Linear4bit)
    # Measured as for LoHa (tiny Llama, all-linear, block 8, 30 AdamW steps): lowest loss at
    # 1e-1 against LoRA's 3e-2, so about 3x LoRA's suggestion.
    suggested_learning_rate: ClassVar[float] = 6e-3
    peft_codec: ClassVar[PeftCodec] = OftPeftCodec()
    api_level: ClassVar[int] = 2  # the PEFT codec

    def inject(self, model: nn.Module, adapter_name: str, config: OftConfig,
               family: ModelFamily | None) -> list[str]:
        plans = _plan(model, config, family)  # every layer checked before any is touched
        for path, r, size in plans:
            host = host_for(model, path)
            layer = OftEmbedding if isinstance(host.base, nn.Embedding) else OftLinear
            host.adapters[adapter_name] = layer(host.base, r, size, config,
                                                f"{adapter_name!r} on {path!r}")
        return [p for p, _, _ in plans]

    def parameter_count(self, model: nn.Module, config: OftConfig,
                        family: ModelFamily | None) -> int:
        """``r * b (b - 1) / 2`` per adapted layer (``b (b - 1) / 2`` with ``block_share``)."""
        return sum((1 if config.block_share else r) * (size * (size - 1) // 2)
                   for _, r, size in _plan(model, config, family))


@hookimpl
def peftreg_register_methods() -> list[PEFTMethod[Any]]:
    """Provide OFT."""
    return [OftMethod()]
