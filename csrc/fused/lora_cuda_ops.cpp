// SPDX-License-Identifier: Apache-2.0
//
// CUDA kernel table of the LoRA ops (lora_kernels.h; the checked entries are lora_ops.cpp).
// lora_linear writes the base product x @ W^T + bias into the output with one ATen addmm (cuBLAS),
// then calls the plain-pointer launch API of lora_cuda.cu to add the low-rank update in place,
// on the current stream of x's device under a device guard. The (rows x r) workspace comes from
// the caching allocator. peftreg::lora_linear_backward is composed of ATen products
// (csrc/fused/lora_math.h), which cuBLAS runs natively in every dtype.
//
// Compiled only in CUDA builds (setup.py picks files ending in _cuda_ops.cpp together with the
// *_cuda.cu files). Only c10/cuda headers are used for streams and guards: <ATen/cuda/...> needs
// cuBLAS headers, which not every toolkit install provides.

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <optional>

#include "common/checks.h"
#include "common/cuda_glue.h"
#include "fused/lora_dropout.h"
#include "fused/lora_kernels.h"
#include "fused/lora_math.h"
#include "nf4/nf4_kernels.h"

namespace peftreg::fused {
namespace {

at::Tensor lora_linear_cuda(const LoraLinearSizes& s, const at::Tensor& x,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                            const std::optional<at::Tensor>& x_lora,
                            const LoraDropout& dropout) {
  const c10::cuda::CUDAGuard device_guard(x.device());

  // Base product through ATen (cuBLAS), straight into the output, as in the CPU kernel.
  const at::Tensor x2d = x.reshape({s.rows, s.in_features}).contiguous();
  at::Tensor y = at::empty({s.rows, s.out_features}, x.options());
  if (bias.has_value()) {
    at::addmm_out(y, *bias, x2d, weight.t());
  } else {
    at::mm_out(y, x2d, weight.t());
  }

  // Low-rank update in place. The kernels index dense row-major buffers; contiguous() is a
  // no-op for the usual layouts (and y is dense by construction).
  at::Tensor xl2d =
      x_lora.has_value() ? x_lora->reshape({s.rows, s.in_features}).contiguous() : x2d;
  if (dropout.active()) xl2d = lora_dropout_apply(xl2d, dropout);
  const at::Tensor a = lora_a.contiguous();
  const at::Tensor b = lora_b.contiguous();
  const cuda::ScalarKind kind = cuda_glue::scalar_kind(kLoraLinearOp, x.scalar_type());
  const at::ScalarType acc_type = kind == cuda::ScalarKind::kFloat64 ? at::kDouble : at::kFloat;
  at::Tensor workspace = at::empty({s.rows, s.rank}, x.options().dtype(acc_type));

  cuda::LoraUpdateArgs args;
  args.dtype = kind;
  args.x_lora = xl2d.data_ptr();
  args.lora_a = a.data_ptr();
  args.lora_b = b.data_ptr();
  args.workspace = workspace.numel() > 0 ? workspace.data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.rows = s.rows;
  args.in_features = s.in_features;
  args.out_features = s.out_features;
  args.rank = s.rank;
  args.scaling = scaling;

  const cudaStream_t stream = cuda_glue::stream_of(x);
  C10_CUDA_CHECK(cuda::lora_low_rank_update(args, stream));
  // workspace is freed when this function returns; the caching allocator only hands the block
  // to later work on the same stream, which is ordered after these kernels.
  return y;
}

// The backward through ATen (cuBLAS multiplies bf16/fp16 natively with fp32 accumulation).
LoraGrads lora_linear_backward_cuda(const LoraBackwardSizes& s, const at::Tensor& grad,
                                    const std::optional<at::Tensor>& x,
                                    const std::optional<at::Tensor>& weight,
                                    const at::Tensor& lora_a, const at::Tensor& lora_b,
                                    double scaling, const std::optional<at::Tensor>& x_lora,
                                    const LoraDropout& dropout) {
  const c10::cuda::CUDAGuard device_guard(grad.device());
  return lora_backward_composite(grad, x, weight, lora_a, lora_b, scaling, x_lora, s,
                                 grad.scalar_type(), dropout);
}

// LoRA on an NF4 base: nf4_linear's CUDA product (rounded to x's dtype, as nf4_linear returns
// it) plus the low-rank terms added in place with cuBLAS.
at::Tensor nf4_lora_linear_cuda(const Nf4LoraSizes& s, const at::Tensor& x,
                                const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, double scaling,
                                const std::optional<at::Tensor>& x_lora,
                                const LoraDropout& dropout) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor x2d = rows_2d(x, s.rows, s.in_features);
  at::Tensor y = nf4::nf4_linear_rows(nf4::cuda_nf4_kernels(), s.weight, x2d, bias,
                                      s.out_features, s.in_features);
  at::Tensor xl2d = x_lora.has_value() ? rows_2d(*x_lora, s.rows, s.in_features) : x2d;
  if (dropout.active()) xl2d = lora_dropout_apply(xl2d, dropout);
  add_low_rank(y, xl2d, lora_a, lora_b, scaling);
  return y;
}

LoraGrads nf4_lora_linear_backward_cuda(const LoraBackwardSizes& s, const at::Tensor& grad,
                                        const std::optional<at::Tensor>& x,
                                        const nf4::Nf4Weight& weight, const at::Tensor& lora_a,
                                        const at::Tensor& lora_b, double scaling,
                                        const std::optional<at::Tensor>& x_lora,
                                        const LoraDropout& dropout) {
  const c10::cuda::CUDAGuard device_guard(grad.device());
  const at::Tensor g2d = rows_2d(grad, s.rows, s.out_features);
  at::Tensor grad_x;
  if (s.need[kGradX]) {
    grad_x = nf4::cuda_nf4_kernels()
                 .product(weight, g2d, s.out_features, s.in_features, /*forward=*/false)
                 .to(grad.scalar_type());
  }
  const LowRankGrads lr = low_rank_grads_for(g2d, x, lora_a, lora_b, scaling, x_lora, s,
                                             grad.scalar_type(),
                                             s.need[kGradX] ? &grad_x : nullptr, dropout);
  return finish_grads(grad, grad_x, lr, s);
}

}  // namespace

const LoraKernels& cuda_lora_kernels() {
  static const LoraKernels table{&lora_linear_cuda, &lora_linear_backward_cuda,
                                 &nf4_lora_linear_cuda, &nf4_lora_linear_backward_cuda};
  return table;
}

}  // namespace peftreg::fused
