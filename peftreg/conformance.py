# SPDX-License-Identifier: Apache-2.0
"""The extra conformance checks run by :func:`peftreg.testing.check_method` (``checks=``).

Each check builds its own adapted models from the :class:`Subject`, perturbs the adapter's
parameters (so that a zero-initialised factor does not hide anything) and raises
:class:`ConformanceError` with the check's name and the measured amount when a promise fails.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Collection, Iterator
from typing import Any, Final, NoReturn

import torch
from torch import nn

from peftreg.config import MethodConfig
from peftreg.errors import PeftregError, UnsupportedOperationError
from peftreg.host import AdapterHost, iter_slots
from peftreg.method import PEFTMethod
from peftreg.model import AdaptedModel
from peftreg.registry import Registry

EXTRA_CHECKS: Final[tuple[str, ...]] = (
    "gradients", "stacking", "dtypes", "moves", "state_dict", "compile")
ALL_CHECKS: Final[tuple[str, ...]] = EXTRA_CHECKS

Forward = Callable[[nn.Module, Any], torch.Tensor]


class ConformanceError(PeftregError):
    """A method broke a conformance promise.

    Attributes:
        method: the method's name.
        check: which check failed (``"gradients"``, ``"merge"``, ``"stacking"``, ...).
        measured: the amount measured (an error, a difference), when there is one.
        limit: the bound it should have respected.
    """

    def __init__(self, method: str, check: str, message: str, *,
                 measured: float | int | None = None, limit: float | int | None = None) -> None:
        super().__init__(message)
        self.method, self.check, self.measured, self.limit = method, check, measured, limit


def fail(method: str, check: str, problem: str, measured: float | int | None = None,
         limit: float | int | None = None) -> NoReturn:
    """Raise :class:`ConformanceError` with a message saying which check and by how much."""
    amount = "" if measured is None else f" (measured {measured:.3g}"
    if measured is not None:
        amount += ")" if limit is None else f", allowed {limit:.3g})"
    raise ConformanceError(method, check, f"{method}: {check} check failed: {problem}{amount}",
                           measured=measured, limit=limit)


def outputs(model: nn.Module, batch: Any, forward: Forward) -> torch.Tensor:
    """``forward(model, batch)`` without autograd, detached and copied."""
    with torch.no_grad():
        return forward(model, batch).detach().clone()


@dataclasses.dataclass
class Subject:
    """Everything a check needs to build adapted models of the method under test."""

    config: MethodConfig
    make_model: Callable[[], nn.Module]
    batch: Any
    forward: Forward
    loss: Forward
    registry: Registry
    method: PEFTMethod[Any]
    starts_equal: bool = True

    def adapted(self, name: str = "under_test", *, dtype: torch.dtype | None = None,
                seed: int = 0) -> AdaptedModel:
        """A fresh model with the adapter added and its parameters perturbed, in eval mode."""
        base = self.make_model()
        if dtype is not None:
            _to_dtype(base, dtype)
        model = AdaptedModel(base, registry=self.registry)
        model.add_adapter(name, self.config)
        if dtype is not None:  # adapters whose config fixes their dtype (QLoRA's) follow too
            _to_dtype(model, dtype)
        perturb(model, name, seed)
        return model.eval()


def perturb(model: AdaptedModel, name: str, seed: int = 0) -> None:
    """Add N(0, 0.1^2) noise to every parameter of adapter ``name`` (deterministic by seed)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.add_((noise * 0.1).to(device=p.device, dtype=p.dtype))


def _to_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    module.to(dtype)
    for sub in module.modules():  # quantized layers keep their codes, compute in ``dtype``
        if isinstance(getattr(sub, "compute_dtype", None), torch.dtype):
            setattr(sub, "compute_dtype", dtype)  # noqa: B010 (a plain attribute, not a module)


def _cast_batch(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _cast_batch(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_cast_batch(v, dtype) for v in batch)
    return batch


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.double().abs().max().clamp_min(1e-12))
    return float((a.double() - b.double()).abs().max()) / scale


# -- gradients ---------------------------------------------------------------------------------


def _sample_indices(numel: int, count: int) -> list[int]:
    if numel <= count:
        return list(range(numel))
    return sorted({round(i * (numel - 1) / (count - 1)) for i in range(count)})


def check_gradients(subject: Subject, reference_loss: Forward | None = None, *,
                    eps: float = 1e-6, samples: int = 4, rtol: float = 1e-5) -> float:
    """Autograd gradients of the adapter equal the expected ones, in float64.

    The expected gradients are those of ``reference_loss`` (the author's own maths) when given,
    else central finite differences of the method's own loss at ``samples`` entries per tensor.

    Returns:
        The largest error relative to the largest expected gradient.
    """
    name = subject.method.name
    model = subject.adapted(dtype=torch.float64)
    batch = _cast_batch(subject.batch, torch.float64)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    subject.loss(model, batch).backward()
    actual = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
              for n, p in params.items()}
    expected: dict[str, torch.Tensor] = {}
    if reference_loss is not None:
        model.zero_grad(set_to_none=True)
        reference_loss(model, batch).backward()
        expected = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                    for n, p in params.items()}
        pairs = [(n, actual[n].flatten(), expected[n].flatten()) for n in params]
    else:
        pairs = []
        with torch.no_grad():
            for n, p in params.items():
                flat = p.view(-1)
                idx = _sample_indices(flat.numel(), samples)
                fd = []
                for i in idx:
                    keep = float(flat[i])
                    flat[i] = keep + eps
                    up = float(subject.loss(model, batch))
                    flat[i] = keep - eps
                    down = float(subject.loss(model, batch))
                    flat[i] = keep
                    fd.append((up - down) / (2 * eps))
                pairs.append((n, actual[n].view(-1)[idx], torch.tensor(fd, dtype=torch.float64)))
    scale = max(float(e.abs().max()) for _, _, e in pairs if e.numel()) or 1.0
    worst, where = 0.0, ""
    for n, a, e in pairs:
        if not e.numel():
            continue
        err = float((a.double() - e.double()).abs().max()) / scale
        if err > worst:
            worst, where = err, n
    if worst > rtol:
        against = "the reference loss's gradients" if reference_loss else "finite differences"
        fail(name, "gradients", f"autograd gradient of {where} differs from {against}",
             worst, rtol)
    return worst


# -- stacking ------------------------------------------------------------------------------------


def _layer_targets(model: AdaptedModel, name: str) -> list[str]:
    return [p for p, s in iter_slots(model.model)
            if isinstance(s, AdapterHost) and name in s.adapter_names()]


def _partner(subject: Subject, model: AdaptedModel, name: str) -> MethodConfig | None:
    if "lora" not in subject.registry.names():
        return None
    targets: list[str] | str = _layer_targets(model, name) or "all-linear"
    data = {"method": "lora", "r": 2, "target_modules": targets}
    return subject.registry.config_from_dict(data)


def check_stacking(subject: Subject, *, atol: float = 1e-4) -> dict[str, str]:
    """Stacked with a LoRA adapter in both orders, merging keeps the outputs or is refused.

    Where merging succeeds: merged equals unmerged, unmerge restores it, and deleting both
    adapters while merged restores the base. A refused merge must change nothing.

    Returns:
        ``"merged"`` or the refusal message for each order (``"partner first"``: the LoRA
        adapter is applied first; ``"under test first"``).
    """
    name = subject.method.name
    probe = subject.adapted()
    partner = _partner(subject, probe, "under_test")
    if partner is None:
        return {"skipped": "no 'lora' method installed to stack with"}
    results = {}
    for order in (("lora", "under_test"), ("under_test", "lora")):
        label = "partner first" if order[0] == "lora" else "under test first"
        model = AdaptedModel(subject.make_model(), registry=subject.registry).eval()
        base = outputs(model, subject.batch, subject.forward)
        for adapter in order:
            model.add_adapter(adapter, partner if adapter == "lora" else subject.config)
            perturb(model, adapter, seed=len(adapter))
        model.set_active(list(order))
        unmerged = outputs(model, subject.batch, subject.forward)
        try:
            model.merge()
        except UnsupportedOperationError as exc:
            after = outputs(model, subject.batch, subject.forward)
            if model.merged_adapters or not torch.equal(after, unmerged):
                fail(name, "stacking", f"{label}: a refused merge left changes behind",
                     float((after - unmerged).abs().max()), 0.0)
            results[label] = f"refused: {exc}"
            continue
        diff = float((outputs(model, subject.batch, subject.forward) - unmerged).abs().max())
        if diff > atol:
            fail(name, "stacking", f"{label}: merged output differs from unmerged", diff, atol)
        model.unmerge()
        diff = float((outputs(model, subject.batch, subject.forward) - unmerged).abs().max())
        if diff > atol:
            fail(name, "stacking", f"{label}: unmerge did not restore the outputs", diff, atol)
        model.merge()
        for adapter in order:
            model.delete_adapter(adapter)
        diff = float((outputs(model, subject.batch, subject.forward) - base).abs().max())
        if diff > atol:
            fail(name, "stacking", f"{label}: deleting merged adapters did not restore the base",
                 diff, atol)
        results[label] = "merged"
    return results


# -- dtypes, moves, state dict, compile ------------------------------------------------------


def check_dtypes(subject: Subject, dtypes: Collection[torch.dtype] = (
        torch.float32, torch.bfloat16)) -> dict[str, float]:
    """In each dtype the adapter starts at the base (if it claims to), and gives finite
    outputs and finite, non-zero gradients.

    Returns:
        The largest absolute gradient per dtype.
    """
    name = subject.method.name
    found = {}
    for dtype in dtypes:
        label = str(dtype).removeprefix("torch.")
        base = subject.make_model().eval()
        _to_dtype(base, dtype)
        batch = _cast_batch(subject.batch, dtype)
        base_out = outputs(base, batch, subject.forward)
        fresh = subject.make_model()
        _to_dtype(fresh, dtype)
        model = AdaptedModel(fresh, registry=subject.registry)
        model.add_adapter("under_test", subject.config)
        model.eval()
        start = outputs(model, batch, subject.forward)
        if subject.starts_equal and not torch.equal(start, base_out):
            fail(name, "dtypes", f"{label}: the fresh adapter differs from the base",
                 float((start.double() - base_out.double()).abs().max()), 0.0)
        perturb(model, "under_test")
        if not bool(torch.isfinite(outputs(model, batch, subject.forward)).all()):
            fail(name, "dtypes", f"{label}: non-finite outputs")
        model.zero_grad(set_to_none=True)
        subject.loss(model, batch).backward()
        grads = [p.grad for p in model.adapter_parameters("under_test") if p.grad is not None]
        if not grads:
            fail(name, "dtypes", f"{label}: no adapter parameter received a gradient")
        top = max(float(g.abs().max()) for g in grads)
        if not all(bool(torch.isfinite(g).all()) for g in grads) or top == 0.0:
            fail(name, "dtypes", f"{label}: gradients are non-finite or all zero", top)
        found[label] = top
    return found


def _devices() -> Iterator[str]:
    yield "cpu"
    if torch.cuda.is_available():
        yield "cuda"


def check_moves(subject: Subject, *, rtol: float = 1e-4) -> float:
    """``.to(float64)``, ``.to(device)`` and back keep the outputs and move every adapter
    tensor.

    Returns:
        The largest relative output change over the moves.
    """
    name = subject.method.name
    model = subject.adapted()
    reference = outputs(model, subject.batch, subject.forward)
    worst = 0.0
    moves: list[tuple[str, torch.dtype | None]] = [
        (device, dtype) for device, dtype in itertools.product(_devices(), (torch.float64, None))]
    for device, dtype in moves:
        if dtype is not None:
            _to_dtype(model, dtype)
        model.to(device)
        for p in model.adapter_parameters("under_test"):
            if p.device.type != device or (dtype is not None and p.dtype != dtype):
                fail(name, "moves", f"adapter parameter stayed on {p.device}/{p.dtype} after "
                     f".to({device}, {dtype})")
        batch = _cast_batch(_to_device(subject.batch, device), dtype or torch.float32)
        moved = outputs(model, batch, subject.forward).to("cpu", torch.float32)
        worst = max(worst, _max_rel(moved, reference))
        if dtype is not None:
            _to_dtype(model, torch.float32)
    if worst > rtol:
        fail(name, "moves", "outputs changed after moving the adapted model", worst, rtol)
    return worst


def _to_device(batch: Any, device: str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def check_state_dict(subject: Subject) -> int:
    """The adapted model's ``state_dict`` loads strictly into a fresh adapted model (other
    random adapter weights) and reproduces its outputs exactly.

    Returns:
        The number of state-dict entries.
    """
    name = subject.method.name
    trained = subject.adapted(seed=1)
    state = trained.state_dict()
    other = subject.adapted(seed=2)
    if torch.equal(outputs(other, subject.batch, subject.forward),
                   outputs(trained, subject.batch, subject.forward)):
        fail(name, "state_dict", "two differently perturbed adapters give equal outputs")
    missing, unexpected = other.load_state_dict(state, strict=False)
    if missing or unexpected:
        fail(name, "state_dict", f"keys differ: missing {missing[:5]}, unexpected "
             f"{unexpected[:5]}", len(missing) + len(unexpected), 0)
    diff = float((outputs(other, subject.batch, subject.forward)
                  - outputs(trained, subject.batch, subject.forward)).abs().max())
    if diff != 0.0:
        fail(name, "state_dict", "outputs differ after loading the state dict", diff, 0.0)
    return len(state)


def check_compile(subject: Subject, *, backend: str = "aot_eager", rtol: float = 1e-5
                  ) -> float | None:
    """``torch.compile`` gives the eager outputs, for methods whose capabilities say
    ``compilable``; ``None`` (not run) otherwise.

    Returns:
        The relative difference between compiled and eager outputs.
    """
    if not subject.method.capabilities.compilable:
        return None
    name = subject.method.name
    model = subject.adapted()
    eager = outputs(model, subject.batch, subject.forward)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=backend)
        got = outputs(compiled, subject.batch, subject.forward)  # type: ignore[arg-type]
    finally:
        torch._dynamo.reset()
    diff = _max_rel(got, eager)
    if diff > rtol:
        fail(name, "compile", "compiled outputs differ from eager ones", diff, rtol)
    return diff


def run_extra_checks(subject: Subject, checks: Collection[str],
                     reference_loss: Forward | None = None) -> dict[str, Any]:
    """Run the named extra checks in :data:`EXTRA_CHECKS` order; return their measurements."""
    results: dict[str, Any] = {}
    for check in EXTRA_CHECKS:
        if check not in checks:
            continue
        if check == "gradients":
            results[check] = check_gradients(subject, reference_loss)
        elif check == "stacking":
            results[check] = check_stacking(subject)
        elif check == "dtypes":
            results[check] = check_dtypes(subject)
        elif check == "moves":
            results[check] = check_moves(subject)
        elif check == "state_dict":
            results[check] = check_state_dict(subject)
        else:
            results[check] = check_compile(subject)
    return results
