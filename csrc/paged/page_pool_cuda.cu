// SPDX-License-Identifier: Apache-2.0
//
// The fused AdamW update of one resident page on the GPU; same maths and order as the CPU
// update in page_pool_cpu.cpp (torch.optim.AdamW's single-tensor step). Explicitly rounded
// intrinsics keep nvcc from contracting the steps into FMAs, as -ffp-contract=off does on
// the CPU.
#include "paged/page_pool_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "common/cuda_elem.cuh"

namespace peftreg::paged::cuda {

namespace {

constexpr int kThreads = 256;

using cuda_common::Elem;  // every storage type the kernels take accumulates in float

// One element's step, shared by the float32-state and 8-bit kernels: m and v hold the element's
// moments on entry and the updated ones on return; returns the updated parameter value.
__device__ __forceinline__ float adamw_element(const AdamWScalars& s, float g, float p,
                                               float& m, float& v) {
  if (s.maximize) {
    g = -g;
  }
  const float w = s.one_minus_beta1;
  p = __fmul_rn(p, s.decay);
  const float m0 = m;
  m = w < 0.5f ? __fadd_rn(m0, __fmul_rn(w, __fsub_rn(g, m0)))
               : __fsub_rn(g, __fmul_rn(__fsub_rn(g, m0), __fsub_rn(1.0f, w)));
  v = __fadd_rn(__fmul_rn(v, s.beta2), __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bc2_sqrt), s.eps);
  return __fadd_rn(p, __fdiv_rn(__fmul_rn(s.neg_step_size, m), denom));
}

template <typename T>
__global__ void adamw_kernel(AdamWLaunch a) {
  T* param = static_cast<T*>(a.param);
  const T* grad = static_cast<const T*>(a.grad);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < a.count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float m = a.m[i];
    float v = a.v[i];
    const float p = adamw_element(a.s, Elem<T>::load(grad[i]), Elem<T>::load(param[i]), m, v);
    a.m[i] = m;
    a.v[i] = v;
    param[i] = Elem<T>::store(p);
  }
}

constexpr int kBlock8 = 256;  // peftreg::paged::kQuantBlock

// Number of midpoints below q (mid[255] = +inf): the code nearest to q, ties to the lower.
__device__ __forceinline__ int encode(const float* mid, float q) {
  int idx = 0;
#pragma unroll
  for (int step = 128; step >= 1; step >>= 1) {
    if (mid[idx + step - 1] < q) {
      idx += step;
    }
  }
  return idx;
}

// x times the reciprocal of its block's absmax, as the CPU's encode_block: a division only
// where the absmax has no finite reciprocal, and scale 1 for an all-zero block.
__device__ __forceinline__ float normalized(float x, float absmax) {
  const float scale = absmax > 0.0f ? __fdiv_rn(1.0f, absmax) : 1.0f;
  return isinf(scale) ? __fdiv_rn(x, absmax) : __fmul_rn(x, scale);
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
  scratch[threadIdx.x] = x;
  __syncthreads();
  for (int width = kBlock8 / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) {
      scratch[threadIdx.x] = fmaxf(scratch[threadIdx.x], scratch[threadIdx.x + width]);
    }
    __syncthreads();
  }
  const float out = scratch[0];
  __syncthreads();
  return out;
}

template <typename T>
__global__ void __launch_bounds__(kBlock8) adamw8_kernel(AdamW8Launch a) {
  __shared__ float code1[256], code2[256], mid1[256], mid2[256], scratch[kBlock8];
  const int t = threadIdx.x;
  code1[t] = a.map1[t];
  code2[t] = a.map2[t];
  __syncthreads();
  mid1[t] = t < 255 ? __fmul_rn(__fadd_rn(code1[t], code1[t + 1]), 0.5f) : __int_as_float(0x7f800000);
  mid2[t] = t < 255 ? __fmul_rn(__fadd_rn(code2[t], code2[t + 1]), 0.5f) : __int_as_float(0x7f800000);
  __syncthreads();
  const int64_t block = blockIdx.x;
  const int64_t i = block * kBlock8 + t;
  const bool live = i < a.count;
  float mi = 0.0f;
  float vi = 0.0f;
  if (live) {
    T* param = static_cast<T*>(a.param);
    const T* grad = static_cast<const T*>(a.grad);
    mi = __fmul_rn(code1[a.c1[i]], a.a1[block]);
    vi = __fmul_rn(code2[a.c2[i]], a.a2[block]);
    param[i] = Elem<T>::store(
        adamw_element(a.s, Elem<T>::load(grad[i]), Elem<T>::load(param[i]), mi, vi));
  }
  // Every thread takes part in the reductions; the slack of a partial block counts as 0.
  const float max1 = block_max(live ? fabsf(mi) : 0.0f, scratch);
  const float max2 = block_max(live ? fabsf(vi) : 0.0f, scratch);
  if (live) {
    a.c1[i] = static_cast<unsigned char>(encode(mid1, normalized(mi, max1)));
    a.c2[i] = static_cast<unsigned char>(encode(mid2, normalized(vi, max2)));
  }
  if (t == 0) {
    a.a1[block] = max1;
    a.a2[block] = max2;
  }
}

// Calls launch(T{}) with T the storage type of `dtype`, then reports the launch's error.
template <typename Launch>
cudaError_t dispatch(ScalarKind dtype, Launch&& launch) {
  return cuda_common::with_storage_type(dtype, [&](auto tag) {
    if constexpr (std::is_same_v<decltype(tag), double>) {
      return cudaErrorInvalidValue;  // ParamDType has no float64, so no kernel is built for it
    } else {
      launch(tag);
      return cudaGetLastError();
    }
  });
}

}  // namespace

cudaError_t launch_adamw8(const AdamW8Launch& args, cudaStream_t stream) {
  if (args.count <= 0) {
    return cudaSuccess;
  }
  const int64_t blocks = (args.count + kBlock8 - 1) / kBlock8;
  if (blocks > 2147483647LL) {
    return cudaErrorInvalidValue;
  }
  const unsigned grid = static_cast<unsigned>(blocks);
  return dispatch(args.dtype, [&](auto tag) {
    adamw8_kernel<decltype(tag)><<<grid, kBlock8, 0, stream>>>(args);
  });
}

cudaError_t launch_adamw(const AdamWLaunch& args, cudaStream_t stream) {
  if (args.count <= 0) {
    return cudaSuccess;
  }
  const int64_t wanted = (args.count + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < 65535 ? wanted : 65535);
  return dispatch(args.dtype, [&](auto tag) {
    adamw_kernel<decltype(tag)><<<blocks, kThreads, 0, stream>>>(args);
  });
}

}  // namespace peftreg::paged::cuda
