// SPDX-License-Identifier: Apache-2.0
//
// CUDA registration glue of the IA3, Houlsby and multi-LoRA ops: the same argument checks as the
// CPU kernels (adapters_args.h), the GEMMs through ATen (cuBLAS), and the plain-pointer kernels of
// adapters_cuda.cu for everything else, on the current stream of the input's device under a
// device guard. Compiled only in CUDA builds; only c10/cuda headers are used (as lora_cuda_ops).

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/cuda_glue.h"
#include "fused/adapters_args.h"
#include "fused/adapters_cuda.h"

namespace peftreg::fused {
namespace {

namespace kc = adapters_cuda;
using cuda_glue::scalar_kind;
using cuda_glue::stream_of;

const void* optional_ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

at::Tensor ia3_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                           bool scale_input) {
  const Ia3Sizes s = check_ia3_linear_args(x, weight, bias, scale, scale_input);
  checks::check_device_type(x, kIa3LinearOp, "x", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const kc::ScalarKind kind = scalar_kind(kIa3LinearOp, x.scalar_type());
  const at::Tensor x2d = x.reshape({s.rows, s.in_features}).contiguous();
  const at::Tensor l = scale.contiguous();
  at::Tensor y = at::empty({s.rows, s.out_features}, x.options());
  if (scale_input) {
    at::Tensor xs = at::empty_like(x2d);
    C10_CUDA_CHECK(kc::ia3_scale_columns(kind, x2d.const_data_ptr(), l.const_data_ptr(),
                                         xs.data_ptr(), s.rows, s.in_features, stream_of(x)));
    if (bias.has_value()) {
      at::addmm_out(y, *bias, xs, weight.t());
    } else {
      at::mm_out(y, xs, weight.t());
    }
  } else {
    at::mm_out(y, x2d, weight.t());
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    C10_CUDA_CHECK(kc::ia3_output_epilogue(kind, y.data_ptr(), optional_ptr(b),
                                           l.const_data_ptr(), s.rows, s.out_features,
                                           stream_of(x)));
  }
  return y.view(with_last(x, s.out_features));
}

at::Tensor ia3_scale_grad_cuda(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& x,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& scale) {
  const Ia3Sizes s = check_ia3_scale_grad_args(grad, out, x, weight, bias, scale);
  checks::check_device_type(x, kIa3ScaleGradOp, "x", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor g = grad.contiguous(), y = out.contiguous(), xc = x.contiguous();
  const at::Tensor w = weight.contiguous(), l = scale.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor result = at::empty({s.out_features}, x.options());
  C10_CUDA_CHECK(kc::ia3_scale_grad(scalar_kind(kIa3ScaleGradOp, x.scalar_type()),
                                    g.const_data_ptr(), y.const_data_ptr(), xc.const_data_ptr(),
                                    w.const_data_ptr(), optional_ptr(b), l.const_data_ptr(),
                                    result.data_ptr(), s.rows, s.in_features, s.out_features,
                                    stream_of(x)));
  return result;
}

std::tuple<at::Tensor, at::Tensor> houlsby_adapter_cuda(const at::Tensor& h,
                                                        const at::Tensor& w_down,
                                                        const std::optional<at::Tensor>& b_down,
                                                        const at::Tensor& w_up,
                                                        const std::optional<at::Tensor>& b_up,
                                                        c10::string_view activation) {
  const HoulsbySizes s = check_houlsby_args(h, w_down, b_down, w_up, b_up);
  const Activation act = parse_activation(activation);
  checks::check_device_type(h, kHoulsbyOp, "h", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor h2d = h.reshape({s.rows, s.hidden}).contiguous();
  at::Tensor z = at::empty({s.rows, s.bottleneck}, h.options());
  if (b_down.has_value()) {
    at::addmm_out(z, *b_down, h2d, w_down.t());
  } else {
    at::mm_out(z, h2d, w_down.t());
  }
  const int64_t cols = s.bottleneck + (b_up.has_value() ? 1 : 0);
  at::Tensor a = at::empty({s.rows, cols}, h.options());
  C10_CUDA_CHECK(kc::houlsby_activation(scalar_kind(kHoulsbyOp, h.scalar_type()),
                                        z.const_data_ptr(), a.data_ptr(), s.rows, s.bottleneck,
                                        cols, static_cast<int>(act), stream_of(h)));
  const at::Tensor w_up_ext = b_up.has_value() ? at::cat({w_up, b_up->unsqueeze(1)}, 1) : w_up;
  at::Tensor out = at::empty({s.rows, s.hidden}, h.options());
  at::addmm_out(out, h2d, a, w_up_ext.t());
  return {out.view(h.sizes()), z.view(with_last(h, s.bottleneck))};
}

at::Tensor lora_multi_add_cuda(const at::Tensor& base, const at::Tensor& x,
                               const at::Tensor& lora_a, const at::Tensor& lora_b,
                               const at::Tensor& scaling, const at::Tensor& index) {
  const LoraMultiSizes s = check_lora_multi_args(base, x, lora_a, lora_b, scaling, index);
  checks::check_device_type(x, kLoraMultiOp, "x", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor idx = index.reshape({s.rows}).contiguous();
  if (s.rows > 0) {
    // One synchronising read of the index range, so a bad index is a clear error rather than
    // an out-of-bounds read in the kernel.
    const auto [lo, hi] = at::aminmax(idx);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK(lo_v >= -1 && hi_v < s.adapters, kLoraMultiOp,
                ": argument 'index' has values in [", lo_v, ", ", hi_v,
                "]; expected -1 (no adapter) or an adapter in [0, ", s.adapters, ")");
  }
  const kc::ScalarKind kind = scalar_kind(kLoraMultiOp, x.scalar_type());
  const at::ScalarType acc = kind == kc::ScalarKind::kFloat64 ? at::kDouble : at::kFloat;
  const at::Tensor x2d = x.reshape({s.rows, s.in_features}).contiguous();
  const at::Tensor base2d = base.reshape({s.rows, s.out_features}).contiguous();
  const at::Tensor a = lora_a.contiguous(), b = lora_b.contiguous();
  const at::Tensor sc = scaling.to(acc).contiguous();
  at::Tensor out = at::empty({s.rows, s.out_features}, x.options());
  C10_CUDA_CHECK(kc::lora_multi_add(kind, base2d.const_data_ptr(), x2d.const_data_ptr(),
                                    a.const_data_ptr(), b.const_data_ptr(), sc.const_data_ptr(),
                                    idx.const_data_ptr<int64_t>(), out.data_ptr(), s.rows,
                                    s.in_features, s.out_features, s.rank, stream_of(x)));
  return out.view(base.sizes());
}

}  // namespace
}  // namespace peftreg::fused

TORCH_LIBRARY_IMPL(peftreg, CUDA, m) {
  m.impl("ia3_linear", &peftreg::fused::ia3_linear_cuda);
  m.impl("ia3_scale_grad", &peftreg::fused::ia3_scale_grad_cuda);
  m.impl("houlsby_adapter", &peftreg::fused::houlsby_adapter_cuda);
  m.impl("lora_multi_add", &peftreg::fused::lora_multi_add_cuda);
}
