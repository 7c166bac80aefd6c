# SPDX-License-Identifier: Apache-2.0
"""Validated method configs with a JSON round trip.

A method's config is a dataclass deriving from :class:`MethodConfig`. Field types are checked on
construction from the annotations, so a config built from JSON and one built in Python are held
to the same rules; each subclass adds range checks in :meth:`MethodConfig.validate`.

The JSON form records the method name and a format version::

    {"method": "lora", "format_version": 1, "r": 8, ...}

A version newer than the running code is refused; an older one is passed through
:meth:`MethodConfig.migrate` so a method can rename or drop fields across releases.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar, Union

from peftreg.errors import ConfigError

C = TypeVar("C", bound="MethodConfig")


@dataclasses.dataclass
class MethodConfig:
    """Base class of every method config.

    Subclasses set the class variable ``method`` (the registry name) and may raise
    ``format_version`` when their JSON form changes, overriding :meth:`migrate` to read older
    forms.

    Attributes:
        modules_to_save: names (exact module paths or path suffixes) of whole modules to train and
            save with this adapter, such as a classification head. Each adapter keeps its own copy.
    """

    method: ClassVar[str] = ""
    format_version: ClassVar[int] = 1

    modules_to_save: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        _check_field_types(self)
        self.validate()

    def validate(self) -> None:
        """Check value ranges and cross-field rules; raise :class:`ConfigError` on failure.

        Subclasses extend this and call ``super().validate()``.
        """
        for name in self.modules_to_save:
            if not name:
                raise self.error("modules_to_save", "names must be non-empty", name)

    def error(self, field: str, problem: str, value: Any = dataclasses.MISSING) -> ConfigError:
        """Build a :class:`ConfigError` that names this config class and ``field``."""
        shown = "" if value is dataclasses.MISSING else f" (got {value!r})"
        return ConfigError(f"{type(self).__name__}.{field}: {problem}{shown}")

    # -- JSON round trip -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict, including ``method`` and ``format_version``."""
        data: dict[str, Any] = {"method": self.method, "format_version": self.format_version}
        for f in dataclasses.fields(self):
            data[f.name] = _to_jsonable(getattr(self, f.name))
        return data

    def to_json(self, indent: int | None = 2) -> str:
        """Serialise to JSON text (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build and validate a config from the dict form written by :meth:`to_dict`.

        Raises:
            ConfigError: wrong method, a format version from the future, an unknown field, a
                wrong type or an out-of-range value.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ConfigError(
                f"{cls.__name__}: the data is for method {method!r}, not {cls.method!r}"
            )
        version = data.pop("format_version", cls.format_version)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError(f"{cls.__name__}.format_version: must be an integer >= 1 "
                              f"(got {version!r})")
        if version > cls.format_version:
            raise ConfigError(
                f"{cls.__name__}: format_version {version} is newer than this peftreg "
                f"understands ({cls.format_version}); upgrade the plugin providing "
                f"{cls.method!r}"
            )
        if version < cls.format_version:
            data = cls.migrate(data, version)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown field(s) {', '.join(map(repr, unknown))}; "
                f"known fields: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        """Parse JSON text written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cls.__name__}: invalid JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def migrate(cls, data: dict[str, Any], from_version: int) -> dict[str, Any]:
        """Turn the fields of an older ``format_version`` into the current ones.

        The default accepts older data unchanged; override when fields change.
        """
        return data

    def replace(self: C, **changes: Any) -> C:
        """Return a validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


# -- type checking from annotations -------------------------------------------------------------


def _check_field_types(config: MethodConfig) -> None:
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        expected = hints.get(f.name, Any)
        coerced = _coerce(value, expected)
        if coerced is _MISMATCH:
            raise config.error(f.name, f"expected {_describe(expected)}", value)
        if coerced is not value:
            object.__setattr__(config, f.name, coerced)


_MISMATCH = object()


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` (maybe converted, e.g. int to float) if it fits ``tp``, else _MISMATCH."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for arg in args:
            out = _coerce(value, arg)
            if out is not _MISMATCH:
                return out
        return _MISMATCH
    if origin is Literal:
        return value if value in args else _MISMATCH
    if tp is type(None):
        return value if value is None else _MISMATCH
    if tp is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if tp is float:
        if isinstance(value, bool):
            return _MISMATCH
        if isinstance(value, int):
            return float(value)
        return value if isinstance(value, float) else _MISMATCH
    if tp is str:
        return value if isinstance(value, str) else _MISMATCH
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _MISMATCH
        (item_tp,) = args or (Any,)
        items = [_coerce(v, item_tp) for v in value]
        return _MISMATCH if any(i is _MISMATCH for i in items) else items
    if origin is dict:
        if not isinstance(value, dict):
            return _MISMATCH
        key_tp, val_tp = args or (Any, Any)
        out = {}
        for k, v in value.items():
            ck, cv = _coerce(k, key_tp), _coerce(v, val_tp)
            if ck is _MISMATCH or cv is _MISMATCH:
                return _MISMATCH
            out[ck] = cv
        return out
    if isinstance(tp, type):
        return value if isinstance(value, tp) else _MISMATCH
    return value


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is list:
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}" if args else "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    return value
