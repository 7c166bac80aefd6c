// SPDX-License-Identifier: Apache-2.0
//
// The one entry of lora_linear, lora_linear_backward, nf4_lora_linear and
// nf4_lora_linear_backward (schemas at the end of this file): argument and dropout checks
// written once and registered for CPU and, in CUDA builds, CUDA; the kernels come from the
// device's table (lora_kernels.h).

#include <ATen/core/Tensor.h>
#include <ATen/core/enum_tag.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "common/device_table.h"
#include "fused/lora_dropout.h"
#include "fused/lora_kernels.h"
#include "fused/lora_math.h"
#include "nf4/nf4_kernels.h"

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

// The schemas of lora_linear, nf4_lora_linear and their backward ops.
// csrc/registration.cpp holds the one TORCH_LIBRARY(peftreg, m); each family adds its schemas
// by fragment beside its entries.
TORCH_LIBRARY_FRAGMENT(peftreg, m) {
  // Naming the family's Python module (its wrappers, fake kernels and backwards) before the
  // schemas makes a missing fake kernel point there (torch imports that module) and makes
  // torch refuse a fake registered anywhere else.
  m.set_python_module("peftreg.ops.lora");

  // y = x @ weight^T + bias + scaling * ((x_lora or x) @ lora_a^T) @ lora_b^T
  // (LoRA, Hu et al. 2021, eq. 3, with the alpha/r factor passed as `scaling`). x may have any
  // number of leading dims; x_lora is an input of the LoRA path computed by the caller, or
  // dropout_p > 0 applies dropout to x inside the op with a mask regenerated from dropout_seed
  // (an int64 tensor) in the backward (csrc/fused/lora_dropout.h). The kernels never form the
  // dense lora_b @ lora_a product.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scaling, Tensor? x_lora=None, float dropout_p=0., Tensor? dropout_seed=None) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
  // The gradients of lora_linear except the base weight's and bias's (computed with plain
  // matmuls by the autograd formula, since the base is normally frozen): grad_x (the base's
  // g @ W plus, when x_lora is None, the low-rank path's), grad_lora_a, grad_lora_b and
  // grad_x_lora, each only where output_mask asks for it (an empty tensor otherwise). x and
  // weight may be None when no requested gradient reads them.
  m.def(
      "lora_linear_backward(Tensor grad, Tensor? x, Tensor? weight, Tensor lora_a, "
      "Tensor lora_b, float scaling, Tensor? x_lora, bool[4] output_mask, float dropout_p=0., "
      "Tensor? dropout_seed=None) -> "
      "(Tensor grad_x, Tensor grad_lora_a, Tensor grad_lora_b, Tensor grad_x_lora)",
      {at::Tag::pt2_compliant_tag});

  // The NF4-base ops' Python side is the NF4 family's module (peftreg/ops/nf4.py).
  m.set_python_module("peftreg.ops.nf4");
  // LoRA on an NF4 base (QLoRA): nf4_linear's product plus lora_linear's low-rank update, all
  // summed in float32 and rounded once; W stays 4-bit. Differentiable in x, bias, lora_a,
  // lora_b and x_lora; the backward op has lora_linear_backward's contract (no weight
  // gradient: the quantized base is frozen).
  m.def(
      "nf4_lora_linear(Tensor x, Tensor codes, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? offset, int blocksize, int nested_blocksize, int out_features, int in_features, "
      "Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling, Tensor? x_lora=None, "
      "float dropout_p=0., Tensor? dropout_seed=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "nf4_lora_linear_backward(Tensor grad, Tensor? x, Tensor codes, Tensor absmax, "
      "Tensor? nested_absmax, Tensor? offset, int blocksize, int nested_blocksize, "
      "int out_features, int in_features, Tensor lora_a, Tensor lora_b, float scaling, "
      "Tensor? x_lora, bool[4] output_mask, float dropout_p=0., Tensor? dropout_seed=None) -> "
      "(Tensor grad_x, Tensor grad_lora_a, Tensor grad_lora_b, Tensor grad_x_lora)",
      {at::Tag::pt2_compliant_tag});

}

PEFTREG_IMPL_CPU_AND_CUDA(peftreg::fused::impl_lora_ops)
