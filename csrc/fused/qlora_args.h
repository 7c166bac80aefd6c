// SPDX-License-Identifier: Apache-2.0
//
// Argument checks of peftreg::nf4_lora_linear and its backward (LoRA on an NF4 base), run once
// by their entries (lora_ops.cpp) for every device: x, the quantized weight (nf4_args.h), bias
// and A/B, in the order of the fake kernel (peftreg/ops/nf4.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/SmallVector.h>

#include <cstdint>
#include <optional>

#include "common/checks.h"
#include "nf4/nf4_args.h"

namespace peftreg::fused {

inline constexpr const char* kNf4LoraOp = "peftreg::nf4_lora_linear";
inline constexpr const char* kNf4LoraBackwardOp = "peftreg::nf4_lora_linear_backward";

struct Nf4LoraSizes {
  int64_t rows = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  c10::SmallVector<int64_t, 6> out_shape;  // (*x.shape[:-1], out_features)
  nf4::Nf4Weight weight;
};

inline Nf4LoraSizes check_nf4_lora_args(const at::Tensor& x, const at::Tensor& codes,
                                        const at::Tensor& absmax,
                                        const std::optional<at::Tensor>& nested_absmax,
                                        const std::optional<at::Tensor>& offset,
                                        int64_t blocksize, int64_t nested_blocksize,
                                        int64_t out_features, int64_t in_features,
                                        const std::optional<at::Tensor>& bias,
                                        const at::Tensor& lora_a, const at::Tensor& lora_b,
                                        const std::optional<at::Tensor>& x_lora) {
  namespace ck = peftreg::checks;
  const char* op = kNf4LoraOp;
  const nf4::LinearSizes ls = nf4::check_linear_input(op, x, "x", in_features, "in_features",
                                                      out_features, in_features);
  Nf4LoraSizes s;
  s.weight = nf4::checked_weight(op, x, "x", codes, absmax, nested_absmax, offset, blocksize,
                                 nested_blocksize, out_features * in_features);
  nf4::check_bias(op, bias, x, out_features);
  ck::check_dim(lora_a, op, "lora_a", 2, "(r, in_features)");
  ck::check_dim(lora_b, op, "lora_b", 2, "(out_features, r)");
  ck::check_size(lora_a, op, "lora_a", 1, in_features, "(r, in_features)", "in_features");
  ck::check_size(lora_b, op, "lora_b", 0, out_features, "(out_features, r)", "out_features");
  ck::check_size(lora_b, op, "lora_b", 1, lora_a.size(0), "(out_features, r)",
                 "r = lora_a.shape[0]");
  if (x_lora.has_value()) ck::check_same_shape(*x_lora, op, "x_lora", x, "x");
  ck::check_like(op, {{"lora_a", &lora_a}, {"lora_b", &lora_b}, {"x_lora", ck::opt(x_lora)}}, x,
                 "x");
  s.rows = ls.rows;
  s.in_features = in_features;
  s.out_features = out_features;
  s.out_shape = ck::with_last(x, out_features);
  return s;
}

}  // namespace peftreg::fused
