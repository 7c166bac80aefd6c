// SPDX-License-Identifier: Apache-2.0
//
// Argument validation and sizes of the IA3, Houlsby and multi-LoRA ops, shared by the CPU kernels
// (adapters_cpu.cpp) and the CUDA glue (adapters_cuda_ops.cpp) so both devices reject the same
// inputs with the same messages. The fake kernels in peftreg/ops/adapters.py repeat these checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/SmallVector.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>

#include "common/checks.h"

namespace peftreg::fused {

inline constexpr const char* kIa3LinearOp = "peftreg::ia3_linear";
inline constexpr const char* kIa3ScaleGradOp = "peftreg::ia3_scale_grad";
inline constexpr const char* kHoulsbyOp = "peftreg::houlsby_adapter";
inline constexpr const char* kLoraMultiOp = "peftreg::lora_multi_add";

// The nonlinearities of plugins/houlsby.py; GELU is the exact (erf) form, as nn.GELU().
enum class Activation : int { kRelu = 0, kGelu = 1, kSilu = 2, kTanh = 3 };

inline Activation parse_activation(c10::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "silu") return Activation::kSilu;
  if (name == "tanh") return Activation::kTanh;
  TORCH_CHECK(false, kHoulsbyOp, ": argument 'activation' is '", std::string(name),
              "'; expected one of relu, gelu, silu, tanh");
  return Activation::kRelu;  // unreachable
}

inline int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

inline c10::SmallVector<int64_t, 6> with_last(const at::Tensor& t, int64_t last) {
  c10::SmallVector<int64_t, 6> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = last;
  return shape;
}

struct Ia3Sizes {
  int64_t rows = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
};

// ia3_linear(x, weight, bias, scale, scale_input): scale has in_features entries when the input
// is scaled, out_features when the output is.
inline Ia3Sizes check_ia3_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const at::Tensor& scale, bool scale_input) {
  namespace ck = peftreg::checks;
  const char* op = kIa3LinearOp;
  ck::check_min_dim(x, op, "x", 1, "(..., in_features)");
  ck::check_dim(weight, op, "weight", 2, "(out_features, in_features)");
  ck::check_dim(scale, op, "scale", 1, scale_input ? "(in_features,)" : "(out_features,)");
  Ia3Sizes s;
  s.rows = leading_rows(x);
  s.in_features = x.size(-1);
  s.out_features = weight.size(0);
  ck::check_size(weight, op, "weight", 1, s.in_features, "(out_features, in_features)",
                 "in_features = x.shape[-1]");
  if (scale_input) {
    ck::check_size(scale, op, "scale", 0, s.in_features, "(in_features,)",
                   "scale_input=True: in_features = x.shape[-1]");
  } else {
    ck::check_size(scale, op, "scale", 0, s.out_features, "(out_features,)",
                   "scale_input=False: out_features = weight.shape[0]");
  }
  if (bias.has_value()) {
    ck::check_dim(*bias, op, "bias", 1, "(out_features,)");
    ck::check_size(*bias, op, "bias", 0, s.out_features, "(out_features,)",
                   "out_features = weight.shape[0]");
  }
  ck::check_supported_dtype(x, op, "x");
  ck::check_same_dtype(weight, op, "weight", x, "x");
  ck::check_same_dtype(scale, op, "scale", x, "x");
  if (bias.has_value()) ck::check_same_dtype(*bias, op, "bias", x, "x");
  ck::check_same_device(weight, op, "weight", x, "x");
  ck::check_same_device(scale, op, "scale", x, "x");
  if (bias.has_value()) ck::check_same_device(*bias, op, "bias", x, "x");
  return s;
}

// ia3_scale_grad(grad, out, x, weight, bias, scale): the output-scaling case of ia3_linear;
// grad and out are (..., out_features) like the op's output.
inline Ia3Sizes check_ia3_scale_grad_args(const at::Tensor& grad, const at::Tensor& out,
                                          const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          const at::Tensor& scale) {
  namespace ck = peftreg::checks;
  const char* op = kIa3ScaleGradOp;
  ck::check_min_dim(x, op, "x", 1, "(..., in_features)");
  ck::check_dim(weight, op, "weight", 2, "(out_features, in_features)");
  ck::check_dim(scale, op, "scale", 1, "(out_features,)");
  Ia3Sizes s;
  s.rows = leading_rows(x);
  s.in_features = x.size(-1);
  s.out_features = weight.size(0);
  ck::check_size(weight, op, "weight", 1, s.in_features, "(out_features, in_features)",
                 "in_features = x.shape[-1]");
  ck::check_size(scale, op, "scale", 0, s.out_features, "(out_features,)",
                 "out_features = weight.shape[0]");
  const auto expected = with_last(x, s.out_features);
  TORCH_CHECK(out.sizes() == c10::IntArrayRef(expected), op,
              ": argument 'out' must have shape (*x.shape[:-1], out_features) = ",
              c10::IntArrayRef(expected), " but has shape ", out.sizes());
  ck::check_same_shape(grad, op, "grad", out, "out");
  if (bias.has_value()) {
    ck::check_dim(*bias, op, "bias", 1, "(out_features,)");
    ck::check_size(*bias, op, "bias", 0, s.out_features, "(out_features,)",
                   "out_features = weight.shape[0]");
  }
  ck::check_supported_dtype(x, op, "x");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad", &grad},
                                {"out", &out}, {"weight", &weight}, {"scale", &scale}}) {
    ck::check_same_dtype(*t, op, name, x, "x");
    ck::check_same_device(*t, op, name, x, "x");
  }
  if (bias.has_value()) {
    ck::check_same_dtype(*bias, op, "bias", x, "x");
    ck::check_same_device(*bias, op, "bias", x, "x");
  }
  return s;
}

struct HoulsbySizes {
  int64_t rows = 0;
  int64_t hidden = 0;
  int64_t bottleneck = 0;
};

// houlsby_adapter(h, w_down, b_down, w_up, b_up, activation)
inline HoulsbySizes check_houlsby_args(const at::Tensor& h, const at::Tensor& w_down,
                                       const std::optional<at::Tensor>& b_down,
                                       const at::Tensor& w_up,
                                       const std::optional<at::Tensor>& b_up) {
  namespace ck = peftreg::checks;
  const char* op = kHoulsbyOp;
  ck::check_min_dim(h, op, "h", 1, "(..., hidden)");
  ck::check_dim(w_down, op, "w_down", 2, "(bottleneck, hidden)");
  ck::check_dim(w_up, op, "w_up", 2, "(hidden, bottleneck)");
  HoulsbySizes s;
  s.rows = leading_rows(h);
  s.hidden = h.size(-1);
  s.bottleneck = w_down.size(0);
  ck::check_size(w_down, op, "w_down", 1, s.hidden, "(bottleneck, hidden)",
                 "hidden = h.shape[-1]");
  ck::check_size(w_up, op, "w_up", 0, s.hidden, "(hidden, bottleneck)", "hidden = h.shape[-1]");
  ck::check_size(w_up, op, "w_up", 1, s.bottleneck, "(hidden, bottleneck)",
                 "bottleneck = w_down.shape[0]");
  if (b_down.has_value()) {
    ck::check_dim(*b_down, op, "b_down", 1, "(bottleneck,)");
    ck::check_size(*b_down, op, "b_down", 0, s.bottleneck, "(bottleneck,)",
                   "bottleneck = w_down.shape[0]");
  }
  if (b_up.has_value()) {
    ck::check_dim(*b_up, op, "b_up", 1, "(hidden,)");
    ck::check_size(*b_up, op, "b_up", 0, s.hidden, "(hidden,)", "hidden = h.shape[-1]");
  }
  ck::check_supported_dtype(h, op, "h");
  ck::check_same_dtype(w_down, op, "w_down", h, "h");
  ck::check_same_dtype(w_up, op, "w_up", h, "h");
  if (b_down.has_value()) ck::check_same_dtype(*b_down, op, "b_down", h, "h");
  if (b_up.has_value()) ck::check_same_dtype(*b_up, op, "b_up", h, "h");
  ck::check_same_device(w_down, op, "w_down", h, "h");
  ck::check_same_device(w_up, op, "w_up", h, "h");
  if (b_down.has_value()) ck::check_same_device(*b_down, op, "b_down", h, "h");
  if (b_up.has_value()) ck::check_same_device(*b_up, op, "b_up", h, "h");
  return s;
}

struct LoraMultiSizes {
  int64_t rows = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t rank = 0;      // r_max: lora_a.shape[1]
  int64_t adapters = 0;  // n: lora_a.shape[0]
};

// lora_multi_add(base, x, lora_a, lora_b, scaling, index)
inline LoraMultiSizes check_lora_multi_args(const at::Tensor& base, const at::Tensor& x,
                                            const at::Tensor& lora_a, const at::Tensor& lora_b,
                                            const at::Tensor& scaling, const at::Tensor& index) {
  namespace ck = peftreg::checks;
  const char* op = kLoraMultiOp;
  ck::check_min_dim(x, op, "x", 1, "(..., in_features)");
  ck::check_dim(lora_a, op, "lora_a", 3, "(adapters, r, in_features)");
  ck::check_dim(lora_b, op, "lora_b", 3, "(adapters, out_features, r)");
  ck::check_dim(scaling, op, "scaling", 1, "(adapters,)");
  LoraMultiSizes s;
  s.rows = leading_rows(x);
  s.in_features = x.size(-1);
  s.adapters = lora_a.size(0);
  s.rank = lora_a.size(1);
  s.out_features = lora_b.size(1);
  ck::check_size(lora_a, op, "lora_a", 2, s.in_features, "(adapters, r, in_features)",
                 "in_features = x.shape[-1]");
  ck::check_size(lora_b, op, "lora_b", 0, s.adapters, "(adapters, out_features, r)",
                 "adapters = lora_a.shape[0]");
  ck::check_size(lora_b, op, "lora_b", 2, s.rank, "(adapters, out_features, r)",
                 "r = lora_a.shape[1]");
  ck::check_size(scaling, op, "scaling", 0, s.adapters, "(adapters,)",
                 "adapters = lora_a.shape[0]");
  const auto expected = with_last(x, s.out_features);
  TORCH_CHECK(base.sizes() == c10::IntArrayRef(expected), op,
              ": argument 'base' must have shape (*x.shape[:-1], out_features) = ",
              c10::IntArrayRef(expected), " but has shape ", base.sizes());
  TORCH_CHECK(index.dim() == x.dim() - 1 && index.sizes() == x.sizes().slice(0, x.dim() - 1),
              op, ": argument 'index' must have shape x.shape[:-1] = ",
              x.sizes().slice(0, x.dim() - 1), " (one adapter per row) but has shape ",
              index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": argument 'index' has dtype ",
              index.scalar_type(), "; expected Long (int64)");
  ck::check_supported_dtype(x, op, "x");
  ck::check_same_dtype(base, op, "base", x, "x");
  ck::check_same_dtype(lora_a, op, "lora_a", x, "x");
  ck::check_same_dtype(lora_b, op, "lora_b", x, "x");
  TORCH_CHECK(checks::is_supported_float(scaling.scalar_type()), op,
              ": argument 'scaling' has dtype ", scaling.scalar_type(),
              "; expected a floating dtype");
  ck::check_same_device(base, op, "base", x, "x");
  ck::check_same_device(lora_a, op, "lora_a", x, "x");
  ck::check_same_device(lora_b, op, "lora_b", x, "x");
  ck::check_same_device(scaling, op, "scaling", x, "x");
  ck::check_same_device(index, op, "index", x, "x");
  return s;
}

}  // namespace peftreg::fused
