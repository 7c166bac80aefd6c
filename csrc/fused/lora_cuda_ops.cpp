// SPDX-License-Identifier: Apache-2.0
//
// CUDA registration glue for peftreg::lora_linear: checks the arguments (same checks as the CPU
// kernel), writes the base product x @ W^T + bias into the output with one ATen addmm (cuBLAS),
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
#include <torch/library.h>

#include <optional>

#include "common/checks.h"
#include "fused/lora_args.h"
#include "fused/lora_cuda.h"
#include "fused/lora_math.h"

namespace peftreg::fused {
namespace {

cuda::ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::ScalarKind::kFloat32;
    case at::kDouble:
      return cuda::ScalarKind::kFloat64;
    case at::kHalf:
      return cuda::ScalarKind::kFloat16;
    case at::kBFloat16:
      return cuda::ScalarKind::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, kLoraLinearOp, ": unsupported dtype ", t);
  return cuda::ScalarKind::kFloat32;  // unreachable: TORCH_CHECK(false, ...) throws
}

at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, double scaling,
                            const std::optional<at::Tensor>& x_lora) {
  const LoraLinearSizes s = check_lora_linear_args(x, weight, bias, lora_a, lora_b, x_lora);
  checks::check_device_type(x, kLoraLinearOp, "x", c10::DeviceType::CUDA);
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
  const at::Tensor xl2d =
      x_lora.has_value() ? x_lora->reshape({s.rows, s.in_features}).contiguous() : x2d;
  const at::Tensor a = lora_a.contiguous();
  const at::Tensor b = lora_b.contiguous();
  const cuda::ScalarKind kind = scalar_kind(x.scalar_type());
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

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  C10_CUDA_CHECK(cuda::lora_low_rank_update(args, stream));
  // workspace is freed when this function returns; the caching allocator only hands the block
  // to later work on the same stream, which is ordered after these kernels.
  return y.view(s.out_shape);
}

// The backward through ATen (cuBLAS multiplies bf16/fp16 natively with fp32 accumulation).
LoraGrads lora_linear_backward_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& x,
                                    const std::optional<at::Tensor>& weight,
                                    const at::Tensor& lora_a, const at::Tensor& lora_b,
                                    double scaling, const std::optional<at::Tensor>& x_lora,
                                    std::array<bool, 4> output_mask) {
  const LoraBackwardSizes s = check_lora_backward_args(grad, x, weight, lora_a, lora_b, x_lora,
                                                       output_mask);
  checks::check_device_type(grad, kLoraBackwardOp, "grad", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  return lora_backward_composite(grad, x, weight, lora_a, lora_b, scaling, x_lora, s,
                                 grad.scalar_type());
}

}  // namespace
}  // namespace peftreg::fused

TORCH_LIBRARY_IMPL(peftreg, CUDA, m) {
  m.impl("lora_linear", &peftreg::fused::lora_linear_cuda);
  m.impl("lora_linear_backward", &peftreg::fused::lora_linear_backward_cuda);
}
