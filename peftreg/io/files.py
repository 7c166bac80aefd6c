# SPDX-License-Identifier: Apache-2.0
"""Which file an adapter directory read may open: one rule for every format.

A shared adapter directory (a git checkout, an unpacked archive, a download) can hold symbolic
links. A link that stays inside the directory is followed; one that leads anywhere else (a
private key, another user's file, a device) is refused before anything is read, naming the
file and where it points. The same rule covers peftreg's files, PEFT's two files and PEFT's
sub-adapter directories. When a file is missing or is not a regular file, the error says what
is there instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from peftreg.errors import AdapterFileError

__all__ = ["checked_subdirectory", "describe_entry", "is_present", "readable_file"]


def is_present(path: Path) -> bool:
    """Whether anything is at ``path``, a broken link included (``exists()`` follows links)."""
    return path.is_symlink() or path.exists()


def _inside(root: Path, path: Path) -> bool:
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def describe_entry(path: Path) -> str:
    """What is at ``path``, in words: ``"missing"``, ``"a directory"``, ``"a dangling link to
    X"``, ``"a link to X"``, ``"a regular file"`` or ``"a special file"``."""
    if path.is_symlink():
        target = os.readlink(path)
        return f"a dangling link to {target}" if not path.exists() else f"a link to {target}"
    if not path.exists():
        return "missing"
    if path.is_dir():
        return "a directory"
    return "a regular file" if path.is_file() else "a special file (not a regular file)"


def readable_file(directory: Path, name: str, role: str) -> Path:
    """``directory / name``, checked to be a regular file that does not lead out of
    ``directory``.

    Args:
        directory: the adapter directory (the trust boundary).
        name: the file's name inside it.
        role: what the file is, for the message (e.g. ``"the PEFT weights file"``).

    Raises:
        AdapterFileError: the entry links out of the directory (naming where it points), or
            is missing, a directory, a dangling link or a special file (saying which).
    """
    path = directory / name
    if is_present(path) and not _inside(directory, path):
        raise AdapterFileError(
            f"{path}: {role} is a link to {os.path.realpath(path)}, outside the adapter "
            f"directory {directory}; refusing to follow it")
    if not path.is_file():
        what = describe_entry(path)
        raise AdapterFileError(f"{directory}: {role} {name} is {what}"
                               + ("" if what == "missing" else ", not a regular file"))
    return path


def checked_subdirectory(parent: Path, directory: Path) -> None:
    """Refuse a sub-adapter directory (PEFT's ``X/``) that is a link out of ``parent``.

    Raises:
        AdapterFileError: naming the directory and where it points.
    """
    if not _inside(parent, directory):
        raise AdapterFileError(
            f"{directory}: the sub-adapter directory is a link to "
            f"{os.path.realpath(directory)}, outside the adapter directory {parent}; refusing "
            "to follow it")
