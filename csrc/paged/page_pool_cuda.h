// SPDX-License-Identifier: Apache-2.0
//
// Plain-pointer launch API of the paged AdamW CUDA kernel (no torch types, so nvcc compiles
// page_pool_cuda.cu alone; page_pool.h includes no torch header either). The glue in
// page_pool_cuda_ops.cpp owns streams, memory and events.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/scalar_kind.h"
#include "paged/page_pool.h"

namespace peftreg::paged::cuda {

using ::peftreg::ScalarKind;  // common/scalar_kind.h

// One contiguous run of a parameter whose exp_avg / exp_avg_sq live at m / v inside a resident
// page. param and grad share dtype, one of float32, bfloat16 and float16 (ParamDType's, which
// the glue maps to ScalarKind); the kernels reject kFloat64. s: the parameter's step scalars.
struct AdamWLaunch {
  void* param;
  const void* grad;
  ScalarKind dtype;
  int64_t count;
  float* m;
  float* v;
  AdamWScalars s;
};

cudaError_t launch_adamw(const AdamWLaunch& args, cudaStream_t stream);

// The 8-bit update of one segment (issue 17; layout in page_pool.h): `count` elements from a
// block boundary, their codes at c1 / c2 and one absmax per 256 elements at a1 / a2, all in a
// resident page. The maps travel by value (2 KiB of the 4 KiB kernel-argument space); the
// kernel derives the midpoints in float32 exactly as the CPU's Quantizer does, and one thread
// block of 256 threads updates one quantization block.
struct AdamW8Launch {
  void* param;
  const void* grad;
  ScalarKind dtype;
  int64_t count;
  unsigned char* c1;
  unsigned char* c2;
  float* a1;
  float* a2;
  AdamWScalars s;
  float map1[256];
  float map2[256];
};

cudaError_t launch_adamw8(const AdamW8Launch& args, cudaStream_t stream);

}  // namespace peftreg::paged::cuda
