// SPDX-License-Identifier: Apache-2.0
//
// Plain-pointer launch API of the paged AdamW CUDA kernel (no torch types, so nvcc compiles
// page_pool_cuda.cu alone). The glue in page_pool_cuda_ops.cpp owns streams, memory and events.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace peftreg::paged::cuda {

// One contiguous run of a parameter whose exp_avg / exp_avg_sq live at m / v inside a resident
// page. dtype: 0 float32, 1 bfloat16, 2 float16 (param and grad share it). The float scalars
// are those of peftreg::paged::AdamWScalars (page_pool.h).
struct AdamWLaunch {
  void* param;
  const void* grad;
  int dtype;
  int64_t count;
  float* m;
  float* v;
  float decay;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float bc2_sqrt;
  float eps;
  float neg_step_size;
  int maximize;
};

cudaError_t launch_adamw(const AdamWLaunch& args, cudaStream_t stream);

}  // namespace peftreg::paged::cuda
