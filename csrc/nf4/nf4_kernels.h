// SPDX-License-Identifier: Apache-2.0
//
// The one interface header of the NF4 storage ops, for every file of the family:
//
//   - the launch API of the NF4 CUDA kernels in nf4_cuda.cu: plain pointers and sizes, no torch
//     types, so nvcc compiles the .cu file alone (tests/ops/test_cuda_build.py). Every function
//     enqueues work on `stream` and returns cudaSuccess, a launch error, or cudaErrorInvalidValue
//     for bad sizes;
//   - under #ifndef __CUDACC__, the torch side: the argument checks of the peftreg::nf4_* ops,
//     called once per op by its one entry (nf4_ops.cpp, and lora_kernels.h's checks for
//     nf4_lora_linear) whatever the device (the fake kernels in peftreg/ops/nf4.py repeat them
//     with torch._check, in the same words), and the per-device kernel table. The entries make
//     the arguments contiguous, allocate the outputs and call the table of the input's device:
//     nf4_cpu.cpp (always) or nf4_cuda_ops.cpp (CUDA builds: device guard, stream, offsets via
//     ATen's mean, dynamic-code upload, the cuBLAS GEMMs of the large-batch path). The
//     LoRA-on-NF4 kernels (csrc/fused/qlora_cpu.cpp, lora_cuda_ops.cpp) call `product` of their
//     device's table too.
//
// A quantized weight travels through the ops as six arguments (see docs/ops.md):
//   codes             uint8, (n + 1) // 2 packed bytes (bitsandbytes stores them as (bytes, 1))
//   absmax            float32 (blocks,) without double quantization, uint8 (blocks,) with it
//   nested_absmax     float32 (ceil(blocks / nested_blocksize),) with double quantization, else None
//   offset            float32 0-dim (or 1-element) tensor with double quantization, else None
//   blocksize, nested_blocksize
#pragma once

#include <cstdint>

// ---- CUDA launch API (no torch types) ------------------------------------------------------
// Seen by nvcc and by CUDA builds only: a CPU build has no CUDA toolkit headers.
#if defined(__CUDACC__) || PEFTREG_WITH_CUDA
#include <cuda_runtime_api.h>


#include "common/scalar_kind.h"

namespace peftreg::nf4::cuda {

using ::peftreg::ScalarKind;  // common/scalar_kind.h

// A quantized weight in device memory (see the torch side below for the layout).
struct WeightArgs {
  const uint8_t* codes = nullptr;         // (numel + 1) / 2 packed bytes
  const float* absmax = nullptr;          // float32 scales (no double quantization), or
  const uint8_t* absmax_codes = nullptr;  // uint8 scale codes (double quantization) with
  const float* nested = nullptr;          //   the float32 second-level scales,
  const float* offset = nullptr;          //   the offset (one float, device memory) and
  const float* dynamic_code = nullptr;    //   the 256-entry dynamic code (device memory)
  int64_t numel = 0;
  int64_t blocksize = 64;
  int64_t nested_blocksize = 256;
};

// Fills host arrays with the dynamic code, its midpoints and bitsandbytes' decision boundaries
// (nf4_format.h), so the glue can upload them once per device.
void host_dynamic_code(float* code256, float* mid255, float* bnb255);

// codes/absmax of x (n elements of `dtype`); *bad_block (device int64, preset to -1 by the
// caller) receives the index of a block holding NaN/inf, if any.
cudaError_t quantize(ScalarKind dtype, const void* x, int64_t n, int64_t blocksize,
                     uint8_t* codes, float* absmax, long long* bad_block, cudaStream_t stream);

// absmax_codes/nested of (absmax - *offset); `bounds` holds 255 decision boundaries on device:
// the midpoints with `nearest` (values scaled as the 4-bit codes are), else bitsandbytes'
// boundaries (values divided by the block's absmax).
cudaError_t double_quantize(const float* absmax, int64_t n, const float* offset,
                            int64_t nested_blocksize, const float* bounds, bool nearest,
                            uint8_t* absmax_codes, float* nested, cudaStream_t stream);

// out[i] = dequantized element first + i, for i < count, rounded once from float32 to `dtype`.
cudaError_t dequantize(const WeightArgs& w, int64_t first, int64_t count, ScalarKind dtype,
                       void* out, cudaStream_t stream);

// Few-row products with on-the-fly decoding (rows <= kMaxGemvRows), accumulating in float32
// (float64 for kFloat64) into `acc` (rows, out_features) resp. (rows, in_features):
//   gemv_forward:    acc = x @ W^T        x: (rows, in_features)
//   gemv_grad_input: acc = g @ W          g: (rows, out_features)
inline constexpr int64_t kMaxGemvRows = 8;
cudaError_t gemv_forward(const WeightArgs& w, ScalarKind dtype, const void* x, int64_t rows,
                         int64_t out_features, int64_t in_features, void* acc,
                         cudaStream_t stream);
cudaError_t gemv_grad_input(const WeightArgs& w, ScalarKind dtype, const void* g, int64_t rows,
                            int64_t out_features, int64_t in_features, void* acc,
                            cudaStream_t stream);

}  // namespace peftreg::nf4::cuda
#endif  // defined(__CUDACC__) || PEFTREG_WITH_CUDA

// ---- Torch side: checks, sizes, the kernel table (not for nvcc: nf4_cuda.cu stays torch-free) --
#ifndef __CUDACC__
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

struct Nf4Kernels {
  // codes ((n + 1) / 2, 1) and absmax (blocks,) of the contiguous x; returns the first block
  // holding NaN or infinity (the entry reports it), or -1.
  int64_t (*quantize)(const at::Tensor& x, int64_t blocksize, at::Tensor& codes,
                      at::Tensor& absmax);
  // codes (n,) and nested (ceil(n / nested_blocksize),) of the finite, contiguous float32
  // absmax - offset, offset a 0-dim float32 tensor on absmax's device.
  void (*double_quantize)(const at::Tensor& absmax, const at::Tensor& offset,
                          int64_t nested_blocksize, bool nearest, at::Tensor& codes,
                          at::Tensor& nested);
  // The contiguous out (w.sizes.numel elements, a supported float dtype) = the dense weight.
  void (*dequantize)(const Nf4Weight& w, at::Tensor& out);
  // input2d (rows, k) @ op(W) for W (out_features, in_features): W^T when `forward` (k =
  // in_features, result (rows, out_features)), else W (k = out_features, result (rows,
  // in_features)). The result is unrounded: float32 (float64 for float64 input), except where
  // a device multiplies decoded tiles in the input's dtype (many rows of bf16/fp16: CUDA always,
  // the CPU where it has arithmetic for the dtype): then it is rounded to the input's dtype.
  at::Tensor (*product)(const Nf4Weight& w, const at::Tensor& input2d, int64_t out_features,
                        int64_t in_features, bool forward);
};

const Nf4Kernels& cpu_nf4_kernels();

// Whether the CPU table's product over `rows` rows of dtype t multiplies tiles decoded into t
// and returns its result rounded to t (many rows of bf16/fp16 on a CPU with arithmetic for
// them, or PEFTREG_CPU_WIDEN_16BIT=0; nf4_cpu.cpp).
bool cpu_products_in_16bit(at::ScalarType t, int64_t rows);
#if PEFTREG_WITH_CUDA
const Nf4Kernels& cuda_nf4_kernels();
#endif

// nf4_linear's rows: x2d (rows, in_features) @ W^T + bias, rounded once to x2d's dtype.
inline at::Tensor nf4_linear_rows(const Nf4Kernels& k, const Nf4Weight& w, const at::Tensor& x2d,
                                  const std::optional<at::Tensor>& bias, int64_t out_features,
                                  int64_t in_features) {
  at::Tensor y = k.product(w, x2d, out_features, in_features, /*forward=*/true);
  if (bias.has_value()) y.add_(bias->to(y.scalar_type()));
  return y.to(x2d.scalar_type());
}

}  // namespace peftreg::nf4
#endif  // __CUDACC__
