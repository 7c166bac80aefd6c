# SPDX-License-Identifier: Apache-2.0
"""Compile-check the CUDA sources wherever a CUDA toolkit exists; no GPU needed.

Every ``csrc/**/*_cuda.cu`` includes no torch header, so nvcc compiles it alone in seconds: it
includes its family's interface header (``*_kernels.h``), whose torch side sits under
``#ifndef __CUDACC__``, and nvcc gets no torch include path here. The torch-side CUDA kernel
tables (``*_cuda_ops.cpp``) and the CUDA branch of every other file that has one (the entries'
``PEFTREG_WITH_CUDA`` registration) are syntax-checked with the host compiler against torch's
headers and the toolkit's, which catches API drift before a GPU machine does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.rglob("*_cuda.cu"))
GLUE_FILES = sorted(CSRC.rglob("*_cuda_ops.cpp"))
# C++ files that CPU builds compile too but whose CUDA branch only CUDA builds see.
_CUDA_BRANCH = re.compile(r"PEFTREG_(WITH_CUDA|CUDA_TABLE|IMPL_CPU_AND_CUDA)\b")
CUDA_BRANCH_FILES = sorted(p for p in CSRC.rglob("*.cpp")
                           if p not in GLUE_FILES and _CUDA_BRANCH.search(p.read_text()))
SYNTAX_FILES = GLUE_FILES + CUDA_BRANCH_FILES


def _find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, else PATH, else the conventional install location."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _toolkit_root(nvcc: str) -> Path | None:
    """The toolkit root as nvcc itself reports it (PATH may hold a wrapper script)."""
    proc = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"^#\$ TOP=(.+)$", proc.stdout + proc.stderr, re.MULTILINE)
    return Path(match.group(1).strip()).resolve() if match else None


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME to a CUDA "
                                                     "toolkit to compile-check the .cu files)")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_there_are_cuda_sources():
    assert CU_FILES, "no csrc/**/*_cuda.cu files found"
    # Every op family registers its one entry for CUDA in a CUDA build.
    entries = {p.relative_to(CSRC).as_posix() for p in CUDA_BRANCH_FILES}
    assert {"fused/lora_ops.cpp", "fused/adapters_ops.cpp", "nf4/nf4_ops.cpp"} <= entries, entries
    # Each kernel file has its CUDA table file (*_cuda_ops.cpp) next to it, and vice versa.
    assert {p.with_name(p.name.replace("_cuda.cu", "_cuda_ops.cpp")) for p in CU_FILES} == set(
        GLUE_FILES)


_INCLUDE = re.compile(r'#include\s*[<"]([^>"]+)[>"]')
_TORCH_HEADER = re.compile(r"(?:torch|ATen|c10)/")


def _includes_seen_by_nvcc(path: Path, seen: set[Path] | None = None) -> list[str]:
    """Every header nvcc reaches from `path`, following csrc's own headers, skipping the regions
    under ``#ifndef __CUDACC__`` (the torch side of a family header)."""
    seen = set() if seen is None else seen
    if path in seen:
        return []
    seen.add(path)
    found: list[str] = []
    hidden: list[bool] = []  # per open #if: whether nvcc skips its current branch
    for line in path.read_text().splitlines():
        directive = line.strip()
        if directive.startswith(("#ifndef", "#if ", "#ifdef")):
            hidden.append(directive in ("#ifndef __CUDACC__", "#if !defined(__CUDACC__)"))
        elif directive.startswith("#else") and hidden:
            hidden[-1] = False  # the #else of `#ifndef __CUDACC__` is nvcc's; others: both seen
        elif directive.startswith("#endif") and hidden:
            hidden.pop()
        elif any(hidden):
            continue
        elif (match := _INCLUDE.match(directive)):
            name = match.group(1)
            found.append(name)
            local = CSRC / name
            if local.is_file():
                found += _includes_seen_by_nvcc(local, seen)
    return found


@pytest.mark.parametrize("cu_file", CU_FILES, ids=[_rel(p) for p in CU_FILES])
def test_cu_files_include_no_torch_headers(cu_file):
    """Keeps the .cu files compilable by nvcc alone (and fast to compile)."""
    reached = _includes_seen_by_nvcc(cu_file)
    torch_includes = [h for h in reached if _TORCH_HEADER.match(h)]
    assert not torch_includes, f"{_rel(cu_file)} reaches torch headers: {torch_includes}"
    # The rule above is only as good as the scan: the family header really is included.
    family = cu_file.name.replace("_cuda.cu", "_kernels.h")
    if (cu_file.parent / family).is_file():
        assert f"{cu_file.parent.name}/{family}" in reached, reached


@needs_nvcc
@pytest.mark.parametrize("cu_file", CU_FILES, ids=[_rel(p) for p in CU_FILES])
def test_nvcc_compiles_for_sm90(cu_file, tmp_path):
    obj = tmp_path / (cu_file.stem + ".o")
    cmd = [NVCC, "-c", "-arch=sm_90", "-std=c++17", f"-I{CSRC}", str(cu_file), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert obj.stat().st_size > 0


@needs_nvcc
@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="the host-compiler check is Linux-only")
@pytest.mark.parametrize("glue_file", SYNTAX_FILES, ids=[_rel(p) for p in SYNTAX_FILES])
def test_cuda_glue_syntax_checks_against_torch_headers(glue_file):
    """A CUDA build's C++ parses against this torch's headers and the toolkit's (~10 s each)."""
    torch_cpp = pytest.importorskip("torch.utils.cpp_extension")
    root = _toolkit_root(NVCC)
    if root is None or not (root / "include" / "cuda_runtime_api.h").is_file():
        pytest.skip(f"could not locate the CUDA toolkit's include folder from {NVCC}")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"host compiler {compiler!r} not found")
    includes = [f"-isystem{p}" for p in torch_cpp.include_paths()]
    includes += [f"-isystem{root / 'include'}", f"-isystem{sysconfig.get_paths()['include']}"]
    # CPU wheels of torch ship c10/cuda headers without the generated cuda_cmake_macros.h; its
    # documented opt-out lets the glue be checked here anyway.
    cmd = [compiler, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DPEFTREG_WITH_CUDA=1", f"-I{CSRC}",
           *includes, str(glue_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr[-4000:]}"
