# SPDX-License-Identifier: Apache-2.0
"""Choosing which modules of a model a method adapts, and replacing them.

Rules for a target entry (the same as HF PEFT's, so configs carry over):

* a list of names: an entry matches a module whose path equals it or ends with ``"." + entry``;
* a single string: a regular expression that must match the whole module path;
* ``"all-linear"``: every linear layer of a supported type except the output head.

``exclude_modules`` follows the same rules. ``layers_to_transform`` keeps only modules inside the
listed transformer blocks (block indices come from the model family when known, otherwise from
``layers_pattern``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from torch import nn

from peftreg.config import MethodConfig
from peftreg.errors import TargetNotFoundError
from peftreg.families import ModelFamily
from peftreg.host import AdapterSlot, get_module, replace_module
from peftreg.patterns import UnsafePatternError, compile_pattern

__all__ = [
    "ALL_LINEAR", "TargetedConfig", "get_module", "is_linear", "iter_base_modules",
    "layer_index", "matches", "output_head_paths", "replace_module", "select_targets",
]

ALL_LINEAR = "all-linear"
# Names commonly given to the block list of a transformer, for the layer filter when no family
# plugin describes the model.
DEFAULT_LAYERS_PATTERN = r"layers|layer|h|blocks|block"
_COMMON_HEADS = ("lm_head", "classifier", "score", "head", "output", "cls")


@dataclasses.dataclass
class TargetedConfig(MethodConfig):
    """Config fields shared by methods that adapt chosen modules.

    Attributes:
        target_modules: which modules to adapt: a list of names or suffixes, a regex string, or
            ``"all-linear"``; ``None`` asks the method for its default for the model family.
        exclude_modules: modules to leave out, with the same matching rules.
        layers_to_transform: indices of the transformer blocks to adapt (all when ``None``).
        layers_pattern: regex naming the block list in module paths, used with
            ``layers_to_transform`` when no family plugin describes the model.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: str | None = None

    def validate(self) -> None:
        super().validate()
        for field in ("target_modules", "exclude_modules"):
            value = getattr(self, field)
            if isinstance(value, str) and value != ALL_LINEAR:
                _compile(value, self, field)
            if isinstance(value, list):
                if not value and field == "target_modules":
                    raise self.error(field, "must not be an empty list", value)
                if any(not v for v in value):
                    raise self.error(field, "entries must be non-empty strings", value)
        if self.exclude_modules == ALL_LINEAR:
            raise self.error("exclude_modules", "'all-linear' is only valid for target_modules")
        if self.layers_to_transform is not None:
            if not self.layers_to_transform:
                raise self.error("layers_to_transform", "must not be an empty list", [])
            if any(i < 0 for i in self.layers_to_transform):
                raise self.error("layers_to_transform", "indices must be >= 0",
                                 self.layers_to_transform)
        if self.layers_pattern is not None:
            _compile(self.layers_pattern, self, "layers_pattern")


def _compile(pattern: str, config: MethodConfig, field: str) -> None:
    try:
        compile_pattern(pattern, f"{type(config).__name__}.{field}")
    except UnsafePatternError as exc:
        raise config.error(field, exc.problem) from exc


# -- walking and replacing -------------------------------------------------------------------


def iter_base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(path, module)`` for the model's own modules, seeing through adapter slots.

    An adapter slot is reported under its own path with the module it wraps, and its adapter
    submodules are skipped, so targeting is unaffected by adapters already present.
    """
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, AdapterSlot):
            inner = child.wrapped()
            if inner is None:
                continue
            yield path, inner
            yield from iter_base_modules(inner, path + ".")
        else:
            yield path, child
            yield from iter_base_modules(child, path + ".")


# -- selection -------------------------------------------------------------------------------


def matches(path: str, spec: list[str] | str) -> bool:
    """Whether module ``path`` matches a target entry: a list of names or suffixes, or a regex
    string matching the whole path (the module docstring gives the rules)."""
    if isinstance(spec, str):
        return compile_pattern(spec, "target_modules").fullmatch(path) is not None
    return any(path == entry or path.endswith("." + entry) for entry in spec)


def is_linear(module: nn.Module) -> bool:
    """Whether ``"all-linear"`` counts ``module``: an ``nn.Linear``, or a class that declares
    ``peftreg_linear = True`` (quantized or fused linear layers)."""
    return isinstance(module, nn.Linear) or bool(getattr(type(module), "peftreg_linear", False))


def output_head_paths(model: nn.Module, family: ModelFamily | None) -> set[str]:
    """Paths of modules treated as the output head (left out of ``"all-linear"``)."""
    if family is not None and family.output_head:
        return {family.output_head}
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_module = None
    if callable(get_out):
        try:
            out_module = get_out()
        except (NotImplementedError, AttributeError):
            out_module = None
    for path, module in iter_base_modules(model):
        if module is out_module or path.rsplit(".", 1)[-1] in _COMMON_HEADS:
            heads.add(path)
    return heads


def layer_index(path: str, family: ModelFamily | None, layers_pattern: str | None) -> int | None:
    """Transformer block index of module ``path``, or ``None`` when outside any block."""
    if family is not None and family.layers and layers_pattern is None:
        return family.layer_index(path)
    pattern = layers_pattern or DEFAULT_LAYERS_PATTERN
    match = compile_pattern(rf"(?:^|\.)(?:{pattern})\.(\d+)(?:\.|$)", "layers_pattern"
                            ).search(path)
    return int(match.group(1)) if match else None


def select_targets(
    model: nn.Module,
    config: TargetedConfig,
    supported: tuple[type[nn.Module], ...],
    family: ModelFamily | None = None,
    default_targets: list[str] | str | None = None,
) -> list[str]:
    """Return the paths of the modules ``config`` selects, in model order.

    Args:
        model: the model to search.
        config: the targeting fields.
        supported: module types the method can adapt.
        family: the model's family, when a plugin described it.
        default_targets: used when ``config.target_modules`` is ``None``.

    Raises:
        TargetNotFoundError: nothing matches, an exact name matches no module, or a named module
            has a type the method cannot adapt. The message lists candidate module names.
    """
    spec = config.target_modules if config.target_modules is not None else default_targets
    if spec is None:
        raise TargetNotFoundError(
            f"{type(config).__name__}.target_modules is not set and no default is known for "
            f"this model{f' (family {family.name!r})' if family else ''}; candidates: "
            f"{_candidates(model, supported)}"
        )
    modules = list(iter_base_modules(model))
    heads = output_head_paths(model, family) if spec == ALL_LINEAR else set()
    chosen: list[str] = []
    wrong_type: list[str] = []
    layer_indices: set[int | None] = set()  # of modules the layer filter left out
    for path, module in modules:
        if spec == ALL_LINEAR:
            if not (isinstance(module, supported) and is_linear(module)) or path in heads:
                continue
        elif not matches(path, spec):
            continue
        elif not isinstance(module, supported):
            wrong_type.append(f"{path} ({type(module).__name__})")
            continue
        if config.exclude_modules is not None and matches(path, config.exclude_modules):
            continue
        if config.layers_to_transform is not None:
            index = layer_index(path, family, config.layers_pattern)
            if index is None or index not in config.layers_to_transform:
                layer_indices.add(index)
                continue
        chosen.append(path)
    if isinstance(spec, list):
        _check_each_entry(spec, modules, supported, model)
    if not chosen and layer_indices:
        found = sorted(i for i in layer_indices if i is not None)
        where = (f"the targeted modules sit in layers {found}" if found else
                 "no targeted module sits in a numbered layer"
                 f" (layers_pattern {config.layers_pattern or DEFAULT_LAYERS_PATTERN!r})")
        raise TargetNotFoundError(
            f"{type(config).__name__}.layers_to_transform = {config.layers_to_transform} "
            f"selects no layer: target spec {spec!r} matches modules, but {where}")
    if not chosen:
        detail = ""
        if wrong_type:
            detail = (f"; matched modules of types the method cannot adapt "
                      f"({', '.join(t.__name__ for t in supported)} supported): "
                      f"{', '.join(wrong_type[:10])}")
        raise TargetNotFoundError(
            f"target spec {spec!r} selected no module{detail}; candidates: "
            f"{_candidates(model, supported)}"
        )
    return chosen


def _check_each_entry(
    spec: list[str],
    modules: list[tuple[str, nn.Module]],
    supported: tuple[type[nn.Module], ...],
    model: nn.Module,
) -> None:
    """Every listed name must match at least one module of a supported type."""
    missing, unsupported = [], []
    for entry in spec:
        hits = [(p, m) for p, m in modules if p == entry or p.endswith("." + entry)]
        if not hits:
            missing.append(entry)
        elif not any(isinstance(m, supported) for _, m in hits):
            types = ", ".join(sorted({type(m).__name__ for _, m in hits}))
            unsupported.append(f"{entry} ({types})")
    if missing:
        raise TargetNotFoundError(
            f"target_modules entries {missing} match no module in the model; candidates: "
            f"{_candidates(model, supported)}"
        )
    if unsupported:
        raise TargetNotFoundError(
            f"target_modules entries match only modules of unsupported types: "
            f"{', '.join(unsupported)}; supported: {', '.join(t.__name__ for t in supported)}"
        )


def _candidates(model: nn.Module, supported: tuple[type[nn.Module], ...], limit: int = 40) -> str:
    names = [p for p, m in iter_base_modules(model) if isinstance(m, supported)]
    suffixes = sorted({p.rsplit(".", 1)[-1] for p in names})
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    shown = ", ".join(names[:limit]) + more
    return f"[{shown}] (distinct names: {', '.join(suffixes)})" if names else "none"
