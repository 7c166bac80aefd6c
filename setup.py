# SPDX-License-Identifier: Apache-2.0
"""Builds the optional compiled extension ``peftreg._C``; all metadata lives in pyproject.toml.

Build against the torch that will run it (torch is deliberately not a build requirement)::

    pip install --no-build-isolation -e .      # or
    python setup.py build_ext --inplace

What gets built:

* no extension when torch does not import or ``PEFTREG_BUILD_EXT=0``: peftreg then runs on its
  plain-PyTorch path, and ``peftreg.ops.extension_error()`` says why;
* CPU kernels (``csrc/**/*.cpp``, minus the CUDA glue ``*_cuda_ops.cpp``) whenever torch imports;
* CUDA kernels (``csrc/**/*_cuda.cu`` plus ``csrc/**/*_cuda_ops.cpp``) as well when torch is a
  CUDA build and a CUDA toolkit is found (set ``CUDA_HOME`` to the toolkit root, the directory
  holding ``bin/nvcc``); ``PEFTREG_BUILD_CUDA=0`` forces a CPU-only build.

``PEFTREG_DEBUG=1`` compiles with ``-O0 -g`` instead of ``-O3``. OpenMP is enabled when a probe
library built with ``-fopenmp`` loads next to torch's own OpenMP runtime; it makes the
``at::parallel_for`` loops of ATen headers parallel inside the extension.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
from typing import Any

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
CUDA_GLUE_SUFFIX = "_cuda_ops.cpp"  # C++ files that register CUDA kernels: CUDA builds only
CUDA_KERNEL_SUFFIX = "_cuda.cu"

_OPENMP_PROBE = r"""
#include <omp.h>
extern "C" int peftreg_openmp_probe() {
  int threads = 0;
#pragma omp parallel reduction(+ : threads)
  threads += 1;
  return threads + 0 * omp_get_max_threads();
}
"""


def _log(message: str) -> None:
    print(f"peftreg setup.py: {message}", flush=True)


def _env_flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def _find(pattern: str) -> list[str]:
    """Sorted paths under csrc/ matching ``pattern``, relative to this file's directory."""
    found = glob.glob(os.path.join(CSRC, pattern), root_dir=HERE, recursive=True)
    return sorted(p.replace(os.sep, "/") for p in found)


def _openmp_flags() -> list[str]:
    """``["-fopenmp"]`` if an OpenMP probe built with it runs beside torch's runtime, else []."""
    if not sys.platform.startswith("linux"):
        _log("OpenMP: skipped (only probed on Linux)")
        return []
    import torch

    if not torch.backends.openmp.is_available():
        _log("OpenMP: skipped (this torch was built without OpenMP)")
        return []
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory(prefix="peftreg-omp-") as tmp:
        src = os.path.join(tmp, "probe.cpp")
        lib = os.path.join(tmp, "probe.so")
        with open(src, "w") as handle:
            handle.write(_OPENMP_PROBE)
        try:
            subprocess.run([compiler, "-fopenmp", "-shared", "-fPIC", src, "-o", lib],
                           check=True, capture_output=True, timeout=120)
            # Load the probe in a fresh interpreter after torch, exactly as the extension will
            # be loaded: the libgomp.so.1 it needs resolves to the copy torch already loaded.
            check = ("import ctypes, torch; "
                     f"assert ctypes.CDLL({lib!r}).peftreg_openmp_probe() >= 1")
            subprocess.run([sys.executable, "-c", check], check=True, capture_output=True,
                           timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            _log(f"OpenMP: disabled ({type(exc).__name__}: "
                 f"{detail.decode(errors='replace').strip()[-300:] or exc})")
            return []
    _log("OpenMP: enabled (-fopenmp works with torch's OpenMP runtime)")
    return ["-fopenmp"]


def _cuda_skip_reason() -> str | None:
    """Why CUDA kernels cannot be built here, or None when they can."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if not _env_flag("PEFTREG_BUILD_CUDA", "1"):
        return "PEFTREG_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)"
    if CUDA_HOME is None:
        return "no CUDA toolkit found; set CUDA_HOME to the toolkit root (the folder with bin/nvcc)"
    if not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h")):
        return (f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime_api.h; set CUDA_HOME to "
                "the toolkit root (the folder with bin/nvcc and include/)")
    return None


def _extension_build() -> tuple[list[Any], dict[str, Any]]:
    """The ``ext_modules`` and ``cmdclass`` for setup(), or empty ones with the reason logged."""
    if not _env_flag("PEFTREG_BUILD_EXT", "1"):
        _log("building no extension (PEFTREG_BUILD_EXT=0); peftreg will use plain PyTorch")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # any import failure means: no extension, say why
        _log(f"building no extension: torch does not import ({type(exc).__name__}: {exc}). "
             "Install torch first, then `pip install --no-build-isolation -e .`")
        return [], {}

    cpp_sources = [p for p in _find("**/*.cpp") if not p.endswith(CUDA_GLUE_SUFFIX)]
    debug = _env_flag("PEFTREG_DEBUG", "0")
    openmp = _openmp_flags()
    # -ffp-contract=off: the NF4 kernels reproduce bitsandbytes' float32 roundings bit for bit
    # (fp32(fp32(a * b) + c)); a fused multiply-add would round once and differ in the last bit.
    cxx_flags = (["-O0", "-g"] if debug else ["-O3"]) + ["-ffp-contract=off"] + openmp
    nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
    common: dict[str, Any] = {
        "include_dirs": [os.path.join(HERE, CSRC)],
        "extra_link_args": openmp + (["-g"] if debug else []),
    }

    cuda_reason = _cuda_skip_reason()
    if cuda_reason is None:
        cuda_sources = _find(f"**/*{CUDA_KERNEL_SUFFIX}") + _find(f"**/*{CUDA_GLUE_SUFFIX}")
        _log(f"building peftreg._C with CPU and CUDA kernels (torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}): {len(cpp_sources) + len(cuda_sources)} files")
        ext = CUDAExtension(
            "peftreg._C",
            sources=cpp_sources + cuda_sources,
            define_macros=[("PEFTREG_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            **common,
        )
    else:
        _log(f"CUDA kernels skipped: {cuda_reason}")
        _log(f"building peftreg._C with CPU kernels (torch {torch.__version__}): "
             f"{len(cpp_sources)} files")
        ext = CppExtension(
            "peftreg._C",
            sources=cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            **common,
        )
    return [ext], {"build_ext": BuildExtension}


_ext_modules, _cmdclass = _extension_build()
setup(ext_modules=_ext_modules, cmdclass=_cmdclass)
