// SPDX-License-Identifier: Apache-2.0
//
// CPU kernel of peftreg::lora_linear (schema in csrc/registration.cpp):
//
//   y = x @ W^T + bias + scaling * ((x_lora or x) @ A^T) @ B^T       (LoRA, Hu et al. 2021, eq. 3)
//
// It is three BLAS calls into one output buffer: the base product is written straight into y
// (with the bias as the addmm input), the rank-r projection u = x_l @ A^T is a small (rows x r)
// matrix, and the low-rank update is accumulated into y in place by addmm_ with alpha = scaling.
// Compared with the unfused PyTorch expression this saves two (rows x out) temporaries and two
// elementwise passes, and it never forms the dense (out x in) product B @ A.
//
// Precision: for bf16/fp16 ATen's CPU GEMM accumulates in fp32 and rounds once per call, so y
// is rounded after the base product, u once, and y once more after the in-place update (which
// reads y, adds in fp32 and rounds). The backward lives in peftreg/ops/_autograd.py.
//
// Per-operator ATen headers instead of <ATen/ATen.h> keep this translation unit's compile time
// down (header parsing dominates it).

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <optional>

#include "common/checks.h"
#include "fused/lora_args.h"

namespace peftreg::fused {
namespace {

at::Tensor lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                           const at::Tensor& lora_b, double scaling,
                           const std::optional<at::Tensor>& x_lora) {
  const LoraLinearSizes s = check_lora_linear_args(x, weight, bias, lora_a, lora_b, x_lora);
  checks::check_device_type(x, kLoraLinearOp, "x", c10::DeviceType::CPU);

  // Flatten leading dims into rows. reshape is free for contiguous x and copies otherwise;
  // .contiguous() then guarantees unit stride along in_features for the GEMM. weight, lora_a and
  // lora_b are passed as transposed views: the GEMM reads either memory order without a copy,
  // and ATen copies internally only for layouts BLAS cannot express.
  const at::Tensor x2d = x.reshape({s.rows, s.in_features}).contiguous();
  at::Tensor y = at::empty({s.rows, s.out_features}, x.options());

  if (bias.has_value()) {
    at::addmm_out(y, *bias, x2d, weight.t());
  } else {
    at::mm_out(y, x2d, weight.t());
  }

  const at::Tensor xl2d =
      x_lora.has_value() ? x_lora->reshape({s.rows, s.in_features}).contiguous() : x2d;
  const at::Tensor u = at::mm(xl2d, lora_a.t());  // (rows, r): the only LoRA temporary
  y.addmm_(u, lora_b.t(), /*beta=*/1.0, /*alpha=*/scaling);

  return y.view(s.out_shape);
}

}  // namespace
}  // namespace peftreg::fused

TORCH_LIBRARY_IMPL(peftreg, CPU, m) {
  m.impl("lora_linear", &peftreg::fused::lora_linear_cpu);
}
