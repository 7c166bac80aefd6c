// SPDX-License-Identifier: Apache-2.0
//
// Elem<T>: loads and stores between a CUDA kernel's storage type T (float, double, __half,
// __nv_bfloat16) and the type it accumulates in (float; double for double), and
// with_storage_type, the one switch from a ScalarKind to that T. Shared by every family's
// kernels (csrc/*/*_cuda.cu); includes no torch header, like them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/scalar_kind.h"

namespace peftreg::cuda_common {

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Acc = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

template <>
struct Elem<double> {
  using Acc = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};

template <>
struct Elem<__half> {
  using Acc = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// Calls f(T{}) with T the storage type of `dtype` and returns what f returns. A kernel that does
// not take some type says so inside f (`if constexpr`), so the switch itself is written once.
template <typename F>
cudaError_t with_storage_type(ScalarKind dtype, F&& f) {
  switch (dtype) {
    case ScalarKind::kFloat32:
      return f(float{});
    case ScalarKind::kFloat64:
      return f(double{});
    case ScalarKind::kFloat16:
      return f(__half{});
    case ScalarKind::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace peftreg::cuda_common
