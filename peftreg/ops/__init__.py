# SPDX-License-Identifier: Apache-2.0
"""The compiled operators of peftreg, and the only module that loads them.

Importing this package never fails and never compiles anything. It loads, in order:

1. the compiled library: the prebuilt ``peftreg._C`` (``pip install --no-build-isolation -e .``
   or ``python setup.py build_ext --inplace``), else a library previously JIT-built by
   ``python -m peftreg.ops.build`` for this exact torch (see :func:`jit_build_dir`). Loading it
   runs the static ``TORCH_LIBRARY`` registrations: the op schemas and CPU/CUDA kernels;
2. the op families :mod:`peftreg.ops.lora`, :mod:`peftreg.ops.nf4` and
   :mod:`peftreg.ops.adapters`: each holds, per op, the typed wrapper, the fake (meta) kernel
   used by ``torch.compile`` and the backward formula, all registered through one
   :class:`peftreg.ops._op.Op`. :data:`OPS` is derived from those objects.

If no library loads, the families still import (so :data:`OPS` is known) but register nothing
(the schemas do not exist); :func:`has_extension` is False and :func:`extension_error` says why
and how to build. Each op's ``run`` then takes the plain-PyTorch maths of
:mod:`peftreg.ops.reference` (after :func:`warn_fallback_once`), and the strict wrappers raise
:class:`ExtensionUnavailableError`. The kernel mode (``PEFTREG_KERNELS``, :func:`kernels`)
forces either path.

Environment:
    PEFTREG_EXTENSION: ``auto`` (default: prebuilt, then JIT cache), ``prebuilt``, ``jit`` or
        ``off`` (load nothing, e.g. to exercise the plain-PyTorch path).
    PEFTREG_EXTENSION_DIR: root folder of JIT builds (default ``~/.cache/peftreg/extensions``,
        honouring ``XDG_CACHE_HOME``).

Only one compiled library is ever loaded per process: a ``TORCH_LIBRARY`` namespace can be
registered once, so a prebuilt module and a JIT one must never meet.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Final

import torch

__all__ = [
    "BUILD_HINT",
    "DEVICES",
    "OPS",
    "ExtensionUnavailableError",
    "PeftregFallbackWarning",
    "adapters",
    "built_with_cuda",
    "extension_error",
    "extension_origin",
    "has_extension",
    "jit_build_dir",
    "kernel_available",
    "kernel_mode",
    "kernel_report",
    "kernels",
    "lora",
    "nf4",
    "require_kernel",
    "set_kernel_mode",
    "warn_fallback_once",
]

#: Devices reported by :func:`kernel_report`.
DEVICES: Final[tuple[str, ...]] = ("cpu", "cuda")
#: How to get the compiled kernels; appended to every error and warning about them.
BUILD_HINT: Final[str] = (
    "build the compiled extension from a source checkout with torch installed first: "
    "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace` "
    "(or JIT-build it into a cache folder with `python -m peftreg.ops.build`)"
)
#: File name stem of a JIT-built library inside :func:`jit_build_dir`.
JIT_LIBRARY_NAME: Final[str] = "peftreg_jit"
JIT_BUILD_INFO: Final[str] = "build-info.json"

_DISPATCH_KEYS: Final[dict[str, str]] = {"cpu": "CPU", "cuda": "CUDA"}
_MODES: Final[tuple[str, ...]] = ("auto", "prebuilt", "jit", "off")


class PeftregFallbackWarning(UserWarning):
    """Warned once per process when peftreg computes with plain PyTorch instead of its kernels."""


class ExtensionUnavailableError(RuntimeError):
    """A compiled peftreg kernel was requested but is unavailable; the message says how to build."""


_origin: str | None = None  # "prebuilt" or "jit" once a library is loaded
_error: str | None = None
_with_cuda: bool = False
_known_kernels: set[tuple[str, str]] = set()
_fallback_warned = False
_fallback_lock = threading.Lock()


def jit_build_dir() -> Path:
    """The folder where ``python -m peftreg.ops.build`` puts a library for this torch and Python.

    The folder name encodes the torch version, CUDA flavour and Python version, so a library is
    never loaded into a torch it was not compiled against.

    Returns:
        ``$PEFTREG_EXTENSION_DIR/<tag>`` or ``<cache>/peftreg/extensions/<tag>``.
    """
    root = os.environ.get("PEFTREG_EXTENSION_DIR")
    if root:
        base = Path(root).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = Path(cache) / "peftreg" / "extensions"
    flavour = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{flavour}"
    return base / tag.replace("+", "_").replace("/", "_")


def _load_compiled() -> None:
    """Load at most one compiled library, recording where it came from or why none loaded."""
    global _origin, _error, _with_cuda
    mode = os.environ.get("PEFTREG_EXTENSION", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        _error = f"PEFTREG_EXTENSION={mode!r} is not one of {', '.join(_MODES)}"
        return
    if mode == "off":
        _error = f"loading is disabled by PEFTREG_EXTENSION=off; unset it or {BUILD_HINT}"
        return
    reasons: list[str] = []
    if mode in ("auto", "prebuilt"):
        try:
            from peftreg import _C  # type: ignore[attr-defined]
        except ImportError as exc:
            if isinstance(exc, ModuleNotFoundError) and exc.name == "peftreg._C":
                reasons.append("peftreg._C is not built")
            else:  # typically an undefined symbol: built against another torch
                reasons.append(f"peftreg._C failed to load ({exc}); rebuild it for torch "
                               f"{torch.__version__}")
        else:
            _origin, _with_cuda = "prebuilt", bool(getattr(_C, "WITH_CUDA", 0))
            return
    if mode in ("auto", "jit"):
        library = jit_build_dir() / f"{JIT_LIBRARY_NAME}.so"
        if library.is_file():
            try:
                torch.ops.load_library(str(library))
            except (OSError, RuntimeError) as exc:
                reasons.append(f"the JIT-built {library} failed to load ({exc})")
            else:
                _origin, _with_cuda = "jit", _jit_built_with_cuda(library.parent)
                return
        elif mode == "jit":
            reasons.append(f"no JIT-built library at {library}")
    _error = f"{'; '.join(reasons)}. To use the compiled kernels, {BUILD_HINT}"


def _jit_built_with_cuda(folder: Path) -> bool:
    try:
        info = json.loads((folder / JIT_BUILD_INFO).read_text())
    except (OSError, ValueError):
        return False
    return bool(info.get("with_cuda", False))


def has_extension() -> bool:
    """Whether a compiled library is loaded (op schemas plus at least the CPU kernels)."""
    return _origin is not None


def extension_origin() -> str | None:
    """``"prebuilt"`` (``peftreg._C``), ``"jit"`` (``python -m peftreg.ops.build``) or None."""
    return _origin


def extension_error() -> str | None:
    """Why the compiled extension is unavailable and how to build it; None when it is loaded."""
    return None if has_extension() else _error


def built_with_cuda() -> bool:
    """Whether the loaded library was compiled with CUDA kernels."""
    return has_extension() and _with_cuda


def _device_type(device: str | torch.device) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def kernel_available(op_name: str, device: str | torch.device) -> bool:
    """Whether ``peftreg::<op_name>`` has a compiled kernel for ``device``.

    Args:
        op_name: operator name, with or without the ``peftreg::`` prefix (``"lora_linear"``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a :class:`torch.device`.

    Returns:
        True when the dispatcher has a kernel for that device's dispatch key. Always False
        without the extension, for unknown ops, and for device types other than CPU and CUDA.
    """
    if not has_extension():
        return False
    name = op_name.removeprefix("peftreg::")
    device_type = _device_type(device)
    if (name, device_type) in _known_kernels:
        return True
    key = _DISPATCH_KEYS.get(device_type)
    if key is None:
        return False
    try:
        found = torch._C._dispatch_has_kernel_for_dispatch_key(f"peftreg::{name}", key)
    except RuntimeError:  # the operator does not exist
        return False
    if found:  # registrations are static, so a positive answer never changes
        _known_kernels.add((name, device_type))
    return bool(found)


def kernel_report() -> list[tuple[str, str, bool]]:
    """``(op, device, compiled)`` for every op in :data:`OPS` on every device in :data:`DEVICES`."""
    return [(op, device, kernel_available(op, device)) for op in OPS for device in DEVICES]


def require_kernel(op_name: str, device: str | torch.device) -> None:
    """Raise unless ``peftreg::<op_name>`` can run compiled on ``device``.

    Device types other than CPU and CUDA (``meta``, ...) are left to the dispatcher.

    Raises:
        ExtensionUnavailableError: no extension, or no kernel for that device in this build.
    """
    name = op_name.removeprefix("peftreg::")
    if not has_extension():
        raise ExtensionUnavailableError(
            f"peftreg::{name} needs peftreg's compiled extension, which is unavailable: "
            f"{extension_error()}"
        )
    device_type = _device_type(device)
    if device_type in _DISPATCH_KEYS and not kernel_available(name, device_type):
        cuda_hint = (
            " This build has no CUDA kernels: rebuild with a CUDA build of torch and CUDA_HOME "
            "set to the CUDA toolkit root."
            if device_type == "cuda" and not built_with_cuda() else ""
        )
        raise ExtensionUnavailableError(
            f"peftreg::{name} has no compiled {device_type} kernel in the loaded extension "
            f"({_origin}).{cuda_hint} To rebuild, {BUILD_HINT}"
        )


def warn_fallback_once(reason: str) -> None:
    """Warn (once per process) that peftreg computes with plain PyTorch instead of its kernels.

    Args:
        reason: why the compiled path is not used, e.g. ``"peftreg::lora_linear has no compiled
            cuda kernel"``; it starts the message.
    """
    global _fallback_warned
    with _fallback_lock:
        if _fallback_warned:
            return
        _fallback_warned = True
    # Reasons taken from extension_error() already say how to build; say it once.
    hint = "" if BUILD_HINT in reason else f" To use the compiled kernels, {BUILD_HINT}."
    warnings.warn(
        f"peftreg: {reason}; using the plain-PyTorch path (peftreg.ops.reference), which is "
        f"correct but slower.{hint}",
        PeftregFallbackWarning,
        stacklevel=2,
    )


def _reset_fallback_warning() -> None:
    """Testing hook: let :func:`warn_fallback_once` warn again."""
    global _fallback_warned
    with _fallback_lock:
        _fallback_warned = False


_load_compiled()
# The families register their fakes and backwards only when the library loaded (the schemas
# exist only then); they always define their Op objects, from which OPS is derived.
from peftreg.ops import adapters, lora, nf4  # noqa: E402
from peftreg.ops._op import kernel_mode, kernels, registered, set_kernel_mode  # noqa: E402

#: Every operator the csrc families define, from the families' Op objects (a test checks
#: this against the dispatcher, and the parity harness covers each one).
OPS: Final[tuple[str, ...]] = tuple(registered())
