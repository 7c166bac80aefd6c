// SPDX-License-Identifier: Apache-2.0
//
// Argument validation and size bookkeeping for peftreg::lora_linear and its backward, run once
// by their entries (lora_ops.cpp) for every device. The fake kernels in peftreg/ops/lora.py
// mirror it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/SmallVector.h>

#include <array>
#include <cstdint>
#include <optional>

#include "common/checks.h"

namespace peftreg::fused {

inline constexpr const char* kLoraLinearOp = "peftreg::lora_linear";
inline constexpr const char* kLoraBackwardOp = "peftreg::lora_linear_backward";

struct LoraLinearSizes {
  int64_t rows = 0;          // product of x's leading dimensions
  int64_t in_features = 0;   // x.shape[-1]
  int64_t out_features = 0;  // weight.shape[0]
  int64_t rank = 0;          // lora_a.shape[0]
  c10::SmallVector<int64_t, 6> out_shape;  // (*x.shape[:-1], out_features)
};

// Validates every argument of lora_linear against x and returns the problem sizes.
// Order: ranks of tensors, then shapes, then dtypes, then devices, so the first message a user
// sees is about the most basic mistake.
inline LoraLinearSizes check_lora_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const at::Tensor& lora_a, const at::Tensor& lora_b,
                                              const std::optional<at::Tensor>& x_lora) {
  namespace ck = peftreg::checks;
  const char* op = kLoraLinearOp;
  ck::check_min_dim(x, op, "x", 1, "(..., in_features)");
  ck::check_dim(weight, op, "weight", 2, "(out_features, in_features)");
  ck::check_dim(lora_a, op, "lora_a", 2, "(r, in_features)");
  ck::check_dim(lora_b, op, "lora_b", 2, "(out_features, r)");

  LoraLinearSizes s;
  s.in_features = x.size(-1);
  s.out_features = weight.size(0);
  s.rank = lora_a.size(0);
  s.rows = ck::leading_rows(x);
  s.out_shape = ck::with_last(x, s.out_features);

  ck::check_size(weight, op, "weight", 1, s.in_features, "(out_features, in_features)",
                 "in_features = x.shape[-1]");
  ck::check_size(lora_a, op, "lora_a", 1, s.in_features, "(r, in_features)",
                 "in_features = x.shape[-1]");
  ck::check_size(lora_b, op, "lora_b", 0, s.out_features, "(out_features, r)",
                 "out_features = weight.shape[0]");
  ck::check_size(lora_b, op, "lora_b", 1, s.rank, "(out_features, r)", "r = lora_a.shape[0]");
  ck::check_optional_vector(bias, op, "bias", s.out_features, "(out_features,)",
                            "out_features = weight.shape[0]");
  if (x_lora.has_value()) {
    ck::check_same_shape(*x_lora, op, "x_lora", x, "x");
  }
  ck::check_supported_dtype(x, op, "x");
  ck::check_like(op,
                 {{"weight", &weight}, {"lora_a", &lora_a}, {"lora_b", &lora_b},
                  {"bias", ck::opt(bias)}, {"x_lora", ck::opt(x_lora)}},
                 x, "x");
  return s;
}

struct LoraBackwardSizes {
  int64_t rows = 0;
  int64_t in_features = 0;   // lora_a.shape[1]
  int64_t out_features = 0;  // grad.shape[-1]
  c10::SmallVector<int64_t, 6> x_shape;  // (*grad.shape[:-1], in_features)
  std::array<bool, 4> need{};  // output_mask: grad_x, grad_lora_a, grad_lora_b, grad_x_lora
};

// Validates the backward's arguments. `op` names the calling op in messages (the NF4 variant
// shares these checks). `weight_needed` is false for a base whose input gradient the caller
// computes itself (the NF4 base).
inline LoraBackwardSizes check_lora_backward_args(
    const at::Tensor& grad, const std::optional<at::Tensor>& x,
    const std::optional<at::Tensor>& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const std::optional<at::Tensor>& x_lora, std::array<bool, 4> output_mask,
    const char* op = kLoraBackwardOp, bool weight_needed = true) {
  namespace ck = peftreg::checks;
  LoraBackwardSizes s;
  s.need = output_mask;
  ck::check_min_dim(grad, op, "grad", 1, "(..., out_features)");
  ck::check_dim(lora_a, op, "lora_a", 2, "(r, in_features)");
  ck::check_dim(lora_b, op, "lora_b", 2, "(out_features, r)");
  s.out_features = grad.size(-1);
  s.in_features = lora_a.size(1);
  s.rows = ck::leading_rows(grad);
  s.x_shape = ck::with_last(grad, s.in_features);
  ck::check_size(lora_b, op, "lora_b", 0, s.out_features, "(out_features, r)",
                 "out_features = grad.shape[-1]");
  ck::check_size(lora_b, op, "lora_b", 1, lora_a.size(0), "(out_features, r)",
                 "r = lora_a.shape[0]");
  const bool lora_input_needed = s.need[1] || s.need[2];
  const std::optional<at::Tensor>& lora_input = x_lora.has_value() ? x_lora : x;
  TORCH_CHECK(!lora_input_needed || lora_input.has_value(), op,
              ": the gradients of lora_a/lora_b need the LoRA input: pass x (or x_lora)");
  TORCH_CHECK(!(weight_needed && s.need[0]) || weight.has_value(), op,
              ": grad_x needs the base weight: pass weight");
  for (const auto* t : {&x, &x_lora}) {
    if (t->has_value()) {
      const char* name = t == &x ? "x" : "x_lora";
      TORCH_CHECK((*t)->sizes() == c10::IntArrayRef(s.x_shape), op, ": argument '", name,
                  "' must have shape ", c10::IntArrayRef(s.x_shape),
                  " (grad's leading dims, in_features) but has shape ", (*t)->sizes());
      ck::check_like(op, {{name, &**t}}, grad, "grad");
    }
  }
  if (weight_needed && weight.has_value()) {
    ck::check_dim(*weight, op, "weight", 2, "(out_features, in_features)");
    ck::check_size(*weight, op, "weight", 0, s.out_features, "(out_features, in_features)",
                   "out_features = grad.shape[-1]");
    ck::check_size(*weight, op, "weight", 1, s.in_features, "(out_features, in_features)",
                   "in_features = lora_a.shape[1]");
    ck::check_like(op, {{"weight", &*weight}}, grad, "grad");
  }
  ck::check_supported_dtype(grad, op, "grad");
  ck::check_like(op, {{"lora_a", &lora_a}, {"lora_b", &lora_b}}, grad, "grad");
  return s;
}

}  // namespace peftreg::fused
