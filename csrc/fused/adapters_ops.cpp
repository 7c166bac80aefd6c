// SPDX-License-Identifier: Apache-2.0
//
// The one entry of each IA3, Houlsby and multi-LoRA op (schemas in csrc/registration.cpp): the
// argument checks (adapters_args.h), reshape and output allocation, written once and registered
// for CPU and, in CUDA builds, CUDA. The kernels come from the device's table
// (adapters_kernels.h).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/device_table.h"
#include "fused/adapters_args.h"
#include "fused/adapters_kernels.h"

namespace peftreg::fused {
namespace {

const AdapterKernels& kernels(const at::Tensor& t, const char* op) {
  return kernels_for(t, op, cpu_adapter_kernels(), PEFTREG_CUDA_TABLE(cuda_adapter_kernels));
}

at::Tensor ia3_linear(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                      bool scale_input) {
  const Ia3Sizes s = check_ia3_linear_args(x, weight, bias, scale, scale_input);
  const at::Tensor x2d = x.reshape({s.rows, s.in_features}).contiguous();
  at::Tensor y = at::empty({s.rows, s.out_features}, x.options());
  kernels(x, kIa3LinearOp).ia3_linear(s, x2d, weight, bias, scale.contiguous(), scale_input, y);
  return y.view(with_last(x, s.out_features));
}

at::Tensor ia3_scale_grad(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& x,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& scale) {
  const Ia3Sizes s = check_ia3_scale_grad_args(grad, out, x, weight, bias, scale);
  const at::Tensor g2d = grad.reshape({s.rows, s.out_features}).contiguous();
  const at::Tensor y2d = out.reshape({s.rows, s.out_features}).contiguous();
  const at::Tensor x2d = x.reshape({s.rows, s.in_features}).contiguous();
  at::Tensor result = at::empty({s.out_features}, x.options());
  kernels(x, kIa3ScaleGradOp).ia3_scale_grad(s, g2d, y2d, x2d, weight.contiguous(), bias,
                                              scale.contiguous(), result);
  return result;
}

std::tuple<at::Tensor, at::Tensor> houlsby_adapter(const at::Tensor& h,
                                                   const at::Tensor& w_down,
                                                   const std::optional<at::Tensor>& b_down,
                                                   const at::Tensor& w_up,
                                                   const std::optional<at::Tensor>& b_up,
                                                   c10::string_view activation) {
  const HoulsbySizes s = check_houlsby_args(h, w_down, b_down, w_up, b_up);
  const Activation act = parse_activation(activation);
  const at::Tensor h2d = h.reshape({s.rows, s.hidden}).contiguous();
  at::Tensor z = at::empty({s.rows, s.bottleneck}, h.options());
  at::Tensor out = at::empty({s.rows, s.hidden}, h.options());
  kernels(h, kHoulsbyOp).houlsby_adapter(s, h2d, w_down, b_down, w_up, b_up, act, z, out);
  return {out.view(h.sizes()), z.view(with_last(h, s.bottleneck))};
}

at::Tensor lora_multi_add(const at::Tensor& base, const at::Tensor& x, const at::Tensor& lora_a,
                          const at::Tensor& lora_b, const at::Tensor& scaling,
                          const at::Tensor& index) {
  const LoraMultiSizes s = check_lora_multi_args(base, x, lora_a, lora_b, scaling, index);
  const at::Tensor idx = index.reshape({s.rows}).contiguous();
  const at::Tensor x2d = x.reshape({s.rows, s.in_features}).contiguous();
  const at::Tensor base2d = base.reshape({s.rows, s.out_features}).contiguous();
  at::Tensor out = at::empty({s.rows, s.out_features}, x.options());
  kernels(x, kLoraMultiOp).lora_multi_add(s, base2d, x2d, lora_a, lora_b, scaling, idx, out);
  return out.view(base.sizes());
}

void impl_adapter_ops(torch::Library& m) {
  m.impl("ia3_linear", &ia3_linear);
  m.impl("ia3_scale_grad", &ia3_scale_grad);
  m.impl("houlsby_adapter", &houlsby_adapter);
  m.impl("lora_multi_add", &lora_multi_add);
}

}  // namespace
}  // namespace peftreg::fused

PEFTREG_IMPL_CPU_AND_CUDA(peftreg::fused::impl_adapter_ops)
