// SPDX-License-Identifier: Apache-2.0
//
// The fused AdamW update of one resident page on the GPU; same maths and order as the CPU
// update in page_pool_cpu.cpp (torch.optim.AdamW's single-tensor step). Explicitly rounded
// intrinsics keep nvcc from contracting the steps into FMAs, as -ffp-contract=off does on
// the CPU.
#include "paged/page_pool_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace peftreg::paged::cuda {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

template <typename T>
__global__ void adamw_kernel(AdamWLaunch a) {
  T* param = static_cast<T*>(a.param);
  const T* grad = static_cast<const T*>(a.grad);
  const float w = a.one_minus_beta1;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < a.count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float g = to_float(grad[i]);
    if (a.maximize) {
      g = -g;
    }
    float p = __fmul_rn(to_float(param[i]), a.decay);
    const float m0 = a.m[i];
    const float mi = w < 0.5f ? __fadd_rn(m0, __fmul_rn(w, __fsub_rn(g, m0)))
                              : __fsub_rn(g, __fmul_rn(__fsub_rn(g, m0), __fsub_rn(1.0f, w)));
    const float vi = __fadd_rn(__fmul_rn(a.v[i], a.beta2),
                               __fmul_rn(__fmul_rn(a.one_minus_beta2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), a.bc2_sqrt), a.eps);
    p = __fadd_rn(p, __fdiv_rn(__fmul_rn(a.neg_step_size, mi), denom));
    a.m[i] = mi;
    a.v[i] = vi;
    param[i] = from_float<T>(p);
  }
}

}  // namespace

cudaError_t launch_adamw(const AdamWLaunch& args, cudaStream_t stream) {
  if (args.count <= 0) {
    return cudaSuccess;
  }
  const int64_t wanted = (args.count + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < 65535 ? wanted : 65535);
  switch (args.dtype) {
    case 0:
      adamw_kernel<float><<<blocks, kThreads, 0, stream>>>(args);
      break;
    case 1:
      adamw_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(args);
      break;
    case 2:
      adamw_kernel<__half><<<blocks, kThreads, 0, stream>>>(args);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace peftreg::paged::cuda
