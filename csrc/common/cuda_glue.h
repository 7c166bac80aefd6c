// SPDX-License-Identifier: Apache-2.0
//
// What every CUDA registration file needs from torch, written once: the ScalarKind of a tensor's
// dtype (with the op's name in the error) and the current stream of a tensor's device. Only c10
// CUDA headers, which compile with the CPU torch wheel too; included by *_cuda_ops.cpp, which
// CUDA builds alone compile.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "common/scalar_kind.h"

namespace peftreg::cuda_glue {

inline ScalarKind scalar_kind(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ScalarKind::kFloat32;
    case at::kDouble:
      return ScalarKind::kFloat64;
    case at::kHalf:
      return ScalarKind::kFloat16;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": unsupported dtype ", t);
  return ScalarKind::kFloat32;  // unreachable
}

inline cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

}  // namespace peftreg::cuda_glue
