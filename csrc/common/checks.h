// SPDX-License-Identifier: Apache-2.0
//
// Argument checks shared by every peftreg kernel. Each helper raises through TORCH_CHECK (a Python
// RuntimeError) with a message that names the operator, the argument and the offending value, so
// that a user who passes a wrong tensor learns which one and why without reading C++.
//
// The fake kernels' helpers (peftreg/ops/_checks.py) repeat these invariants with torch._check in
// the same words; tests/ops/test_parity.py checks that every bad input reads the same both ways.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <c10/util/SmallVector.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

namespace peftreg::checks {

// True for the floating dtypes every peftreg kernel accepts. float64 is accepted so that
// torch.autograd.gradcheck can run on the real kernel; the documented contract is fp32/bf16/fp16.
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline void check_supported_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": argument '", name,
              "' has dtype ", t.scalar_type(),
              "; expected one of Float (float32), BFloat16, Half (float16) or Double");
}

inline void check_same_dtype(const at::Tensor& t, const char* op, const char* name,
                             const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": argument '", name, "' has dtype ",
              t.scalar_type(), " but '", ref_name, "' has dtype ", ref.scalar_type(),
              "; all tensor arguments must share one dtype");
}

inline void check_same_device(const at::Tensor& t, const char* op, const char* name,
                              const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": argument '", name, "' is on device ",
              t.device(), " but '", ref_name, "' is on device ", ref.device(),
              "; all tensor arguments must be on one device");
}

inline void check_device_type(const at::Tensor& t, const char* op, const char* name,
                              c10::DeviceType expected) {
  TORCH_CHECK(t.device().type() == expected, op, ": argument '", name, "' is on device ",
              t.device(), " but this kernel runs on ", c10::Device(expected).str());
}

inline void check_dim(const at::Tensor& t, const char* op, const char* name, int64_t dim,
                      const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": argument '", name, "' must be ", dim, "-D ", layout,
              " but has shape ", t.sizes());
}

inline void check_min_dim(const at::Tensor& t, const char* op, const char* name, int64_t dim,
                          const char* layout) {
  TORCH_CHECK(t.dim() >= dim, op, ": argument '", name, "' must have at least ", dim,
              " dimension(s) ", layout, " but has shape ", t.sizes());
}

// Checks t.size(dim) == expected; `meaning` says where `expected` comes from, e.g.
// "in_features = x.shape[-1]".
inline void check_size(const at::Tensor& t, const char* op, const char* name, int64_t dim,
                       int64_t expected, const char* layout, const char* meaning) {
  TORCH_CHECK(t.size(dim) == expected, op, ": argument '", name, "' must have shape ", layout,
              " with size ", expected, " at dim ", dim, " (", meaning, ") but has shape ",
              t.sizes());
}

inline void check_same_shape(const at::Tensor& t, const char* op, const char* name,
                             const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": argument '", name, "' must have the same shape as '",
              ref_name, "' ", ref.sizes(), " but has shape ", t.sizes());
}

// A named tensor argument for the list checks below; a null tensor is an absent optional one.
using Named = std::pair<const char*, const at::Tensor*>;

inline const at::Tensor* opt(const std::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

inline void check_same_dtypes(const char* op, std::initializer_list<Named> named,
                              const at::Tensor& ref, const char* ref_name) {
  for (const auto& [name, t] : named) {
    if (t != nullptr) check_same_dtype(*t, op, name, ref, ref_name);
  }
}

inline void check_same_devices(const char* op, std::initializer_list<Named> named,
                               const at::Tensor& ref, const char* ref_name) {
  for (const auto& [name, t] : named) {
    if (t != nullptr) check_same_device(*t, op, name, ref, ref_name);
  }
}

// Every present tensor of `named` has ref's dtype, then every one is on ref's device: the order
// of the fake kernels' same_dtype / same_device (peftreg/ops/_checks.py).
inline void check_like(const char* op, std::initializer_list<Named> named, const at::Tensor& ref,
                       const char* ref_name) {
  check_same_dtypes(op, named, ref, ref_name);
  check_same_devices(op, named, ref, ref_name);
}

// An optional 1-D argument of `size` entries (a bias): its rank, then its length.
inline void check_optional_vector(const std::optional<at::Tensor>& t, const char* op,
                                  const char* name, int64_t size, const char* layout,
                                  const char* meaning) {
  if (!t.has_value()) return;
  check_dim(*t, op, name, 1, layout);
  check_size(*t, op, name, 0, size, layout, meaning);
}

// The product of t's leading dimensions: the rows of a (..., features) argument.
inline int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

// t's shape with the last dimension replaced: the shape of an op's (..., features) output.
inline c10::SmallVector<int64_t, 6> with_last(const at::Tensor& t, int64_t last) {
  c10::SmallVector<int64_t, 6> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = last;
  return shape;
}

// Several adapters' LoRA factors stacked: x (..., in), lora_a (adapters, r, in), lora_b
// (adapters, out, r), scaling (adapters,). Checks them in one order for every op that takes them
// (lora_multi_add, lora_grouped_add) and fills s.rows, in_features, adapters, rank and
// out_features.
template <typename Sizes>
void check_stacked_lora(Sizes& s, const char* op, const at::Tensor& x, const at::Tensor& lora_a,
                        const at::Tensor& lora_b, const at::Tensor& scaling) {
  check_min_dim(x, op, "x", 1, "(..., in_features)");
  check_dim(lora_a, op, "lora_a", 3, "(adapters, r, in_features)");
  check_dim(lora_b, op, "lora_b", 3, "(adapters, out_features, r)");
  check_dim(scaling, op, "scaling", 1, "(adapters,)");
  s.rows = leading_rows(x);
  s.in_features = x.size(-1);
  s.adapters = lora_a.size(0);
  s.rank = lora_a.size(1);
  s.out_features = lora_b.size(1);
  check_size(lora_a, op, "lora_a", 2, s.in_features, "(adapters, r, in_features)",
             "in_features = x.shape[-1]");
  check_size(lora_b, op, "lora_b", 0, s.adapters, "(adapters, out_features, r)",
             "adapters = lora_a.shape[0]");
  check_size(lora_b, op, "lora_b", 2, s.rank, "(adapters, out_features, r)",
             "r = lora_a.shape[1]");
  check_size(scaling, op, "scaling", 0, s.adapters, "(adapters,)", "adapters = lora_a.shape[0]");
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": argument '", name,
              "' must be contiguous but has strides ", t.strides(), " for shape ", t.sizes());
}

}  // namespace peftreg::checks
