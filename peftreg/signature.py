# SPDX-License-Identifier: Apache-2.0
"""The class an :class:`~peftreg.AdaptedModel` takes so that its ``forward`` shows the wrapped
model's signature.

Frameworks read a model's ``forward`` signature to decide what to pass it: the Hugging Face
``Trainer`` keeps only the batch columns the signature names (``remove_unused_columns``), finds
the label columns on the model's *class* (``find_labels``) and checks whether ``forward`` takes
``**kwargs`` (``num_items_in_batch``). ``AdaptedModel.forward(*args, **kwargs)`` would hide all
of it, so every wrapper becomes an instance of a subclass made once per (wrapper class, wrapped
class) pair, named ``Adapted<WrappedClass>``, whose ``forward`` carries the wrapped signature.
Nothing else differs: parameters, state dict and adapters belong to the instance.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["SIGNATURE_BASE", "signature_class"]

SIGNATURE_BASE = "_peftreg_signature_base"
"""Class attribute naming the wrapper class a signature class was made from."""

_CLASSES: dict[tuple[type[Any], type[Any]], type[Any]] = {}


def _rebuild(base: type[Any], wrapped: type[Any]) -> Any:
    # Unpickling calls this; the state is applied afterwards by __setstate__.
    cls = signature_class(base, wrapped)
    return object.__new__(cls)


def signature_class(base: type[Any], wrapped: type[Any]) -> type[Any]:
    """The subclass of ``base`` whose ``forward`` carries ``wrapped.forward``'s signature.

    Args:
        base: the wrapper class (``AdaptedModel`` or a subclass of it).
        wrapped: the class of the model it wraps.

    Returns:
        The same class object for the same pair, made on first use. Its instances pickle and
        deep-copy: the class is rebuilt from its two bases, which pickle by name.
    """
    cls = _CLASSES.get((base, wrapped))
    if cls is not None:
        return cls
    try:
        signature = inspect.signature(wrapped.forward)
    except (TypeError, ValueError):
        # A forward inspect cannot read (a C builtin, say): keep the wrapper's own.
        signature = inspect.signature(base.forward)

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return base.forward(self, *args, **kwargs)

    def __reduce_ex__(self: Any, protocol: int) -> tuple[Any, ...]:
        # The class is made at run time, so pickle cannot name it; rebuild it from its bases.
        reduced = object.__reduce_ex__(self, max(protocol, 2))
        return (_rebuild, (base, wrapped), *reduced[2:])

    # The signature includes ``self``, as on the wrapped class: find_labels inspects the class.
    forward.__signature__ = signature  # type: ignore[attr-defined]
    forward.__doc__ = (f"Call the wrapped ``{wrapped.__qualname__}``; ``adapter_names`` works as "
                       f"on :meth:`{base.__qualname__}.forward`.")
    name = f"Adapted{wrapped.__name__}"
    cls = type(name, (base,), {
        "__module__": base.__module__,
        "__qualname__": name,
        "__doc__": f"{base.__name__} around a ``{wrapped.__qualname__}``.",
        "forward": forward,
        "__reduce_ex__": __reduce_ex__,
        SIGNATURE_BASE: base,
    })
    _CLASSES[(base, wrapped)] = cls
    return cls
