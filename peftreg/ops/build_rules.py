# SPDX-License-Identifier: Apache-2.0
"""The one set of build rules for the compiled extension: which files, which flags.

Both builds read it: setup.py (``pip install --no-build-isolation -e .`` / ``build_ext``), which
loads this file by path so that it never imports the package it is building, and the JIT
fallback :mod:`peftreg.ops.build`. Standard library only, for that reason.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

#: C++ files that register CUDA kernels: they include torch's CUDA headers, CUDA builds only.
CUDA_GLUE_SUFFIX = "_cuda_ops.cpp"
#: CUDA kernels: plain pointers and a small launch API, no torch headers.
CUDA_KERNEL_SUFFIX = "_cuda.cu"


def env_flag(name: str, default: str) -> bool:
    """Whether environment variable ``name`` (``default`` when unset) is on (not 0/false/no/off)."""
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def sources(root: str | os.PathLike[str], with_cuda: bool) -> list[str]:
    """The files to compile, as sorted ``csrc/...`` paths relative to the checkout ``root``.

    CPU builds take every ``csrc/**/*.cpp`` except the CUDA glue; CUDA builds add the
    ``*_cuda.cu`` kernels and the ``*_cuda_ops.cpp`` glue.
    """
    def find(pattern: str) -> list[str]:
        found = glob.glob(os.path.join("csrc", pattern), root_dir=root, recursive=True)
        return sorted(p.replace(os.sep, "/") for p in found)

    files = [p for p in find("**/*.cpp") if not p.endswith(CUDA_GLUE_SUFFIX)]
    if with_cuda:
        files += find(f"**/*{CUDA_KERNEL_SUFFIX}") + find(f"**/*{CUDA_GLUE_SUFFIX}")
    return files


def cxx_flags(debug: bool, openmp: list[str], with_cuda: bool) -> list[str]:
    """Host compiler flags.

    ``-ffp-contract=off``: the NF4 kernels reproduce bitsandbytes' float32 roundings bit for bit
    (fp32(fp32(a * b) + c)); a fused multiply-add would round once and differ in the last bit.
    """
    flags = (["-O0", "-g"] if debug else ["-O3"]) + ["-ffp-contract=off"] + openmp
    return flags + (["-DPEFTREG_WITH_CUDA=1"] if with_cuda else [])


def nvcc_flags(debug: bool) -> list[str]:
    """nvcc flags (the kernels keep their roundings with __fmul_rn/__fadd_rn intrinsics)."""
    return (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]) + ["-DPEFTREG_WITH_CUDA=1"]


def include_dirs(root: str | os.PathLike[str]) -> list[str]:
    return [str(Path(root) / "csrc")]


def cuda_skip_reason(torch: Any, cuda_home: str | None) -> str | None:
    """Why CUDA kernels cannot be built with this ``torch`` module and toolkit, or None."""
    if not env_flag("PEFTREG_BUILD_CUDA", "1"):
        return "PEFTREG_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)"
    if cuda_home is None:
        return "no CUDA toolkit found; set CUDA_HOME to the toolkit root (the folder with bin/nvcc)"
    if not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime_api.h")):
        return (f"CUDA_HOME={cuda_home} has no include/cuda_runtime_api.h; set CUDA_HOME to "
                "the toolkit root (the folder with bin/nvcc and include/)")
    return None
