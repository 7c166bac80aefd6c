// SPDX-License-Identifier: Apache-2.0
//
// CPU helpers of the fused LoRA kernels, shared by the dense-base (lora_cpu.cpp) and NF4-base
// (qlora_cpu.cpp) kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>

namespace peftreg::fused {

// Whether CPU kernels widen 16-bit operands of dtype t to float32 for products over `rows` input
// rows (bf16/fp16 on processors without native 16-bit arithmetic, from 32 rows; see
// lora_math.h and lora_cpu.cpp).
bool cpu_widens_16bit(at::ScalarType t, int64_t rows);

// For a bf16/fp16 output y rounded from the float32 result y_acc: raises a clear error when y
// holds inf/NaN although every tensor in `inputs` (null entries skipped) is finite.
void check_16bit_output_overflow(const char* op, const at::Tensor& y, const at::Tensor& y_acc,
                                 std::initializer_list<const at::Tensor*> inputs);

}  // namespace peftreg::fused
