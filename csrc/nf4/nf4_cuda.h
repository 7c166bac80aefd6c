// SPDX-License-Identifier: Apache-2.0
//
// Launch API of the NF4 CUDA kernels in nf4_cuda.cu: plain pointers and sizes, no torch types,
// so nvcc compiles the .cu file alone (tests/ops/test_cuda_build.py). The torch side (argument
// checks, allocation, offsets via ATen's mean, the cuBLAS GEMMs of the large-batch path, stream
// and device guard, registration) is nf4_cuda_ops.cpp. Every function enqueues work on `stream`
// and returns cudaSuccess, a launch error, or cudaErrorInvalidValue for bad sizes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/scalar_kind.h"

namespace peftreg::nf4::cuda {

using ::peftreg::ScalarKind;  // common/scalar_kind.h

// A quantized weight in device memory (see csrc/nf4/nf4_args.h for the layout).
struct WeightArgs {
  const uint8_t* codes = nullptr;         // (numel + 1) / 2 packed bytes
  const float* absmax = nullptr;          // float32 scales (no double quantization), or
  const uint8_t* absmax_codes = nullptr;  // uint8 scale codes (double quantization) with
  const float* nested = nullptr;          //   the float32 second-level scales,
  const float* offset = nullptr;          //   the offset (one float, device memory) and
  const float* dynamic_code = nullptr;    //   the 256-entry dynamic code (device memory)
  int64_t numel = 0;
  int64_t blocksize = 64;
  int64_t nested_blocksize = 256;
};

// Fills host arrays with the dynamic code, its midpoints and bitsandbytes' decision boundaries
// (nf4_format.h), so the glue can upload them once per device.
void host_dynamic_code(float* code256, float* mid255, float* bnb255);

// codes/absmax of x (n elements of `dtype`); *bad_block (device int64, preset to -1 by the
// caller) receives the index of a block holding NaN/inf, if any.
cudaError_t quantize(ScalarKind dtype, const void* x, int64_t n, int64_t blocksize,
                     uint8_t* codes, float* absmax, long long* bad_block, cudaStream_t stream);

// absmax_codes/nested of (absmax - *offset); `bounds` holds 255 decision boundaries on device:
// the midpoints with `nearest` (values scaled as the 4-bit codes are), else bitsandbytes'
// boundaries (values divided by the block's absmax).
cudaError_t double_quantize(const float* absmax, int64_t n, const float* offset,
                            int64_t nested_blocksize, const float* bounds, bool nearest,
                            uint8_t* absmax_codes, float* nested, cudaStream_t stream);

// out[i] = dequantized element first + i, for i < count, rounded once from float32 to `dtype`.
cudaError_t dequantize(const WeightArgs& w, int64_t first, int64_t count, ScalarKind dtype,
                       void* out, cudaStream_t stream);

// Few-row products with on-the-fly decoding (rows <= kMaxGemvRows), accumulating in float32
// (float64 for kFloat64) into `acc` (rows, out_features) resp. (rows, in_features):
//   gemv_forward:    acc = x @ W^T        x: (rows, in_features)
//   gemv_grad_input: acc = g @ W          g: (rows, out_features)
inline constexpr int64_t kMaxGemvRows = 8;
cudaError_t gemv_forward(const WeightArgs& w, ScalarKind dtype, const void* x, int64_t rows,
                         int64_t out_features, int64_t in_features, void* acc,
                         cudaStream_t stream);
cudaError_t gemv_grad_input(const WeightArgs& w, ScalarKind dtype, const void* g, int64_t rows,
                            int64_t out_features, int64_t in_features, void* acc,
                            cudaStream_t stream);

}  // namespace peftreg::nf4::cuda
