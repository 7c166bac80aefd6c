// SPDX-License-Identifier: Apache-2.0
//
// CUDA registration glue for the peftreg::nf4_* ops: the same argument checks as the CPU kernels
// (nf4_args.h), allocation from the caching allocator, the current stream of the tensors' device
// under a device guard, and the plain-pointer launch API of nf4_cuda.cu.
//
// nf4_linear / nf4_linear_grad_input:
// * up to kMaxGemvRows input rows: the decoding GEMV kernels (weight at float32, float32 sums,
//   one rounding of the output), as on the CPU;
// * more rows: tiles of at most kTileBytes of weight rows are decoded into x.dtype and
//   multiplied with cuBLAS through ATen (tensor cores), so the dense weight never exists whole;
//   the weight is then rounded to x.dtype, as in dequantize-then-matmul.
//
// Compiled only in CUDA builds. Only c10/cuda headers are used for streams and guards.

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/cuda_glue.h"
#include "nf4/nf4_args.h"
#include "nf4/nf4_cuda.h"
#include "nf4/nf4_format.h"

namespace peftreg::nf4 {
namespace {

using cuda_glue::scalar_kind;
using cuda_glue::stream_of;

constexpr const char* kQuantizeOp = "peftreg::nf4_quantize";
constexpr const char* kDoubleQuantizeOp = "peftreg::nf4_double_quantize";
constexpr const char* kDequantizeOp = "peftreg::nf4_dequantize";
constexpr const char* kLinearOp = "peftreg::nf4_linear";
constexpr const char* kGradInputOp = "peftreg::nf4_linear_grad_input";
constexpr int64_t kTileBytes = int64_t{64} << 20;  // decoded weight tile, large-batch path

// The dynamic code (256 values, then its 255 midpoints, then bitsandbytes' 255 decision
// boundaries) on `device`, uploaded once per device.
at::Tensor dynamic_table(const at::Tensor& like) {
  static std::mutex mutex;
  static std::vector<at::Tensor> tables;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto index = static_cast<size_t>(like.device().index());
  if (tables.size() <= index) tables.resize(index + 1);
  if (!tables[index].defined()) {
    at::Tensor host = at::empty({kDynamicCodes + 2 * (kDynamicCodes - 1)},
                                at::TensorOptions().dtype(at::kFloat));
    float* p = host.data_ptr<float>();
    cuda::host_dynamic_code(p, p + kDynamicCodes, p + 2 * kDynamicCodes - 1);
    tables[index] = host.to(like.device());
  }
  return tables[index];
}

struct DeviceWeight {
  at::Tensor codes, absmax, nested, offset, table;
  cuda::WeightArgs args;
};

DeviceWeight device_weight(const QuantizedWeight& q, const at::Tensor& codes,
                           const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& offset) {
  DeviceWeight d;
  d.codes = codes.contiguous();
  d.absmax = absmax.contiguous();
  d.args.codes = d.codes.const_data_ptr<uint8_t>();
  d.args.numel = q.numel;
  d.args.blocksize = q.blocksize;
  d.args.nested_blocksize = q.nested_blocksize;
  if (q.double_quant) {
    d.nested = nested_absmax->contiguous();
    d.offset = offset->contiguous();
    d.table = dynamic_table(codes);
    d.args.absmax_codes = d.absmax.const_data_ptr<uint8_t>();
    d.args.nested = d.nested.const_data_ptr<float>();
    d.args.offset = d.offset.const_data_ptr<float>();
    d.args.dynamic_code = d.table.const_data_ptr<float>();
  } else {
    d.args.absmax = d.absmax.const_data_ptr<float>();
  }
  return d;
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& x, int64_t blocksize) {
  check_blocksize(kQuantizeOp, "blocksize", blocksize);
  checks::check_device_type(x, kQuantizeOp, "x", c10::DeviceType::CUDA);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kQuantizeOp,
              ": argument 'x' has dtype ", dtype,
              "; expected Float (float32), BFloat16 or Half (float16)");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  at::Tensor codes = at::empty({packed_bytes(n), 1}, xc.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({num_blocks(n, blocksize)}, xc.options().dtype(at::kFloat));
  at::Tensor bad = at::full({1}, -1, xc.options().dtype(at::kLong));
  C10_CUDA_CHECK(cuda::quantize(scalar_kind(kQuantizeOp, dtype), xc.const_data_ptr(), n,
                                blocksize, codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                reinterpret_cast<long long*>(bad.data_ptr<int64_t>()),
                                stream_of(xc)));
  const int64_t bad_block = bad.item<int64_t>();  // synchronises: quantization is not hot
  TORCH_CHECK(bad_block < 0, kQuantizeOp, ": argument 'x' contains NaN or infinity (in block ",
              bad_block, ", elements ", bad_block * blocksize, " to ",
              std::min(n, (bad_block + 1) * blocksize) - 1,
              " of the flattened tensor); NF4 can only store finite values");
  return {codes, absmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nf4_double_quantize_cuda(
    const at::Tensor& absmax, int64_t nested_blocksize, bool nearest) {
  check_blocksize(kDoubleQuantizeOp, "nested_blocksize", nested_blocksize);
  checks::check_device_type(absmax, kDoubleQuantizeOp, "absmax", c10::DeviceType::CUDA);
  check_dtype(absmax, kDoubleQuantizeOp, "absmax", at::kFloat);
  checks::check_dim(absmax, kDoubleQuantizeOp, "absmax", 1, "(blocks,)");
  const c10::cuda::CUDAGuard guard(absmax.device());
  const at::Tensor a = absmax.contiguous();
  const int64_t n = a.numel();
  TORCH_CHECK(n == 0 || a.isfinite().all().item<bool>(), kDoubleQuantizeOp,
              ": argument 'absmax' contains NaN or infinity");
  at::Tensor offset = n > 0 ? at::mean(a) : at::zeros({}, a.options());
  at::Tensor codes = at::empty({n}, a.options().dtype(at::kByte));
  at::Tensor nested = at::empty({num_blocks(n, nested_blocksize)}, a.options());
  const at::Tensor table = dynamic_table(a);
  C10_CUDA_CHECK(cuda::double_quantize(a.const_data_ptr<float>(), n,
                                       offset.const_data_ptr<float>(), nested_blocksize,
                                       table.const_data_ptr<float>() + kDynamicCodes +
                                           (nearest ? 0 : kDynamicCodes - 1),
                                       nearest, codes.data_ptr<uint8_t>(),
                                       nested.data_ptr<float>(),
                                       stream_of(a)));
  return {codes, nested, offset.reshape({})};
}

void nf4_dequantize_into_cuda(const at::Tensor& codes, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& offset, int64_t blocksize,
                              int64_t nested_blocksize, at::Tensor& out) {
  checks::check_device_type(codes, kDequantizeOp, "codes", c10::DeviceType::CUDA);
  TORCH_CHECK(checks::is_supported_float(out.scalar_type()), kDequantizeOp,
              ": argument 'out' has dtype ", out.scalar_type(),
              "; expected one of Float (float32), BFloat16, Half (float16) or Double");
  const QuantizedWeight q = check_quantized_weight(kDequantizeOp, codes, "codes", codes, absmax,
                                                   nested_absmax, offset, blocksize,
                                                   nested_blocksize, out.numel());
  checks::check_same_device(out, kDequantizeOp, "out", codes, "codes");
  checks::check_contiguous(out, kDequantizeOp, "out");
  const c10::cuda::CUDAGuard guard(codes.device());
  const DeviceWeight w = device_weight(q, codes, absmax, nested_absmax, offset);
  C10_CUDA_CHECK(cuda::dequantize(w.args, 0, q.numel, scalar_kind(kDequantizeOp,
                                                                   out.scalar_type()),
                                  out.data_ptr(), stream_of(out)));
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& codes, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& offset, int64_t blocksize,
                               int64_t nested_blocksize, at::IntArrayRef shape,
                               at::ScalarType dtype) {
  TORCH_CHECK(checks::is_supported_float(dtype), kDequantizeOp, ": argument 'dtype' is ", dtype,
              "; expected one of Float (float32), BFloat16, Half (float16) or Double");
  for (const int64_t d : shape) {
    TORCH_CHECK(d >= 0, kDequantizeOp, ": argument 'shape' ", shape, " has a negative size");
  }
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out = at::empty(shape, codes.options().dtype(dtype));
  nf4_dequantize_into_cuda(codes, absmax, nested_absmax, offset, blocksize, nested_blocksize, out);
  return out;
}

// (rows, n_cols) = input @ op(W): W^T for the forward, W for the input gradient.
at::Tensor product(const char* op, const DeviceWeight& w, const at::Tensor& input2d, int64_t in,
                   int64_t out, bool forward) {
  const at::Tensor a = input2d.contiguous();
  const int64_t rows = a.size(0);
  const int64_t n_cols = forward ? out : in;
  const at::ScalarType acc_type = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (rows <= cuda::kMaxGemvRows) {
    at::Tensor acc = at::empty({rows, n_cols}, a.options().dtype(acc_type));
    if (rows == 0 || n_cols == 0) return acc;
    if (!forward && out == 0) return acc.zero_();
    const cuda::ScalarKind kind = scalar_kind(op, a.scalar_type());
    if (forward) {
      C10_CUDA_CHECK(cuda::gemv_forward(w.args, kind, a.const_data_ptr(), rows, out, in,
                                        acc.data_ptr(), stream_of(a)));
    } else {
      C10_CUDA_CHECK(cuda::gemv_grad_input(w.args, kind, a.const_data_ptr(), rows, out, in,
                                           acc.data_ptr(), stream_of(a)));
    }
    return acc;
  }
  // The ATen GEMMs below run under the op's own autograd formula (peftreg/ops/nf4.py).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor result = at::zeros({rows, n_cols}, a.options());
  if (n_cols == 0 || out == 0 || in == 0) return result;
  const int64_t row_bytes = std::max<int64_t>(1, in * a.element_size());
  const int64_t chunk = std::max<int64_t>(1, std::min(out, kTileBytes / row_bytes));
  at::Tensor tile_buffer = at::empty({chunk * in}, a.options());
  const cuda::ScalarKind kind = scalar_kind(op, a.scalar_type());
  for (int64_t o0 = 0; o0 < out; o0 += chunk) {
    const int64_t o1 = std::min(out, o0 + chunk);
    at::Tensor tile = tile_buffer.narrow(0, 0, (o1 - o0) * in).view({o1 - o0, in});
    C10_CUDA_CHECK(cuda::dequantize(w.args, o0 * in, (o1 - o0) * in, kind, tile.data_ptr(),
                                    stream_of(a)));
    if (forward) {
      at::Tensor y_slice = result.narrow(1, o0, o1 - o0);
      at::mm_out(y_slice, a, tile.t());
    } else {
      result.addmm_(a.narrow(1, o0, o1 - o0), tile);
    }
  }
  return result;
}

at::Tensor nf4_linear_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& offset, int64_t blocksize,
                           int64_t nested_blocksize, int64_t out_features, int64_t in_features,
                           const std::optional<at::Tensor>& bias) {
  const LinearSizes s = check_linear_input(kLinearOp, x, "x", in_features, "in_features",
                                           out_features, in_features);
  checks::check_device_type(x, kLinearOp, "x", c10::DeviceType::CUDA);
  const QuantizedWeight q = check_quantized_weight(kLinearOp, x, "x", codes, absmax, nested_absmax,
                                                   offset, blocksize, nested_blocksize,
                                                   out_features * in_features);
  check_bias(kLinearOp, bias, x, out_features);
  const c10::cuda::CUDAGuard guard(x.device());
  const DeviceWeight w = device_weight(q, codes, absmax, nested_absmax, offset);
  at::Tensor y = product(kLinearOp, w, x.reshape({s.rows, in_features}), in_features,
                         out_features, /*forward=*/true);
  if (bias.has_value()) y.add_(bias->to(y.scalar_type()));
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  return y.to(x.scalar_type()).view(out_shape);
}

at::Tensor nf4_linear_grad_input_cuda(const at::Tensor& grad, const at::Tensor& codes,
                                      const at::Tensor& absmax,
                                      const std::optional<at::Tensor>& nested_absmax,
                                      const std::optional<at::Tensor>& offset, int64_t blocksize,
                                      int64_t nested_blocksize, int64_t out_features,
                                      int64_t in_features) {
  const LinearSizes s = check_linear_input(kGradInputOp, grad, "grad", out_features,
                                           "out_features", out_features, in_features);
  checks::check_device_type(grad, kGradInputOp, "grad", c10::DeviceType::CUDA);
  const QuantizedWeight q = check_quantized_weight(kGradInputOp, grad, "grad", codes, absmax,
                                                   nested_absmax, offset, blocksize,
                                                   nested_blocksize, out_features * in_features);
  const c10::cuda::CUDAGuard guard(grad.device());
  const DeviceWeight w = device_weight(q, codes, absmax, nested_absmax, offset);
  const at::Tensor gx = product(kGradInputOp, w, grad.reshape({s.rows, out_features}),
                                in_features, out_features, /*forward=*/false);
  std::vector<int64_t> out_shape(grad.sizes().begin(), grad.sizes().end());
  out_shape.back() = in_features;
  return gx.to(grad.scalar_type()).view(out_shape);
}

}  // namespace
}  // namespace peftreg::nf4

TORCH_LIBRARY_IMPL(peftreg, CUDA, m) {
  m.impl("nf4_quantize", &peftreg::nf4::nf4_quantize_cuda);
  m.impl("nf4_double_quantize", &peftreg::nf4::nf4_double_quantize_cuda);
  m.impl("nf4_dequantize", &peftreg::nf4::nf4_dequantize_cuda);
  m.impl("nf4_dequantize_into", &peftreg::nf4::nf4_dequantize_into_cuda);
  m.impl("nf4_linear", &peftreg::nf4::nf4_linear_cuda);
  m.impl("nf4_linear_grad_input", &peftreg::nf4::nf4_linear_grad_input_cuda);
}
