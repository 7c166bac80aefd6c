// SPDX-License-Identifier: Apache-2.0
//
// The per-device kernel table of the NF4 storage ops. nf4_ops.cpp checks the arguments
// (nf4_args.h), makes them contiguous, allocates the outputs and calls the table of the input's
// device: nf4_cpu.cpp (always) or nf4_cuda_ops.cpp (CUDA builds). The LoRA-on-NF4 kernels
// (csrc/fused/qlora_cpu.cpp, lora_cuda_ops.cpp) call `product` of their device's table too.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "nf4/nf4_args.h"

namespace peftreg::nf4 {

struct Nf4Kernels {
  // codes ((n + 1) / 2, 1) and absmax (blocks,) of the contiguous x; returns the first block
  // holding NaN or infinity (the entry reports it), or -1.
  int64_t (*quantize)(const at::Tensor& x, int64_t blocksize, at::Tensor& codes,
                      at::Tensor& absmax);
  // codes (n,) and nested (ceil(n / nested_blocksize),) of the finite, contiguous float32
  // absmax - offset, offset a 0-dim float32 tensor on absmax's device.
  void (*double_quantize)(const at::Tensor& absmax, const at::Tensor& offset,
                          int64_t nested_blocksize, bool nearest, at::Tensor& codes,
                          at::Tensor& nested);
  // The contiguous out (w.sizes.numel elements, a supported float dtype) = the dense weight.
  void (*dequantize)(const Nf4Weight& w, at::Tensor& out);
  // input2d (rows, k) @ op(W) for W (out_features, in_features): W^T when `forward` (k =
  // in_features, result (rows, out_features)), else W (k = out_features, result (rows,
  // in_features)). The result is unrounded: float32 (float64 for float64 input), except where
  // a device multiplies decoded tiles in the input's dtype (many rows of bf16/fp16: CUDA always,
  // the CPU where it has arithmetic for the dtype): then it is rounded to the input's dtype.
  at::Tensor (*product)(const Nf4Weight& w, const at::Tensor& input2d, int64_t out_features,
                        int64_t in_features, bool forward);
};

const Nf4Kernels& cpu_nf4_kernels();

// Whether the CPU table's product over `rows` rows of dtype t multiplies tiles decoded into t
// and returns its result rounded to t (many rows of bf16/fp16 on a CPU with arithmetic for
// them, or PEFTREG_CPU_WIDEN_16BIT=0; nf4_cpu.cpp).
bool cpu_products_in_16bit(at::ScalarType t, int64_t rows);
#if PEFTREG_WITH_CUDA
const Nf4Kernels& cuda_nf4_kernels();
#endif

// nf4_linear's rows: x2d (rows, in_features) @ W^T + bias, rounded once to x2d's dtype.
inline at::Tensor nf4_linear_rows(const Nf4Kernels& k, const Nf4Weight& w, const at::Tensor& x2d,
                                  const std::optional<at::Tensor>& bias, int64_t out_features,
                                  int64_t in_features) {
  at::Tensor y = k.product(w, x2d, out_features, in_features, /*forward=*/true);
  if (bias.has_value()) y.add_(bias->to(y.scalar_type()));
  return y.to(x2d.scalar_type());
}

}  // namespace peftreg::nf4
