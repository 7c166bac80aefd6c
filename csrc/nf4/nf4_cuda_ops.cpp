// SPDX-License-Identifier: Apache-2.0
//
// The CUDA kernel table of the peftreg::nf4_* ops (nf4_kernels.h; the checked entries are
// nf4_ops.cpp): a device guard, the current stream of the tensors' device, the dynamic code
// table on the device, and the plain-pointer launch API of nf4_cuda.cu.
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
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <vector>

#include "common/cuda_glue.h"
#include "nf4/nf4_format.h"
#include "nf4/nf4_kernels.h"

namespace peftreg::nf4 {
namespace {

using cuda_glue::scalar_kind;
using cuda_glue::stream_of;

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

DeviceWeight device_weight(const Nf4Weight& w) {
  const QuantizedWeight& q = w.sizes;
  DeviceWeight d;
  d.codes = w.codes;
  d.absmax = w.absmax;
  d.args.codes = d.codes.const_data_ptr<uint8_t>();
  d.args.numel = q.numel;
  d.args.blocksize = q.blocksize;
  d.args.nested_blocksize = q.nested_blocksize;
  if (q.double_quant) {
    d.nested = w.nested_absmax;
    d.offset = w.offset;
    d.table = dynamic_table(w.codes);
    d.args.absmax_codes = d.absmax.const_data_ptr<uint8_t>();
    d.args.nested = d.nested.const_data_ptr<float>();
    d.args.offset = d.offset.const_data_ptr<float>();
    d.args.dynamic_code = d.table.const_data_ptr<float>();
  } else {
    d.args.absmax = d.absmax.const_data_ptr<float>();
  }
  return d;
}

int64_t quantize_cuda(const at::Tensor& xc, int64_t blocksize, at::Tensor& codes,
                      at::Tensor& absmax) {
  const c10::cuda::CUDAGuard guard(xc.device());
  at::Tensor bad = at::full({1}, -1, xc.options().dtype(at::kLong));
  C10_CUDA_CHECK(cuda::quantize(scalar_kind(kQuantizeOp, xc.scalar_type()), xc.const_data_ptr(),
                                xc.numel(), blocksize, codes.data_ptr<uint8_t>(),
                                absmax.data_ptr<float>(),
                                reinterpret_cast<long long*>(bad.data_ptr<int64_t>()),
                                stream_of(xc)));
  return bad.item<int64_t>();  // synchronises: quantization is not hot
}

void double_quantize_cuda(const at::Tensor& a, const at::Tensor& offset, int64_t nested_blocksize,
                          bool nearest, at::Tensor& codes, at::Tensor& nested) {
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor table = dynamic_table(a);
  C10_CUDA_CHECK(cuda::double_quantize(a.const_data_ptr<float>(), a.numel(),
                                       offset.const_data_ptr<float>(), nested_blocksize,
                                       table.const_data_ptr<float>() + kDynamicCodes +
                                           (nearest ? 0 : kDynamicCodes - 1),
                                       nearest, codes.data_ptr<uint8_t>(),
                                       nested.data_ptr<float>(), stream_of(a)));
}

void dequantize_cuda(const Nf4Weight& w, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const DeviceWeight d = device_weight(w);
  C10_CUDA_CHECK(cuda::dequantize(d.args, 0, w.sizes.numel,
                                  scalar_kind(kDequantizeOp, out.scalar_type()), out.data_ptr(),
                                  stream_of(out)));
}

// (rows, n_cols) = input @ op(W): W^T for the forward, W for the input gradient.
at::Tensor product_cuda(const Nf4Weight& weight, const at::Tensor& input2d, int64_t out,
                        int64_t in, bool forward) {
  const char* op = forward ? kLinearOp : kGradInputOp;
  const c10::cuda::CUDAGuard guard(input2d.device());
  const DeviceWeight w = device_weight(weight);
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

}  // namespace

const Nf4Kernels& cuda_nf4_kernels() {
  static const Nf4Kernels table{&quantize_cuda, &double_quantize_cuda, &dequantize_cuda,
                                &product_cuda};
  return table;
}

}  // namespace peftreg::nf4
