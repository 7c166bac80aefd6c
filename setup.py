# SPDX-License-Identifier: Apache-2.0
"""Builds the optional compiled extension ``peftreg._C``; all metadata lives in pyproject.toml.

Build against the torch that will run it (torch is deliberately not a build requirement)::

    pip install --no-build-isolation -e .      # or
    python setup.py build_ext --inplace

What gets built (the file and flag rules live in peftreg/ops/build_rules.py, shared with the
JIT build ``python -m peftreg.ops.build``):

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

import importlib.util
import os
import subprocess
import sys
import tempfile
from typing import Any

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_rules() -> Any:
    """peftreg/ops/build_rules.py (shared with the JIT build), by path: importing the peftreg
    package here would import the extension being built."""
    path = os.path.join(HERE, "peftreg", "ops", "build_rules.py")
    spec = importlib.util.spec_from_file_location("_peftreg_build_rules", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rules = _load_build_rules()

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


def _extension_build() -> tuple[list[Any], dict[str, Any]]:
    """The ``ext_modules`` and ``cmdclass`` for setup(), or empty ones with the reason logged."""
    if not rules.env_flag("PEFTREG_BUILD_EXT", "1"):
        _log("building no extension (PEFTREG_BUILD_EXT=0); peftreg will use plain PyTorch")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # any import failure means: no extension, say why
        _log(f"building no extension: torch does not import ({type(exc).__name__}: {exc}). "
             "Install torch first, then `pip install --no-build-isolation -e .`")
        return [], {}

    from torch.utils.cpp_extension import CUDA_HOME

    debug = rules.env_flag("PEFTREG_DEBUG", "0")
    openmp = _openmp_flags()
    cuda_reason = rules.cuda_skip_reason(torch, CUDA_HOME)
    with_cuda = cuda_reason is None
    sources = rules.sources(HERE, with_cuda)
    common: dict[str, Any] = {
        "sources": sources,
        "include_dirs": rules.include_dirs(HERE),
        "extra_link_args": openmp + (["-g"] if debug else []),
    }
    cxx_flags = rules.cxx_flags(debug, openmp, with_cuda)
    if with_cuda:
        _log(f"building peftreg._C with CPU and CUDA kernels (torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}): {len(sources)} files")
        ext = CUDAExtension("peftreg._C", extra_compile_args={
            "cxx": cxx_flags, "nvcc": rules.nvcc_flags(debug)}, **common)
    else:
        _log(f"CUDA kernels skipped: {cuda_reason}")
        _log(f"building peftreg._C with CPU kernels (torch {torch.__version__}): "
             f"{len(sources)} files")
        ext = CppExtension("peftreg._C", extra_compile_args={"cxx": cxx_flags}, **common)
    return [ext], {"build_ext": BuildExtension}


_ext_modules, _cmdclass = _extension_build()
setup(ext_modules=_ext_modules, cmdclass=_cmdclass)
