// SPDX-License-Identifier: Apache-2.0
//
// The one entry of each IA3, Houlsby and multi-LoRA op (schemas at the end of this file): the
// argument checks (adapters_kernels.h), reshape and output allocation, written once and registered
// for CPU and, in CUDA builds, CUDA. The kernels come from the device's table
// (adapters_kernels.h).

#include <ATen/core/Tensor.h>
#include <ATen/core/enum_tag.h>
#include <ATen/ops/empty.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/device_table.h"
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

// The schemas of the IA3, Houlsby and multi-LoRA ops (docs/ops.md).
// csrc/registration.cpp holds the one TORCH_LIBRARY(peftreg, m); each family adds its schemas
// by fragment beside its entries.
TORCH_LIBRARY_FRAGMENT(peftreg, m) {
  // Naming the family's Python module (its wrappers, fake kernels and backwards) before the
  // schemas makes a missing fake kernel point there (torch imports that module) and makes
  // torch refuse a fake registered anywhere else.
  m.set_python_module("peftreg.ops.adapters");
  // IA3 (Liu et al. 2022, section 3.3) fused into the product it scales. scale_input=False:
  // y = (x @ weight^T + bias) * scale, scale (out_features,) (keys, values); scale_input=True:
  // y = (x * scale) @ weight^T + bias, scale (in_features,) (feed-forward down projection).
  m.def(
      "ia3_linear(Tensor x, Tensor weight, Tensor? bias, Tensor scale, bool scale_input) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Gradient of ia3_linear (scale_input=False) with respect to scale, given its output `out`:
  // sum over rows of grad * (x @ weight^T + bias), recovered as out / scale except where a scale
  // entry is zero (recomputed from x and weight there).
  m.def(
      "ia3_scale_grad(Tensor grad, Tensor out, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor scale) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Houlsby bottleneck (Houlsby et al. 2019, section 2.1) as one op:
  // out = h + act(h @ w_down^T + b_down) @ w_up^T + b_up, activation in {relu, gelu, silu,
  // tanh}; also returns z = h @ w_down^T + b_down (rows x bottleneck), saved for the backward.
  m.def(
      "houlsby_adapter(Tensor h, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, "
      "str activation) -> (Tensor out, Tensor z)",
      {at::Tag::pt2_compliant_tag});
  // Batched multi-adapter LoRA (S-LoRA, Sheng et al. 2023; Punica, Chen et al. 2023): row i of
  // x uses adapter k = index[i] of the stacked lora_a (n, r, in), lora_b (n, out, r) and
  // scaling (n,): out[i] = base[i] + scaling[k] * (x[i] @ lora_a[k]^T) @ lora_b[k]^T, or
  // base[i] when k == -1. index has shape x.shape[:-1]. Inference only (peftreg/ops/adapters.py).
  m.def(
      "lora_multi_add(Tensor base, Tensor x, Tensor lora_a, Tensor lora_b, Tensor scaling, "
      "Tensor index) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

PEFTREG_IMPL_CPU_AND_CUDA(peftreg::fused::impl_adapter_ops)
