# SPDX-License-Identifier: Apache-2.0
"""JIT-build the compiled extension into a per-torch cache folder.

Usage (from a source checkout, torch installed)::

    python -m peftreg.ops.build [--verbose]

This is the fallback when ``pip install --no-build-isolation -e .`` / ``python setup.py
build_ext --inplace`` is not an option. It compiles the same sources with the same flags as
setup.py (both read :mod:`peftreg.ops.build_rules`) with ``torch.utils.cpp_extension.load``
into :func:`peftreg.ops.jit_build_dir` (override the root with ``PEFTREG_EXTENSION_DIR``).
Later ``import peftreg.ops`` loads that library when no prebuilt ``peftreg._C`` exists (or
always, with ``PEFTREG_EXTENSION=jit``). Nothing is ever compiled at import time.

A process never holds two compiled libraries (each would register the ``peftreg`` namespace), so
when one is already loaded here the build runs in a child process with loading disabled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from peftreg import ops
from peftreg.ops import build_rules


def source_dir() -> Path:
    """The csrc/ folder of the source checkout this package was imported from."""
    return _checkout() / "csrc"


def _checkout() -> Path:
    return Path(__file__).resolve().parents[2]


def build(verbose: bool = False) -> Path:
    """Compile the extension into :func:`peftreg.ops.jit_build_dir` and load it here.

    Returns:
        Path of the built library.

    Raises:
        FileNotFoundError: no csrc/ next to the package (an installed wheel, not a checkout).
        RuntimeError: the process already holds a compiled library.
    """
    if ops.has_extension():
        raise RuntimeError("a compiled peftreg library is already loaded in this process")
    from torch.utils.cpp_extension import CUDA_HOME, load

    csrc = source_dir()
    if not csrc.is_dir():
        raise FileNotFoundError(f"no C++ sources at {csrc}: the JIT build needs a source checkout")
    cuda_reason = build_rules.cuda_skip_reason(torch, CUDA_HOME)
    with_cuda = cuda_reason is None
    if not with_cuda:
        print(f"peftreg: CUDA kernels skipped: {cuda_reason}")
    sources = [str(_checkout() / p) for p in build_rules.sources(_checkout(), with_cuda)]
    debug = build_rules.env_flag("PEFTREG_DEBUG", "0")
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") and \
        torch.backends.openmp.is_available() else []
    out_dir = ops.jit_build_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"peftreg: compiling {len(sources)} files into {out_dir} (this takes a minute)")
    load(
        name=ops.JIT_LIBRARY_NAME,
        sources=sources,
        extra_include_paths=build_rules.include_dirs(_checkout()),
        extra_cflags=build_rules.cxx_flags(debug, openmp, with_cuda),
        extra_cuda_cflags=build_rules.nvcc_flags(debug) if with_cuda else None,
        extra_ldflags=openmp,
        build_directory=str(out_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
    info = {"with_cuda": with_cuda, "torch": torch.__version__, "cuda": torch.version.cuda}
    (out_dir / ops.JIT_BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir / f"{ops.JIT_LIBRARY_NAME}.so"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m peftreg.ops.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="show compiler commands")
    args = parser.parse_args(argv)
    if ops.has_extension():
        # Build in a child that loads nothing, so this process never loads a second library.
        print(f"peftreg: a {ops.extension_origin()} library is already loaded here; "
              "building in a child process")
        env = {**os.environ, "PEFTREG_EXTENSION": "off"}
        cmd = [sys.executable, "-m", "peftreg.ops.build", *(["--verbose"] if args.verbose else [])]
        return subprocess.call(cmd, env=env)
    try:
        library = build(verbose=args.verbose)
    except (FileNotFoundError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"peftreg: JIT build failed: {exc}", file=sys.stderr)
        return 1
    print(f"peftreg: built {library}")
    print("peftreg: `import peftreg.ops` loads it when no prebuilt peftreg._C exists "
          "(PEFTREG_EXTENSION=jit to prefer it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
