# SPDX-License-Identifier: Apache-2.0
"""Regular expressions that come from users and files, matched in bounded time.

``target_modules``, ``exclude_modules``, ``layers_pattern`` and the keys of ``rank_pattern`` /
``alpha_pattern`` come from configs and adapter files, so they may be hostile: a pattern with
nested quantifiers such as ``((\\w|\\.)+)+!`` makes Python's backtracking engine run for ever on
an ordinary module path (PEFT hangs on it too). Every such pattern goes through
:func:`compile_pattern`:

* With google-re2 installed (a peftreg dependency where it has wheels), patterns run on RE2, a
  linear-time engine. A pattern RE2 cannot express (backreferences, lookaround) falls back to
  Python's engine only if the check below finds no way for it to backtrack exponentially.
* Without RE2, the same check decides: a repetition that can repeat without bound and whose body
  holds another repetition, an alternation, or a backreference is refused, since those are the
  shapes whose matching time grows exponentially. Module paths are short (a few hundred
  characters), so the polynomial cases that remain finish quickly.

A refused pattern raises :class:`UnsafePatternError`, which names the field and the pattern.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Protocol

from peftreg.errors import ConfigError

try:  # the module name of the google-re2 distribution
    import re2 as _re2
except ImportError:  # pragma: no cover - depends on the platform having a wheel
    _re2 = None

try:  # Python 3.11+
    from re import _constants as _sre_constants  # type: ignore[attr-defined]
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_constants  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["UnsafePatternError", "compile_pattern", "has_linear_time_engine", "pattern_fullmatch"]


class UnsafePatternError(ConfigError):
    """A user- or file-supplied regular expression is invalid or could take unbounded time.

    Attributes:
        field: the config field the pattern came from.
        problem: what is wrong, without the field.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def message_for_file(self) -> str:
        """The message for a pattern read from a file's key of the same name."""
        return f"{self.field}: {self.problem}"


class CompiledPattern(Protocol):
    """What peftreg needs of a compiled pattern (both engines provide it)."""

    def fullmatch(self, text: str) -> Any: ...

    def search(self, text: str) -> Any: ...


def has_linear_time_engine() -> bool:
    """Whether google-re2 is installed, so that patterns run in linear time."""
    return _re2 is not None


_REPEATS = {_sre_constants.MAX_REPEAT, _sre_constants.MIN_REPEAT}
_POSSESSIVE = getattr(_sre_constants, "POSSESSIVE_REPEAT", None)


def _backtracking_hazard(items: Any, inside_unbounded: bool = False) -> str | None:
    """The first construct of a parsed pattern that can backtrack exponentially, or None."""
    for op, arg in items:
        if op in _REPEATS:
            _low, high, body = arg
            unbounded = high == _sre_constants.MAXREPEAT or high > 64
            if inside_unbounded and high > 1:
                return "a repetition nested inside another unbounded repetition"
            found = _backtracking_hazard(body, inside_unbounded or unbounded)
            if found:
                return found
        elif op is _POSSESSIVE:
            continue  # possessive repeats never backtrack into their body
        elif op == _sre_constants.SUBPATTERN:
            found = _backtracking_hazard(arg[-1], inside_unbounded)
            if found:
                return found
        elif op == _sre_constants.BRANCH:
            if inside_unbounded:
                return "an alternation inside an unbounded repetition"
            for branch in arg[1]:
                found = _backtracking_hazard(branch, inside_unbounded)
                if found:
                    return found
        elif op in (_sre_constants.GROUPREF, _sre_constants.GROUPREF_EXISTS):
            return "a backreference"
        elif op in (_sre_constants.ASSERT, _sre_constants.ASSERT_NOT):
            found = _backtracking_hazard(arg[1], inside_unbounded)
            if found:
                return found
    return None


def _python_pattern(pattern: str, field: str) -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
        hazard = _backtracking_hazard(_sre_parse.parse(pattern))
    except re.error as exc:
        raise UnsafePatternError(field, f"invalid regular expression {pattern!r}: {exc}"
                                 ) from exc
    if hazard:
        raise UnsafePatternError(
            field, f"regular expression {pattern!r} is refused: it has {hazard}, which can "
            "make matching take exponential time (install google-re2 for a linear-time engine, "
            "or write the pattern without nesting)")
    return compiled


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str, field: str = "pattern") -> CompiledPattern:
    """Compile a user- or file-supplied regular expression for bounded-time matching.

    Args:
        pattern: the regular expression (Python syntax).
        field: the config field it came from, named in errors.

    Raises:
        UnsafePatternError: the pattern is invalid, or could take exponential time and RE2
            cannot run it.
    """
    if not isinstance(pattern, str):
        raise UnsafePatternError(field, f"a regular expression must be a string, got "
                                        f"{pattern!r}")
    if _re2 is not None:
        options = _re2.Options()
        options.log_errors = False
        try:
            return _re2.compile(pattern, options)
        except _re2.error:
            pass  # a feature RE2 lacks (backreference, lookaround): judged below
    return _python_pattern(pattern, field)


def pattern_fullmatch(pattern: str, text: str, field: str = "pattern") -> bool:
    """Whether ``pattern`` matches all of ``text`` (see :func:`compile_pattern`)."""
    return compile_pattern(pattern, field).fullmatch(text) is not None
