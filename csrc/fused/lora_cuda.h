// SPDX-License-Identifier: Apache-2.0
//
// Launch API of the CUDA kernels in lora_cuda.cu. It uses plain pointers and sizes only, so the
// .cu file includes no torch header: nvcc compiles it in about a second on any machine with a
// CUDA toolkit, and tests/ops/test_cuda_build.py checks that wherever nvcc exists. The torch side
// (argument checks, allocation, the base product, stream, device guard, registration) is
// lora_cuda_ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/scalar_kind.h"

namespace peftreg::fused::cuda {

using ::peftreg::ScalarKind;  // common/scalar_kind.h

// Arguments of the low-rank update  y += scaling * (x_l @ A^T) @ B^T.
// Every pointer refers to a dense row-major (C-contiguous) device buffer of `dtype`, except
// `workspace`, whose element type is the accumulation type (double for kFloat64, else float).
struct LoraUpdateArgs {
  ScalarKind dtype = ScalarKind::kFloat32;
  const void* x_lora = nullptr;  // (rows, in_features): the LoRA input (x, or dropout(x))
  const void* lora_a = nullptr;  // (rank, in_features)
  const void* lora_b = nullptr;  // (out_features, rank)
  void* workspace = nullptr;     // (rows, rank) accumulation-type scratch for scaling * x_l @ A^T
  void* y = nullptr;             // (rows, out_features): read (the base product) and updated
  int64_t rows = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t rank = 0;
  double scaling = 1.0;
};

// Bytes `workspace` must hold for the given dtype and sizes.
std::size_t lora_update_workspace_bytes(ScalarKind dtype, int64_t rows, int64_t rank);

// Enqueues y += scaling * (x_l @ A^T) @ B^T on `stream` (the caller has made the right device
// current). Returns cudaSuccess, a launch error, or cudaErrorInvalidValue for bad sizes.
cudaError_t lora_low_rank_update(const LoraUpdateArgs& args, cudaStream_t stream);

}  // namespace peftreg::fused::cuda
