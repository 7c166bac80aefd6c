# SPDX-License-Identifier: Apache-2.0
"""Atomic file replacement, the litter of killed saves, and why a save could not write.

Every save writes a temporary file ``.<target name>.<8 random chars>.tmp`` next to its target
(:func:`tempfile.mkstemp`), syncs it and renames it over the target. A process killed before
the rename leaves that temporary file behind; :func:`remove_stale_temporaries` deletes those of
one target, and a complete save calls it, so kills do not accumulate files. (Two processes
saving to one target at once are not supported: the second's cleanup may remove the first's
file before its rename, and the first save then fails.)

A save that cannot write gets an ``OSError`` naming the temporary file, which the user never
asked for; :func:`describe_write_failure` says instead what stops writing the target, for the
caller's own error class.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "describe_write_failure", "fsync_dir", "remove_stale_temporaries",
           "stale_temporaries"]

# mkstemp's random part: 8 characters of [a-z0-9_] (CPython's _RandomNameSequence).
_RANDOM = r"[a-z0-9_]{8}"


def fsync_dir(directory: Path) -> None:
    """Sync ``directory``'s entries to disk where the file system allows it."""
    with contextlib.suppress(OSError):  # some file systems cannot sync directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by a file holding ``data`` in one rename (the old file or the new one,
    whatever happens). ``OSError`` propagates; see :func:`describe_write_failure`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def stale_temporaries(path: Path) -> list[Path]:
    """The temporary files :func:`atomic_write` left beside ``path`` when killed."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_RANDOM}\.tmp")
    with contextlib.suppress(OSError):
        return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))
    return []


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of earlier, killed saves to ``path`` (best effort)."""
    for stale in stale_temporaries(path):
        with contextlib.suppress(OSError):
            stale.unlink()


def describe_write_failure(target: Path, exc: OSError) -> str:
    """What stops ``target`` from being written, given the ``OSError`` a save raised.

    Names the target's ancestors, never the temporary file: a regular file where a directory
    must be, a directory that is missing or not writable, or the system's own reason.
    """
    for ancestor in reversed(target.parents):
        if ancestor.exists() and not ancestor.is_dir():
            return f"{ancestor} is a file, not a directory"
    if target.is_dir():
        return f"{target} is a directory"
    parent = target.parent
    if not parent.exists():
        return f"the directory {parent} does not exist"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write in {parent} ({exc.strerror})"
    return exc.strerror or str(exc)
