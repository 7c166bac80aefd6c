// SPDX-License-Identifier: Apache-2.0
//
// CPU kernels of peftreg::lora_linear and peftreg::lora_linear_backward (schemas in
// lora_ops.cpp):
//
//   y = x @ W^T + bias + scaling * ((x_lora or x) @ A^T) @ B^T       (LoRA, Hu et al. 2021, eq. 3)
//
// Forward: the base product goes straight into the output buffer (bias as the addmm input) and
// the rank-r update is accumulated into it in place (csrc/fused/lora_math.h), so the only LoRA
// temporary is the (rows, r) projection. Backward: the base's input gradient g @ W is computed
// into a fresh buffer and the low-rank input gradient is accumulated into it in place; A's and B's
// gradients come from (rows, r) intermediates. Neither direction forms B @ A.
//
// 16-bit inputs on processors without native bf16/fp16 arithmetic run every product in float32
// (see lora_math.h for why and what that means for the numbers); the output is rounded once.
// The forward refuses to return a 16-bit output that overflowed from finite inputs (a silent inf
// would turn into NaN further on); the backward does not check, because fp16 loss scaling
// relies on overflowing gradients reaching the scaler.
//
// Per-operator ATen headers instead of <ATen/ATen.h> keep this translation unit's compile time
// down (header parsing dominates it).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/all.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/max.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define PEFTREG_LORA_X86 1
#include <immintrin.h>
#else
#define PEFTREG_LORA_X86 0
#endif

#include "common/checks.h"
#include "fused/lora_cpu.h"
#include "fused/lora_dropout.h"
#include "fused/lora_kernels.h"
#include "fused/lora_math.h"

namespace peftreg::fused {

bool cpu_widens_16bit(at::ScalarType t, int64_t rows) {
  if (t != at::kBFloat16 && t != at::kHalf) return false;
  // PEFTREG_CPU_WIDEN_16BIT=0/1 overrides the hardware probe (tests use it to run both paths).
  if (const char* env = std::getenv("PEFTREG_CPU_WIDEN_16BIT"); env != nullptr && *env != '\0') {
    return std::strcmp(env, "0") != 0;
  }
  // Widening converts the whole weight (about 3 ns per element measured), which only pays when
  // enough rows share it: ATen's 16-bit path costs about 0.2-0.6 ns per multiply-add and row,
  // and its one-row (GEMV) path is fast. Below this many rows ATen's own kernel is used.
  if (rows < kCpuWidenMinRows) return false;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  static const bool native_bf16 = __builtin_cpu_supports("avx512bf16");
  static const bool native_fp16 = __builtin_cpu_supports("avx512fp16");
  return t == at::kBFloat16 ? !native_bf16 : !native_fp16;
#else
  return false;  // other architectures: trust ATen's 16-bit GEMM
#endif
}

namespace {

bool has_f16c() {
#if PEFTREG_LORA_X86
  static const bool f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2") &&
                           __builtin_cpu_supports("fma");
  return f16c;
#else
  return false;
#endif
}

}  // namespace

bool cpu_16bit_rows_kernel(at::ScalarType t, int64_t rows) {
  if (t != at::kBFloat16 && t != at::kHalf) return false;
  if (t == at::kHalf && !has_f16c()) return false;  // no fast widening of fp16 without F16C
  // PEFTREG_CPU_16BIT_ROWS=0/1 overrides the choice (tests run the kernel on any processor).
  if (const char* env = std::getenv("PEFTREG_CPU_16BIT_ROWS"); env != nullptr && *env != '\0') {
    return std::strcmp(env, "0") != 0;
  }
  if (const char* env = std::getenv("PEFTREG_CPU_WIDEN_16BIT"); env != nullptr && *env != '\0') {
    return false;  // a forced widen/native choice covers every row count
  }
  // Measured (benchmarks/bench_bf16_crossover.py, 1 x 4096 x 4096, r=16, fwd+bwd): without
  // bf16 arithmetic ATen's bf16 g @ W (the 'N' layout, not its fast GEMV) took 120 ms against
  // 7 ms in fp32, and this kernel beat widening at every row count below the widening
  // threshold (0.08x at 1 row to 0.56x at 31). With bf16 arithmetic (AVX512-BF16) it beat
  // ATen at one row only (0.79x against 1.13x of the fp32 twin; 2 rows: even). fp16 without
  // fp16 arithmetic is the same case (ATen's fp16 g @ W: 120 ms at one row); with it
  // (AVX512-FP16) no processor was at hand to measure, so ATen keeps it there.
  const bool native = !cpu_widens_16bit(t, kCpuWidenMinRows);
  if (t == at::kHalf) return !native && rows < kCpuWidenMinRows;
  return rows < (native ? kNativeBf16RowsKernelMax : kCpuWidenMinRows);
}

namespace {

// Columns [begin, end) of grad_x = g @ W with g (rows, out) float32 and W (out, in)
// contiguous bf16: every W row is read once and widened in registers (bf16 is the top half of
// a float32), accumulating in float32 into the zeroed rp.
void bf16_weight_columns(const float* gp, const uint16_t* wp, float* rp, int64_t rows,
                         int64_t out, int64_t in, int64_t begin, int64_t end) {
  for (int64_t j = 0; j < out; ++j) {
    const uint16_t* wrow = wp + j * in;
    for (int64_t r = 0; r < rows; ++r) {
      const float gj = gp[r * out + j];
      float* acc = rp + r * in;
      for (int64_t i = begin; i < end; ++i) {
        const uint32_t bits = static_cast<uint32_t>(wrow[i]) << 16;
        float w;
        std::memcpy(&w, &bits, sizeof w);
        acc[i] += gj * w;
      }
    }
  }
}

#if PEFTREG_LORA_X86
// fp16 W, widened eight at a time by F16C (has_f16c() holds).
__attribute__((target("avx2,fma,f16c"))) void fp16_weight_columns(
    const float* gp, const uint16_t* wp, float* rp, int64_t rows, int64_t out, int64_t in,
    int64_t begin, int64_t end) {
  for (int64_t j = 0; j < out; ++j) {
    const uint16_t* wrow = wp + j * in;
    for (int64_t r = 0; r < rows; ++r) {
      const float gj = gp[r * out + j];
      const __m256 g8 = _mm256_set1_ps(gj);
      float* acc = rp + r * in;
      int64_t i = begin;
      for (; i + 8 <= end; i += 8) {
        const __m256 w8 =
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + i)));
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(g8, w8, _mm256_loadu_ps(acc + i)));
      }
      for (; i < end; ++i) acc[i] = std::fma(gj, _cvtsh_ss(wrow[i]), acc[i]);
    }
  }
}
#endif

// grad_x = g @ W for a contiguous bf16 or fp16 W (the row kernel, cpu_16bit_rows_kernel).
// Threads split the columns; each keeps its block of `rows` accumulators hot in cache.
at::Tensor rows_times_16bit_weight(const at::Tensor& g, const at::Tensor& weight) {
  const int64_t rows = g.size(0), out = weight.size(0), in = weight.size(1);
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || PEFTREG_LORA_X86,
              "peftreg: the fp16 row kernel needs x86 F16C (cpu_16bit_rows_kernel)");
  at::Tensor result = at::zeros({rows, in}, g.options());
  const float* gp = g.const_data_ptr<float>();
  float* rp = result.data_ptr<float>();
  const auto* wp = static_cast<const uint16_t*>(weight.const_data_ptr());
  at::parallel_for(0, in, 512, [&](int64_t begin, int64_t end) {
#if PEFTREG_LORA_X86
    if (!bf16) {
      fp16_weight_columns(gp, wp, rp, rows, out, in, begin, end);
      return;
    }
#endif
    bf16_weight_columns(gp, wp, rp, rows, out, in, begin, end);
  });
  return result;
}

// True if any element of the 16-bit tensor t is inf or NaN: all exponent bits set. An integer
// scan of the bit patterns, far cheaper than the product it follows.
bool any_non_finite_16bit(const at::Tensor& t) {
  const uint16_t exponent = t.scalar_type() == at::kBFloat16 ? 0x7F80 : 0x7C00;
  const auto* bits = static_cast<const uint16_t*>(t.const_data_ptr());
  std::atomic<bool> found{false};
  at::parallel_for(0, t.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    uint16_t hit = 0;
    for (int64_t i = begin; i < end; ++i) hit |= ((bits[i] & exponent) == exponent);
    if (hit) found.store(true, std::memory_order_relaxed);
  });
  return found.load();
}

bool all_finite(const at::Tensor& t) { return at::isfinite(t).all().item<bool>(); }

}  // namespace

void check_16bit_output_overflow(const char* op, const at::Tensor& y, const at::Tensor& y_acc,
                                 std::initializer_list<const at::Tensor*> inputs) {
  if (y.scalar_type() != at::kBFloat16 && y.scalar_type() != at::kHalf) return;
  if (!any_non_finite_16bit(y)) return;
  for (const at::Tensor* t : inputs) {
    if (t != nullptr && t->defined() && !all_finite(*t)) return;  // inf/NaN came in: pass through
  }
  // y_acc is the float32 result when the products were widened, else y itself (then inf).
  const double largest = at::abs(y_acc).max().item<double>();
  TORCH_CHECK(false, op, ": the ", y.scalar_type(), " output overflowed (largest |y| = ",
              largest, ", beyond the dtype's finite range) although every input is finite; "
              "compute this layer in float32 (or bfloat16 instead of float16), or rescale "
              "its inputs");
}

at::Tensor lora_linear_cpu(const LoraLinearSizes& s, const at::Tensor& x,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                           const std::optional<at::Tensor>& x_lora, const LoraDropout& dropout) {
  const at::ScalarType compute = lora_compute_dtype(x.scalar_type(),
                                                    cpu_widens_16bit(x.scalar_type(), s.rows));

  // weight, A and B enter the GEMMs as transposed views: BLAS reads either memory order
  // without a copy (widening makes a contiguous float32 copy anyway).
  const at::Tensor x2d = as_compute(rows_2d(x, s.rows, s.in_features), compute);
  const at::Tensor w = as_compute(weight, compute);
  at::Tensor y = at::empty({s.rows, s.out_features}, x2d.options());
  if (bias.has_value()) {
    at::addmm_out(y, as_compute(*bias, compute), x2d, w.t());
  } else {
    at::mm_out(y, x2d, w.t());
  }
  at::Tensor xl2d =
      x_lora.has_value() ? as_compute(rows_2d(*x_lora, s.rows, s.in_features), compute) : x2d;
  if (dropout.active()) xl2d = lora_dropout_apply(xl2d, dropout);
  add_low_rank(y, xl2d, as_compute(lora_a, compute), as_compute(lora_b, compute), scaling);

  const at::Tensor out = compute == x.scalar_type() ? y : y.to(x.scalar_type());
  const at::Tensor* xl = x_lora.has_value() ? &*x_lora : nullptr;
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  check_16bit_output_overflow(kLoraLinearOp, out, y, {&x, &weight, b, &lora_a, &lora_b, xl});
  return out;
}

LoraGrads lora_linear_backward_cpu(const LoraBackwardSizes& s, const at::Tensor& grad,
                                   const std::optional<at::Tensor>& x,
                                   const std::optional<at::Tensor>& weight,
                                   const at::Tensor& lora_a, const at::Tensor& lora_b,
                                   double scaling, const std::optional<at::Tensor>& x_lora,
                                   const LoraDropout& dropout) {
  if (s.need[kGradX] && weight.has_value() && weight->is_contiguous() &&
      cpu_16bit_rows_kernel(grad.scalar_type(), s.rows)) {
    // Few rows of bf16/fp16: g @ W by the row kernel, the small products in float32 (g, x, A
    // and B are (rows, .) or rank-sized, cheap to widen); one rounding at the end as elsewhere.
    const at::Tensor g = rows_2d(grad, s.rows, s.out_features).to(at::kFloat).contiguous();
    at::Tensor grad_x = rows_times_16bit_weight(g, *weight);
    const LowRankGrads lr = low_rank_grads_for(g, x, lora_a, lora_b, scaling, x_lora, s,
                                               at::kFloat, &grad_x, dropout);
    return finish_grads(grad, grad_x, lr, s);
  }
  const at::ScalarType compute = lora_compute_dtype(grad.scalar_type(),
                                                    cpu_widens_16bit(grad.scalar_type(), s.rows));
  return lora_backward_composite(grad, x, weight, lora_a, lora_b, scaling, x_lora, s, compute,
                                 dropout);
}

}  // namespace peftreg::fused
