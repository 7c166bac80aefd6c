// SPDX-License-Identifier: Apache-2.0
//
// The per-device kernel table of lora_linear, nf4_lora_linear and their backward ops.
// lora_ops.cpp checks the arguments (lora_args.h, qlora_args.h) and the dropout arguments once,
// then calls the table of the input's device: lora_cpu.cpp + qlora_cpu.cpp (always) or
// lora_cuda_ops.cpp (CUDA builds). Forward kernels return the (rows, out_features) output in
// x's dtype; the entry gives it x's leading dimensions.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "fused/lora_args.h"
#include "fused/lora_dropout.h"
#include "fused/lora_math.h"
#include "fused/qlora_args.h"

namespace peftreg::fused {

struct LoraKernels {
  at::Tensor (*lora_linear)(const LoraLinearSizes& s, const at::Tensor& x,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                            const std::optional<at::Tensor>& x_lora, const LoraDropout& dropout);
  LoraGrads (*lora_linear_backward)(const LoraBackwardSizes& s, const at::Tensor& grad,
                                    const std::optional<at::Tensor>& x,
                                    const std::optional<at::Tensor>& weight,
                                    const at::Tensor& lora_a, const at::Tensor& lora_b,
                                    double scaling, const std::optional<at::Tensor>& x_lora,
                                    const LoraDropout& dropout);
  // The NF4 base (s.weight, s.out_features x s.in_features) in place of weight.
  at::Tensor (*nf4_lora_linear)(const Nf4LoraSizes& s, const at::Tensor& x,
                                const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, double scaling,
                                const std::optional<at::Tensor>& x_lora,
                                const LoraDropout& dropout);
  // `weight` is checked (and read) only when s.need[kGradX].
  LoraGrads (*nf4_lora_linear_backward)(const LoraBackwardSizes& s, const at::Tensor& grad,
                                        const std::optional<at::Tensor>& x,
                                        const nf4::Nf4Weight& weight, const at::Tensor& lora_a,
                                        const at::Tensor& lora_b, double scaling,
                                        const std::optional<at::Tensor>& x_lora,
                                        const LoraDropout& dropout);
};

const LoraKernels& cpu_lora_kernels();
#if PEFTREG_WITH_CUDA
const LoraKernels& cuda_lora_kernels();
#endif

}  // namespace peftreg::fused
