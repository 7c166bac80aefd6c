# SPDX-License-Identifier: Apache-2.0
"""Loading plugins from the ``peftreg`` entry-point group, one at a time.

Each entry point is loaded and registered inside its own ``try``: a plugin that fails to import,
or whose hooks do not match the specs, becomes a :class:`PluginFailure` naming its distribution,
and every other plugin still loads. ``PEFTREG_STRICT_PLUGINS=1`` (or ``strict=True``) turns the
first failure into an exception instead, for CI.

Environment:
    PEFTREG_STRICT_PLUGINS: ``1`` to raise on the first plugin failure.
    PEFTREG_BLOCK_PLUGINS: comma-separated entry-point or distribution names not to load.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import os
from collections.abc import Iterable
from typing import Any

import pluggy

from peftreg import hookspecs
from peftreg.errors import PluginError

GROUP = "peftreg"
BUILTIN_DIST = "peftreg"


@dataclasses.dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used, and why.

    Attributes:
        dist: distribution (package) name that ships the plugin, or ``"<unknown>"``.
        version: that distribution's version, or ``""``.
        entry_point: the entry-point name, or the plugin name when not loaded from one.
        reason: what went wrong, in one line.
    """

    dist: str
    version: str
    entry_point: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.dist} {self.version}".strip()
        return f"plugin {self.entry_point!r} from {where}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class PluginSource:
    """Where a registered plugin object came from."""

    dist: str
    version: str
    entry_point: str

    @property
    def builtin(self) -> bool:
        """True for the plugins shipped with peftreg itself."""
        return self.dist == BUILTIN_DIST


def strict_from_env() -> bool:
    """Whether ``PEFTREG_STRICT_PLUGINS`` asks for strict loading."""
    return os.environ.get("PEFTREG_STRICT_PLUGINS", "").lower() in {"1", "true", "yes"}


def _blocked() -> set[str]:
    raw = os.environ.get("PEFTREG_BLOCK_PLUGINS", "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def new_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager that knows peftreg's hook specs."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_entry_points(
    pm: pluggy.PluginManager,
    entry_points: Iterable[md.EntryPoint] | None = None,
    *,
    strict: bool = False,
) -> tuple[dict[str, PluginSource], list[PluginFailure]]:
    """Load and register every entry point of the ``peftreg`` group into ``pm``.

    Args:
        pm: the plugin manager to register into.
        entry_points: the entry points to load (default: the installed ``peftreg`` group);
            tests pass fakes here.
        strict: raise :class:`PluginError` on the first failure instead of recording it.

    Returns:
        The source of each registered plugin by plugin name, and the failures.
    """
    if entry_points is None:
        entry_points = md.entry_points(group=GROUP)
    blocked = _blocked()
    sources: dict[str, PluginSource] = {}
    failures: list[PluginFailure] = []
    # Sorted so that which of two clashing plugins wins does not depend on install order.
    for ep in sorted(entry_points, key=lambda e: (_dist_name(e) != BUILTIN_DIST, e.name)):
        dist, version = _dist_name(ep), _dist_version(ep)
        if ep.name in blocked or dist in blocked:
            continue
        plugin_name = f"{dist}:{ep.name}"
        try:
            if pm.has_plugin(plugin_name):
                raise PluginError(f"entry point {ep.name!r} is listed twice")
            plugin: Any = ep.load()
            pm.register(plugin, name=plugin_name)
        # SystemExit too: a plugin calling sys.exit() on import must not end the host program.
        except (Exception, SystemExit) as exc:
            reason = f"failed to load: {_describe_error(exc)}"
            failure = PluginFailure(dist, version, ep.name, reason)
            if strict:
                raise PluginError(str(failure)) from exc
            failures.append(failure)
            continue
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            pm.unregister(name=plugin_name)
            failure = PluginFailure(dist, version, ep.name, f"hooks without a spec: {exc}")
            if strict:
                raise PluginError(str(failure)) from exc
            failures.append(failure)
            continue
        sources[plugin_name] = PluginSource(dist, version, ep.name)
    return sources, failures


def _dist_name(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "<unknown>"


def _dist_version(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else ""
