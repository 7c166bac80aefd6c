# SPDX-License-Identifier: Apache-2.0
"""The layout rules of csrc/ that no compiler enforces (csrc/README.md).

One ``TORCH_LIBRARY(peftreg, m)`` (registration.cpp); each family defines its schemas with
``TORCH_LIBRARY_FRAGMENT`` in the file that holds their entries, each schema exactly once, and
those are exactly the ops of ``peftreg.ops.OPS``. Read from the sources, so no compiled library
is needed.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from peftreg import ops

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = sorted(CSRC.rglob("*.cpp"))
_DEF = re.compile(r'\bm\.def\(\s*"([A-Za-z_0-9]+)\(')
_FRAGMENT = re.compile(r"^TORCH_LIBRARY_FRAGMENT\(peftreg, m\)", re.MULTILINE)
_IMPL = re.compile(r'\bm\.impl\(\s*"([A-Za-z_0-9]+)"')


def _rel(path: Path) -> str:
    return path.relative_to(CSRC).as_posix()


def test_one_library_block_in_registration_cpp():
    blocks = [_rel(p) for p in SOURCES
              for _ in re.finditer(r"^TORCH_LIBRARY\(peftreg\b", p.read_text(), re.MULTILINE)]
    assert blocks == ["registration.cpp"], blocks
    assert not _DEF.search((CSRC / "registration.cpp").read_text()), (
        "registration.cpp defines a schema; it belongs in its family's TORCH_LIBRARY_FRAGMENT")


def test_every_schema_defined_once_beside_its_entry():
    defs = Counter()
    for path in SOURCES:
        text = path.read_text()
        names = _DEF.findall(text)
        defs.update(names)
        if names:
            assert _FRAGMENT.search(text), f"{_rel(path)} defines schemas outside a fragment"
            # The entry (the CPU/CUDA m.impl) is registered from the same file.
            missing = set(names) - set(_IMPL.findall(text))
            assert not missing, f"{_rel(path)} defines {sorted(missing)} without their entries"
    twice = sorted(name for name, n in defs.items() if n > 1)
    assert not twice, f"schemas defined more than once: {twice}"
    assert set(defs) == set(ops.OPS)
