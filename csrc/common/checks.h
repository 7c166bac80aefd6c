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

#include <cstdint>
#include <initializer_list>

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

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": argument '", name,
              "' must be contiguous but has strides ", t.strides(), " for shape ", t.sizes());
}

}  // namespace peftreg::checks
