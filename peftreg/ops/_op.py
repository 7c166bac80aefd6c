# SPDX-License-Identifier: Apache-2.0
"""One object per compiled op: its call, fake kernel, autograd formula and kernel choice.

Each family module (:mod:`peftreg.ops.lora`, :mod:`~peftreg.ops.nf4`,
:mod:`~peftreg.ops.adapters`) creates one :class:`Op` per schema of its csrc family (the
``TORCH_LIBRARY_FRAGMENT`` in the family's ``*_ops.cpp``) and registers its fake kernel and
backward through it, next to the typed wrapper. The op list
(:data:`peftreg.ops.OPS`) is the set of :class:`Op` objects created, never a hand-kept tuple.

The choice between the compiled kernel and plain PyTorch is made here and nowhere else
(:meth:`Op.run`), by the kernel mode:

* ``auto`` (default): the compiled kernel when the extension has one for the device and the
  op's measured crossover (``faster``; table in docs/ops.md) says it beats plain PyTorch for
  this call; plain PyTorch otherwise. A missing extension or kernel warns once per process.
* ``compiled``: always the kernel; a missing one raises :class:`ExtensionUnavailableError`.
* ``reference``: always plain PyTorch (:mod:`peftreg.ops.reference`).

Set it with ``PEFTREG_KERNELS`` or :func:`set_kernel_mode` / :func:`kernels`. The strict
wrappers (:meth:`Op.__call__`) never fall back: a caller that asked for the kernel gets it or an
error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch

from peftreg import ops as _ops

KernelMode = Literal["auto", "compiled", "reference"]
_MODES: tuple[str, ...] = ("auto", "compiled", "reference")
_mode: KernelMode | None = None
_REGISTRY: dict[str, Op] = {}


def kernel_mode() -> KernelMode:
    """The current mode (``PEFTREG_KERNELS`` unless :func:`set_kernel_mode` was called).

    Raises:
        ValueError: ``PEFTREG_KERNELS`` holds something else than auto, compiled or reference.
    """
    if _mode is not None:
        return _mode
    env = os.environ.get("PEFTREG_KERNELS", "auto")
    if env in _MODES:  # the common case, checked first: this runs on every layer call
        return env  # type: ignore[return-value]
    env = env.strip().lower() or "auto"
    if env not in _MODES:
        raise ValueError(f"PEFTREG_KERNELS={env!r}; expected one of {', '.join(_MODES)}")
    return env  # type: ignore[return-value]


def set_kernel_mode(mode: KernelMode | None) -> None:
    """Force ``"compiled"`` or ``"reference"`` kernels, or ``"auto"``; ``None`` resets.

    Raises:
        ValueError: an unknown mode.
    """
    global _mode
    if mode is not None and mode not in _MODES:
        raise ValueError(f"kernel mode {mode!r}; expected one of {', '.join(_MODES)}")
    _mode = mode


@contextlib.contextmanager
def kernels(mode: KernelMode) -> Iterator[None]:
    """Use kernel mode ``mode`` inside a ``with`` block."""
    global _mode
    before = _mode
    set_kernel_mode(mode)
    try:
        yield
    finally:
        _mode = before


def _first_device(args: tuple[Any, ...]) -> torch.device:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
    return torch.device("cpu")


class Op:
    """A ``peftreg::<name>`` operator as Python sees it.

    Args:
        name: the schema name (its ``m.def`` in the family's ``csrc/**/*_ops.cpp``).
        reference: the plain-PyTorch function with the schema's positional arguments (and the
            same outputs), or None for ops that have no plain path (backward helpers).
        faster: the measured crossover: given the call's arguments, whether the compiled kernel
            is at least as fast as plain PyTorch. None means always (docs/ops.md lists why).
    """

    def __init__(self, name: str, *, reference: Callable[..., Any] | None = None,
                 faster: Callable[..., bool] | None = None) -> None:
        if name in _REGISTRY:
            raise ValueError(f"peftreg::{name} is defined twice in peftreg.ops")
        self.name = name
        self.qualname = f"peftreg::{name}"
        self.reference = reference
        self.faster = faster
        _REGISTRY[name] = self

    def __repr__(self) -> str:
        return f"Op({self.qualname})"

    # --- registration -------------------------------------------------------------------------

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: ``fn`` computes output shapes and dtypes (skipped without the library)."""
        if _ops.has_extension():
            # torch checks the caller's module against the schema's set_python_module:
            # the frame to name is the family module that applied this decorator.
            torch.library.register_fake(self.qualname, fn, _stacklevel=2)
        return fn

    def register_autograd(self, backward: Callable[..., Any],
                          setup_context: Callable[..., Any]) -> None:
        """The op's backward formula (skipped without the library: no schema to attach to).

        ``setup_context`` must accept ``inputs`` without the trailing arguments the dispatcher
        dropped for being at their defaults (the family modules pad them back themselves).
        """
        if not _ops.has_extension():
            return
        if not positional_without_tensor_lists(self.overload._schema):
            raise NotImplementedError(
                f"{self.qualname}: Op.register_autograd takes schemas of positional arguments "
                "without tensor lists (torch.library.register_autograd covers the rest)")
        _register_autograd_kernel(self, backward, setup_context)

    def not_differentiable(self, reason: str) -> None:
        """Register a backward that raises ``reason``: a gradient reaching this op is a bug."""

        def backward(ctx: Any, *grads: Any) -> tuple[torch.Tensor | None, ...]:
            raise RuntimeError(f"{self.qualname} {reason}")

        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            return None

        self.register_autograd(backward, setup_context)

    # --- calling ------------------------------------------------------------------------------

    @property
    def overload(self) -> Any:
        """``torch.ops.peftreg.<name>.default`` (needs the loaded library)."""
        return getattr(torch.ops.peftreg, self.name).default

    def require(self, device: torch.device) -> None:
        """Raise unless the compiled kernel can run on ``device``.

        Raises:
            ExtensionUnavailableError: no extension, or no kernel for that device.
        """
        if not _ops.has_extension():
            raise _ops.ExtensionUnavailableError(
                f"{self.qualname} needs peftreg's compiled extension, which is unavailable: "
                f"{_ops.extension_error()}")
        if not torch.compiler.is_compiling():
            # While compiling, the fake kernel validates; the device check is for eager calls.
            _ops.require_kernel(self.name, device)

    def __call__(self, *args: Any) -> Any:
        """The compiled kernel, strictly: never plain PyTorch."""
        self.require(_first_device(args))
        return self.overload(*args)

    def use_compiled(self, *args: Any) -> bool:
        """Whether :meth:`run` takes the compiled kernel for these arguments (see module doc).

        Raises:
            ExtensionUnavailableError: mode ``compiled`` and no kernel for the device.
        """
        mode = kernel_mode()
        if mode == "reference":
            return False
        device = _first_device(args)
        if not _ops.has_extension():
            if mode == "compiled":
                raise _ops.ExtensionUnavailableError(
                    f"PEFTREG_KERNELS=compiled but {self.qualname} has no compiled "
                    f"{device.type} kernel: {_ops.extension_error()}")
            _ops.warn_fallback_once(
                f"the compiled extension is not loaded: {_ops.extension_error()}")
            return False
        if mode == "auto" and self.faster is not None and not self.faster(*args):
            return False  # plain PyTorch is at least as fast here: no kernel needed
        if _ops.kernel_available(self.name, device):
            return True
        if mode == "compiled":
            raise _ops.ExtensionUnavailableError(
                f"PEFTREG_KERNELS=compiled but {self.qualname} has no compiled {device.type} "
                "kernel: not built for this device")
        _ops.warn_fallback_once(f"{self.qualname} has no compiled {device.type} kernel")
        return False

    def run(self, *args: Any) -> Any:
        """The op by the kernel mode: compiled kernel or :attr:`reference` (same arguments).

        Raises:
            ExtensionUnavailableError: mode ``compiled`` and no kernel for the device.
        """
        if self.reference is None:
            return self(*args)
        if self.use_compiled(*args):
            return self.overload(*args)
        return self.reference(*args)


def positional_without_tensor_lists(schema: Any) -> bool:
    """Whether ``schema`` (a ``torch.FunctionSchema``) has no keyword-only argument and no
    tensor list among its arguments and returns: what :meth:`Op.register_autograd` handles."""
    for arg in (*schema.arguments, *schema.returns):
        kind = str(arg.type)
        if arg.kwarg_only or (kind.startswith("List[") and "Tensor" in kind):
            return False
    return True


_IMPL_LIBRARY: torch.library.Library | None = None


def _register_autograd_kernel(op: Op, backward: Callable[..., Any],
                              setup_context: Callable[..., Any]) -> None:
    """Register ``op``'s Autograd kernel: an autograd.Function around the kernel below it.

    What ``torch.library.register_autograd`` builds, without its general machinery: it
    rebuilds the schema's argument list on every differentiable call to re-add defaulted
    arguments (measured: 55 us per call of ``nf4_lora_linear``, about as long as the whole
    forward of a 16 x 128 layer), and wraps the dispatch key set in a dataclass.
    """
    global _IMPL_LIBRARY
    if _IMPL_LIBRARY is None:
        _IMPL_LIBRARY = torch.library.Library("peftreg", "IMPL")
    overload = op.overload
    below = torch._C._after_autograd_keyset

    def forward(ctx: Any, *args: Any) -> Any:
        keyset = args[-1]
        inputs = args[:-1]
        with torch._C._AutoDispatchBelowAutograd():
            output = overload.redispatch(keyset & below, *inputs)
        setup_context(ctx, inputs, output)
        return output

    def backward_without_keyset(ctx: Any, *grads: Any) -> Any:
        grads_in = backward(ctx, *grads)
        # The key set rides as the last input: its gradient slot is None.
        return (*grads_in, None) if isinstance(grads_in, tuple) else (grads_in, None)

    function: Any = type(f"{op.name}_autograd", (torch.autograd.Function,),
                         {"forward": staticmethod(forward),
                          "backward": staticmethod(backward_without_keyset)})

    def autograd_kernel(keyset: Any, *args: Any) -> Any:
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return overload.redispatch(keyset & below, *args)

    _IMPL_LIBRARY.impl(op.name, autograd_kernel, "Autograd", with_keyset=True)


def saved(tensor: torch.Tensor | None, op: str, what: str) -> torch.Tensor:
    """A tensor an autograd backward saved only when a gradient needs it, now that one does.

    The setup context saves ``None`` for tensors no requested gradient reads; a backward that
    finds ``None`` where a gradient needs the tensor has a bug in that bookkeeping, reported by
    name rather than as an arithmetic error on ``None``.
    """
    if tensor is None:
        raise RuntimeError(f"{op} backward: {what} was not saved for a gradient that needs it")
    return tensor


def registered() -> dict[str, Op]:
    """Every op created so far, by schema name, in definition order."""
    return dict(_REGISTRY)
