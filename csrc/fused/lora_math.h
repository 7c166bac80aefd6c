// SPDX-License-Identifier: Apache-2.0
//
// The low-rank part of LoRA's forward and backward, written once with ATen matrix products and
// shared by every fused LoRA kernel (dense or NF4 base, CPU or CUDA glue). With rows flattened,
// x_l the LoRA input (x_lora, or x), A (r, in), B (out, r), s the scaling and g = dL/dy:
//
//   forward    u = x_l A^T (rows, r);   y += s * u B^T
//   backward   grad_u = s * g B;  grad_A = grad_u^T x_l;  grad_B = s * g^T u
//              grad_x_l = grad_u A  (added to the base's input gradient when x_l is x)
//
// Only (rows, r) temporaries are created; the dense (out, in) product B A never is.
//
// Compute dtype. Every sum here accumulates in float32 (float64 stays float64), and each output
// is rounded once to the caller's dtype. Where the processor has no native bf16/fp16 matrix
// arithmetic, ATen's 16-bit CPU GEMM falls back to a slow generic loop (measured 20-30x slower
// than fp32 GEMM on an AVX2 machine), so CPU kernels widen 16-bit operands to float32 and call
// the fp32 GEMM instead: the widening is exact and the accumulation is fp32 either way, so the
// results are those of ATen's own 16-bit kernels up to summation order, only faster.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include "fused/lora_dropout.h"
#include "fused/lora_kernels.h"

namespace peftreg::fused {

// float32 for 16-bit inputs when `widen_16bit`, else the input's own dtype.
inline at::ScalarType lora_compute_dtype(at::ScalarType t, bool widen_16bit) {
  if (widen_16bit && (t == at::kBFloat16 || t == at::kHalf)) return at::kFloat;
  return t;
}

inline at::Tensor as_compute(const at::Tensor& t, at::ScalarType compute) {
  return t.scalar_type() == compute ? t : t.to(compute);
}

// An unrequested gradient: an empty tensor (the op's schema has no optional returns).
inline at::Tensor no_grad_output(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

// A rows-flattened view of t, contiguous, with the feature dimension `features` last.
inline at::Tensor rows_2d(const at::Tensor& t, int64_t rows, int64_t features) {
  return t.reshape({rows, features}).contiguous();
}

// y_acc += s * (xl_acc A^T) B^T, all operands already in the compute dtype; y_acc is (rows, out).
inline void add_low_rank(at::Tensor& y_acc, const at::Tensor& xl_acc, const at::Tensor& a_acc,
                         const at::Tensor& b_acc, double scaling) {
  const at::Tensor u = at::mm(xl_acc, a_acc.t());  // (rows, r): the only temporary
  y_acc.addmm_(u, b_acc.t(), /*beta=*/1.0, /*alpha=*/scaling);
}

// Low-rank gradients given g (rows, out) in the compute dtype; xl_acc is the LoRA path's input
// (after dropout, if any). When `base_grad_x` is defined it is the base layer's input gradient
// (rows, in) in the compute dtype and, if x feeds the LoRA path (no separate x_lora), grad_u A
// (through dropout's mask) is accumulated into it in place. Returns compute-dtype tensors
// (grad_A, grad_B, grad_x_lora); undefined where not requested.
struct LowRankGrads {
  at::Tensor grad_a, grad_b, grad_x_lora;
};

inline LowRankGrads low_rank_backward(const at::Tensor& g_acc, const at::Tensor& xl_acc,
                                      const at::Tensor& a_acc, const at::Tensor& b_acc,
                                      double scaling, bool has_x_lora, at::Tensor* base_grad_x,
                                      const LoraGradMask& need, const LoraDropout& dropout) {
  LowRankGrads out;
  const bool into_base = need[kGradX] && !has_x_lora && base_grad_x != nullptr;
  const bool need_xl = need[kGradXLora] && has_x_lora;
  if (need[kGradA] || need_xl || into_base) {
    // s * g B, scaled on the small (rows, r) side so no (rows, out) temporary is made.
    at::Tensor grad_u = at::mm(g_acc, b_acc);
    grad_u.mul_(scaling);
    if (need[kGradA]) out.grad_a = at::mm(grad_u.t(), xl_acc);
    if (into_base && dropout.active()) {
      lora_dropout_accumulate_grad(*base_grad_x, at::mm(grad_u, a_acc), dropout);
    } else if (into_base) {
      base_grad_x->addmm_(grad_u, a_acc);
    }
    if (need_xl) out.grad_x_lora = at::mm(grad_u, a_acc);
  }
  if (need[kGradB]) {
    // u is recomputed rather than saved by the forward: it costs a fraction r / out of the
    // forward's main product and the op then returns y alone.
    at::Tensor u = at::mm(xl_acc, a_acc.t());
    u.mul_(scaling);
    out.grad_b = at::mm(g_acc.t(), u);
  }
  return out;
}

// low_rank_backward with the LoRA input taken from x_lora or dropout(x) or x (rows-flattened,
// in the compute dtype).
inline LowRankGrads low_rank_grads_for(const at::Tensor& g_acc,
                                       const std::optional<at::Tensor>& x,
                                       const at::Tensor& lora_a, const at::Tensor& lora_b,
                                       double scaling, const std::optional<at::Tensor>& x_lora,
                                       const LoraBackwardSizes& s, at::ScalarType compute,
                                       at::Tensor* base_grad_x, const LoraDropout& dropout) {
  at::Tensor xl_acc;
  if (s.need[kGradA] || s.need[kGradB]) {
    xl_acc = as_compute(rows_2d(x_lora.has_value() ? *x_lora : *x, s.rows, s.in_features),
                        compute);
    // The forward's mask, regenerated from the seed (nothing of it was saved).
    if (dropout.active()) xl_acc = lora_dropout_apply(xl_acc, dropout);
  }
  return low_rank_backward(g_acc, xl_acc, as_compute(lora_a, compute),
                           as_compute(lora_b, compute), scaling, x_lora.has_value(), base_grad_x,
                           s.need, dropout);
}

// Rounds compute-dtype gradients to the caller's dtypes and shapes; empty where not requested.
inline LoraGrads finish_grads(const at::Tensor& grad, const at::Tensor& grad_x_acc,
                              const LowRankGrads& lr, const LoraBackwardSizes& s) {
  const at::ScalarType dtype = grad.scalar_type();
  auto finish = [&](const at::Tensor& t) {
    return t.defined() ? t.to(dtype) : no_grad_output(grad);
  };
  const at::Tensor grad_x =
      s.need[kGradX] ? grad_x_acc.to(dtype).view(s.x_shape) : no_grad_output(grad);
  const at::Tensor grad_xl =
      lr.grad_x_lora.defined() ? lr.grad_x_lora.to(dtype).view(s.x_shape) : no_grad_output(grad);
  return {grad_x, finish(lr.grad_a), finish(lr.grad_b), grad_xl};
}

// The whole LoRA backward for a dense base, in `compute` dtype, results rounded once to the
// inputs' dtype: grad_x = g W (+ grad_u A when x feeds the LoRA path), grad_A, grad_B and
// grad_x_lora as requested by s.need; unrequested ones are empty tensors.
inline LoraGrads lora_backward_composite(const at::Tensor& grad,
                                         const std::optional<at::Tensor>& x,
                                         const std::optional<at::Tensor>& weight,
                                         const at::Tensor& lora_a, const at::Tensor& lora_b,
                                         double scaling, const std::optional<at::Tensor>& x_lora,
                                         const LoraBackwardSizes& s, at::ScalarType compute,
                                         const LoraDropout& dropout) {
  const at::Tensor g = as_compute(rows_2d(grad, s.rows, s.out_features), compute);
  at::Tensor grad_x;
  if (s.need[kGradX]) grad_x = at::mm(g, as_compute(*weight, compute));
  const LowRankGrads lr = low_rank_grads_for(g, x, lora_a, lora_b, scaling, x_lora, s, compute,
                                             s.need[kGradX] ? &grad_x : nullptr, dropout);
  return finish_grads(grad, grad_x, lr, s);
}

}  // namespace peftreg::fused
