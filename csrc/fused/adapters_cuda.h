// SPDX-License-Identifier: Apache-2.0
//
// Launch API of the CUDA kernels in adapters_cuda.cu (IA3, Houlsby, multi-LoRA). Plain pointers
// and sizes only, so the .cu file includes no torch header and nvcc compiles it alone
// (tests/ops/test_cuda_build.py). The torch side (checks, allocation, the GEMMs through ATen /
// cuBLAS, stream, device guard, registration) is adapters_cuda_ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/scalar_kind.h"

namespace peftreg::fused::adapters_cuda {

using ::peftreg::ScalarKind;  // common/scalar_kind.h

// y = (y + bias) * scale per column, in place; y (rows, cols), bias (cols) or null, scale (cols).
cudaError_t ia3_output_epilogue(ScalarKind dtype, void* y, const void* bias, const void* scale,
                                int64_t rows, int64_t cols, cudaStream_t stream);

// dst = x * scale per column; x and dst (rows, cols), scale (cols).
cudaError_t ia3_scale_columns(ScalarKind dtype, const void* x, const void* scale, void* dst,
                              int64_t rows, int64_t cols, cudaStream_t stream);

// result[j] = sum_i grad[i, j] * p[i, j] with p = out / scale[j], or, where scale[j] == 0,
// p[i, j] = x[i] . weight[j] + bias[j]. grad/out (rows, out_f), x (rows, in_f),
// weight (out_f, in_f), bias (out_f) or null, scale and result (out_f).
cudaError_t ia3_scale_grad(ScalarKind dtype, const void* grad, const void* out, const void* x,
                           const void* weight, const void* bias, const void* scale, void* result,
                           int64_t rows, int64_t in_f, int64_t out_f, cudaStream_t stream);

// a[i, :m] = act(z[i, :]) and, when cols == m + 1, a[i, m] = 1. act: 0 relu, 1 gelu (erf),
// 2 silu, 3 tanh. z (rows, m), a (rows, cols).
cudaError_t houlsby_activation(ScalarKind dtype, const void* z, void* a, int64_t rows, int64_t m,
                               int64_t cols, int act, cudaStream_t stream);

// out[i] = base[i] + scaling[k] * (x[i] A_k^T) B_k^T with k = index[i] (base[i] for k < 0).
// base/out (rows, out_f), x (rows, in_f), lora_a (n, r, in_f), lora_b (n, out_f, r); scaling (n)
// in the accumulation type; index (rows) int64, already checked to lie in [-1, n).
cudaError_t lora_multi_add(ScalarKind dtype, const void* base, const void* x, const void* lora_a,
                           const void* lora_b, const void* scaling, const int64_t* index,
                           void* out, int64_t rows, int64_t in_f, int64_t out_f, int64_t rank,
                           cudaStream_t stream);

}  // namespace peftreg::fused::adapters_cuda
