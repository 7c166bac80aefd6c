// SPDX-License-Identifier: Apache-2.0
//
// CUDA kernels of peftreg::lora_linear (schema in lora_ops.cpp, torch glue in
// lora_cuda_ops.cpp). No torch header is included here: the launch API in lora_kernels.h takes
// plain pointers, so this file compiles with nvcc alone.
//
//   y = x @ W^T + bias + scaling * (x_l @ A^T) @ B^T,   x_l = x_lora or x   (Hu et al. 2021, eq. 3)
//
// Division of labour: the glue computes the base product x @ W^T + bias with one ATen addmm (a
// cuBLAS GEMM on tensor cores: a hand-written kernel would not come close on the largest
// product), and these kernels add the low-rank update in two launches, both shared-memory tiled
// products of the "NT" form C[i, j] = sum_k L[i, k] * R[j, k] (operands row-major with k
// contiguous, which is how nn.Linear stores weights):
//   1. project: workspace u = scaling * x_l @ A^T, a (rows x r) matrix kept in the accumulation
//      type (fp32, or fp64 for fp64 inputs), so half-precision u is never rounded;
//   2. update:  y = y + u @ B^T, reading and writing each output element once and rounding once.
// The dense (out x in) product B @ A is never formed. Compared with the unfused PyTorch
// expression this replaces four kernels and two (rows x out) temporaries by two kernels and a
// (rows x r) workspace. The kernels favour clarity over peak speed (no tensor cores, no
// double-buffering); the update is bandwidth-bound on y for the small ranks LoRA uses.
// The backward uses ATen matmuls (peftreg/ops/lora.py), so only the forward is needed here.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/cuda_elem.cuh"
#include "fused/lora_kernels.h"

namespace peftreg::fused::cuda {
namespace {

constexpr int kTile = 16;                     // 16 x 16 = 256 threads per block
constexpr int64_t kMaxGridX = 2147483647;     // rows / kTile blocks go on grid.x
constexpr int64_t kMaxGridY = 65535;          // out / kTile (or r / kTile) blocks go on grid.y

using peftreg::cuda_common::Elem;
using peftreg::cuda_common::with_storage_type;

// Returns sum_k lhs[row, k] * rhs[col, k] for this thread's output element, where
// row = blockIdx.x * kTile + threadIdx.y and col = blockIdx.y * kTile + threadIdx.x; lhs is
// (m, k) and rhs is (n, k), both dense row-major. Out-of-range rows/cols contribute zeros, so
// every thread of the block runs the same loop: it calls __syncthreads() and must not be skipped
// by any thread. The +1 padding keeps the column reads of rhs_tile free of bank conflicts.
template <typename Acc, typename TL, typename TR>
__device__ __forceinline__ Acc nt_tile_dot(const TL* __restrict__ lhs,
                                           const TR* __restrict__ rhs, int64_t m, int64_t n,
                                           int64_t k, Acc (*lhs_tile)[kTile + 1],
                                           Acc (*rhs_tile)[kTile + 1]) {
  const int tx = static_cast<int>(threadIdx.x);
  const int ty = static_cast<int>(threadIdx.y);
  const int64_t lhs_row = static_cast<int64_t>(blockIdx.x) * kTile + ty;
  const int64_t rhs_row = static_cast<int64_t>(blockIdx.y) * kTile + ty;
  Acc acc = Acc(0);
  for (int64_t k0 = 0; k0 < k; k0 += kTile) {
    const int64_t kk = k0 + tx;  // consecutive threads read consecutive k: coalesced
    lhs_tile[ty][tx] = (lhs_row < m && kk < k)
                           ? static_cast<Acc>(Elem<TL>::load(lhs[lhs_row * k + kk]))
                           : Acc(0);
    rhs_tile[ty][tx] = (rhs_row < n && kk < k)
                           ? static_cast<Acc>(Elem<TR>::load(rhs[rhs_row * k + kk]))
                           : Acc(0);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      acc += lhs_tile[ty][j] * rhs_tile[tx][j];
    }
    __syncthreads();
  }
  return acc;
}

// u = scaling * x_l @ A^T, shape (rows, rank), in the accumulation type.
template <typename T>
__global__ void __launch_bounds__(kTile* kTile)
    lora_project_kernel(const T* __restrict__ x_l, const T* __restrict__ lora_a,
                        typename Elem<T>::Acc* __restrict__ u, int64_t rows,
                        int64_t in_features, int64_t rank, typename Elem<T>::Acc scaling) {
  using Acc = typename Elem<T>::Acc;
  __shared__ Acc lhs_tile[kTile][kTile + 1];
  __shared__ Acc rhs_tile[kTile][kTile + 1];
  const Acc acc = nt_tile_dot<Acc>(x_l, lora_a, rows, rank, in_features, lhs_tile, rhs_tile);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.x;
  if (row < rows && col < rank) {
    u[row * rank + col] = scaling * acc;
  }
}

// y = y + u @ B^T, shape (rows, out_features): y holds the base product on entry.
template <typename T>
__global__ void __launch_bounds__(kTile* kTile)
    lora_update_kernel(const typename Elem<T>::Acc* __restrict__ u,
                       const T* __restrict__ lora_b, T* __restrict__ y, int64_t rows,
                       int64_t out_features, int64_t rank) {
  using Acc = typename Elem<T>::Acc;
  __shared__ Acc lhs_tile[kTile][kTile + 1];
  __shared__ Acc rhs_tile[kTile][kTile + 1];
  const Acc update = nt_tile_dot<Acc>(u, lora_b, rows, out_features, rank, lhs_tile, rhs_tile);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.x;
  if (row < rows && col < out_features) {
    T* out = y + row * out_features + col;
    *out = Elem<T>::store(static_cast<Acc>(Elem<T>::load(*out)) + update);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
cudaError_t launch(const LoraUpdateArgs& a, cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  if (a.rows < 0 || a.in_features < 0 || a.out_features < 0 || a.rank < 0) {
    return cudaErrorInvalidValue;
  }
  if (a.rows == 0 || a.out_features == 0 || a.rank == 0) {
    return cudaSuccess;  // nothing to add (and a zero-sized grid is invalid)
  }
  const int64_t row_blocks = ceil_div(a.rows, kTile);
  const int64_t out_blocks = ceil_div(a.out_features, kTile);
  const int64_t rank_blocks = ceil_div(a.rank, kTile);
  if (row_blocks > kMaxGridX || out_blocks > kMaxGridY || rank_blocks > kMaxGridY ||
      a.workspace == nullptr || a.y == nullptr || a.lora_b == nullptr ||
      (a.in_features > 0 && (a.x_lora == nullptr || a.lora_a == nullptr))) {
    return cudaErrorInvalidValue;
  }

  const T* x_l = static_cast<const T*>(a.x_lora);
  const T* lora_a = static_cast<const T*>(a.lora_a);
  const T* lora_b = static_cast<const T*>(a.lora_b);
  Acc* u = static_cast<Acc*>(a.workspace);
  T* y = static_cast<T*>(a.y);
  const dim3 block(kTile, kTile);

  const dim3 project_grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(rank_blocks));
  lora_project_kernel<T><<<project_grid, block, 0, stream>>>(
      x_l, lora_a, u, a.rows, a.in_features, a.rank, static_cast<Acc>(a.scaling));
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return err;
  }
  // Same stream: the update runs after the projection has written u.
  const dim3 update_grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(out_blocks));
  lora_update_kernel<T><<<update_grid, block, 0, stream>>>(u, lora_b, y, a.rows,
                                                           a.out_features, a.rank);
  return cudaGetLastError();
}

}  // namespace

std::size_t lora_update_workspace_bytes(ScalarKind dtype, int64_t rows, int64_t rank) {
  const std::size_t acc_bytes = dtype == ScalarKind::kFloat64 ? sizeof(double) : sizeof(float);
  if (rows <= 0 || rank <= 0) {
    return 0;
  }
  return static_cast<std::size_t>(rows) * static_cast<std::size_t>(rank) * acc_bytes;
}

cudaError_t lora_low_rank_update(const LoraUpdateArgs& args, cudaStream_t stream) {
  return with_storage_type(args.dtype,
                           [&](auto tag) { return launch<decltype(tag)>(args, stream); });
}

}  // namespace peftreg::fused::cuda
