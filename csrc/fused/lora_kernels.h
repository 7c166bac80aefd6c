// SPDX-License-Identifier: Apache-2.0
//
// The one interface header of the LoRA family (lora_linear, nf4_lora_linear, their backward ops),
// for every file of the family:
//
//   - the launch API of the CUDA kernels in lora_cuda.cu: plain pointers and sizes only, so the
//     .cu file includes no torch header and nvcc compiles it in about a second on any machine with
//     a CUDA toolkit (tests/ops/test_cuda_build.py);
//   - under #ifndef __CUDACC__, the torch side: the argument checks and sizes of lora_linear and
//     its backward (the fake kernels in peftreg/ops/lora.py mirror them) and of nf4_lora_linear
//     and its backward (x, the quantized weight's checks of nf4_kernels.h, bias and A/B, in the
//     order of the fake kernel in peftreg/ops/nf4.py), run once by the entries (lora_ops.cpp)
//     for every device together with the dropout checks; then the per-device kernel table: the
//     CPU table (defined here over the kernels of lora_cpu.cpp and qlora_cpu.cpp) or
//     lora_cuda_ops.cpp (CUDA builds: allocation, the base product, stream, device
//     guard, launches). Forward kernels return the (rows, out_features) output in
//     x's dtype; the entry gives it x's leading dimensions.
#pragma once

#include <cstdint>

// ---- CUDA launch API (no torch types) ------------------------------------------------------
// Seen by nvcc and by CUDA builds only: a CPU build has no CUDA toolkit headers.
#if defined(__CUDACC__) || PEFTREG_WITH_CUDA
#include <cuda_runtime_api.h>

#include <cstddef>

#include "common/scalar_kind.h"

namespace peftreg::fused::cuda {

using ::peftreg::ScalarKind;  // common/scalar_kind.h

// Arguments of the low-rank update  y += scaling * (x_l @ A^T) @ B^T.
// Every pointer refers to a dense row-major (C-contiguous) device buffer of `dtype`, except
// `workspace`, whose element type is the accumulation type (double for kFloat64, else float).
struct LoraUpdateArgs {
  ScalarKind dtype = ScalarKind::kFloat32;
  const void* x_lora = nullptr;  // (rows, in_features): the LoRA input (x, or dropout(x))
  const void* lora_a = nullptr;  // (rank, in_features)
  const void* lora_b = nullptr;  // (out_features, rank)
  void* workspace = nullptr;     // (rows, rank) accumulation-type scratch for scaling * x_l @ A^T
  void* y = nullptr;             // (rows, out_features): read (the base product) and updated
  int64_t rows = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t rank = 0;
  double scaling = 1.0;
};

// Bytes `workspace` must hold for the given dtype and sizes.
std::size_t lora_update_workspace_bytes(ScalarKind dtype, int64_t rows, int64_t rank);

// Enqueues y += scaling * (x_l @ A^T) @ B^T on `stream` (the caller has made the right device
// current). Returns cudaSuccess, a launch error, or cudaErrorInvalidValue for bad sizes.
cudaError_t lora_low_rank_update(const LoraUpdateArgs& args, cudaStream_t stream);

}  // namespace peftreg::fused::cuda
#endif  // defined(__CUDACC__) || PEFTREG_WITH_CUDA

// ---- Torch side: the checks and sizes of the four ops, the kernel table -----------------------
// nvcc never sees it, so lora_cuda.cu includes this header and still no torch header. The
// dropout checks are lora_dropout.h's; the NF4 weight's are nf4_kernels.h's.
#ifndef __CUDACC__
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/SmallVector.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "fused/lora_dropout.h"
#include "nf4/nf4_kernels.h"

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

// Gradients requested from a LoRA backward, in this order (the ops' bool[4] output_mask).
enum LoraGrad : int { kGradX = 0, kGradA = 1, kGradB = 2, kGradXLora = 3 };
using LoraGradMask = std::array<bool, 4>;
using LoraGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

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

// The CPU kernels live in two files, lora_cpu.cpp (dense base) and qlora_cpu.cpp (NF4 base), so
// the CPU table lists them here: a new CPU kernel is declared and listed in this header,
// whichever of the two holds it (signatures as in the table).
at::Tensor lora_linear_cpu(const LoraLinearSizes& s, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                           const at::Tensor& lora_b, double scaling,
                           const std::optional<at::Tensor>& x_lora, const LoraDropout& dropout);
LoraGrads lora_linear_backward_cpu(const LoraBackwardSizes& s, const at::Tensor& grad,
                                   const std::optional<at::Tensor>& x,
                                   const std::optional<at::Tensor>& weight,
                                   const at::Tensor& lora_a, const at::Tensor& lora_b,
                                   double scaling, const std::optional<at::Tensor>& x_lora,
                                   const LoraDropout& dropout);
at::Tensor nf4_lora_linear_cpu(const Nf4LoraSizes& s, const at::Tensor& x,
                               const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, double scaling,
                               const std::optional<at::Tensor>& x_lora,
                               const LoraDropout& dropout);
LoraGrads nf4_lora_linear_backward_cpu(const LoraBackwardSizes& s, const at::Tensor& grad,
                                       const std::optional<at::Tensor>& x,
                                       const nf4::Nf4Weight& weight, const at::Tensor& lora_a,
                                       const at::Tensor& lora_b, double scaling,
                                       const std::optional<at::Tensor>& x_lora,
                                       const LoraDropout& dropout);

inline const LoraKernels& cpu_lora_kernels() {
  static const LoraKernels table{&lora_linear_cpu, &lora_linear_backward_cpu,
                                 &nf4_lora_linear_cpu, &nf4_lora_linear_backward_cpu};
  return table;
}
#if PEFTREG_WITH_CUDA
const LoraKernels& cuda_lora_kernels();
#endif

}  // namespace peftreg::fused
#endif  // __CUDACC__
