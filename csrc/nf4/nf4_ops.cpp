// SPDX-License-Identifier: Apache-2.0
//
// The one entry of each NF4 storage op (schemas at the end of this file; format in
// nf4_format.h, docs/format.md "NF4 storage"):
//
//   nf4_quantize           x -> packed 4-bit codes + float32 absmax per block
//   nf4_double_quantize    absmax -> uint8 codes + float32 absmax per 256 blocks + offset
//   nf4_dequantize         codes + scales -> dense tensor of any float dtype
//   nf4_dequantize_into    the same, written into a preallocated tensor
//   nf4_linear             y = x @ dequant(W)^T + bias, never forming the dense W
//   nf4_linear_grad_input  grad_x = grad_y @ dequant(W), never forming the dense W
//
// Checks (nf4_kernels.h), reshape and allocation are written once here and registered for CPU and,
// in CUDA builds, CUDA; the kernels come from the device's table (nf4_kernels.h).

#include <ATen/core/Tensor.h>
#include <ATen/core/enum_tag.h>
#include <ATen/ops/all.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/device_table.h"
#include "nf4/nf4_format.h"
#include "nf4/nf4_kernels.h"

namespace peftreg::nf4 {
namespace {

const Nf4Kernels& kernels(const at::Tensor& t, const char* op) {
  return kernels_for(t, op, cpu_nf4_kernels(), PEFTREG_CUDA_TABLE(cuda_nf4_kernels));
}

using checks::with_last;

std::tuple<at::Tensor, at::Tensor> nf4_quantize(const at::Tensor& x, int64_t blocksize) {
  check_blocksize(kQuantizeOp, "blocksize", blocksize);
  check_quantize_dtype(kQuantizeOp, x);
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  at::Tensor codes = at::empty({packed_bytes(n), 1}, xc.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({num_blocks(n, blocksize)}, xc.options().dtype(at::kFloat));
  const int64_t bad = kernels(x, kQuantizeOp).quantize(xc, blocksize, codes, absmax);
  TORCH_CHECK(bad < 0, kQuantizeOp, ": argument 'x' contains NaN or infinity (in block ", bad,
              ", elements ", bad * blocksize, " to ", std::min(n, (bad + 1) * blocksize) - 1,
              " of the flattened tensor); NF4 can only store finite values");
  return {codes, absmax};
}

// The first non-finite entry of the float32 vector `a`, read on the host (an error path only).
void check_finite_absmax(const at::Tensor& a) {
  if (a.numel() == 0 || at::isfinite(a).all().item<bool>()) return;
  const at::Tensor host = a.cpu();
  const float* p = host.const_data_ptr<float>();
  int64_t i = 0;
  while (i + 1 < host.numel() && std::isfinite(p[i])) ++i;
  TORCH_CHECK(false, kDoubleQuantizeOp, ": argument 'absmax' contains NaN or infinity (entry ",
              i, " is ", p[i], ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nf4_double_quantize(const at::Tensor& absmax,
                                                                   int64_t nested_blocksize,
                                                                   bool nearest) {
  check_blocksize(kDoubleQuantizeOp, "nested_blocksize", nested_blocksize);
  check_dtype(absmax, kDoubleQuantizeOp, "absmax", at::kFloat);
  checks::check_dim(absmax, kDoubleQuantizeOp, "absmax", 1, "(blocks,)");
  const at::Tensor a = absmax.contiguous();
  check_finite_absmax(a);
  const int64_t n = a.numel();
  // The offset is torch's own float32 mean (bitsandbytes uses absmax.mean()), so the two agree
  // to the bit whatever summation order the mean uses.
  const at::Tensor offset = n > 0 ? at::mean(a) : at::zeros({}, a.options());
  at::Tensor codes = at::empty({n}, a.options().dtype(at::kByte));
  at::Tensor nested = at::empty({num_blocks(n, nested_blocksize)}, a.options());
  kernels(a, kDoubleQuantizeOp).double_quantize(a, offset, nested_blocksize, nearest, codes,
                                                nested);
  return {codes, nested, offset.reshape({})};
}

void dequantize_checked(const char* op, const at::Tensor& codes, const at::Tensor& absmax,
                        const std::optional<at::Tensor>& nested_absmax,
                        const std::optional<at::Tensor>& offset, int64_t blocksize,
                        int64_t nested_blocksize, at::Tensor& out) {
  checks::check_supported_dtype(out, op, "out");
  const Nf4Weight w = checked_weight(op, codes, "codes", codes, absmax, nested_absmax, offset,
                                     blocksize, nested_blocksize, out.numel());
  checks::check_same_device(out, op, "out", codes, "codes");
  checks::check_contiguous(out, op, "out");
  kernels(codes, op).dequantize(w, out);
}

void nf4_dequantize_into(const at::Tensor& codes, const at::Tensor& absmax,
                         const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& offset, int64_t blocksize,
                         int64_t nested_blocksize, at::Tensor& out) {
  dequantize_checked(kDequantizeIntoOp, codes, absmax, nested_absmax, offset, blocksize,
                     nested_blocksize, out);
}

at::Tensor nf4_dequantize(const at::Tensor& codes, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& offset, int64_t blocksize,
                          int64_t nested_blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
  check_dense_dtype(kDequantizeOp, dtype);
  check_shape(kDequantizeOp, shape);
  at::Tensor out = at::empty(shape, codes.options().dtype(dtype));
  dequantize_checked(kDequantizeOp, codes, absmax, nested_absmax, offset, blocksize,
                     nested_blocksize, out);
  return out;
}

at::Tensor nf4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                      const std::optional<at::Tensor>& nested_absmax,
                      const std::optional<at::Tensor>& offset, int64_t blocksize,
                      int64_t nested_blocksize, int64_t out_features, int64_t in_features,
                      const std::optional<at::Tensor>& bias) {
  const LinearSizes s = check_linear_input(kLinearOp, x, "x", in_features, "in_features",
                                           out_features, in_features);
  const Nf4Weight w = checked_weight(kLinearOp, x, "x", codes, absmax, nested_absmax, offset,
                                     blocksize, nested_blocksize, out_features * in_features);
  check_bias(kLinearOp, bias, x, out_features);
  const at::Tensor y = nf4_linear_rows(kernels(x, kLinearOp), w,
                                       x.reshape({s.rows, in_features}), bias, out_features,
                                       in_features);
  return y.view(with_last(x, out_features));
}

at::Tensor nf4_linear_grad_input(const at::Tensor& grad, const at::Tensor& codes,
                                 const at::Tensor& absmax,
                                 const std::optional<at::Tensor>& nested_absmax,
                                 const std::optional<at::Tensor>& offset, int64_t blocksize,
                                 int64_t nested_blocksize, int64_t out_features,
                                 int64_t in_features) {
  const LinearSizes s = check_linear_input(kGradInputOp, grad, "grad", out_features,
                                           "out_features", out_features, in_features);
  const Nf4Weight w = checked_weight(kGradInputOp, grad, "grad", codes, absmax, nested_absmax,
                                     offset, blocksize, nested_blocksize,
                                     out_features * in_features);
  const at::Tensor gx = kernels(grad, kGradInputOp)
                            .product(w, grad.reshape({s.rows, out_features}), out_features,
                                     in_features, /*forward=*/false);
  return gx.to(grad.scalar_type()).view(with_last(grad, in_features));
}

void impl_nf4_ops(torch::Library& m) {
  m.impl("nf4_quantize", &nf4_quantize);
  m.impl("nf4_double_quantize", &nf4_double_quantize);
  m.impl("nf4_dequantize", &nf4_dequantize);
  m.impl("nf4_dequantize_into", &nf4_dequantize_into);
  m.impl("nf4_linear", &nf4_linear);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input);
}

}  // namespace
}  // namespace peftreg::nf4

// The schemas of the NF4 storage ops.
// csrc/registration.cpp holds the one TORCH_LIBRARY(peftreg, m); each family adds its schemas
// by fragment beside its entries.
TORCH_LIBRARY_FRAGMENT(peftreg, m) {
  // Naming the family's Python module (its wrappers, fake kernels and backwards) before the
  // schemas makes a missing fake kernel point there (torch imports that module) and makes
  // torch refuse a fake registered anywhere else.
  m.set_python_module("peftreg.ops.nf4");
  // NF4 4-bit storage (QLoRA, Dettmers et al. 2023, section 3) in bitsandbytes' byte format
  // (csrc/nf4/nf4_format.h; docs/format.md "NF4 storage"; docs/ops.md). A quantized weight is
  // passed as codes (uint8, (numel + 1) // 2 packed bytes), absmax (float32 per block, or uint8
  // with double quantization), nested_absmax and offset (float32; double quantization only),
  // blocksize and nested_blocksize.
  //
  // Flatten x; per block of `blocksize` elements: float32 absmax, nearest NF4 code of x / absmax,
  // two codes per byte (element 2i in the high nibble). codes: ((numel + 1) // 2, 1) uint8.
  m.def("nf4_quantize(Tensor x, int blocksize=64) -> (Tensor codes, Tensor absmax)",
        {at::Tag::pt2_compliant_tag});
  // Double quantization of the absmax: offset = mean(absmax); (absmax - offset) in blocks of
  // nested_blocksize with the signed 8-bit dynamic code, choosing codes as bitsandbytes does
  // (nearest=False) or by the nearest code. offset is a 0-dim float32 tensor.
  m.def(
      "nf4_double_quantize(Tensor absmax, int nested_blocksize=256, bool nearest=False) -> "
      "(Tensor absmax_codes, Tensor nested_absmax, Tensor offset)",
      {at::Tag::pt2_compliant_tag});
  // The dense tensor of `shape` and `dtype`: code value * block scale, each rounded once from
  // float32. nf4_dequantize_into writes into a preallocated contiguous tensor instead (it returns
  // nothing: torch.compile functionalizes custom ops only when mutated inputs are not returned).
  m.def(
      "nf4_dequantize(Tensor codes, Tensor absmax, Tensor? nested_absmax, Tensor? offset, "
      "int blocksize, int nested_blocksize, int[] shape, ScalarType dtype) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "nf4_dequantize_into(Tensor codes, Tensor absmax, Tensor? nested_absmax, Tensor? offset, "
      "int blocksize, int nested_blocksize, Tensor(a!) out) -> ()",
      {at::Tag::pt2_compliant_tag});
  // y = x @ W^T + bias with W (out_features, in_features) stored as NF4; W is decoded tile by
  // tile inside the product, never as a whole. Differentiable in x and bias (W is frozen).
  m.def(
      "nf4_linear(Tensor x, Tensor codes, Tensor absmax, Tensor? nested_absmax, Tensor? offset, "
      "int blocksize, int nested_blocksize, int out_features, int in_features, "
      "Tensor? bias=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // grad_x = grad @ W (the input gradient of nf4_linear), again without a dense W.
  m.def(
      "nf4_linear_grad_input(Tensor grad, Tensor codes, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? offset, int blocksize, int nested_blocksize, int out_features, "
      "int in_features) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

PEFTREG_IMPL_CPU_AND_CUDA(peftreg::nf4::impl_nf4_ops)

// nf4_dequantize_into mutates `out`, so torch.library cannot attach a Python autograd formula
// (peftreg/ops/nf4.py covers the other NF4 ops). torch's fallbacks make autograd refuse
// inputs that require grad and keep version counters right for the mutated output.
TORCH_LIBRARY_IMPL(peftreg, Autograd, m) {
  m.impl("nf4_dequantize_into", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(peftreg, ADInplaceOrView, m) {
  m.impl("nf4_dequantize_into", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
}
