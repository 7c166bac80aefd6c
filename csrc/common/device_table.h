// SPDX-License-Identifier: Apache-2.0
//
// One entry per op over per-device kernel tables (the shape of PagePool over PageBackend): a
// family's <family>_ops.cpp holds each op's checks, allocation and reshape once and registers
// that one function for CPU and CUDA; the function picks the table of its input's device and
// calls the kernel, which sees checked, contiguous 2-D tensors and preallocated outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace peftreg {

// The kernel table for `t`'s device: `cpu`, or `*cuda` (null in builds without CUDA kernels).
template <typename Table>
const Table& kernels_for(const at::Tensor& t, const char* op, const Table& cpu,
                         const Table* cuda) {
  if (t.device().is_cuda()) {
    TORCH_CHECK(cuda != nullptr, op, ": this build of peftreg has no CUDA kernels");
    return *cuda;
  }
  TORCH_CHECK(t.device().is_cpu(), op, ": no kernel for device ", t.device());
  return cpu;
}

}  // namespace peftreg
