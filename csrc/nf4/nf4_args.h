// SPDX-License-Identifier: Apache-2.0
//
// Argument validation for the peftreg::nf4_* ops, called once per op by its one entry
// (nf4_ops.cpp, and qlora_args.h for nf4_lora_linear), whatever the device. The fake kernels in
// peftreg/ops/nf4.py repeat these checks with torch._check, in the same words.
//
// A quantized weight travels through the ops as six arguments (see docs/ops.md):
//   codes             uint8, (n + 1) // 2 packed bytes (bitsandbytes stores them as (bytes, 1))
//   absmax            float32 (blocks,) without double quantization, uint8 (blocks,) with it
//   nested_absmax     float32 (ceil(blocks / nested_blocksize),) with double quantization, else None
//   offset            float32 0-dim (or 1-element) tensor with double quantization, else None
//   blocksize, nested_blocksize
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <utility>

#include "common/checks.h"
#include "nf4/nf4_format.h"

namespace peftreg::nf4 {

inline void check_blocksize(const char* op, const char* name, int64_t value) {
  TORCH_CHECK(valid_blocksize(value), op, ": argument '", name, "' is ", value,
              "; expected a power of two from ", kMinBlocksize, " to ", kMaxBlocksize);
}

inline void check_dtype(const at::Tensor& t, const char* op, const char* name,
                        at::ScalarType expected) {
  TORCH_CHECK(t.scalar_type() == expected, op, ": argument '", name, "' has dtype ",
              t.scalar_type(), "; expected ", expected);
}

inline constexpr const char* kQuantizeOp = "peftreg::nf4_quantize";
inline constexpr const char* kDoubleQuantizeOp = "peftreg::nf4_double_quantize";
inline constexpr const char* kDequantizeOp = "peftreg::nf4_dequantize";
inline constexpr const char* kDequantizeIntoOp = "peftreg::nf4_dequantize_into";
inline constexpr const char* kLinearOp = "peftreg::nf4_linear";
inline constexpr const char* kGradInputOp = "peftreg::nf4_linear_grad_input";

// nf4_quantize takes the dtypes NF4 weights come in; float64 has no use here.
inline void check_quantize_dtype(const char* op, const at::Tensor& x) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": argument 'x' has dtype ", dtype,
              "; expected Float (float32), BFloat16 or Half (float16)");
}

// nf4_dequantize's 'dtype'; nf4_dequantize_into checks its 'out' with
// checks::check_supported_dtype.
inline void check_dense_dtype(const char* op, at::ScalarType dtype) {
  TORCH_CHECK(checks::is_supported_float(dtype), op, ": argument 'dtype' is ", dtype,
              "; expected one of Float (float32), BFloat16, Half (float16) or Double");
}

inline void check_shape(const char* op, at::IntArrayRef shape) {
  for (const int64_t d : shape) {
    TORCH_CHECK(d >= 0, op, ": argument 'shape' ", shape, " has a negative size");
  }
}

inline void check_numel(const at::Tensor& t, const char* op, const char* name, int64_t expected,
                        const char* meaning) {
  TORCH_CHECK(t.numel() == expected, op, ": argument '", name, "' has ", t.numel(),
              " elements (shape ", t.sizes(), ") but ", expected, " are expected (", meaning,
              ")");
}

// The fields of a quantized weight, after validation. Pointers are filled by the device code.
struct QuantizedWeight {
  int64_t numel = 0;            // elements of the dense weight
  int64_t blocks = 0;           // absmax entries
  int64_t blocksize = 0;
  int64_t nested_blocksize = 0;
  bool double_quant = false;
};

// Validates codes/absmax/nested_absmax/offset for a dense tensor of `numel` elements, all on
// `device_ref`'s device.
inline QuantizedWeight check_quantized_weight(const char* op, const at::Tensor& device_ref,
                                              const char* ref_name, const at::Tensor& codes,
                                              const at::Tensor& absmax,
                                              const std::optional<at::Tensor>& nested_absmax,
                                              const std::optional<at::Tensor>& offset,
                                              int64_t blocksize, int64_t nested_blocksize,
                                              int64_t numel) {
  namespace ck = peftreg::checks;
  check_blocksize(op, "blocksize", blocksize);
  TORCH_CHECK(numel >= 0, op, ": the weight has a negative element count ", numel);
  QuantizedWeight w;
  w.numel = numel;
  w.blocksize = blocksize;
  w.blocks = num_blocks(numel, blocksize);
  w.nested_blocksize = nested_blocksize;

  check_dtype(codes, op, "codes", at::kByte);
  check_numel(codes, op, "codes", packed_bytes(numel),
              "(numel + 1) // 2 packed bytes for the weight's element count");
  ck::check_same_device(codes, op, "codes", device_ref, ref_name);
  ck::check_same_device(absmax, op, "absmax", device_ref, ref_name);
  check_numel(absmax, op, "absmax", w.blocks, "one per block: ceil(numel / blocksize)");

  if (absmax.scalar_type() == at::kByte) {
    w.double_quant = true;
    check_blocksize(op, "nested_blocksize", nested_blocksize);
    TORCH_CHECK(nested_absmax.has_value() && offset.has_value(), op,
                ": argument 'absmax' is uint8 (double-quantized), so 'nested_absmax' and "
                "'offset' are required");
    check_dtype(*nested_absmax, op, "nested_absmax", at::kFloat);
    check_dtype(*offset, op, "offset", at::kFloat);
    check_numel(*nested_absmax, op, "nested_absmax", num_blocks(w.blocks, nested_blocksize),
                "one per nested block: ceil(blocks / nested_blocksize)");
    check_numel(*offset, op, "offset", 1, "one scalar: the mean of the absmax");
    ck::check_same_device(*nested_absmax, op, "nested_absmax", device_ref, ref_name);
    ck::check_same_device(*offset, op, "offset", device_ref, ref_name);
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, op, ": argument 'absmax' has dtype ",
                absmax.scalar_type(),
                "; expected Float (float32 scales) or Byte (uint8 double-quantized scales)");
    TORCH_CHECK(!nested_absmax.has_value() && !offset.has_value(), op,
                ": arguments 'nested_absmax' and 'offset' belong to double-quantized weights "
                "(uint8 'absmax') but 'absmax' is float32; pass None for both");
  }
  return w;
}

// A validated quantized weight as the kernels get it: its sizes and its tensors, contiguous
// (nested_absmax and offset are undefined without double quantization).
struct Nf4Weight {
  QuantizedWeight sizes;
  at::Tensor codes, absmax, nested_absmax, offset;
};

// check_quantized_weight, then the tensors the kernels read.
inline Nf4Weight checked_weight(const char* op, const at::Tensor& device_ref,
                                const char* ref_name, const at::Tensor& codes,
                                const at::Tensor& absmax,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& offset, int64_t blocksize,
                                int64_t nested_blocksize, int64_t numel) {
  Nf4Weight w;
  w.sizes = check_quantized_weight(op, device_ref, ref_name, codes, absmax, nested_absmax, offset,
                                   blocksize, nested_blocksize, numel);
  w.codes = codes.contiguous();
  w.absmax = absmax.contiguous();
  if (w.sizes.double_quant) {
    w.nested_absmax = nested_absmax->contiguous();
    w.offset = offset->contiguous();
  }
  return w;
}

// nf4_linear / nf4_linear_grad_input: sizes of the product.
struct LinearSizes {
  int64_t rows = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
};

inline LinearSizes check_linear_input(const char* op, const at::Tensor& x, const char* x_name,
                                      int64_t features, const char* features_name,
                                      int64_t out_features, int64_t in_features) {
  namespace ck = peftreg::checks;
  TORCH_CHECK(in_features >= 0 && out_features >= 0, op, ": out_features (", out_features,
              ") and in_features (", in_features, ") must not be negative");
  ck::check_min_dim(x, op, x_name, 1, "(..., features)");
  TORCH_CHECK(x.size(-1) == features, op, ": argument '", x_name, "' has ", x.size(-1),
              " features in its last dimension (shape ", x.sizes(), ") but ", features_name,
              " is ", features);
  ck::check_supported_dtype(x, op, x_name);
  LinearSizes s;
  s.in_features = in_features;
  s.out_features = out_features;
  s.rows = ck::leading_rows(x);
  return s;
}

inline void check_bias(const char* op, const std::optional<at::Tensor>& bias,
                       const at::Tensor& x, int64_t out_features) {
  namespace ck = peftreg::checks;
  if (!bias.has_value()) return;
  ck::check_dim(*bias, op, "bias", 1, "(out_features,)");
  TORCH_CHECK(bias->size(0) == out_features, op, ": argument 'bias' has shape ", bias->sizes(),
              " but out_features is ", out_features);
  ck::check_like(op, {{"bias", &*bias}}, x, "x");
}

}  // namespace peftreg::nf4
