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
//   blocks of `nested_blocksize` (256) with the signed 8-bit dynamic code below; dequantized
//   absmax = fp32(fp32(code[q] * nested_absmax[block]) + offset). The code of a residual r in a
//   block whose largest |r| is m follows bitsandbytes' CPU quantizer by default: z = fp32(r / m),
//   then its measured decision boundaries (kBnbDynamicUpperBits below), which are not the
//   midpoints: its bucketed search merges the codes near zero and moves other boundaries by up to
//   about a tenth of a code gap. A block of zero residuals gives z = NaN there, hence code 0.
//   The nearest-code rule (midpoints, ties to the lower code, same scaling as the 4-bit codes)
//   stays available as an explicit option.
// * The signed dynamic code (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
//   Quantization", dynamic tree quantization): for exponent level e = 0..6 the magnitude
//   10^(e-6) times the 2^e midpoints of 2^e + 1 evenly spaced points from 0.1 to 1, with both
//   signs; plus 0 and 1.0. 127 negative values, 0, 127 positive values, 1.0: 256 entries, sorted.
//   Every intermediate is float32 as bitsandbytes computes it (its torch.linspace forms each
//   point with one rounding of start + step * k, or end - step * (n - k) past the middle), which
//   reproduces its table bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

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

// The absmax a block stores: bitsandbytes keeps a full block's as it is (0 for an all-zero
// block) but clamps the trailing partial block's to 1e-38, the divisor both use.
PEFTREG_NF4_HD inline float stored_absmax(float amax, bool full_block) {
  return full_block || amax > kMinAbsmax ? amax : kMinAbsmax;
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

// bitsandbytes 0.50's decision boundaries for the dynamic code, as float32 bit patterns: entry k
// is the largest normalised value z in [-1, 1] that its CPU blockwise quantizer maps to a code
// <= k. Measured by bisection over float32 against bitsandbytes itself
// (tests/bnb_dynamic_probe.py prints this table; a test re-measures it), and checked there
// on millions of values, every code, midpoint and boundary neighbour.
inline constexpr uint32_t kBnbDynamicUpperBits[kDynamicCodes - 1] = {
    0xbf7c66fd, 0xbf78ccf9, 0xbf7532f6, 0xbf7198f2, 0xbf6e00ef, 0xbf6a66eb, 0xbf66cce7, 0xbf6332e4,
    0xbf5f98e0, 0xbf5c00dd, 0xbf5866d9, 0xbf54ccd5, 0xbf5132d2, 0xbf4d98ce, 0xbf4a00cb, 0xbf4666c7,
    0xbf42ccc3, 0xbf3f32c0, 0xbf3b98bc, 0xbf3800b9, 0xbf3466b5, 0xbf30ccb2, 0xbf2d32ae, 0xbf2998aa,
    0xbf2600a7, 0xbf2266a3, 0xbf1ecca0, 0xbf1b329c, 0xbf179a98, 0xbf140095, 0xbf106691, 0xbf0ccc8e,
    0xbf09328a, 0xbf059a86, 0xbf020083, 0xbefcccfe, 0xbef598f7, 0xbeee64ef, 0xbee734ea, 0xbee000e2,
    0xbed8ccda, 0xbed198d3, 0xbeca64cb, 0xbec334c6, 0xbebc00be, 0xbeb4ccb6, 0xbead98af, 0xbea664a7,
    0xbe9f34a2, 0xbe98009a, 0xbe90cc92, 0xbe89988b, 0xbe826483, 0xbe7668fb, 0xbe6800eb, 0xbe5998db,
    0xbe4b30ce, 0xbe3cd0be, 0xbe2e68b3, 0xbe2000a3, 0xbe119893, 0xbe033086, 0xbde9a0ec, 0xbdd290d5,
    0xbdc710cc, 0xbdc140c5, 0xbdbb80bc, 0xbdb5c0bc, 0xbdb000b5, 0xbdaa40ac, 0xbda480ac, 0xbd9eb0a5,
    0xbd98f09c, 0xbd933095, 0xbd8d7095, 0xbd87b08c, 0xbd81f085, 0xbd786109, 0xbd6cc0f8, 0xbd6140e9,
    0xbd55c0d8, 0xbd4a40d8, 0xbd3ec0c9, 0xbd3340b8, 0xbd27a0a9, 0xbd1c20a9, 0xbd10a098, 0xbd052089,
    0xbcf34111, 0xbcdc40f0, 0xbcc500d1, 0xbcae00b0, 0xbc9700b0, 0xbc800091, 0xbc5200e0, 0xbc2d00e0,
    0xbc1a80a1, 0xbc1180a1, 0xbc0800a1, 0xbbfe0141, 0xbbec0141, 0xbbd90141, 0xbbc70141, 0xbbb400c0,
    0xbba200c0, 0xbb8f00c0, 0xbb7a0180, 0xbb540180, 0xbb300180, 0xbb0c0180, 0xbacc0101, 0xba900101,
    0xba680201, 0xba480201, 0xba300201, 0xba100201, 0xb9e00401, 0xb9b00401, 0xb9600801, 0xb9000801,
    0xb8c01001, 0xb8801001, 0xb8002001, 0xb3000001, 0xb3000001, 0xb3000001, 0xb3000001, 0xb3000001,
    0xb3000001, 0xb3000001, 0xb3000001, 0x37ff7fff, 0x387fbfff, 0x38bfdfff, 0x38ffdfff, 0x395fefff,
    0x39aff7ff, 0x39dff7ff, 0x3a0ffbff, 0x3a2ffbff, 0x3a47fbff, 0x3a67fbff, 0x3a8ffdff, 0x3acbfdff,
    0x3b0bfeff, 0x3b2ffeff, 0x3b53feff, 0x3b79feff, 0x3b8f0080, 0x3ba20080, 0x3bb40080, 0x3bc70080,
    0x3bd90080, 0x3bec0080, 0x3bfe0080, 0x3c080040, 0x3c118040, 0x3c1a8040, 0x3c2d0040, 0x3c5200bf,
    0x3c80005f, 0x3c97005f, 0x3cae00a0, 0x3cc500a0, 0x3cdc40a0, 0x3cf340df, 0x3d05206f, 0x3d10a090,
    0x3d1c2090, 0x3d27a090, 0x3d3340af, 0x3d3ec0af, 0x3d4a40af, 0x3d55c0d0, 0x3d6140d0, 0x3d6cc0d0,
    0x3d7860ef, 0x3d81f077, 0x3d87b077, 0x3d8d7088, 0x3d933088, 0x3d98f097, 0x3d9eb097, 0x3da48097,
    0x3daa40a8, 0x3db000a8, 0x3db5c0a8, 0x3dbb80b7, 0x3dc140b7, 0x3dc710b7, 0x3dd290c8, 0x3de9a0e8,
    0x3e03307b, 0x3e11988b, 0x3e20009b, 0x3e2e68ab, 0x3e3cd0bb, 0x3e4b30c4, 0x3e5998d4, 0x3e6800e4,
    0x3e7668f4, 0x3e826482, 0x3e899885, 0x3e90cc8d, 0x3e980095, 0x3e9f349d, 0x3ea664a5, 0x3ead98aa,
    0x3eb4ccb2, 0x3ebc00ba, 0x3ec334c2, 0x3eca64ca, 0x3ed198cd, 0x3ed8ccd5, 0x3ee000dd, 0x3ee734e5,
    0x3eee64ed, 0x3ef598f2, 0x3efcccfa, 0x3f020081, 0x3f059a85, 0x3f093289, 0x3f0ccc8a, 0x3f10668e,
    0x3f140092, 0x3f179a96, 0x3f1b329a, 0x3f1ecc9d, 0x3f2266a1, 0x3f2600a5, 0x3f2998a9, 0x3f2d32ad,
    0x3f30ccae, 0x3f3466b2, 0x3f3800b6, 0x3f3b98ba, 0x3f3f32be, 0x3f42ccc1, 0x3f4666c5, 0x3f4a00c9,
    0x3f4d98cd, 0x3f5132d1, 0x3f54ccd2, 0x3f5866d6, 0x3f5c00da, 0x3f5f98de, 0x3f6332e2, 0x3f66cce5,
    0x3f6a66e9, 0x3f6e00ed, 0x3f7198f1, 0x3f7532f5, 0x3f78ccf6, 0x3f7c66fa, 0x3f7f18fe
};

// Fills `bounds` with kBnbDynamicUpperBits as floats (host side; the CUDA glue uploads them).
inline void fill_bnb_dynamic_bounds(float* bounds) {
  for (int i = 0; i < kDynamicCodes - 1; ++i) {
    const uint32_t bits = kBnbDynamicUpperBits[i];
    std::memcpy(&bounds[i], &bits, sizeof(float));
  }
}

// The dynamic-code index of v given 255 ascending upper bounds (the midpoints for the nearest
// code, ties to the lower entry; or bitsandbytes' boundaries): the number of bounds strictly
// below v, by a branch-free binary search (8 fixed steps; the indices read are at most 254).
// NaN compares false everywhere and gives 0, as in bitsandbytes.
PEFTREG_NF4_HD inline int dynamic_index(float v, const float* bounds) {
  int i = 0;
  for (int step = kDynamicCodes / 2; step > 0; step /= 2) {
    i += (v > bounds[i + step - 1]) ? step : 0;
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
