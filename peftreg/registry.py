# SPDX-License-Identifier: Apache-2.0
"""The method registry: name to :class:`PEFTMethod`, built from plugins.

The registry asks each plugin for its methods separately, so one plugin returning garbage or
raising does not hide the others. A name is owned by the first plugin that registers it, with
built-in plugins always considered first: a third-party plugin can never replace a built-in
method silently; the clash is reported with both distribution names.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import pluggy
from torch import nn

from peftreg import discovery
from peftreg.config import MethodConfig
from peftreg.discovery import PluginFailure, PluginSource
from peftreg.errors import ConfigError, DuplicateMethodError, PluginError, UnknownMethodError
from peftreg.families import ModelFamily
from peftreg.method import API_LEVEL, Capabilities, PEFTMethod

_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """One installed method, as listed by :func:`peftreg.methods`.

    Attributes:
        name: registry name.
        capabilities: what it can do.
        dist: distribution that provides it.
        version: that distribution's version.
        builtin: shipped with peftreg.
        description: one line.
        peft_type: Hugging Face PEFT's name of the method when its plugin brings a PEFT codec
            (its adapters then load from and export to PEFT's format), else ``None``.
    """

    name: str
    capabilities: Capabilities
    dist: str
    version: str
    builtin: bool
    description: str
    peft_type: str | None = None


@dataclasses.dataclass(frozen=True)
class _Entry:
    method: PEFTMethod
    source: PluginSource


class Registry:
    """Installed methods and model-family plugins.

    Build one with :meth:`from_entry_points` (what :func:`default_registry` does) or, in tests,
    with :meth:`for_testing`.
    """

    def __init__(
        self,
        pm: pluggy.PluginManager,
        sources: dict[str, PluginSource],
        failures: Sequence[PluginFailure] = (),
        *,
        strict: bool = False,
    ) -> None:
        self._pm = pm
        self._sources = dict(sources)
        self.failures: list[PluginFailure] = list(failures)
        self._methods: dict[str, _Entry] = {}
        self._strict = strict
        self._collect_methods()

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_entry_points(
        cls,
        entry_points: Iterable[Any] | None = None,
        *,
        strict: bool | None = None,
    ) -> Registry:
        """Load every plugin of the ``peftreg`` entry-point group.

        Args:
            entry_points: override the installed entry points (tests).
            strict: raise on the first plugin failure; defaults to ``PEFTREG_STRICT_PLUGINS``.
        """
        strict = discovery.strict_from_env() if strict is None else strict
        pm = discovery.new_plugin_manager()
        sources, failures = discovery.load_entry_points(pm, entry_points, strict=strict)
        return cls(pm, sources, failures, strict=strict)

    @classmethod
    def for_testing(
        cls,
        methods: Sequence[PEFTMethod] = (),
        plugins: Sequence[object] = (),
        *,
        dist: str = "test",
    ) -> Registry:
        """A registry holding exactly ``methods`` (and hook ``plugins``), without entry points."""
        pm = discovery.new_plugin_manager()
        sources: dict[str, PluginSource] = {}

        class _Provider:
            @staticmethod
            @discovery.hookspecs.hookimpl
            def peftreg_register_methods() -> list[PEFTMethod]:
                return list(methods)

        for index, plugin in enumerate([_Provider(), *plugins]):
            name = f"{dist}:plugin{index}"
            pm.register(plugin, name=name)
            sources[name] = PluginSource(dist, "0", name)
        pm.check_pending()
        return cls(pm, sources, strict=True)

    # -- methods -------------------------------------------------------------------------------

    def _fail(self, source: PluginSource, reason: str,
              exc: type[PluginError] = PluginError) -> None:
        failure = PluginFailure(source.dist, source.version, source.entry_point, reason)
        if self._strict:
            raise exc(str(failure))
        self.failures.append(failure)

    def _collect_methods(self) -> None:
        ordered = sorted(self._sources.items(), key=lambda kv: (not kv[1].builtin, kv[0]))
        for plugin_name, source in ordered:
            plugin = self._pm.get_plugin(plugin_name)
            impls = [
                impl for impl in self._pm.hook.peftreg_register_methods.get_hookimpls()
                if impl.plugin is plugin
            ]
            for impl in impls:
                try:
                    returned = impl.function()
                except (Exception, SystemExit) as exc:
                    self._fail(source, f"peftreg_register_methods raised "
                               f"{type(exc).__name__}: {exc}")
                    continue
                for method in self._validate_returned(source, returned):
                    self._add(method, source)

    def _validate_returned(self, source: PluginSource, returned: object) -> list[PEFTMethod]:
        if not isinstance(returned, (list, tuple)):
            self._fail(source, "peftreg_register_methods must return a list of PEFTMethod, "
                       f"got {type(returned).__name__}")
            return []
        good = []
        for item in returned:
            try:
                problem = _method_problem(item)
            except Exception as exc:  # e.g. a ``name`` property that raises
                problem = f"checking {type(item).__name__} raised {type(exc).__name__}: {exc}"
            if problem:
                self._fail(source, f"peftreg_register_methods returned an invalid method: "
                           f"{problem}")
            else:
                good.append(item)
        return good

    def _add(self, method: PEFTMethod, source: PluginSource) -> None:
        existing = self._methods.get(method.name)
        if existing is not None:
            owner = existing.source
            kind = "built-in " if owner.builtin else ""
            self._fail(
                source,
                f"method name {method.name!r} is already registered by {kind}distribution "
                f"{owner.dist!r} ({owner.entry_point}); refusing the registration from "
                f"{source.dist!r}",
                DuplicateMethodError,
            )
            return
        self._methods[method.name] = _Entry(method, source)

    def collect(self, hook: str, kind: type[_T]) -> list[tuple[_T, PluginSource]]:
        """The items every plugin returns from the list-returning hook ``hook``, built-in
        plugins first, with the plugin that gave each. A plugin whose hook raises, returns no
        list, or returns items that are not ``kind`` is recorded as a failure (by name); the
        rest are kept."""
        out: list[tuple[_T, PluginSource]] = []
        ordered = sorted(self._sources.items(), key=lambda kv: (not kv[1].builtin, kv[0]))
        impls = getattr(self._pm.hook, hook).get_hookimpls()
        for plugin_name, source in ordered:
            plugin = self._pm.get_plugin(plugin_name)
            for impl in (i for i in impls if i.plugin is plugin):
                try:
                    returned = impl.function()
                except (Exception, SystemExit) as exc:
                    self._fail(source, f"{hook} raised {type(exc).__name__}: {exc}")
                    continue
                if not isinstance(returned, (list, tuple)):
                    self._fail(source, f"{hook} must return a list of {kind.__name__}, got "
                               f"{type(returned).__name__}")
                    continue
                for item in returned:
                    if isinstance(item, kind):
                        out.append((item, source))
                    else:
                        self._fail(source, f"{hook} returned a {type(item).__name__}, not a "
                                   f"{kind.__name__}")
        return out

    def record_failure(self, source: PluginSource, reason: str) -> None:
        """Report a plugin's mistake found by a caller (shown by ``peftreg methods``)."""
        self._fail(source, reason)

    def names(self) -> list[str]:
        """Sorted names of the available methods."""
        return sorted(self._methods)

    def get(self, name: str) -> PEFTMethod:
        """The method called ``name``.

        Raises:
            UnknownMethodError: nothing provides ``name``; the message lists what is installed
                and any plugin failures that might explain it.
        """
        entry = self._methods.get(name)
        if entry is None:
            hint = ""
            if self.failures:
                hint = "; plugin failures: " + "; ".join(str(f) for f in self.failures)
            raise UnknownMethodError(
                f"no installed method is called {name!r}; installed: "
                f"{', '.join(self.names()) or 'none'}{hint}"
            )
        return entry.method

    def source(self, name: str) -> PluginSource:
        """The plugin source of method ``name``."""
        self.get(name)
        return self._methods[name].source

    def method_for(self, config: MethodConfig) -> PEFTMethod:
        """The method that reads ``config`` (looked up by ``config.method``)."""
        method = self.get(config.method)
        if not isinstance(config, method.config_cls):
            raise UnknownMethodError(
                f"config {type(config).__name__} names method {config.method!r}, whose config "
                f"class is {method.config_cls.__name__}"
            )
        return method

    def config_from_dict(self, data: object) -> MethodConfig:
        """Build the config that a JSON object describes, whatever its method.

        Args:
            data: the dict form written by :meth:`MethodConfig.to_dict` (``"method"`` names
                the method; ``"format_version"`` may be older, and is then migrated).

        Raises:
            ConfigError: not an object, no ``"method"``, or an invalid config (see
                :meth:`MethodConfig.from_dict`).
            UnknownMethodError: no installed method has that name.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a method config must be a JSON object, got {type(data).__name__}")
        method = data.get("method")
        if not isinstance(method, str):
            raise ConfigError(f"a method config needs a \"method\" string naming one of: "
                              f"{', '.join(self.names())} (got {method!r})")
        return self.get(method).config_cls.from_dict(data)

    def infos(self) -> list[MethodInfo]:
        """Every installed method with capabilities and provenance, sorted by name."""
        out = []
        for name in self.names():
            entry = self._methods[name]
            out.append(MethodInfo(
                name=name,
                capabilities=entry.method.capabilities,
                dist=entry.source.dist,
                version=entry.source.version,
                builtin=entry.source.builtin,
                description=entry.method.describe(),
                peft_type=getattr(entry.method.peft_codec, "peft_type", None),
            ))
        return out

    # -- model families ------------------------------------------------------------------------

    def describe_model(self, model: nn.Module) -> ModelFamily | None:
        """Ask family plugins about ``model``; third-party plugins are asked first.

        A plugin that raises or returns something other than a :class:`ModelFamily` is
        recorded as a failure and skipped.
        """
        impls = self._pm.hook.peftreg_describe_model.get_hookimpls()
        by_plugin = {id(self._pm.get_plugin(n)): s for n, s in self._sources.items()}
        ordered = sorted(impls, key=lambda i: by_plugin.get(id(i.plugin), _UNKNOWN).builtin)
        for impl in ordered:
            source = by_plugin.get(id(impl.plugin), _UNKNOWN)
            try:
                result = impl.function(model=model)
            except (Exception, SystemExit) as exc:
                self._fail(source, f"peftreg_describe_model raised {type(exc).__name__}: {exc}")
                continue
            if result is None:
                continue
            if not isinstance(result, ModelFamily):
                self._fail(source, "peftreg_describe_model must return a ModelFamily or None, "
                           f"got {type(result).__name__}")
                continue
            return result
        return None


_UNKNOWN = PluginSource("<unknown>", "", "<unknown>")


def _method_problem(item: object) -> str | None:
    if not isinstance(item, PEFTMethod):
        return f"{item!r} is not a PEFTMethod instance"
    name = getattr(item, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        return f"{type(item).__name__}.name must be an identifier string, got {name!r}"
    config_cls = getattr(item, "config_cls", None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        return f"{type(item).__name__}.config_cls must be a MethodConfig subclass"
    if config_cls.method != name:
        return (f"{type(item).__name__}.name is {name!r} but its config class "
                f"{config_cls.__name__} says method {config_cls.method!r}")
    if not isinstance(getattr(item, "capabilities", None), Capabilities):
        return f"{type(item).__name__}.capabilities must be a Capabilities instance"
    level = getattr(item, "api_level", 1)
    if not isinstance(level, int) or isinstance(level, bool) or level < 1:
        return f"{type(item).__name__}.api_level must be a positive integer, got {level!r}"
    if level > API_LEVEL:
        return (f"method {name!r} needs peftreg plugin API level {level}, but this peftreg "
                f"provides level {API_LEVEL}; upgrade peftreg or use an older release of the "
                "plugin")
    numerics = getattr(item, "numerics_version", 1)
    if not isinstance(numerics, int) or isinstance(numerics, bool) or numerics < 1:
        return (f"{type(item).__name__}.numerics_version must be a positive integer, got "
                f"{numerics!r}")
    return None


_default: Registry | None = None
_lock = threading.Lock()


def default_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _default
    with _lock:
        if _default is None:
            _default = Registry.from_entry_points()
        return _default


def reset_default_registry() -> None:
    """Forget the process-wide registry so the next use reloads plugins (after installs)."""
    global _default
    with _lock:
        _default = None
