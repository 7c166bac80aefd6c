// SPDX-License-Identifier: Apache-2.0
//
// The NF4 storage format, one source for the CPU kernels (nf4_cpu.cpp) and the CUDA kernels
// (nf4_cuda.cu). No torch header: nvcc compiles this alone. Everything here is a fact of the
// bitsandbytes 0.50 format (docs/format.md, "NF4 storage"), so checkpoints load without
// requantizing:
//
// * NF4 codebook (QLoRA, Dettmers et al. 2023, section 3 and appendix E): 16 float32 values,
//   index 0..15, sorted, exact 0.0 at index 7 and +-1.0 at the ends.
// * Quantize: blocks of `blocksize` consecutive elements of the flattened tensor (a trailing
//   partial block has its own absmax), absmax in float32, scaled value clamped to [-1, 1], nearest
//   code with ties going to the LOWER code: the code index is the number of float32 midpoints
//   (code[i] + code[i+1]) / 2 strictly below the scaled value. A full block scales by the float32
//   reciprocal of max(absmax, 1e-38) (x * (1 / a)), the trailing partial block divides (x / a):
//   that is what bitsandbytes' quantize does, and the two differ in the last bit often enough to
//   move a value across a midpoint about once per million elements.
// * Packing: element 2i in the HIGH nibble of byte i, element 2i+1 in the LOW nibble; an odd
//   element count pads the last low nibble with code 7 (0.0).
// * Double quantization (QLoRA section 3): offset = mean(absmax); (absmax - offset) quantized in
//   blocks of `nested_blocksize` (256) with the signed 8-bit dynamic code below, same scaling and
//   nearest rule; dequantized absmax = fp32(fp32(code[q] * nested_absmax[block]) + offset).
// * The signed dynamic code (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
//   Quantization", dynamic tree quantization): for exponent level e = 0..6 the magnitude
//   10^(e-6) times the 2^e midpoints of 2^e + 1 evenly spaced points from 0.1 to 1, with both
//   signs; plus 0 and 1.0. 127 negative values, 0, 127 positive values, 1.0: 256 entries, sorted.
//   Every intermediate is float32 as bitsandbytes computes it (its torch.linspace forms each
//   point with one rounding of start + step * k, or end - step * (n - k) past the middle), which
//   reproduces its table bit for bit.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PEFTREG_NF4_HD __host__ __device__
#else
#define PEFTREG_NF4_HD
#endif

namespace peftreg::nf4 {

inline constexpr int kCodes = 16;           // NF4 code points
inline constexpr int kZeroCode = 7;         // the index of 0.0: padding nibble
inline constexpr int kDynamicCodes = 256;   // entries of the double-quant code
inline constexpr int64_t kMinBlocksize = 32;
inline constexpr int64_t kMaxBlocksize = 4096;
inline constexpr int64_t kDefaultBlocksize = 64;
inline constexpr int64_t kDefaultNestedBlocksize = 256;
// bitsandbytes clamps a block's absmax to this before taking its reciprocal, so an all-zero
// block scales to zeros (code 7) instead of dividing by zero.
inline constexpr float kMinAbsmax = 1e-38f;

// The NF4 codebook, float32, index order (QLoRA appendix E; bitsandbytes' table). A macro so
// the CUDA kernels can initialise a __constant__ copy from the same literals.
#define PEFTREG_NF4_CODE_VALUES                                                          \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,             \
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,        \
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,                 \
      0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,                  \
      0.7229568362236023f, 1.0f

inline constexpr float kNF4Code[kCodes] = {PEFTREG_NF4_CODE_VALUES};

// float32 midpoints between neighbouring NF4 codes: (a + b) rounded to float32, then halved
// (exact), as bitsandbytes forms its decision boundaries.
inline constexpr float nf4_midpoint(int i) {
  return static_cast<float>(kNF4Code[i] + kNF4Code[i + 1]) * 0.5f;
}

inline constexpr float kNF4Midpoint[kCodes - 1] = {
    nf4_midpoint(0),  nf4_midpoint(1),  nf4_midpoint(2),  nf4_midpoint(3),  nf4_midpoint(4),
    nf4_midpoint(5),  nf4_midpoint(6),  nf4_midpoint(7),  nf4_midpoint(8),  nf4_midpoint(9),
    nf4_midpoint(10), nf4_midpoint(11), nf4_midpoint(12), nf4_midpoint(13), nf4_midpoint(14),
};

// True for the block sizes of the format: powers of two from 32 to 4096.
PEFTREG_NF4_HD inline constexpr bool valid_blocksize(int64_t b) {
  return b >= kMinBlocksize && b <= kMaxBlocksize && (b & (b - 1)) == 0;
}

PEFTREG_NF4_HD inline constexpr int64_t num_blocks(int64_t n, int64_t blocksize) {
  return (n + blocksize - 1) / blocksize;
}

PEFTREG_NF4_HD inline constexpr int64_t packed_bytes(int64_t n) { return (n + 1) / 2; }

// Nearest NF4 code of a value already scaled into [-1, 1] (ties to the lower code): the count
// of midpoints strictly below v, found with a branch-free binary search over the 15 midpoints.
// NaN never reaches here (the kernels reject non-finite input first).
PEFTREG_NF4_HD inline int nf4_nearest(float v, const float* mid) {
  int i = 0;
  // Each step halves the remaining range [i, i + width]; the indices read are at most 14.
  i += (v > mid[7]) ? 8 : 0;
  i += (v > mid[i + 3]) ? 4 : 0;
  i += (v > mid[i + 1]) ? 2 : 0;
  i += (v > mid[i]) ? 1 : 0;
  return i;
}

// Scales x into [-1, 1] as bitsandbytes does: `inv` is the float32 reciprocal of
// max(absmax, 1e-38) for a full block; a partial block divides by `divisor` instead.
PEFTREG_NF4_HD inline float scale_clamped(float x, bool full_block, float inv, float divisor) {
  float s = full_block ? x * inv : x / divisor;
  s = s < -1.0f ? -1.0f : s;
  return s > 1.0f ? 1.0f : s;
}

// Fills `code` with the 256 entries of bitsandbytes' signed dynamic 8-bit code (see the top of
// this file) and `mid` with its 255 float32 midpoints. Host and device callable; cheap enough
// to run once per process.
PEFTREG_NF4_HD inline void fill_dynamic_code(float* code, float* mid) {
  // 10^(e-6) rounded to float32, e = 0..6.
  const float level_scale[7] = {1e-6f, 1e-5f, 1e-4f, 1e-3f, 1e-2f, 1e-1f, 1.0f};
  float positive[127];
  int count = 0;
  for (int e = 0; e < 7; ++e) {
    const int intervals = 1 << e;          // 2^e means between 2^e + 1 points
    const int steps = intervals + 1;
    const float start = 0.1f;
    const float end = 1.0f;
    const float step = (end - start) / static_cast<float>(intervals);
    const int halfway = steps / 2;
    float previous = 0.0f;
    for (int k = 0; k < steps; ++k) {
      // One rounding of start + step * k (or end - step * (steps - 1 - k)): the product of a
      // float32 and a small integer is exact in double, and so is the sum, so the double
      // expression rounded to float32 is the fused multiply-add torch's linspace computes.
      const double exact = k < halfway
                               ? static_cast<double>(start) + static_cast<double>(step) * k
                               : static_cast<double>(end) -
                                     static_cast<double>(step) * (steps - 1 - k);
      const float point = static_cast<float>(exact);
      if (k > 0) {
        const float mean = (previous + point) / 2.0f;
        positive[count++] = level_scale[e] * mean;
      }
      previous = point;
    }
  }
  // Sorted: 127 negatives (largest magnitude first), 0, 127 positives, 1.0. The levels do not
  // overlap (level e lies in (10^(e-7), 10^(e-6))), so `positive` is already ascending.
  for (int i = 0; i < 127; ++i) {
    code[i] = -positive[126 - i];
    code[128 + i] = positive[i];
  }
  code[127] = 0.0f;
  code[255] = 1.0f;
  for (int i = 0; i < kDynamicCodes - 1; ++i) {
    mid[i] = (code[i] + code[i + 1]) / 2.0f;
  }
}

// Nearest entry of the dynamic code for v in [-1, 1], ties to the lower entry: the number of
// the 255 midpoints strictly below v, by a branch-free binary search (8 fixed steps; the
// indices read are at most 254).
PEFTREG_NF4_HD inline int dynamic_nearest(float v, const float* mid) {
  int i = 0;
  for (int step = kDynamicCodes / 2; step > 0; step /= 2) {
    i += (v > mid[i + step - 1]) ? step : 0;
  }
  return i;
}

// log2 of a power of two (block sizes), so block indices are shifts, not divisions.
PEFTREG_NF4_HD inline constexpr int log2_pow2(int64_t v) {
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

}  // namespace peftreg::nf4
