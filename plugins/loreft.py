# SPDX-License-Identifier: Apache-2.0
"""LoReFT: low-rank linear subspace representation fine-tuning (Wu et al. 2024, eq. 2).

Instead of weights, LoReFT edits hidden states. At chosen positions of the output of chosen
transformer blocks it replaces ``h`` (width ``d``) by

    h + R^T (W h + b - R h)

with ``R`` (r x d) having orthonormal rows, ``W`` (r x d) and ``b`` (r): inside the
``r``-dimensional subspace spanned by ``R``'s rows, the projection ``R h`` is replaced by the
learned ``W h + b``; the rest of ``h`` is left alone. Each intervened layer adds ``2 r d + r``
parameters.

``R`` stays orthonormal through a parametrization: the trained tensor ``X`` (r x d) is mapped to
the ``Q`` factor of ``X^T``'s reduced QR decomposition (signs fixed so the map is continuous and
an orthonormal ``X`` maps to itself). torch's own ``orthogonal`` parametrization was not used: for
a non-square matrix it either reads the diagonal of its tensor as signs (weight decay or noise
then breaks orthonormality) or stores a d x d buffer per layer in every saved file.

``W`` starts equal to ``R`` and ``b`` at zero, so the intervention starts as the identity and the
adapted model equals the base (the paper's code draws ``W`` at random instead; training moves it
either way). Positions are indices into each call's sequence: ``"f<p>+l<s>"`` the first ``p`` and
the last ``s`` (the paper's prefix and suffix), ``"all"`` every position. Not mergeable: it acts
on activations, not on a weight.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Final

import torch
from torch import nn
from torch.nn.utils import parametrize

from peftreg.plugin import (
    Capabilities,
    LayerAdapter,
    MethodConfig,
    ModelFamily,
    ModelFamilyError,
    PEFTMethod,
    get_module,
    hookimpl,
    host_for,
)

_POSITIONS: Final = re.compile(r"(?:f(?P<first>\d+))?\+?(?:l(?P<last>\d+))?")


@dataclasses.dataclass
class LoreftConfig(MethodConfig):
    """Config of a LoReFT intervention.

    Attributes:
        r: rank of the edited subspace (1..hidden size).
        layers: indices of the transformer blocks whose output is edited (``None``: all).
        positions: which positions of each call's sequence are edited: ``"f<p>+l<s>"`` (the
            first ``p`` and last ``s``; either part may be left out), or ``"all"``.
    """

    method: ClassVar[str] = "loreft"

    r: int = 4
    layers: list[int] | None = None
    positions: str = "f1+l1"

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise self.error("r", "rank must be > 0", self.r)
        if self.layers is not None:
            if not self.layers:
                raise self.error("layers", "must not be an empty list (None means all)", [])
            if any(i < 0 for i in self.layers):
                raise self.error("layers", "indices must be >= 0", self.layers)
            if len(set(self.layers)) != len(self.layers):
                raise self.error("layers", "indices must not repeat", self.layers)
        self.first_last()

    def first_last(self) -> tuple[int, int] | None:
        """``(first, last)`` counts of edited positions, or ``None`` for every position."""
        if self.positions == "all":
            return None
        match = _POSITIONS.fullmatch(self.positions)
        if not self.positions or match is None or "++" in self.positions or (
                self.positions.startswith("+") or self.positions.endswith("+")):
            raise self.error("positions", "expected 'f<p>+l<s>', 'f<p>', 'l<s>' or 'all'",
                             self.positions)
        first, last = int(match["first"] or 0), int(match["last"] or 0)
        if first + last == 0:
            raise self.error("positions", "selects no position", self.positions)
        return first, last


class _Orthonormal(nn.Module):
    """Parametrization: ``X`` (r x d) -> the r x d matrix with orthonormal rows from QR."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CPU QR has no 16-bit kernels; a half-precision R is computed in float32.
        wide = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        q, r = torch.linalg.qr(wide.T)  # reduced: q is d x r with orthonormal columns
        # QR is unique up to a sign per column; fixing diag(r) > 0 makes the map continuous
        # and the identity on matrices that already have orthonormal rows.
        sign = torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)
        return (q * sign).T.to(x.dtype)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w


class LoreftIntervention(LayerAdapter):
    """``h + R^T (W h + b - R h)`` at the chosen positions of one block's output hidden states.

    Attributes:
        rotate_layer: ``R`` as a bias-free Linear(d, r) whose weight has orthonormal rows.
        learned_source: ``W`` and ``b`` as a Linear(d, r).
    """

    def __init__(self, d: int, r: int, positions: tuple[int, int] | None,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.rotate_layer = nn.Linear(d, r, bias=False, **kw)
        with torch.no_grad():
            self.rotate_layer.weight.copy_(nn.init.orthogonal_(torch.empty(r, d, device=device)))
        parametrize.register_parametrization(self.rotate_layer, "weight", _Orthonormal())
        self.learned_source = nn.Linear(d, r, **kw)
        with torch.no_grad():
            self.learned_source.weight.copy_(self.rotate_layer.weight)
            self.learned_source.bias.zero_()
        self.positions = positions
        self.r, self.d = r, d

    def rotation(self) -> torch.Tensor:
        """``R`` (r x d), orthonormal rows."""
        return self.rotate_layer.weight

    def _indices(self, length: int, device: torch.device) -> torch.Tensor | None:
        if self.positions is None:
            return None
        first, last = self.positions
        chosen = set(range(min(first, length))) | set(range(max(length - last, 0), length))
        return torch.tensor(sorted(chosen), dtype=torch.long, device=device)

    def intervene(self, h: torch.Tensor) -> torch.Tensor:
        """The edited hidden states ``h`` (batch, sequence, d)."""
        dtype = self.learned_source.weight.dtype
        idx = self._indices(h.shape[1], h.device)
        chosen = h if idx is None else h.index_select(1, idx)
        chosen = chosen.to(dtype)
        rot = self.rotation()
        edit = (self.learned_source(chosen) - chosen @ rot.T) @ rot
        if idx is None:
            return h + edit.to(h.dtype)
        return h.index_add(1, idx, edit.to(h.dtype))

    def adapt_output(self, x: torch.Tensor, y: Any) -> Any:
        # A block returns its hidden states, or a tuple led by them.
        if isinstance(y, tuple):
            return (self.intervene(y[0]), *y[1:])
        return self.intervene(y)

    def extra_repr(self) -> str:
        where = "all positions" if self.positions is None else (
            f"first {self.positions[0]}, last {self.positions[1]} positions")
        return f"d={self.d}, r={self.r}, {where}"


def _plan(model: nn.Module, config: LoreftConfig, family: ModelFamily | None
          ) -> tuple[list[str], int]:
    if family is None or not family.layers:
        raise ModelFamilyError(
            "loreft: no model family plugin describes this model's transformer blocks, so "
            "LoreftConfig.layers cannot be resolved")
    d = family.hidden_size
    if d is None:
        raise ModelFamilyError(f"loreft: model family {family.name!r} does not give the hidden "
                               "size the intervention acts on")
    if config.r > d:
        raise config.error("r", f"must be at most the hidden size {d} (R has orthonormal rows)",
                           config.r)
    indices = config.layers if config.layers is not None else range(family.num_layers)
    bad = [i for i in indices if i >= family.num_layers]
    if bad:
        raise config.error("layers", f"indices {bad} out of range for a model with "
                           f"{family.num_layers} layers", config.layers)
    return [family.layers[i] for i in sorted(indices)], d


class LoreftMethod(PEFTMethod[LoreftConfig]):
    """Low-rank edits of block output hidden states at chosen positions; not mergeable."""

    name: ClassVar[str] = "loreft"
    config_cls = LoreftConfig
    capabilities: ClassVar[Capabilities] = Capabilities(mergeable=False, inference_latency=True)
    # Measured as for LoHa (tiny Llama of the tests, 30 AdamW steps; r=4 on every layer, at
    # positions f1+l1 and at all positions): lowest loss at 1e-1 against LoRA's 3e-2, so about
    # 3x LoRA's suggestion.
    suggested_learning_rate: ClassVar[float] = 6e-3
    size_field: ClassVar[str | None] = "r"

    def inject(self, model: nn.Module, adapter_name: str, config: LoreftConfig,
               family: ModelFamily | None) -> list[str]:
        paths, d = _plan(model, config, family)
        positions = config.first_last()
        for path in paths:
            block = get_module(model, path)
            tensor = next((t for t in block.parameters() if t.is_floating_point()), None)
            device = tensor.device if tensor is not None else torch.device("cpu")
            dtype = tensor.dtype if tensor is not None else torch.float32
            host = host_for(model, path)
            host.adapters[adapter_name] = LoreftIntervention(d, config.r, positions, device,
                                                             dtype)
        return paths

    def parameter_count(self, model: nn.Module, config: LoreftConfig,
                        family: ModelFamily | None) -> int:
        """``2 r d + r`` per intervened layer (``R`` and ``W``, r x d each, and ``b``)."""
        paths, d = _plan(model, config, family)
        return len(paths) * (2 * config.r * d + config.r)


@hookimpl
def peftreg_register_methods() -> list[PEFTMethod[Any]]:
    """Provide LoReFT."""
    return [LoreftMethod()]
