// SPDX-License-Identifier: Apache-2.0
//
// The NF4 CPU product for other CPU kernels (the fused QLoRA kernel in csrc/fused/qlora_cpu.cpp),
// which need its unrounded float32 result to add their own terms before rounding once.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace peftreg::nf4 {

// input2d (rows, k) @ op(W) for the NF4 weight W (out_features, in_features): op(W) = W^T when
// `forward` (k = in_features, result (rows, out_features)), else W (k = out_features, result
// (rows, in_features)). W is decoded tile by tile; the result is float32 (float64 for float64
// input), not rounded to the input's dtype. The weight arguments are checked as nf4_linear
// checks them, with messages naming `op` and `input_name`.
at::Tensor nf4_product_acc_cpu(const char* op, const at::Tensor& input2d, const char* input_name,
                               const at::Tensor& codes, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& offset, int64_t blocksize,
                               int64_t nested_blocksize, int64_t out_features,
                               int64_t in_features, bool forward);

}  // namespace peftreg::nf4
