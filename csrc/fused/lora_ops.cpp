// SPDX-License-Identifier: Apache-2.0
//
// The one entry of lora_linear, lora_linear_backward, nf4_lora_linear and
// nf4_lora_linear_backward (schemas in csrc/registration.cpp): argument and dropout checks
// written once and registered for CPU and, in CUDA builds, CUDA; the kernels come from the
// device's table (lora_kernels.h).

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "common/device_table.h"
#include "fused/lora_args.h"
#include "fused/lora_dropout.h"
#include "fused/lora_kernels.h"
#include "fused/lora_math.h"
#include "fused/qlora_args.h"
#include "nf4/nf4_args.h"

namespace peftreg::fused {
namespace {

const LoraKernels& kernels(const at::Tensor& t, const char* op) {
  return kernels_for(t, op, cpu_lora_kernels(), PEFTREG_CUDA_TABLE(cuda_lora_kernels));
}

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                       const at::Tensor& lora_b, double scaling,
                       const std::optional<at::Tensor>& x_lora, double dropout_p,
                       const std::optional<at::Tensor>& dropout_seed) {
  const LoraLinearSizes s = check_lora_linear_args(x, weight, bias, lora_a, lora_b, x_lora);
  const LoraDropout dropout = lora_dropout_args(kLoraLinearOp, dropout_p, dropout_seed, x_lora);
  const at::Tensor y = kernels(x, kLoraLinearOp)
                           .lora_linear(s, x, weight, bias, lora_a, lora_b, scaling, x_lora,
                                        dropout);
  return y.view(s.out_shape);
}

LoraGrads lora_linear_backward(const at::Tensor& grad, const std::optional<at::Tensor>& x,
                               const std::optional<at::Tensor>& weight,
                               const at::Tensor& lora_a, const at::Tensor& lora_b,
                               double scaling, const std::optional<at::Tensor>& x_lora,
                               std::array<bool, 4> output_mask, double dropout_p,
                               const std::optional<at::Tensor>& dropout_seed) {
  const LoraBackwardSizes s = check_lora_backward_args(grad, x, weight, lora_a, lora_b, x_lora,
                                                       output_mask);
  const LoraDropout dropout = lora_dropout_args(kLoraBackwardOp, dropout_p, dropout_seed, x_lora);
  return kernels(grad, kLoraBackwardOp)
      .lora_linear_backward(s, grad, x, weight, lora_a, lora_b, scaling, x_lora, dropout);
}

at::Tensor nf4_lora_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& offset, int64_t blocksize,
                           int64_t nested_blocksize, int64_t out_features, int64_t in_features,
                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                           const at::Tensor& lora_b, double scaling,
                           const std::optional<at::Tensor>& x_lora, double dropout_p,
                           const std::optional<at::Tensor>& dropout_seed) {
  const Nf4LoraSizes s = check_nf4_lora_args(x, codes, absmax, nested_absmax, offset, blocksize,
                                             nested_blocksize, out_features, in_features, bias,
                                             lora_a, lora_b, x_lora);
  const LoraDropout dropout = lora_dropout_args(kNf4LoraOp, dropout_p, dropout_seed, x_lora);
  const at::Tensor y = kernels(x, kNf4LoraOp)
                           .nf4_lora_linear(s, x, bias, lora_a, lora_b, scaling, x_lora, dropout);
  return y.view(s.out_shape);
}

LoraGrads nf4_lora_linear_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& x, const at::Tensor& codes,
    const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t nested_blocksize,
    int64_t out_features, int64_t in_features, const at::Tensor& lora_a,
    const at::Tensor& lora_b, double scaling, const std::optional<at::Tensor>& x_lora,
    std::array<bool, 4> output_mask, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {
  const LoraBackwardSizes s = check_lora_backward_args(grad, x, std::nullopt, lora_a, lora_b,
                                                       x_lora, output_mask, kNf4LoraBackwardOp,
                                                       /*weight_needed=*/false);
  const LoraDropout dropout = lora_dropout_args(kNf4LoraBackwardOp, dropout_p, dropout_seed,
                                                x_lora);
  TORCH_CHECK(s.out_features == out_features && s.in_features == in_features,
              kNf4LoraBackwardOp, ": grad has ", s.out_features, " features and lora_a ",
              s.in_features, " but the weight is (", out_features, ", ", in_features, ")");
  nf4::Nf4Weight weight;
  if (s.need[kGradX]) {
    weight = nf4::checked_weight(kNf4LoraBackwardOp, grad, "grad", codes, absmax, nested_absmax,
                                 offset, blocksize, nested_blocksize, out_features * in_features);
  }
  return kernels(grad, kNf4LoraBackwardOp)
      .nf4_lora_linear_backward(s, grad, x, weight, lora_a, lora_b, scaling, x_lora, dropout);
}

void impl_lora_ops(torch::Library& m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
  m.impl("nf4_lora_linear", &nf4_lora_linear);
  m.impl("nf4_lora_linear_backward", &nf4_lora_linear_backward);
}

}  // namespace
}  // namespace peftreg::fused

PEFTREG_IMPL_CPU_AND_CUDA(peftreg::fused::impl_lora_ops)
