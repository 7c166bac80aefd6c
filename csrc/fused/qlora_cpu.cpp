// SPDX-License-Identifier: Apache-2.0
//
// CPU kernels of peftreg::nf4_lora_linear and its backward: LoRA on a frozen NF4 base (QLoRA,
// Dettmers et al. 2023, eq. 5, without the double-dequantization notation):
//
//   y = x @ dequant(W)^T + bias + scaling * ((x_lora or x) @ A^T) @ B^T
//
// The base product is the NF4 CPU table's tile-by-tile product (csrc/nf4/nf4_kernels.h), in
// float32 before rounding; bias and the low-rank update (csrc/fused/lora_math.h) are added to
// that float32 result and the output is rounded once. The backward likewise adds the low-rank
// input gradient to the NF4 kernel's float32 g @ dequant(W). So a bf16 QLoRA layer gets fp32
// accumulation throughout, W never exists as a dense matrix, and the only LoRA temporaries are
// (rows, r).
// Exception: many rows of bf16/fp16 on a CPU with arithmetic for them (nf4::
// cpu_products_in_16bit). The product then rounds W and its result to the 16-bit dtype, and
// the LoRA terms run in that dtype too (ATen's 16-bit GEMMs, fp32 accumulation inside each):
// the numbers of dequantize-then-matmul with PEFT's LoRA layer, and of the CUDA kernels.
// Widening the (rows, in) operands for float32 LoRA products would cost more than the 16-bit
// base product saves at r = 16 (measured 128 x 1024 -> 1024, one thread).

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>

#include "common/checks.h"
#include "fused/lora_cpu.h"
#include "fused/lora_dropout.h"
#include "fused/lora_kernels.h"
#include "fused/lora_math.h"
#include "nf4/nf4_kernels.h"

namespace peftreg::fused {
namespace {

// The dtype of the LoRA terms and of the sum they are added into: the input's dtype where the
// NF4 product is 16-bit, else float32 (float64 for float64 input).
at::ScalarType cpu_compute_dtype(at::ScalarType t, int64_t rows) {
  if (nf4::cpu_products_in_16bit(t, rows)) return t;
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor nf4_lora_linear_cpu(const Nf4LoraSizes& s, const at::Tensor& x,
                               const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, double scaling,
                               const std::optional<at::Tensor>& x_lora,
                               const LoraDropout& dropout) {
  const int64_t in_features = s.in_features;
  const at::Tensor x2d = rows_2d(x, s.rows, in_features);
  const at::ScalarType compute = cpu_compute_dtype(x.scalar_type(), s.rows);
  at::Tensor y = as_compute(nf4::cpu_nf4_kernels().product(s.weight, x2d, s.out_features,
                                                           in_features, /*forward=*/true),
                            compute);
  if (bias.has_value()) y.add_(as_compute(*bias, compute));
  at::Tensor xl2d = as_compute(
      x_lora.has_value() ? rows_2d(*x_lora, s.rows, in_features) : x2d, compute);
  if (dropout.active()) xl2d = lora_dropout_apply(xl2d, dropout);
  add_low_rank(y, xl2d, as_compute(lora_a, compute), as_compute(lora_b, compute), scaling);

  const at::Tensor out = compute == x.scalar_type() ? y : y.to(x.scalar_type());
  const at::Tensor* xl = x_lora.has_value() ? &*x_lora : nullptr;
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  check_16bit_output_overflow(kNf4LoraOp, out, y, {&x, b, &lora_a, &lora_b, xl});
  return out;
}

LoraGrads nf4_lora_linear_backward_cpu(const LoraBackwardSizes& s, const at::Tensor& grad,
                                       const std::optional<at::Tensor>& x,
                                       const nf4::Nf4Weight& weight, const at::Tensor& lora_a,
                                       const at::Tensor& lora_b, double scaling,
                                       const std::optional<at::Tensor>& x_lora,
                                       const LoraDropout& dropout) {
  const at::Tensor g2d = rows_2d(grad, s.rows, s.out_features);
  const at::ScalarType compute = cpu_compute_dtype(grad.scalar_type(), s.rows);
  at::Tensor grad_x;
  if (s.need[kGradX]) {
    grad_x = as_compute(nf4::cpu_nf4_kernels().product(weight, g2d, s.out_features,
                                                       s.in_features, /*forward=*/false),
                        compute);
  }
  const LowRankGrads lr = low_rank_grads_for(as_compute(g2d, compute), x, lora_a, lora_b,
                                             scaling, x_lora, s, compute,
                                             s.need[kGradX] ? &grad_x : nullptr, dropout);
  return finish_grads(grad, grad_x, lr, s);
}

}  // namespace peftreg::fused
