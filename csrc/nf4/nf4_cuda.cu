// SPDX-License-Identifier: Apache-2.0
//
// CUDA kernels of the peftreg::nf4_* ops (schemas in nf4_ops.cpp, torch glue in
// nf4_cuda_ops.cpp, format in nf4_format.h). No torch header: nvcc compiles this file alone.
//
// The kernels reproduce the CPU kernels' bytes and values: the same float32 scaling (reciprocal
// for full blocks, division for the trailing partial block; IEEE division, nvcc's default), the
// same midpoint comparisons, and scales formed with explicitly rounded intrinsics
// (__fmul_rn/__fadd_rn), which nvcc never contracts into a fused multiply-add.
//
// * quantize / double_quantize: one thread block per quantization block (shared-memory max).
// * dequantize: one thread per output element; any sub-range of the flattened weight, so the
//   glue can decode a tile of weight rows for the large-batch GEMM path.
// * gemv_forward: one warp per output row, decoding the row's codes on the fly.
// * gemv_grad_input: one thread per input column, walking the output rows.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "common/cuda_elem.cuh"
#include "nf4/nf4_format.h"
#include "nf4/nf4_kernels.h"

namespace peftreg::nf4::cuda {
namespace {

__constant__ float c_nf4_code[kCodes] = {PEFTREG_NF4_CODE_VALUES};

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535;

using cuda_common::Elem;  // common/cuda_elem.cuh, shared with the LoRA and adapter kernels
using cuda_common::with_storage_type;

__device__ __forceinline__ void nf4_midpoints(float* mid) {
  for (int i = 0; i < kCodes - 1; ++i) {
    mid[i] = __fmul_rn(__fadd_rn(c_nf4_code[i], c_nf4_code[i + 1]), 0.5f);
  }
}

// The float32 scale of block b (nf4_format.h: fp32(fp32(code * nested) + offset) with DQ).
__device__ __forceinline__ float block_scale(const WeightArgs& w, int64_t b, int nested_shift) {
  if (w.absmax != nullptr) return w.absmax[b];
  const float product = __fmul_rn(w.dynamic_code[w.absmax_codes[b]], w.nested[b >> nested_shift]);
  return __fadd_rn(product, *w.offset);
}

// The float32 value of flattened weight element e.
__device__ __forceinline__ float weight_value(const WeightArgs& w, int64_t e, int block_shift,
                                              int nested_shift) {
  const uint8_t byte = w.codes[e >> 1];
  const int nibble = (e & 1) ? (byte & 0x0F) : (byte >> 4);
  return __fmul_rn(c_nf4_code[nibble], block_scale(w, e >> block_shift, nested_shift));
}

// Block-wide max of non-negative values and AND of flags; every thread gets the result.
__device__ __forceinline__ void block_reduce(float& value, int& flag) {
  __shared__ float s_value[kThreads];
  __shared__ int s_flag[kThreads];
  s_value[threadIdx.x] = value;
  s_flag[threadIdx.x] = flag;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      s_value[threadIdx.x] = fmaxf(s_value[threadIdx.x], s_value[threadIdx.x + stride]);
      s_flag[threadIdx.x] = s_flag[threadIdx.x] & s_flag[threadIdx.x + stride];
    }
    __syncthreads();
  }
  value = s_value[0];
  flag = s_flag[0];
  __syncthreads();
}

template <typename T>
__global__ void quantize_kernel(const T* __restrict__ x, int64_t n, int64_t blocksize,
                                uint8_t* __restrict__ codes, float* __restrict__ absmax,
                                long long* bad_block) {
  float mid[kCodes - 1];
  nf4_midpoints(mid);
  const int64_t blocks = num_blocks(n, blocksize);
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t first = b * blocksize;
    const int64_t len = n - first < blocksize ? n - first : blocksize;
    float amax = 0.0f;
    int finite = 1;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      const float v = fabsf(Elem<T>::load(x[first + i]));
      finite &= (v <= FLT_MAX) ? 1 : 0;
      amax = fmaxf(amax, v);
    }
    block_reduce(amax, finite);
    if (!finite) {
      if (threadIdx.x == 0) atomicMin(reinterpret_cast<unsigned long long*>(bad_block),
                                      static_cast<unsigned long long>(b));
      continue;
    }
    const bool full = len == blocksize;
    if (threadIdx.x == 0) absmax[b] = stored_absmax(amax, full);
    const float divisor = fmaxf(amax, kMinAbsmax);
    const float inv = 1.0f / divisor;
    for (int64_t p = threadIdx.x; p < (len + 1) / 2; p += blockDim.x) {
      const int64_t i = 2 * p;
      const int hi = nf4_nearest(scale_clamped(Elem<T>::load(x[first + i]), full, inv, divisor),
                                 mid);
      const int lo = i + 1 < len
                         ? nf4_nearest(scale_clamped(Elem<T>::load(x[first + i + 1]), full, inv,
                                                     divisor),
                                       mid)
                         : kZeroCode;
      codes[first / 2 + p] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
}

__global__ void double_quantize_kernel(const float* __restrict__ absmax, int64_t n,
                                       const float* __restrict__ offset, int64_t nested_blocksize,
                                       const float* __restrict__ dynamic_bounds, bool nearest,
                                       uint8_t* __restrict__ codes, float* __restrict__ nested) {
  __shared__ float bounds[kDynamicCodes - 1];
  for (int i = threadIdx.x; i < kDynamicCodes - 1; i += blockDim.x) bounds[i] = dynamic_bounds[i];
  __syncthreads();
  const float off = *offset;
  const int64_t blocks = num_blocks(n, nested_blocksize);
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t first = b * nested_blocksize;
    const int64_t len = n - first < nested_blocksize ? n - first : nested_blocksize;
    float amax = 0.0f;
    int unused = 1;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      amax = fmaxf(amax, fabsf(__fsub_rn(absmax[first + i], off)));
    }
    block_reduce(amax, unused);
    if (threadIdx.x == 0) nested[b] = amax;
    const bool full = len == nested_blocksize;
    const float divisor = fmaxf(amax, kMinAbsmax);
    const float inv = 1.0f / divisor;
    // bitsandbytes' CPU quantizer multiplies by the float32 reciprocal of the raw absmax
    // (0 * (1 / 0) is NaN, code 0).
    const float inv_raw = __fdiv_rn(1.0f, amax);
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      const float r = __fsub_rn(absmax[first + i], off);
      const float s = nearest ? scale_clamped(r, full, inv, divisor) : __fmul_rn(r, inv_raw);
      codes[first + i] = static_cast<uint8_t>(dynamic_index(s, bounds));
    }
  }
}

template <typename T>
__global__ void dequantize_kernel(WeightArgs w, int64_t first, int64_t count, int block_shift,
                                  int nested_shift, T* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    out[i] = Elem<T>::store(weight_value(w, first + i, block_shift, nested_shift));
  }
}

template <typename T>
__global__ void gemv_forward_kernel(WeightArgs w, const T* __restrict__ x, int64_t rows,
                                    int64_t out_features, int64_t in_features, int block_shift,
                                    int nested_shift, typename Elem<T>::Acc* __restrict__ acc) {
  using Acc = typename Elem<T>::Acc;
  const int warps = blockDim.x / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32; o < out_features;
       o += static_cast<int64_t>(gridDim.x) * warps) {
    Acc sum[kMaxGemvRows];
    for (int r = 0; r < kMaxGemvRows; ++r) sum[r] = Acc(0);
    for (int64_t k = lane; k < in_features; k += 32) {
      const Acc wv = static_cast<Acc>(weight_value(w, o * in_features + k, block_shift,
                                                   nested_shift));
      for (int r = 0; r < kMaxGemvRows; ++r) {
        if (r < rows) sum[r] += wv * static_cast<Acc>(Elem<T>::load(x[r * in_features + k]));
      }
    }
    for (int r = 0; r < kMaxGemvRows; ++r) {
      if (r >= rows) break;
      Acc v = sum[r];
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
      if (lane == 0) acc[r * out_features + o] = v;
    }
  }
}

template <typename T>
__global__ void gemv_grad_input_kernel(WeightArgs w, const T* __restrict__ g, int64_t rows,
                                       int64_t out_features, int64_t in_features, int block_shift,
                                       int nested_shift, typename Elem<T>::Acc* __restrict__ acc) {
  using Acc = typename Elem<T>::Acc;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < in_features;
       k += stride) {
    Acc sum[kMaxGemvRows];
    for (int r = 0; r < kMaxGemvRows; ++r) sum[r] = Acc(0);
    for (int64_t o = 0; o < out_features; ++o) {
      const Acc wv = static_cast<Acc>(weight_value(w, o * in_features + k, block_shift,
                                                   nested_shift));
      for (int r = 0; r < kMaxGemvRows; ++r) {
        if (r < rows) sum[r] += static_cast<Acc>(Elem<T>::load(g[r * out_features + o])) * wv;
      }
    }
    for (int r = 0; r < kMaxGemvRows; ++r) {
      if (r < rows) acc[r * in_features + k] = sum[r];
    }
  }
}

unsigned grid_for(int64_t work, int64_t per_block) {
  int64_t blocks = (work + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks > kMaxGrid ? kMaxGrid : blocks);
}

bool valid_weight(const WeightArgs& w) {
  if (w.codes == nullptr || !valid_blocksize(w.blocksize)) return false;
  if (w.absmax != nullptr) return true;
  return w.absmax_codes != nullptr && w.nested != nullptr && w.offset != nullptr &&
         w.dynamic_code != nullptr && valid_blocksize(w.nested_blocksize);
}

int nested_shift_of(const WeightArgs& w) {
  return w.absmax != nullptr ? 0 : log2_pow2(w.nested_blocksize);
}

}  // namespace

void host_dynamic_code(float* code256, float* mid255, float* bnb255) {
  fill_dynamic_code(code256, mid255);
  fill_bnb_dynamic_bounds(bnb255);
}

cudaError_t quantize(ScalarKind dtype, const void* x, int64_t n, int64_t blocksize,
                     uint8_t* codes, float* absmax, long long* bad_block, cudaStream_t stream) {
  if (!valid_blocksize(blocksize) || n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const unsigned grid = grid_for(num_blocks(n, blocksize), 1);
  return with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    // nf4_quantize's checks refuse float64 (nf4_kernels.h), so no kernel is built for it.
    if constexpr (std::is_same_v<T, double>) {
      return cudaErrorInvalidValue;
    } else {
      quantize_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), n, blocksize,
                                                        codes, absmax, bad_block);
      return cudaGetLastError();
    }
  });
}

cudaError_t double_quantize(const float* absmax, int64_t n, const float* offset,
                            int64_t nested_blocksize, const float* bounds, bool nearest,
                            uint8_t* absmax_codes, float* nested, cudaStream_t stream) {
  if (!valid_blocksize(nested_blocksize) || n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const unsigned grid = grid_for(num_blocks(n, nested_blocksize), 1);
  double_quantize_kernel<<<grid, kThreads, 0, stream>>>(absmax, n, offset, nested_blocksize,
                                                        bounds, nearest, absmax_codes, nested);
  return cudaGetLastError();
}

cudaError_t dequantize(const WeightArgs& w, int64_t first, int64_t count, ScalarKind dtype,
                       void* out, cudaStream_t stream) {
  if (!valid_weight(w) || first < 0 || count < 0 || first + count > w.numel) {
    return cudaErrorInvalidValue;
  }
  if (count == 0) return cudaSuccess;
  const unsigned grid = grid_for(count, kThreads);
  const int bs = log2_pow2(w.blocksize);
  const int ns = nested_shift_of(w);
  return with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_kernel<T><<<grid, kThreads, 0, stream>>>(w, first, count, bs, ns,
                                                        static_cast<T*>(out));
    return cudaGetLastError();
  });
}

namespace {

template <typename T>
cudaError_t launch_gemv(bool forward, const WeightArgs& w, const void* input, int64_t rows,
                        int64_t out_features, int64_t in_features, void* acc,
                        cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  const int bs = log2_pow2(w.blocksize);
  const int ns = nested_shift_of(w);
  if (forward) {
    const unsigned grid = grid_for(out_features, kThreads / 32);
    gemv_forward_kernel<T><<<grid, kThreads, 0, stream>>>(w, static_cast<const T*>(input), rows,
                                                          out_features, in_features, bs, ns,
                                                          static_cast<Acc*>(acc));
  } else {
    const unsigned grid = grid_for(in_features, kThreads);
    gemv_grad_input_kernel<T><<<grid, kThreads, 0, stream>>>(
        w, static_cast<const T*>(input), rows, out_features, in_features, bs, ns,
        static_cast<Acc*>(acc));
  }
  return cudaGetLastError();
}

cudaError_t gemv(bool forward, const WeightArgs& w, ScalarKind dtype, const void* input,
                 int64_t rows, int64_t out_features, int64_t in_features, void* acc,
                 cudaStream_t stream) {
  if (!valid_weight(w) || rows < 0 || rows > kMaxGemvRows || out_features < 0 ||
      in_features < 0 || w.numel != out_features * in_features) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || out_features == 0 || in_features == 0) return cudaSuccess;
  return with_storage_type(dtype, [&](auto tag) {
    return launch_gemv<decltype(tag)>(forward, w, input, rows, out_features, in_features, acc,
                                      stream);
  });
}

}  // namespace

cudaError_t gemv_forward(const WeightArgs& w, ScalarKind dtype, const void* x, int64_t rows,
                         int64_t out_features, int64_t in_features, void* acc,
                         cudaStream_t stream) {
  return gemv(true, w, dtype, x, rows, out_features, in_features, acc, stream);
}

cudaError_t gemv_grad_input(const WeightArgs& w, ScalarKind dtype, const void* g, int64_t rows,
                            int64_t out_features, int64_t in_features, void* acc,
                            cudaStream_t stream) {
  return gemv(false, w, dtype, g, rows, out_features, in_features, acc, stream);
}

}  // namespace peftreg::nf4::cuda
