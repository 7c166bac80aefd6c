// SPDX-License-Identifier: Apache-2.0
//
// CPU helpers of the fused LoRA kernels, shared by the dense-base (lora_cpu.cpp) and NF4-base
// (qlora_cpu.cpp) kernels. The kernels themselves are declared, and listed in the CPU table, in
// lora_kernels.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>

namespace peftreg::fused {

// Whether CPU kernels widen 16-bit operands of dtype t to float32 for products over `rows` input
// rows (bf16/fp16 on processors without native 16-bit arithmetic, from 32 rows; see
// lora_math.h and lora_cpu.cpp).
bool cpu_widens_16bit(at::ScalarType t, int64_t rows);

// From this many rows a 16-bit product on a processor without 16-bit arithmetic is widened.
inline constexpr int64_t kCpuWidenMinRows = 32;

// Below this many rows the bf16 row kernel also runs where the processor has bf16 arithmetic.
inline constexpr int64_t kNativeBf16RowsKernelMax = 2;

// Whether the backward computes g @ W for bf16/fp16 by the row kernel of lora_cpu.cpp (W read
// once, widened in registers): below kCpuWidenMinRows rows on processors without the dtype's
// arithmetic, below kNativeBf16RowsKernelMax for bf16 with it (measured crossovers,
// lora_cpu.cpp); fp16 needs F16C for the widening. PEFTREG_CPU_16BIT_ROWS=0/1 forces it
// off/on.
bool cpu_16bit_rows_kernel(at::ScalarType t, int64_t rows);

// For a bf16/fp16 output y rounded from the float32 result y_acc: raises a clear error when y
// holds inf/NaN although every tensor in `inputs` (null entries skipped) is finite.
void check_16bit_output_overflow(const char* op, const at::Tensor& y, const at::Tensor& y_acc,
                                 std::initializer_list<const at::Tensor*> inputs);

}  // namespace peftreg::fused
