# SPDX-License-Identifier: Apache-2.0
"""The exceptions peftreg raises.

Every error a user can cause derives from :class:`PeftregError`, so a caller can catch one type.
The more specific classes also derive from the builtin exception a Python user would expect
(``ValueError`` for bad values, ``LookupError`` for unknown names), so existing handlers keep
working.
"""

from __future__ import annotations


class PeftregError(Exception):
    """Base class of every error peftreg raises on purpose."""


class ConfigError(PeftregError, ValueError):
    """A method config is invalid: unknown field, wrong type, value out of range, bad JSON."""


class UnknownMethodError(PeftregError, LookupError):
    """No installed plugin provides the requested method name."""


class TargetNotFoundError(PeftregError, ValueError):
    """A target specification matched no module (or a named module does not exist)."""


class PluginError(PeftregError):
    """A plugin failed to load, returned something invalid, or clashed with another plugin."""


class DuplicateMethodError(PluginError):
    """Two plugins registered the same method name."""


class AdapterError(PeftregError, ValueError):
    """An operation on a named adapter is invalid (unknown name, name taken, bad name)."""


class UnsupportedOperationError(PeftregError, NotImplementedError):
    """The method does not support the requested operation (for example merging)."""


class AdapterFileError(PeftregError, ValueError):
    """An adapter directory or file is missing, corrupt, or does not match the model."""


class ModelFamilyError(PeftregError, ValueError):
    """A method needs structural knowledge about a model that no family plugin provides."""
