# SPDX-License-Identifier: Apache-2.0
"""The rank of the update, after LoRA paper section 7 (Hu et al. 2021), on the user's model.

Three measurements, each a pure function tested on matrices with known answers:

* :func:`energy_shares`: how much of a full fine-tuning update ``dW`` lies in its top ``k``
  singular directions (``sum_{i<=k} s_i^2 / sum_i s_i^2``). A small share at small ``k`` would
  contradict LoRA's premise that the update has a low "intrinsic rank".
* :func:`subspace_similarity`: the paper's figure 3 measure between two LoRA runs of rank
  ``r1 < r2``: ``phi(i, j) = ||V1[:i] V2[:j]^T||_F^2 / min(i, j)`` for the right singular
  vectors of their ``A`` factors, 1 when the top-``i`` directions of one lie in the top-``j`` of
  the other, 0 when they are orthogonal.
* :func:`amplification`: the paper's table 7 ratio ``||dW||_F / ||U^T W V||_F`` with ``U, V`` the
  top-``r`` singular vectors of ``dW``: how strongly the update amplifies directions the
  pretrained weight already has but does not emphasise (the paper finds about 20 at r=4).

:func:`analyze` trains full fine-tuning and LoRA at two ranks on a ``peftreg compare`` task
and applies them to every matrix kind (q, k, v, o, feed-forward).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftreg.compare.baselines import FULL_LEARNING_RATE
from peftreg.compare.runs import MethodResult, train
from peftreg.compare.tasks import Task
from peftreg.errors import ConfigError
from peftreg.model import AdaptedModel
from peftreg.registry import Registry

__all__ = ["ENERGY_KS", "RankAnalysis", "amplification", "analyze", "energy_shares",
           "subspace_similarity"]

ENERGY_KS = (1, 4, 8, 16, 64)
KINDS = ("q", "k", "v", "o", "ffn_up", "ffn_down")


def energy_shares(delta: torch.Tensor, ks: Sequence[int] = ENERGY_KS) -> dict[int, float]:
    """Share of ``||delta||_F^2`` in its top ``k`` singular directions, for each ``k`` (1.0
    once ``k`` reaches the matrix's rank; 0.0 for a zero update)."""
    s2 = torch.linalg.svdvals(delta.double()).square()
    total = s2.sum().item()
    return {k: (s2[:k].sum().item() / total) if total > 0 else 0.0 for k in ks}


def subspace_similarity(a_small: torch.Tensor, a_large: torch.Tensor) -> torch.Tensor:
    """``phi[i - 1, j - 1]`` for ``i <= rank(a_small)``, ``j <= rank(a_large)``: the LoRA paper's
    normalised subspace similarity between the right singular vectors of two ``A`` factors
    (each ``r x d_in``)."""
    if a_small.shape[1] != a_large.shape[1]:
        raise ConfigError(f"A factors of different input widths: {tuple(a_small.shape)} and "
                          f"{tuple(a_large.shape)}")
    v1 = torch.linalg.svd(a_small.double(), full_matrices=False).Vh
    v2 = torch.linalg.svd(a_large.double(), full_matrices=False).Vh
    overlap = (v1 @ v2.T).square()                       # (r1, r2)
    cumulative = overlap.cumsum(0).cumsum(1)             # ||V1[:i] V2[:j]^T||_F^2
    i = torch.arange(1, v1.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, v2.shape[0] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)


def amplification(delta: torch.Tensor, weight: torch.Tensor, r: int) -> float:
    """``||delta||_F / ||U^T weight V||_F``, ``U`` and ``V`` the top-``r`` left and right
    singular vectors of ``delta`` (LoRA paper table 7)."""
    u, _, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    projected = u[:, :r].T @ weight.double() @ vh[:r].T
    return (delta.double().norm() / projected.norm()).item()


@dataclasses.dataclass
class RankAnalysis:
    """What :func:`analyze` measured (every number averaged over the model's layers).

    Attributes:
        ranks: the two LoRA ranks compared.
        energy: matrix kind -> k -> share of the full fine-tuning update's energy in its top
            ``k`` singular directions.
        similarity: matrix kind -> ``phi[i][j]`` between the two LoRA runs' ``A`` factors.
        amplification: matrix kind -> rank -> ``||dW|| / ||U^T W V||`` of that LoRA run.
        runs: the training runs (metric, final loss), for the record.
        input_widths: matrix kind -> its input width ``d``; two unrelated subspaces of
            dimensions ``i <= j`` in ``R^d`` have ``phi(i, j)`` about ``j / d``, the level
            below which no similarity was learned.
    """

    ranks: tuple[int, int]
    energy: dict[str, dict[int, float]]
    similarity: dict[str, list[list[float]]]
    amplification: dict[str, dict[int, float]]
    runs: list[dict[str, Any]]
    input_widths: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _matrices(model: nn.Module, paths: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for p in paths:
        weight = model.get_submodule(p).weight
        if not isinstance(weight, torch.Tensor):
            raise ConfigError(f"{p}: no weight matrix to analyse")
        out[p] = weight.detach().double().clone()
    return out


def analyze(task: Task, registry: Registry, *, ranks: tuple[int, int] = (8, 64), seed: int = 0,
            kinds: Sequence[str] = KINDS) -> RankAnalysis:
    """Train full fine-tuning and LoRA at ``ranks`` on ``task`` (same data, steps and seed) and
    measure the updates of every matrix kind the model's family names.

    Raises:
        ConfigError: the model has no family describing its matrix kinds, or bad ranks.
    """
    small, large = ranks
    if not 0 < small < large:
        raise ConfigError(f"ranks must be two increasing positive integers, got {ranks}")
    probe = task.make_model(seed)
    family = registry.describe_model(probe)
    if family is None:
        raise ConfigError("the rank analysis needs a model whose family names its matrix "
                          "kinds (q, k, v, o, feed-forward); no family plugin describes it")
    paths = {kind: family.role_paths(kind) for kind in kinds if family.role_paths(kind)}
    runs: list[dict[str, Any]] = []

    # Full fine-tuning: the update of every matrix.
    before = _matrices(probe, [p for group in paths.values() for p in group])
    result = MethodResult("full fine-tuning", "(baseline)", FULL_LEARNING_RATE, seed=seed)
    probe.requires_grad_(True)
    train(result, probe, list(probe.parameters()), task, seed, None)
    after = _matrices(probe, list(before))
    runs.append({"run": "full fine-tuning", "metric": task.evaluate(probe),
                 "final_loss": result.final_loss})
    energy = {kind: {k: statistics.fmean(energy_shares(after[p] - before[p])[k] for p in group)
                     for k in ENERGY_KS} for kind, group in paths.items()}

    # LoRA at two ranks on the same matrices: A factors and merged updates.
    factors: dict[int, dict[str, torch.Tensor]] = {}
    updates: dict[int, dict[str, torch.Tensor]] = {}
    lora = registry.get("lora").config_cls
    # One alpha for both ranks, as the paper does (alpha set to the first rank tried and not
    # tuned), so the larger rank trains at a smaller scale alpha / r instead of diverging.
    alpha = 2.0 * small
    for r in ranks:
        model = AdaptedModel(task.make_model(seed), registry=registry)
        targets = [p for group in paths.values() for p in group]
        torch.manual_seed(seed)
        model.add_adapter("analyze", lora(r=r, lora_alpha=alpha, target_modules=targets,
                                          modules_to_save=list(task.modules_to_save)))
        lr = registry.get("lora").suggested_learning_rate
        result = MethodResult(f"lora r={r}", "", lr, seed=seed)
        train(result, model, [p for p in model.parameters() if p.requires_grad], task, seed,
              None)
        runs.append({"run": f"lora r={r}", "metric": task.evaluate(model),
                     "final_loss": result.final_loss})
        state = model.adapter_state_dict("analyze")
        factors[r] = {p: state[f"{p}.lora_A.weight"] for p in targets}
        scale = alpha / r
        updates[r] = {p: scale * state[f"{p}.lora_B.weight"].double()
                      @ state[f"{p}.lora_A.weight"].double() for p in targets}
    similarity = {}
    amplified: dict[str, dict[int, float]] = {}
    for kind, group in paths.items():
        phi = torch.stack([subspace_similarity(factors[small][p], factors[large][p])
                           for p in group]).mean(0)
        similarity[kind] = phi.tolist()
        amplified[kind] = {r: statistics.fmean(amplification(updates[r][p], before[p], r)
                                               for p in group) for r in ranks}
    widths = {kind: int(before[group[0]].shape[1]) for kind, group in paths.items()}
    return RankAnalysis((small, large), energy, similarity, amplified, runs, widths)


def plot(analysis: RankAnalysis, path: Any) -> None:
    """Two panels: the energy share of full fine-tuning's updates against k, and the subspace
    similarity phi(i, j) of the q and v factors (the LoRA paper's figures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("q", "v") if k in analysis.similarity]
    fig, axes = plt.subplots(1, 1 + len(kinds), figsize=(4.2 * (1 + len(kinds)), 3.6))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    for kind, shares in analysis.energy.items():
        axes[0].plot(list(shares), list(shares.values()), marker="o", label=kind)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("top-k singular directions")
    axes[0].set_ylabel("share of the update's energy")
    axes[0].set_title("full fine-tuning update")
    axes[0].legend(fontsize=7)
    small, large = analysis.ranks
    for ax, kind in zip(axes[1:], kinds, strict=True):
        image = ax.imshow(analysis.similarity[kind], vmin=0, vmax=1, aspect="auto",
                          cmap="viridis", origin="lower",
                          extent=(0.5, large + 0.5, 0.5, small + 0.5))
        ax.set_xlabel(f"j (r={large})")
        ax.set_ylabel(f"i (r={small})")
        ax.set_title(f"phi(i, j), W_{kind}")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: Any) -> None:
    """The options of ``peftreg analyze``."""
    parser.add_argument("--model", default="minilm",
                        help="minilm (default), smollm2, or a local encoder directory; the same "
                             "tasks as peftreg compare")
    parser.add_argument("--task", default=None, metavar="csv:PATH")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ranks", default="8,64", help="the two LoRA ranks compared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="analyze-results",
                        help="folder for analysis.json and analysis.png")


def run_command(args: Any, console: Any) -> int:
    """``peftreg analyze``: train, measure, print the three tables, write JSON and the plot."""
    import json
    from pathlib import Path

    from rich.table import Table

    from peftreg.compare.tasks import build_task
    from peftreg.registry import default_registry

    try:
        ranks = tuple(int(r) for r in args.ranks.split(","))
    except ValueError as exc:
        raise ConfigError(f"--ranks {args.ranks!r}: expected two integers like 8,64") from exc
    if len(ranks) != 2:
        raise ConfigError(f"--ranks {args.ranks!r}: expected two integers like 8,64")
    registry = default_registry()
    task = build_task(args.model, args.task, text_column=args.text_column,
                      label_column=args.label_column, registry=registry, steps=args.steps,
                      batch_size=16, max_length=40, seed=args.seed, test_per_class=334)
    console.print(f"training full fine-tuning and LoRA r={ranks[0]}, r={ranks[1]} "
                  f"({args.steps} steps each) ...")
    result = analyze(task, registry, ranks=(ranks[0], ranks[1]), seed=args.seed)
    energy = Table(title="Full fine-tuning: share of each update's energy in its top-k "
                         "singular directions (mean over layers)")
    energy.add_column("matrix")
    for k in ENERGY_KS:
        energy.add_column(f"k={k}")
    for kind, shares in result.energy.items():
        energy.add_row(kind, *(f"{shares[k]:.3f}" for k in ENERGY_KS))
    console.print(energy)
    small, large = result.ranks
    lora = Table(title=f"LoRA r={small} against r={large}: subspace similarity phi(i, j) of the A "
                       "factors, and amplification ||dW|| / ||U^T W V||")
    for col in ("matrix", "phi(1,1)", f"phi(1,{large})", f"phi({small},{small})",
                f"phi({small},{large})", f"unrelated: {large}/d", f"amplification r={small}",
                f"amplification r={large}"):
        lora.add_column(col)
    for kind, phi in result.similarity.items():
        amp = result.amplification[kind]
        lora.add_row(kind, f"{phi[0][0]:.3f}", f"{phi[0][large - 1]:.3f}",
                     f"{phi[small - 1][small - 1]:.3f}", f"{phi[small - 1][large - 1]:.3f}",
                     f"{large / result.input_widths[kind]:.3f}",
                     f"{amp[small]:.2f}", f"{amp[large]:.2f}")
    console.print(lora)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    plot(result, out / "analysis.png")
    console.print(f"wrote {out / 'analysis.json'} and {out / 'analysis.png'}")
    return 0
