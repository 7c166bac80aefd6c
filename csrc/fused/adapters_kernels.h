// SPDX-License-Identifier: Apache-2.0
//
// The one interface header of the IA3, Houlsby and multi-LoRA ops, for every file of the family:
//
//   - the launch API of the CUDA kernels in adapters_cuda.cu: plain pointers and sizes only, so
//     that file includes no torch header and nvcc compiles it alone (tests/ops/test_cuda_build.py);
//   - under #ifndef __CUDACC__, the torch side: the argument checks and sizes, run once by the
//     entries (adapters_ops.cpp) for every device (the fake kernels in peftreg/ops/adapters.py
//     repeat them in the same words and order), and the per-device kernel table. The entries
//     reshape the arguments to contiguous 2-D tensors, allocate the outputs and call the table of
//     the input's device: adapters_cpu.cpp (always) or adapters_cuda_ops.cpp (CUDA builds: stream,
//     device guard, the GEMMs through ATen / cuBLAS, launches). A kernel writes its preallocated
//     outputs and returns nothing.
#pragma once

#include <cstdint>

// ---- CUDA launch API (no torch types) ------------------------------------------------------
// Seen by nvcc and by CUDA builds only: a CPU build has no CUDA toolkit headers.
#if defined(__CUDACC__) || PEFTREG_WITH_CUDA
#include <cuda_runtime_api.h>


#include "common/scalar_kind.h"

namespace peftreg::fused::adapters_cuda {

using ::peftreg::ScalarKind;  // common/scalar_kind.h

// y = (y + bias) * scale per column, in place; y (rows, cols), bias (cols) or null, scale (cols).
cudaError_t ia3_output_epilogue(ScalarKind dtype, void* y, const void* bias, const void* scale,
                                int64_t rows, int64_t cols, cudaStream_t stream);

// dst = x * scale per column; x and dst (rows, cols), scale (cols).
cudaError_t ia3_scale_columns(ScalarKind dtype, const void* x, const void* scale, void* dst,
                              int64_t rows, int64_t cols, cudaStream_t stream);

// result[j] = sum_i grad[i, j] * p[i, j] with p = out / scale[j], or, where scale[j] == 0,
// p[i, j] = x[i] . weight[j] + bias[j]. grad/out (rows, out_f), x (rows, in_f),
// weight (out_f, in_f), bias (out_f) or null, scale and result (out_f).
cudaError_t ia3_scale_grad(ScalarKind dtype, const void* grad, const void* out, const void* x,
                           const void* weight, const void* bias, const void* scale, void* result,
                           int64_t rows, int64_t in_f, int64_t out_f, cudaStream_t stream);

// a[i, :m] = act(z[i, :]) and, when cols == m + 1, a[i, m] = 1. act: 0 relu, 1 gelu (erf),
// 2 silu, 3 tanh. z (rows, m), a (rows, cols).
cudaError_t houlsby_activation(ScalarKind dtype, const void* z, void* a, int64_t rows, int64_t m,
                               int64_t cols, int act, cudaStream_t stream);

// out[i] = base[i] + scaling[k] * (x[i] A_k^T) B_k^T with k = index[i] (base[i] for k < 0).
// base/out (rows, out_f), x (rows, in_f), lora_a (n, r, in_f), lora_b (n, out_f, r); scaling (n)
// in the accumulation type; index (rows) int64, already checked to lie in [-1, n).
cudaError_t lora_multi_add(ScalarKind dtype, const void* base, const void* x, const void* lora_a,
                           const void* lora_b, const void* scaling, const int64_t* index,
                           void* out, int64_t rows, int64_t in_f, int64_t out_f, int64_t rank,
                           cudaStream_t stream);

}  // namespace peftreg::fused::adapters_cuda
#endif  // defined(__CUDACC__) || PEFTREG_WITH_CUDA

// ---- Torch side (hidden from nvcc): checks, sizes, the kernel table -------------------------
#ifndef __CUDACC__
#include <ATen/core/Tensor.h>
#include <c10/util/SmallVector.h>
#include <c10/util/string_view.h>

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

using checks::leading_rows;
using checks::with_last;

struct Ia3Sizes {
  int64_t rows = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
};

// What both IA3 ops check first: x (..., in_features), weight (out_features, in_features) and
// the rank of scale (`scale_layout`); its length depends on the op.
inline Ia3Sizes check_ia3_weight(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& scale, const char* scale_layout) {
  namespace ck = peftreg::checks;
  ck::check_min_dim(x, op, "x", 1, "(..., in_features)");
  ck::check_dim(weight, op, "weight", 2, "(out_features, in_features)");
  ck::check_dim(scale, op, "scale", 1, scale_layout);
  Ia3Sizes s;
  s.rows = leading_rows(x);
  s.in_features = x.size(-1);
  s.out_features = weight.size(0);
  ck::check_size(weight, op, "weight", 1, s.in_features, "(out_features, in_features)",
                 "in_features = x.shape[-1]");
  return s;
}

// ia3_linear(x, weight, bias, scale, scale_input): scale has in_features entries when the input
// is scaled, out_features when the output is.
inline Ia3Sizes check_ia3_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const at::Tensor& scale, bool scale_input) {
  namespace ck = peftreg::checks;
  const char* op = kIa3LinearOp;
  const Ia3Sizes s = check_ia3_weight(op, x, weight, scale,
                                      scale_input ? "(in_features,)" : "(out_features,)");
  if (scale_input) {
    ck::check_size(scale, op, "scale", 0, s.in_features, "(in_features,)",
                   "scale_input=True: in_features = x.shape[-1]");
  } else {
    ck::check_size(scale, op, "scale", 0, s.out_features, "(out_features,)",
                   "scale_input=False: out_features = weight.shape[0]");
  }
  ck::check_optional_vector(bias, op, "bias", s.out_features, "(out_features,)",
                            "out_features = weight.shape[0]");
  ck::check_supported_dtype(x, op, "x");
  ck::check_like(op, {{"weight", &weight}, {"scale", &scale}, {"bias", ck::opt(bias)}}, x, "x");
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
  const Ia3Sizes s = check_ia3_weight(op, x, weight, scale, "(out_features,)");
  ck::check_size(scale, op, "scale", 0, s.out_features, "(out_features,)",
                 "out_features = weight.shape[0]");
  const auto expected = with_last(x, s.out_features);
  TORCH_CHECK(out.sizes() == c10::IntArrayRef(expected), op,
              ": argument 'out' must have shape (*x.shape[:-1], out_features) = ",
              c10::IntArrayRef(expected), " but has shape ", out.sizes());
  ck::check_same_shape(grad, op, "grad", out, "out");
  ck::check_optional_vector(bias, op, "bias", s.out_features, "(out_features,)",
                            "out_features = weight.shape[0]");
  ck::check_supported_dtype(x, op, "x");
  ck::check_like(op,
                 {{"grad", &grad}, {"out", &out}, {"weight", &weight}, {"scale", &scale},
                  {"bias", ck::opt(bias)}},
                 x, "x");
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
  ck::check_optional_vector(b_down, op, "b_down", s.bottleneck, "(bottleneck,)",
                            "bottleneck = w_down.shape[0]");
  ck::check_optional_vector(b_up, op, "b_up", s.hidden, "(hidden,)", "hidden = h.shape[-1]");
  ck::check_supported_dtype(h, op, "h");
  ck::check_like(op,
                 {{"w_down", &w_down}, {"w_up", &w_up}, {"b_down", ck::opt(b_down)},
                  {"b_up", ck::opt(b_up)}},
                 h, "h");
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
  LoraMultiSizes s;
  ck::check_stacked_lora(s, op, x, lora_a, lora_b, scaling);
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
  ck::check_same_dtypes(op, {{"base", &base}, {"lora_a", &lora_a}, {"lora_b", &lora_b}}, x, "x");
  TORCH_CHECK(checks::is_supported_float(scaling.scalar_type()), op,
              ": argument 'scaling' has dtype ", scaling.scalar_type(),
              "; expected a floating dtype");
  ck::check_same_devices(op,
                         {{"base", &base}, {"lora_a", &lora_a}, {"lora_b", &lora_b},
                          {"scaling", &scaling}, {"index", &index}},
                         x, "x");
  return s;
}

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
#endif  // __CUDACC__
