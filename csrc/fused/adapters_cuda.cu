// SPDX-License-Identifier: Apache-2.0
//
// CUDA kernels of the IA3, Houlsby and multi-LoRA ops (schemas in adapters_ops.cpp, torch
// glue in adapters_cuda_ops.cpp, CPU kernels and the maths in adapters_cpu.cpp). No torch header
// is included: the launch API in adapters_kernels.h takes plain pointers.
//
// The GEMMs (x W^T, h Wd^T, the up projection with its residual) run in cuBLAS through ATen in
// the glue; these kernels are the parts cuBLAS cannot express: IA3's per-column scale epilogue and
// its scale gradient, Houlsby's activation (writing the ones column that carries b_up through the
// up-projection GEMM), and the per-row multi-adapter LoRA update. Every kernel widens to float
// (double for fp64 inputs) and rounds each output once. They favour clarity over peak speed.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_elem.cuh"
#include "fused/adapters_kernels.h"

namespace peftreg::fused::adapters_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cap the grid

using peftreg::cuda_common::Elem;

inline unsigned blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

// Calls f(T{}) with T the storage type of `dtype`, then reports the launch's error.
template <typename F>
cudaError_t dispatch(ScalarKind dtype, F&& f) {
  return cuda_common::with_storage_type(dtype, [&](auto tag) {
    f(tag);
    return cudaGetLastError();
  });
}

// ---- IA3 --------------------------------------------------------------------------------------

template <typename T>
__global__ void ia3_epilogue_kernel(T* __restrict__ y, const T* __restrict__ bias,
                                    const T* __restrict__ scale, int64_t total, int64_t cols) {
  using Acc = typename Elem<T>::Acc;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % cols;
    Acc v = Elem<T>::load(y[e]);
    if (bias != nullptr) v += Elem<T>::load(bias[j]);
    y[e] = Elem<T>::store(v * Elem<T>::load(scale[j]));
  }
}

template <typename T>
__global__ void ia3_scale_columns_kernel(const T* __restrict__ x, const T* __restrict__ scale,
                                         T* __restrict__ dst, int64_t total, int64_t cols) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    dst[e] = Elem<T>::store(Elem<T>::load(x[e]) * Elem<T>::load(scale[e % cols]));
  }
}

// Block (32, 8): threadIdx.x picks one of 32 consecutive columns (coalesced row reads),
// threadIdx.y strides over rows; the 8 partial sums are reduced in shared memory.
template <typename T>
__global__ void ia3_scale_grad_kernel(const T* __restrict__ grad, const T* __restrict__ out,
                                      const T* __restrict__ x, const T* __restrict__ weight,
                                      const T* __restrict__ bias, const T* __restrict__ scale,
                                      T* __restrict__ result, int64_t rows, int64_t in_f,
                                      int64_t out_f) {
  using Acc = typename Elem<T>::Acc;
  __shared__ Acc partial[8][33];
  const int64_t j = blockIdx.x * int64_t(32) + threadIdx.x;
  const bool valid = j < out_f;
  const Acc l = valid ? Elem<T>::load(scale[j]) : Acc(1);
  Acc acc = Acc(0);
  if (valid) {
    if (l != Acc(0)) {
      for (int64_t i = threadIdx.y; i < rows; i += 8) {
        acc += Elem<T>::load(grad[i * out_f + j]) * Elem<T>::load(out[i * out_f + j]);
      }
      acc /= l;
    } else {  // y carries nothing of x W^T + b in this column: recompute it
      const Acc b = bias != nullptr ? Elem<T>::load(bias[j]) : Acc(0);
      for (int64_t i = threadIdx.y; i < rows; i += 8) {
        Acc p = b;
        for (int64_t c = 0; c < in_f; ++c) {
          p += Elem<T>::load(x[i * in_f + c]) * Elem<T>::load(weight[j * in_f + c]);
        }
        acc += Elem<T>::load(grad[i * out_f + j]) * p;
      }
    }
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && valid) {
    Acc total = Acc(0);
    for (int t = 0; t < 8; ++t) total += partial[t][threadIdx.x];
    result[j] = Elem<T>::store(total);
  }
}

// ---- Houlsby ----------------------------------------------------------------------------------

template <typename Acc>
__device__ __forceinline__ Acc activate(Acc v, int act) {
  switch (act) {
    case 0:
      return v > Acc(0) ? v : Acc(0);
    case 1:
      return Acc(0.5) * v * (Acc(1) + erf(v * Acc(0.70710678118654752440)));
    case 2:
      return v / (Acc(1) + exp(-v));
    default:
      return tanh(v);
  }
}

template <typename T>
__global__ void houlsby_activation_kernel(const T* __restrict__ z, T* __restrict__ a,
                                          int64_t rows, int64_t m, int64_t cols, int act) {
  using Acc = typename Elem<T>::Acc;
  const int64_t total = rows * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / cols, c = e % cols;
    a[e] = c < m ? Elem<T>::store(activate<Acc>(Elem<T>::load(z[i * m + c]), act))
                 : Elem<T>::store(Acc(1));
  }
}

// ---- multi-LoRA -------------------------------------------------------------------------------

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// One block per row: its warps compute u = scaling[k] * A_k x_i (one rank component per warp at
// a time, a shuffle reduction each), then all threads sweep the output row with u from shared
// memory. Rows of the same adapter read the same A_k / B_k, which stay in L2.
template <typename T>
__global__ void lora_multi_kernel(const T* __restrict__ base, const T* __restrict__ x,
                                  const T* __restrict__ lora_a, const T* __restrict__ lora_b,
                                  const typename Elem<T>::Acc* __restrict__ scaling,
                                  const int64_t* __restrict__ index, T* __restrict__ out,
                                  int64_t rows, int64_t in_f, int64_t out_f, int64_t rank) {
  using Acc = typename Elem<T>::Acc;
  extern __shared__ unsigned char shared_raw[];
  Acc* u = reinterpret_cast<Acc*>(shared_raw);
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const int64_t k = index[i];
    const T* base_row = base + i * out_f;
    T* out_row = out + i * out_f;
    if (k < 0) {
      for (int64_t j = threadIdx.x; j < out_f; j += blockDim.x) out_row[j] = base_row[j];
      continue;  // uniform per block: no thread skips a barrier
    }
    const T* x_row = x + i * in_f;
    const T* a_k = lora_a + k * rank * in_f;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int64_t q = warp; q < rank; q += warps) {
      Acc acc = Acc(0);
      for (int64_t c = lane; c < in_f; c += 32) {
        acc += Elem<T>::load(a_k[q * in_f + c]) * Elem<T>::load(x_row[c]);
      }
      acc = warp_sum(acc);
      if (lane == 0) u[q] = scaling[k] * acc;
    }
    __syncthreads();
    const T* b_k = lora_b + k * out_f * rank;
    for (int64_t j = threadIdx.x; j < out_f; j += blockDim.x) {
      Acc acc = Elem<T>::load(base_row[j]);
      for (int64_t q = 0; q < rank; ++q) acc += Elem<T>::load(b_k[j * rank + q]) * u[q];
      out_row[j] = Elem<T>::store(acc);
    }
    __syncthreads();  // u is rewritten by the next row
  }
}

}  // namespace

cudaError_t ia3_output_epilogue(ScalarKind dtype, void* y, const void* bias, const void* scale,
                                int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    ia3_epilogue_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
        static_cast<T*>(y), static_cast<const T*>(bias), static_cast<const T*>(scale), total,
        cols);
  });
}

cudaError_t ia3_scale_columns(ScalarKind dtype, const void* x, const void* scale, void* dst,
                              int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    ia3_scale_columns_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(scale), static_cast<T*>(dst), total,
        cols);
  });
}

cudaError_t ia3_scale_grad(ScalarKind dtype, const void* grad, const void* out, const void* x,
                           const void* weight, const void* bias, const void* scale, void* result,
                           int64_t rows, int64_t in_f, int64_t out_f, cudaStream_t stream) {
  if (out_f == 0) return cudaSuccess;
  const int64_t blocks = (out_f + 31) / 32;
  if (blocks > 2147483647LL) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    ia3_scale_grad_kernel<T><<<static_cast<unsigned>(blocks), dim3(32, 8), 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(out), static_cast<const T*>(x),
        static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<const T*>(scale),
        static_cast<T*>(result), rows, in_f, out_f);
  });
}

cudaError_t houlsby_activation(ScalarKind dtype, const void* z, void* a, int64_t rows, int64_t m,
                               int64_t cols, int act, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  if (act < 0 || act > 3 || cols < m || cols > m + 1) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    houlsby_activation_kernel<T><<<blocks_for(rows * cols), kThreads, 0, stream>>>(
        static_cast<const T*>(z), static_cast<T*>(a), rows, m, cols, act);
  });
}

cudaError_t lora_multi_add(ScalarKind dtype, const void* base, const void* x, const void* lora_a,
                           const void* lora_b, const void* scaling, const int64_t* index,
                           void* out, int64_t rows, int64_t in_f, int64_t out_f, int64_t rank,
                           cudaStream_t stream) {
  if (rows == 0 || out_f == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(rows < 2147483647LL ? rows : 2147483647LL);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Elem<T>::Acc;
    const size_t shared = sizeof(Acc) * static_cast<size_t>(rank > 0 ? rank : 1);
    lora_multi_kernel<T><<<grid, kThreads, shared, stream>>>(
        static_cast<const T*>(base), static_cast<const T*>(x), static_cast<const T*>(lora_a),
        static_cast<const T*>(lora_b), static_cast<const Acc*>(scaling), index,
        static_cast<T*>(out), rows, in_f, out_f, rank);
  });
}

}  // namespace peftreg::fused::adapters_cuda
