// SPDX-License-Identifier: Apache-2.0
//
// CUDA kernel table of the IA3, Houlsby and multi-LoRA ops (adapters_kernels.h; the checked entries
// are adapters_ops.cpp): the GEMMs through ATen (cuBLAS) and the plain-pointer kernels of
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

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/cuda_glue.h"
#include "fused/adapters_kernels.h"

namespace peftreg::fused {
namespace {

namespace kc = adapters_cuda;
using cuda_glue::scalar_kind;
using cuda_glue::stream_of;

const void* optional_ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

void ia3_linear_cuda(const Ia3Sizes& s, const at::Tensor& x2d, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& l,
                     bool scale_input, at::Tensor& y) {
  const c10::cuda::CUDAGuard guard(x2d.device());
  const kc::ScalarKind kind = scalar_kind(kIa3LinearOp, x2d.scalar_type());
  if (scale_input) {
    at::Tensor xs = at::empty_like(x2d);
    C10_CUDA_CHECK(kc::ia3_scale_columns(kind, x2d.const_data_ptr(), l.const_data_ptr(),
                                         xs.data_ptr(), s.rows, s.in_features, stream_of(x2d)));
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
                                           stream_of(x2d)));
  }
}

void ia3_scale_grad_cuda(const Ia3Sizes& s, const at::Tensor& g, const at::Tensor& y,
                         const at::Tensor& xc, const at::Tensor& w,
                         const std::optional<at::Tensor>& bias, const at::Tensor& l,
                         at::Tensor& result) {
  const c10::cuda::CUDAGuard guard(xc.device());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  C10_CUDA_CHECK(kc::ia3_scale_grad(scalar_kind(kIa3ScaleGradOp, xc.scalar_type()),
                                    g.const_data_ptr(), y.const_data_ptr(), xc.const_data_ptr(),
                                    w.const_data_ptr(), optional_ptr(b), l.const_data_ptr(),
                                    result.data_ptr(), s.rows, s.in_features, s.out_features,
                                    stream_of(xc)));
}

void houlsby_adapter_cuda(const HoulsbySizes& s, const at::Tensor& h2d,
                          const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
                          const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                          Activation act, at::Tensor& z, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(h2d.device());
  if (b_down.has_value()) {
    at::addmm_out(z, *b_down, h2d, w_down.t());
  } else {
    at::mm_out(z, h2d, w_down.t());
  }
  const int64_t cols = s.bottleneck + (b_up.has_value() ? 1 : 0);
  at::Tensor a = at::empty({s.rows, cols}, h2d.options());
  C10_CUDA_CHECK(kc::houlsby_activation(scalar_kind(kHoulsbyOp, h2d.scalar_type()),
                                        z.const_data_ptr(), a.data_ptr(), s.rows, s.bottleneck,
                                        cols, static_cast<int>(act), stream_of(h2d)));
  const at::Tensor w_up_ext = b_up.has_value() ? at::cat({w_up, b_up->unsqueeze(1)}, 1) : w_up;
  at::addmm_out(out, h2d, a, w_up_ext.t());
}

void lora_multi_add_cuda(const LoraMultiSizes& s, const at::Tensor& base2d,
                         const at::Tensor& x2d, const at::Tensor& lora_a,
                         const at::Tensor& lora_b, const at::Tensor& scaling,
                         const at::Tensor& idx, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x2d.device());
  if (s.rows > 0) {
    // One synchronising read of the index range, so a bad index is a clear error rather than
    // an out-of-bounds read in the kernel.
    const auto [lo, hi] = at::aminmax(idx);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK(lo_v >= -1 && hi_v < s.adapters, kLoraMultiOp,
                ": argument 'index' has values in [", lo_v, ", ", hi_v,
                "]; expected -1 (no adapter) or an adapter in [0, ", s.adapters, ")");
  }
  const kc::ScalarKind kind = scalar_kind(kLoraMultiOp, x2d.scalar_type());
  const at::ScalarType acc = kind == kc::ScalarKind::kFloat64 ? at::kDouble : at::kFloat;
  const at::Tensor a = lora_a.contiguous(), b = lora_b.contiguous();
  const at::Tensor sc = scaling.to(acc).contiguous();
  C10_CUDA_CHECK(kc::lora_multi_add(kind, base2d.const_data_ptr(), x2d.const_data_ptr(),
                                    a.const_data_ptr(), b.const_data_ptr(), sc.const_data_ptr(),
                                    idx.const_data_ptr<int64_t>(), out.data_ptr(), s.rows,
                                    s.in_features, s.out_features, s.rank, stream_of(x2d)));
}

}  // namespace

const AdapterKernels& cuda_adapter_kernels() {
  static const AdapterKernels table{&ia3_linear_cuda, &ia3_scale_grad_cuda, &houlsby_adapter_cuda,
                                    &lora_multi_add_cuda};
  return table;
}

}  // namespace peftreg::fused
