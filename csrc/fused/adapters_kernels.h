// SPDX-License-Identifier: Apache-2.0
//
// The per-device kernel table of the IA3, Houlsby and multi-LoRA ops. adapters_ops.cpp checks
// the arguments (adapters_args.h), reshapes them to contiguous 2-D tensors, allocates the outputs
// and calls the table of the input's device: adapters_cpu.cpp (always) or adapters_cuda_ops.cpp
// (CUDA builds). A kernel writes its preallocated outputs and returns nothing.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "fused/adapters_args.h"

namespace peftreg::fused {

struct AdapterKernels {
  // y (rows, out) = (x2d * l) W^T + b (scale_input) or (x2d W^T + b) * l; l contiguous.
  void (*ia3_linear)(const Ia3Sizes& s, const at::Tensor& x2d, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                     bool scale_input, at::Tensor& y);
  // result (out) = sum over rows of g2d * (x2d W^T + b), recovered as y2d / l where l != 0.
  void (*ia3_scale_grad)(const Ia3Sizes& s, const at::Tensor& g2d, const at::Tensor& y2d,
                         const at::Tensor& x2d, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                         at::Tensor& result);
  // z (rows, m) = h2d Wd^T + bd; out (rows, hidden) = h2d + act(z) Wu^T + bu.
  void (*houlsby_adapter)(const HoulsbySizes& s, const at::Tensor& h2d, const at::Tensor& w_down,
                          const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                          const std::optional<at::Tensor>& b_up, Activation act, at::Tensor& z,
                          at::Tensor& out);
  // out (rows, out) = base2d + per row i with k = index[i] >= 0: s_k (x2d[i] A_k^T) B_k^T.
  // The kernel validates the index values (reading them costs a sync on CUDA).
  void (*lora_multi_add)(const LoraMultiSizes& s, const at::Tensor& base2d,
                         const at::Tensor& x2d, const at::Tensor& lora_a,
                         const at::Tensor& lora_b, const at::Tensor& scaling,
                         const at::Tensor& index, at::Tensor& out);
};

const AdapterKernels& cpu_adapter_kernels();
#if PEFTREG_WITH_CUDA
const AdapterKernels& cuda_adapter_kernels();
#endif

}  // namespace peftreg::fused
