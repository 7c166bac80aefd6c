// SPDX-License-Identifier: Apache-2.0
//
// One entry per op over per-device kernel tables (the shape of PagePool over PageBackend): a
// family's <family>_ops.cpp holds each op's checks, allocation and reshape once and registers
// that one function for CPU and CUDA; the function picks the table of its input's device and
// calls the kernel, which sees checked, contiguous 2-D tensors and preallocated outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <type_traits>

#ifndef PEFTREG_WITH_CUDA
#define PEFTREG_WITH_CUDA 0
#endif

namespace peftreg {

// The kernel table for `t`'s device: `cpu`, or `*cuda` (null in builds without CUDA kernels).
template <typename Table>
const Table& kernels_for(const at::Tensor& t, const char* op, const Table& cpu,
                         const std::type_identity_t<Table>* cuda) {
  if (t.device().is_cuda()) {
    TORCH_CHECK(cuda != nullptr, op, ": this build of peftreg has no CUDA kernels");
    return *cuda;
  }
  TORCH_CHECK(t.device().is_cpu(), op, ": no kernel for device ", t.device());
  return cpu;
}

}  // namespace peftreg

// The `cuda` argument of kernels_for: `&getter()` in CUDA builds, else nullptr (the getter is
// declared only in CUDA builds, so a CPU build must not name it).
#if PEFTREG_WITH_CUDA
#define PEFTREG_CUDA_TABLE(getter) (&getter())
#else
#define PEFTREG_CUDA_TABLE(getter) nullptr
#endif

// Registers a family's entries, `impl(torch::Library&)`, for CPU and, in CUDA builds, CUDA: the
// same function serves both, since each entry picks its device's table itself.
#if PEFTREG_WITH_CUDA
#define PEFTREG_IMPL_CPU_AND_CUDA(impl)             \
  TORCH_LIBRARY_IMPL(peftreg, CPU, m) { impl(m); } \
  TORCH_LIBRARY_IMPL(peftreg, CUDA, m) { impl(m); }
#else
#define PEFTREG_IMPL_CPU_AND_CUDA(impl) \
  TORCH_LIBRARY_IMPL(peftreg, CPU, m) { impl(m); }
#endif
