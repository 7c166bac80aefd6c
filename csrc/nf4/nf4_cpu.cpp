// SPDX-License-Identifier: Apache-2.0
//
// The CPU kernel table of the peftreg::nf4_* ops (nf4_kernels.h): kernels only; the checked
// entries, one per op for every device, are nf4_ops.cpp. The format is csrc/nf4/nf4_format.h,
// documented in docs/format.md "NF4 storage".
//
// Numerics (shared with the CUDA few-row kernels and peftreg/ops/reference.py): a weight enters
// a product as its float32 dequantized value fp32(code * absmax) (with double quantization the
// absmax itself is fp32(fp32(dyncode * nested_absmax) + offset)); activations are widened
// exactly to float32 (float64 stays float64); sums accumulate in float32 (float64); the output
// is rounded once to the input's dtype. So the result does not depend on the compute dtype's
// rounding of W, and bf16 inputs get the accuracy of an fp32 GEMM.
// One exception, for speed: bf16 (fp16) input of more than kGemvMaxRows rows on a CPU with
// bf16 (fp16) arithmetic (AVX512-BF16 / AVX512-FP16, or PEFTREG_CPU_WIDEN_16BIT=0). There each
// weight is rounded to the input's dtype exactly as nf4_dequantize rounds it
// (16-bit(fp32(code * absmax)), nearest even), the tiles are multiplied by ATen's 16-bit GEMM
// (products accumulated in float32 by oneDNN) and the result is rounded to the input's dtype
// once per output element: the numbers of dequantize-to-x.dtype then matmul, as bitsandbytes
// and PEFT compute them, and of the CUDA many-row path. ATen's fp32 GEMM runs at about half
// the speed of its bf16 one on such CPUs, which made the float32 tiles 2x slower than
// dequantize-then-matmul. float32, float64, few rows and CPUs without the instructions keep
// the float32 tiles.
//
// The products decode W tile by tile into small per-thread buffers:
// * few rows (decode, batch <= kGemvMaxRows): threads split the output rows; each weight row is
//   decoded into an L1-sized buffer (AVX2 when the CPU has it) and dotted with every input row;
// * many rows: threads split W into tiles of weight rows (forward) or bands of columns spanning
//   all weight rows (input gradient), a share per thread of at most kScratchBytes decoded;
//   each thread decodes its tile into its own reused buffer and calls the BLAS GEMM on it, so
//   the dense weight never exists (a layer small enough is one tile), and each output element
//   is one GEMM's sum, rounded once.
// Rows of W are flattened element ranges: a quantization block may straddle two rows and a row
// may start on an odd element (a high/low nibble split), so any in_features works.
//
// SIMD: the hot loops have an AVX2+FMA version (compiled with a target attribute) chosen at run
// time with __builtin_cpu_supports, and a portable scalar version used everywhere else.

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <optional>
#include <type_traits>
#include <vector>

#include "nf4/nf4_format.h"
#include "nf4/nf4_kernels.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define PEFTREG_NF4_X86 1
#include <immintrin.h>
#else
#define PEFTREG_NF4_X86 0
#endif

namespace peftreg::nf4 {
namespace {

constexpr int64_t kGemvMaxRows = 8;    // up to this many input rows: decode path (GEMV)
constexpr int64_t kTileRows = 32;      // forward GEMM path: weight rows per tile, at least
constexpr int64_t kBandCols = 64;      // input-gradient GEMM path: weight columns per band, least
constexpr int64_t kGrainElements = 1 << 15;  // elements of work per parallel task, at least

struct DynamicTable {
  float code[kDynamicCodes];
  float mid[kDynamicCodes - 1];
  float bnb[kDynamicCodes - 1];
  DynamicTable() {
    fill_dynamic_code(code, mid);
    fill_bnb_dynamic_bounds(bnb);
  }
};

const DynamicTable& dynamic_table() {
  static const DynamicTable table;
  return table;
}

bool cpu_has_avx2_fma() {
#if PEFTREG_NF4_X86
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

template <typename T>
inline float load_f32(const T& v) {
  return static_cast<float>(v);
}

// ---------------------------------------------------------------------------------------------
// Quantization

// One block of `len` float32 elements (a block starts at a multiple of the block size, so on
// an even element): absmax, then packed codes. Returns false if the block holds NaN or infinity.
// Folds |x[i]| for i in [from, len) into amax, and whether all are finite into `finite`.
inline void scan_abs(const float* x, int64_t from, int64_t len, float& amax, bool& finite) {
  for (int64_t i = from; i < len; ++i) {
    const float v = std::fabs(x[i]);
    finite = finite && (v <= std::numeric_limits<float>::max());
    amax = v > amax ? v : amax;
  }
}

// Packed codes of elements [from, len) of the block, `from` even; the SIMD path's tail too.
inline void pack_codes_scalar(const float* x, int64_t from, int64_t len, bool full_block,
                              float inv, float divisor, uint8_t* packed) {
  const float* mid = kNF4Midpoint;
  int64_t i = from;
  for (; i + 1 < len; i += 2) {
    const int hi = nf4_nearest(scale_clamped(x[i], full_block, inv, divisor), mid);
    const int lo = nf4_nearest(scale_clamped(x[i + 1], full_block, inv, divisor), mid);
    packed[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
  }
  if (i < len) {  // odd element count: the last low nibble is the 0.0 code
    const int hi = nf4_nearest(scale_clamped(x[i], full_block, inv, divisor), mid);
    packed[i / 2] = static_cast<uint8_t>((hi << 4) | kZeroCode);
  }
}

bool quantize_block_scalar(const float* x, int64_t len, bool full_block, uint8_t* packed,
                           float* absmax) {
  float amax = 0.0f;
  bool finite = true;
  scan_abs(x, 0, len, amax, finite);
  if (!finite) return false;
  *absmax = stored_absmax(amax, full_block);
  const float divisor = std::max(amax, kMinAbsmax);
  pack_codes_scalar(x, 0, len, full_block, 1.0f / divisor, divisor, packed);
  return true;
}

#if PEFTREG_NF4_X86
// Codes of 8 elements starting at an even element, written as 4 packed bytes. The scaling and
// comparisons are the scalar ones (IEEE multiply/divide, strict greater-than), lane by lane, so
// both paths give identical bytes.
template <bool Full>
__attribute__((target("avx2,fma"))) inline void quantize8_avx2(const float* x, __m256 inv,
                                                               __m256 divisor,
                                                               const __m256* mid,
                                                               uint8_t* packed) {
  const __m256 v = _mm256_loadu_ps(x);
  __m256 s = Full ? _mm256_mul_ps(v, inv) : _mm256_div_ps(v, divisor);
  s = _mm256_max_ps(_mm256_min_ps(s, _mm256_set1_ps(1.0f)), _mm256_set1_ps(-1.0f));
  __m256i count = _mm256_setzero_si256();
  for (int j = 0; j < kCodes - 1; ++j) {  // count of midpoints below s (all-ones mask = -1)
    count = _mm256_sub_epi32(count, _mm256_castps_si256(_mm256_cmp_ps(s, mid[j], _CMP_GT_OQ)));
  }
  // Each 64-bit lane holds (even code, odd code); (lane << 4) | (lane >> 32) has the packed
  // byte (even << 4) | odd in its low 8 bits.
  const __m256i packed64 =
      _mm256_or_si256(_mm256_slli_epi64(count, 4), _mm256_srli_epi64(count, 32));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), packed64);
  for (int k = 0; k < 4; ++k) packed[k] = static_cast<uint8_t>(lanes[k]);
}

__attribute__((target("avx2,fma"))) bool quantize_block_avx2(const float* x, int64_t len,
                                                             bool full_block, uint8_t* packed,
                                                             float* absmax) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 largest = _mm256_set1_ps(std::numeric_limits<float>::max());
  __m256 vmax = _mm256_setzero_ps();
  int finite_mask = 0xFF;
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
    finite_mask &= _mm256_movemask_ps(_mm256_cmp_ps(a, largest, _CMP_LE_OQ));
    vmax = _mm256_max_ps(vmax, a);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.0f;
  for (const float v : lanes) amax = v > amax ? v : amax;
  bool finite = finite_mask == 0xFF;
  scan_abs(x, i, len, amax, finite);
  if (!finite) return false;
  *absmax = stored_absmax(amax, full_block);
  const float divisor = std::max(amax, kMinAbsmax);
  const float inv = 1.0f / divisor;
  __m256 mid[kCodes - 1];
  for (int j = 0; j < kCodes - 1; ++j) mid[j] = _mm256_set1_ps(kNF4Midpoint[j]);
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 vdiv = _mm256_set1_ps(divisor);
  int64_t e = 0;
  for (; e + 8 <= len; e += 8) {
    if (full_block) {
      quantize8_avx2<true>(x + e, vinv, vdiv, mid, packed + e / 2);
    } else {
      quantize8_avx2<false>(x + e, vinv, vdiv, mid, packed + e / 2);
    }
  }
  pack_codes_scalar(x, e, len, full_block, inv, divisor, packed);
  return true;
}
#endif

bool quantize_block_f32(const float* x, int64_t len, bool full_block, uint8_t* packed,
                        float* absmax) {
#if PEFTREG_NF4_X86
  if (cpu_has_avx2_fma()) return quantize_block_avx2(x, len, full_block, packed, absmax);
#endif
  return quantize_block_scalar(x, len, full_block, packed, absmax);
}

// Widens a half-precision block to float32 (exact) and quantizes it.
template <typename T>
bool quantize_block(const T* x, int64_t len, bool full_block, uint8_t* packed, float* absmax,
                    float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return quantize_block_f32(x, len, full_block, packed, absmax);
  } else {
    for (int64_t i = 0; i < len; ++i) scratch[i] = static_cast<float>(x[i]);
    return quantize_block_f32(scratch, len, full_block, packed, absmax);
  }
}

int64_t quantize_cpu(const at::Tensor& xc, int64_t blocksize, at::Tensor& codes,
                     at::Tensor& absmax) {
  const auto dtype = xc.scalar_type();
  const int64_t n = xc.numel();
  const int64_t blocks = absmax.numel();
  uint8_t* codes_ptr = codes.data_ptr<uint8_t>();
  float* absmax_ptr = absmax.data_ptr<float>();
  std::atomic<int64_t> bad_block{-1};

  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* src = xc.const_data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, kGrainElements / blocksize);
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      std::vector<float> scratch(std::is_same_v<T, float> ? 0 : static_cast<size_t>(blocksize));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t first = b * blocksize;
        const int64_t len = std::min(blocksize, n - first);
        if (!quantize_block<T>(src + first, len, len == blocksize, codes_ptr + first / 2,
                               absmax_ptr + b, scratch.data())) {
          int64_t expected = -1;
          bad_block.compare_exchange_strong(expected, b);
        }
      }
    });
  };
  if (dtype == at::kFloat) {
    run(float{});
  } else if (dtype == at::kBFloat16) {
    run(c10::BFloat16{});
  } else {
    run(c10::Half{});
  }
  return bad_block.load();
}

void double_quantize_cpu(const at::Tensor& a, const at::Tensor& offset, int64_t nested_blocksize,
                         bool nearest, at::Tensor& codes, at::Tensor& nested) {
  const int64_t n = a.numel();
  const float* src = a.const_data_ptr<float>();
  const float off = n > 0 ? offset.item<float>() : 0.0f;
  const int64_t nested_blocks = nested.numel();
  uint8_t* codes_ptr = codes.data_ptr<uint8_t>();
  float* nested_ptr = nested.data_ptr<float>();
  const DynamicTable& table = dynamic_table();
  const float* bounds = nearest ? table.mid : table.bnb;
  at::parallel_for(0, nested_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t first = b * nested_blocksize;
      const int64_t len = std::min(nested_blocksize, n - first);
      float amax = 0.0f;
      for (int64_t i = 0; i < len; ++i) {
        const float v = std::fabs(src[first + i] - off);
        amax = v > amax ? v : amax;
      }
      nested_ptr[b] = amax;
      const float divisor = std::max(amax, kMinAbsmax);
      const float inv = 1.0f / divisor;
      // bitsandbytes multiplies by the float32 reciprocal of the raw absmax (measured: its
      // compiled division behaves so), 0 * (1 / 0) is NaN, code 0; the nearest rule scales as
      // the 4-bit codes do.
      const float inv_raw = 1.0f / amax;
      const bool full = len == nested_blocksize;
      const auto scaled = [&](float r) {
        return nearest ? scale_clamped(r, full, inv, divisor) : r * inv_raw;
      };
      int64_t i = 0;
      // Eight searches in lockstep: their load-compare chains are independent, so the CPU
      // overlaps them (one search alone is latency-bound).
      for (; i + 8 <= len; i += 8) {
        float s[8];
        int idx[8];
        for (int j = 0; j < 8; ++j) {
          s[j] = scaled(src[first + i + j] - off);
          idx[j] = 0;
        }
        for (int step = kDynamicCodes / 2; step > 0; step /= 2) {
          for (int j = 0; j < 8; ++j) idx[j] += (s[j] > bounds[idx[j] + step - 1]) ? step : 0;
        }
        for (int j = 0; j < 8; ++j) codes_ptr[first + i + j] = static_cast<uint8_t>(idx[j]);
      }
      for (; i < len; ++i) {
        codes_ptr[first + i] = static_cast<uint8_t>(dynamic_index(scaled(src[first + i] - off),
                                                                  bounds));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Decoding

// Read-only view of a validated quantized weight.
struct WeightView {
  const uint8_t* codes = nullptr;
  const float* absmax = nullptr;        // without double quantization
  const uint8_t* absmax_codes = nullptr;  // with it
  const float* nested = nullptr;
  float offset = 0.0f;
  int64_t numel = 0;
  int64_t blocksize = 0;
  int64_t nested_blocksize = 0;
  int block_shift = 0;   // log2(blocksize)
  int nested_shift = 0;  // log2(nested_blocksize)
  const float* dyn = nullptr;

  // The float32 scale of block b, exactly as bitsandbytes dequantizes it.
  float scale(int64_t b) const {
    if (absmax != nullptr) return absmax[b];
    const float product = dyn[absmax_codes[b]] * nested[b >> nested_shift];
    return product + offset;
  }
};

// The view of a checked weight (nf4_kernels.h: contiguous tensors, which outlive the view).
WeightView make_view(const Nf4Weight& w) {
  const QuantizedWeight& q = w.sizes;
  WeightView v;
  v.codes = w.codes.const_data_ptr<uint8_t>();
  v.numel = q.numel;
  v.blocksize = q.blocksize;
  v.nested_blocksize = q.nested_blocksize;
  v.block_shift = log2_pow2(q.blocksize);
  v.nested_shift = q.double_quant ? log2_pow2(q.nested_blocksize) : 0;
  if (q.double_quant) {
    v.absmax_codes = w.absmax.const_data_ptr<uint8_t>();
    v.nested = w.nested_absmax.const_data_ptr<float>();
    v.offset = *w.offset.const_data_ptr<float>();
    v.dyn = dynamic_table().code;
  } else {
    v.absmax = w.absmax.const_data_ptr<float>();
  }
  return v;
}

// dst[j] = lut[nibble j] for the 2 * nbytes nibbles of `bytes` (high nibble first).
void decode_bytes_scalar(const uint8_t* bytes, int64_t nbytes, const float* lut, float* dst) {
  for (int64_t i = 0; i < nbytes; ++i) {
    const uint8_t b = bytes[i];
    dst[2 * i] = lut[b >> 4];
    dst[2 * i + 1] = lut[b & 0x0F];
  }
}

#if PEFTREG_NF4_X86
// The 16-entry table values of the high (*hi) and low (*lo) nibbles of 8 bytes; lut_lo and
// lut_hi hold entries 0-7 and 8-15.
__attribute__((target("avx2,fma"), always_inline)) inline void lookup_nibbles8_avx2(
    const uint8_t* bytes, __m256 lut_lo, __m256 lut_hi, __m256* hi, __m256* lo) {
  const __m256i low_mask = _mm256_set1_epi32(0x0F);
  const __m256i b =
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  const __m256i hi_idx = _mm256_srli_epi32(b, 4);
  const __m256i lo_idx = _mm256_and_si256(b, low_mask);
  // permutevar8x32 uses the low 3 bits; bit 3 picks the table half (moved to the sign bit).
  *hi = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, hi_idx),
                         _mm256_permutevar8x32_ps(lut_hi, hi_idx),
                         _mm256_castsi256_ps(_mm256_slli_epi32(hi_idx, 28)));
  *lo = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, lo_idx),
                         _mm256_permutevar8x32_ps(lut_hi, lo_idx),
                         _mm256_castsi256_ps(_mm256_slli_epi32(lo_idx, 28)));
}

__attribute__((target("avx2,fma"))) void decode_bytes_avx2(const uint8_t* bytes, int64_t nbytes,
                                                           const float* lut, float* dst) {
  const __m256 lut_lo = _mm256_loadu_ps(lut);
  const __m256 lut_hi = _mm256_loadu_ps(lut + 8);
  int64_t i = 0;
  for (; i + 8 <= nbytes; i += 8) {
    __m256 hi, lo;
    lookup_nibbles8_avx2(bytes + i, lut_lo, lut_hi, &hi, &lo);
    // Interleave: h0 l0 h1 l1 ... h7 l7.
    const __m256 a = _mm256_unpacklo_ps(hi, lo);  // h0 l0 h1 l1 | h4 l4 h5 l5
    const __m256 c = _mm256_unpackhi_ps(hi, lo);  // h2 l2 h3 l3 | h6 l6 h7 l7
    _mm256_storeu_ps(dst + 2 * i, _mm256_permute2f128_ps(a, c, 0x20));
    _mm256_storeu_ps(dst + 2 * i + 8, _mm256_permute2f128_ps(a, c, 0x31));
  }
  decode_bytes_scalar(bytes + i, nbytes - i, lut, dst + 2 * i);
}
#endif

void decode_bytes(const uint8_t* bytes, int64_t nbytes, const float* lut, float* dst) {
#if PEFTREG_NF4_X86
  if (cpu_has_avx2_fma()) {
    decode_bytes_avx2(bytes, nbytes, lut, dst);
    return;
  }
#endif
  decode_bytes_scalar(bytes, nbytes, lut, dst);
}


template <typename Out>
void dequantize_into(const WeightView& w, Out* out) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / w.blocksize);
  at::parallel_for(0, num_blocks(w.numel, w.blocksize), grain, [&](int64_t b0, int64_t b1) {
    Out lut[kCodes];
    for (int64_t b = b0; b < b1; ++b) {
      const float s = w.scale(b);
      for (int k = 0; k < kCodes; ++k) lut[k] = static_cast<Out>(kNF4Code[k] * s);
      const int64_t first = b * w.blocksize;
      const int64_t len = std::min(w.blocksize, w.numel - first);
      const uint8_t* bytes = w.codes + first / 2;
      Out* dst = out + first;
      const int64_t pairs = len / 2;
      for (int64_t i = 0; i < pairs; ++i) {
        const uint8_t byte = bytes[i];
        dst[2 * i] = lut[byte >> 4];
        dst[2 * i + 1] = lut[byte & 0x0F];
      }
      if (len & 1) dst[len - 1] = lut[bytes[pairs] >> 4];
    }
  });
}

// The 16-bit pattern (bf16 or fp16) of the float32 value v, rounded to nearest even: the
// rounding of dequantize to a half dtype.
inline uint16_t half_bits(float v, bool bf16) {
  return bf16 ? c10::BFloat16(v).x : c10::Half(v).x;
}

// dst[j] = lut[nibble j] for the 2 * nbytes nibbles of `bytes` (high nibble first), 16-bit.
void decode_bytes_16bit_scalar(const uint8_t* bytes, int64_t nbytes, const uint16_t* lut,
                               uint16_t* dst) {
  for (int64_t i = 0; i < nbytes; ++i) {
    const uint8_t byte = bytes[i];
    dst[2 * i] = lut[byte >> 4];
    dst[2 * i + 1] = lut[byte & 0x0F];
  }
}

#if PEFTREG_NF4_X86
// 16-bit outputs (bf16/fp16): a block's 16 rounded values fit two 16-byte shuffle tables (low
// and high bytes), so 32 outputs cost a few shuffles. A function of its own because a lambda
// would not inherit the target attribute.
__attribute__((target("avx2,fma"))) void decode_bytes_16bit_avx2(const uint8_t* bytes,
                                                                 int64_t pairs,
                                                                 const uint16_t* lut,
                                                                 uint16_t* dst) {
  alignas(16) uint8_t lo_bytes[16];
  alignas(16) uint8_t hi_bytes[16];
  for (int k = 0; k < kCodes; ++k) {
    lo_bytes[k] = static_cast<uint8_t>(lut[k] & 0xFF);
    hi_bytes[k] = static_cast<uint8_t>(lut[k] >> 8);
  }
  const __m256i tlo = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(lo_bytes)));
  const __m256i thi = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(hi_bytes)));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  int64_t i = 0;
  for (; i + 32 <= pairs; i += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + i));
    const __m256i hi_idx = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    const __m256i lo_idx = _mm256_and_si256(v, mask);
    // Nibble order h0 l0 h1 l1 ...: interleave the index bytes, then look up both bytes.
    const __m256i idx_a = _mm256_unpacklo_epi8(hi_idx, lo_idx);  // bytes 0-7 | 16-23
    const __m256i idx_b = _mm256_unpackhi_epi8(hi_idx, lo_idx);  // bytes 8-15 | 24-31
    const __m256i la = _mm256_shuffle_epi8(tlo, idx_a);
    const __m256i ha = _mm256_shuffle_epi8(thi, idx_a);
    const __m256i lb = _mm256_shuffle_epi8(tlo, idx_b);
    const __m256i hb = _mm256_shuffle_epi8(thi, idx_b);
    const __m256i a0 = _mm256_unpacklo_epi8(la, ha);  // outputs 0-7   | 32-39
    const __m256i a1 = _mm256_unpackhi_epi8(la, ha);  // outputs 8-15  | 40-47
    const __m256i b0v = _mm256_unpacklo_epi8(lb, hb);  // outputs 16-23 | 48-55
    const __m256i b1v = _mm256_unpackhi_epi8(lb, hb);  // outputs 24-31 | 56-63
    __m256i* d = reinterpret_cast<__m256i*>(dst + 2 * i);
    _mm256_storeu_si256(d + 0, _mm256_permute2x128_si256(a0, a1, 0x20));
    _mm256_storeu_si256(d + 1, _mm256_permute2x128_si256(b0v, b1v, 0x20));
    _mm256_storeu_si256(d + 2, _mm256_permute2x128_si256(a0, a1, 0x31));
    _mm256_storeu_si256(d + 3, _mm256_permute2x128_si256(b0v, b1v, 0x31));
  }
  decode_bytes_16bit_scalar(bytes + i, pairs - i, lut, dst + 2 * i);
}
#endif

void decode_bytes(const uint8_t* bytes, int64_t pairs, const uint16_t* lut, uint16_t* dst) {
#if PEFTREG_NF4_X86
  if (cpu_has_avx2_fma()) {
    decode_bytes_16bit_avx2(bytes, pairs, lut, dst);
    return;
  }
#endif
  decode_bytes_16bit_scalar(bytes, pairs, lut, dst);
}

// Whole blocks [b0, b1) of the weight into the 16-bit out (the dequantize entry).
void dequantize_blocks_16bit(const WeightView& w, uint16_t* out, bool bf16, int64_t b0,
                             int64_t b1) {
  uint16_t lut[kCodes];
  for (int64_t b = b0; b < b1; ++b) {
    const float s = w.scale(b);
    for (int k = 0; k < kCodes; ++k) lut[k] = half_bits(kNF4Code[k] * s, bf16);
    const int64_t first = b * w.blocksize;
    const int64_t len = std::min(w.blocksize, w.numel - first);
    const uint8_t* bytes = w.codes + first / 2;
    uint16_t* dst = out + first;
    const int64_t pairs = len / 2;
    decode_bytes(bytes, pairs, lut, dst);
    if (len & 1) dst[len - 1] = lut[bytes[pairs] >> 4];
  }
}

// Elements [e0, e1) of the weight into dst[0 .. e1 - e0), one walk for every decode type:
// per quantization block a 16-entry table of that block's values (`entry(code * scale)`),
// the byte pairs by decode_bytes, and by hand a block that straddles a range end and an odd
// (low-nibble) start or end.
template <typename T, typename Entry>
void decode_range_as(const WeightView& w, int64_t e0, int64_t e1, T* dst, const Entry& entry) {
  T lut[kCodes];
  while (e0 < e1) {
    const int64_t b = e0 >> w.block_shift;
    const int64_t seg_end = std::min(e1, (b + 1) << w.block_shift);
    const float s = w.scale(b);
    for (int k = 0; k < kCodes; ++k) lut[k] = entry(kNF4Code[k] * s);
    int64_t e = e0;
    if (e & 1) {  // starts on a low nibble
      *dst++ = lut[w.codes[e / 2] & 0x0F];
      ++e;
    }
    const int64_t pairs = (seg_end - e) / 2;
    decode_bytes(w.codes + e / 2, pairs, lut, dst);
    dst += 2 * pairs;
    e += 2 * pairs;
    if (e < seg_end) {  // ends on a high nibble
      *dst++ = lut[w.codes[e / 2] >> 4];
      ++e;
    }
    e0 = seg_end;
  }
}

// Elements [e0, e1) as float32 (the values every float32 product uses).
void decode_range(const WeightView& w, int64_t e0, int64_t e1, float* dst) {
  decode_range_as(w, e0, e1, dst, [](float v) { return v; });
}

// Elements [e0, e1) as 16-bit patterns, each value rounded as dequantize rounds it.
void decode_range_16bit(const WeightView& w, int64_t e0, int64_t e1, bool bf16, uint16_t* dst) {
  decode_range_as(w, e0, e1, dst, [bf16](float v) { return half_bits(v, bf16); });
}

void dequantize_into_16bit(const WeightView& w, uint16_t* out, bool bf16) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / w.blocksize);
  at::parallel_for(0, num_blocks(w.numel, w.blocksize), grain, [&](int64_t b0, int64_t b1) {
    dequantize_blocks_16bit(w, out, bf16, b0, b1);
  });
}

void dequantize_dispatch(const WeightView& w, at::Tensor& out) {
  switch (out.scalar_type()) {
    case at::kFloat:
      dequantize_into<float>(w, out.data_ptr<float>());
      return;
    case at::kDouble:
      dequantize_into<double>(w, out.data_ptr<double>());
      return;
    case at::kBFloat16:
    case at::kHalf:
      dequantize_into_16bit(w, reinterpret_cast<uint16_t*>(out.data_ptr()),
                            out.scalar_type() == at::kBFloat16);
      return;
    default:
      TORCH_CHECK(false, kDequantizeOp, ": unsupported output dtype ", out.scalar_type());
  }
}

void dequantize_cpu(const Nf4Weight& w, at::Tensor& out) {
  dequantize_dispatch(make_view(w), out);
}

// ---------------------------------------------------------------------------------------------
// Products

float dot_scalar(const float* a, const float* b, int64_t n) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

void axpy_scalar(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

#if PEFTREG_NF4_X86
__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  }
  const __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  float total = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

__attribute__((target("avx2,fma"))) void axpy_avx2(float alpha, const float* x, float* y,
                                                   int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
  for (; i < n; ++i) y[i] += alpha * x[i];
}
#endif

float dot(const float* a, const float* b, int64_t n) {
#if PEFTREG_NF4_X86
  if (cpu_has_avx2_fma()) return dot_avx2(a, b, n);
#endif
  return dot_scalar(a, b, n);
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
#if PEFTREG_NF4_X86
  if (cpu_has_avx2_fma()) {
    axpy_avx2(alpha, x, y, n);
    return;
  }
#endif
  axpy_scalar(alpha, x, y, n);
}

double dot(const float* a, const double* b, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

void axpy(double alpha, const float* x, double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * static_cast<double>(x[i]);
}

// Batch-1 GEMV for even in_features (every weight row then starts on a byte): the dot product
// of weight row o with x, decoding the nibbles straight into FMAs against the even- and
// odd-indexed halves of x (x_even[j] = x[2j], x_odd[j] = x[2j + 1]), with the unscaled code
// values; each block's partial sum is scaled once. No decode buffer, no per-block table.
float dot_row_scalar(const WeightView& w, int64_t o, int64_t in, const float* x_even,
                     const float* x_odd) {
  float total = 0.0f;
  for (int64_t e0 = o * in, e1 = (o + 1) * in; e0 < e1;) {
    const int64_t b = e0 >> w.block_shift;
    const int64_t seg_end = std::min(e1, (b + 1) << w.block_shift);
    float partial = 0.0f;
    const int64_t j0 = (e0 - o * in) / 2;
    for (int64_t i = 0; i < (seg_end - e0) / 2; ++i) {
      const uint8_t byte = w.codes[e0 / 2 + i];
      partial += kNF4Code[byte >> 4] * x_even[j0 + i] + kNF4Code[byte & 0x0F] * x_odd[j0 + i];
    }
    total += w.scale(b) * partial;
    e0 = seg_end;
  }
  return total;
}

#if PEFTREG_NF4_X86
__attribute__((target("avx2,fma"))) float dot_row_avx2(const WeightView& w, int64_t o,
                                                       int64_t in, const float* x_even,
                                                       const float* x_odd) {
  const __m256 lut_lo = _mm256_loadu_ps(kNF4Code);
  const __m256 lut_hi = _mm256_loadu_ps(kNF4Code + 8);
  __m256 acc = _mm256_setzero_ps();
  float tail = 0.0f;
  for (int64_t e0 = o * in, e1 = (o + 1) * in; e0 < e1;) {
    const int64_t b = e0 >> w.block_shift;
    const int64_t seg_end = std::min(e1, (b + 1) << w.block_shift);
    const uint8_t* bytes = w.codes + e0 / 2;
    const int64_t nbytes = (seg_end - e0) / 2;
    const float* xe = x_even + (e0 - o * in) / 2;
    const float* xo = x_odd + (e0 - o * in) / 2;
    __m256 partial = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= nbytes; i += 8) {
      __m256 hi, lo;
      lookup_nibbles8_avx2(bytes + i, lut_lo, lut_hi, &hi, &lo);
      partial = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xe + i), partial);
      partial = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xo + i), partial);
    }
    const float s = w.scale(b);
    float rest = 0.0f;
    for (; i < nbytes; ++i) {
      rest += kNF4Code[bytes[i] >> 4] * xe[i] + kNF4Code[bytes[i] & 0x0F] * xo[i];
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(s), partial, acc);
    tail += s * rest;
    e0 = seg_end;
  }
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1))) + tail;
}
#endif

#if PEFTREG_NF4_X86
// The fastest batch-1 path, for in_features % 64 == 0 and blocks of >= 64 elements (every block
// then covers whole 32-byte chunks of a row, aligned to the row start): the four bytes of each
// NF4 float32 value come from four 16-entry byte shuffles, and interleaving the byte planes
// yields the exact float32 code values, 64 weights per 32-byte chunk, in a fixed lane order that
// the permuted copies of x (x_even_p / x_odd_p, see permute_chunks) follow.
__attribute__((target("avx2,fma"))) float dot_row_chunks_avx2(const WeightView& w, int64_t o,
                                                              int64_t in, const float* x_even_p,
                                                              const float* x_odd_p) {
  alignas(16) uint8_t planes[4][16];
  for (int k = 0; k < kCodes; ++k) {
    uint32_t bits;
    std::memcpy(&bits, &kNF4Code[k], sizeof(bits));
    for (int byte = 0; byte < 4; ++byte) planes[byte][k] = static_cast<uint8_t>(bits >> (8 * byte));
  }
  __m256i table[4];
  for (int byte = 0; byte < 4; ++byte) {
    table[byte] = _mm256_broadcastsi128_si256(
        _mm_load_si128(reinterpret_cast<const __m128i*>(planes[byte])));
  }
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const int64_t row_bytes = in / 2;
  const int64_t block_bytes = w.blocksize / 2;
  const uint8_t* row = w.codes + o * row_bytes;
  const int64_t first_block = (o * in) >> w.block_shift;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t start = 0; start < row_bytes; start += block_bytes) {
    __m256 p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps();
    __m256 p2 = _mm256_setzero_ps(), p3 = _mm256_setzero_ps();
    for (int64_t c = start; c < start + block_bytes; c += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c));
      const __m256i idx[2] = {_mm256_and_si256(_mm256_srli_epi16(v, 4), mask),
                              _mm256_and_si256(v, mask)};
      const float* xs[2] = {x_even_p + c, x_odd_p + c};
      for (int half = 0; half < 2; ++half) {
        const __m256i b0 = _mm256_shuffle_epi8(table[0], idx[half]);
        const __m256i b1 = _mm256_shuffle_epi8(table[1], idx[half]);
        const __m256i b2 = _mm256_shuffle_epi8(table[2], idx[half]);
        const __m256i b3 = _mm256_shuffle_epi8(table[3], idx[half]);
        const __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), lo23 = _mm256_unpacklo_epi8(b2, b3);
        const __m256i hi01 = _mm256_unpackhi_epi8(b0, b1), hi23 = _mm256_unpackhi_epi8(b2, b3);
        const float* x = xs[half];
        p0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23)),
                             _mm256_loadu_ps(x), p0);
        p1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23)),
                             _mm256_loadu_ps(x + 8), p1);
        p2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23)),
                             _mm256_loadu_ps(x + 16), p2);
        p3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23)),
                             _mm256_loadu_ps(x + 24), p3);
      }
    }
    const __m256 partial = _mm256_add_ps(_mm256_add_ps(p0, p1), _mm256_add_ps(p2, p3));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(w.scale(first_block + start / block_bytes)), partial,
                          acc);
  }
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}

// Reorders a row-relative array v[j] (one value per code byte j) into the lane order of
// dot_row_chunks_avx2: within each 32-byte chunk, the shuffles produce the weights of bytes
// 0-3 and 16-19, then 4-7 and 20-23, then 8-11 and 24-27, then 12-15 and 28-31.
void permute_chunks(const float* v, int64_t n, float* out) {
  static constexpr int kOrder[32] = {0,  1,  2,  3,  16, 17, 18, 19, 4,  5,  6,  7,  20, 21, 22, 23,
                                     8,  9,  10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  for (int64_t c = 0; c < n; c += 32) {
    for (int i = 0; i < 32; ++i) out[c + i] = v[c + kOrder[i]];
  }
}
#endif

void gemv_forward_one_row(const WeightView& w, const float* x, int64_t in, int64_t out,
                          float* y) {
  std::vector<float> halves(static_cast<size_t>(in));
  float* x_even = halves.data();
  float* x_odd = halves.data() + in / 2;
  for (int64_t j = 0; j < in / 2; ++j) {
    x_even[j] = x[2 * j];
    x_odd[j] = x[2 * j + 1];
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(in, 1));
  const bool avx2 = cpu_has_avx2_fma();
#if PEFTREG_NF4_X86
  if (avx2 && in % 64 == 0 && w.blocksize >= 64) {
    std::vector<float> permuted(static_cast<size_t>(in));
    float* xe = permuted.data();
    float* xo = permuted.data() + in / 2;
    permute_chunks(x_even, in / 2, xe);
    permute_chunks(x_odd, in / 2, xo);
    at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) y[o] = dot_row_chunks_avx2(w, o, in, xe, xo);
    });
    return;
  }
#endif
  at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
#if PEFTREG_NF4_X86
      if (avx2) {
        y[o] = dot_row_avx2(w, o, in, x_even, x_odd);
        continue;
      }
#endif
      y[o] = dot_row_scalar(w, o, in, x_even, x_odd);
    }
  });
  (void)avx2;
}

// y_acc (rows, out) = x_acc (rows, in) @ W^T, decode path. Acc is float or double.
template <typename Acc>
void gemv_forward(const WeightView& w, const Acc* x, int64_t rows, int64_t in, int64_t out,
                  Acc* y) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(in, 1));
  at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) {
    std::vector<float> row(static_cast<size_t>(in));
    for (int64_t o = o0; o < o1; ++o) {
      decode_range(w, o * in, (o + 1) * in, row.data());
      for (int64_t r = 0; r < rows; ++r) {
        y[r * out + o] = dot(row.data(), x + r * in, in);
      }
    }
  });
}

// gx_acc (rows, in) = g_acc (rows, out) @ W, decode path: threads split the columns.
template <typename Acc>
void gemv_grad_input(const WeightView& w, const Acc* g, int64_t rows, int64_t in, int64_t out,
                     Acc* gx) {
  std::fill(gx, gx + rows * in, Acc(0));
  const int64_t grain = std::max<int64_t>(256, kGrainElements / std::max<int64_t>(out, 1));
  at::parallel_for(0, in, grain, [&](int64_t k0, int64_t k1) {
    const int64_t width = k1 - k0;
    std::vector<float> seg(static_cast<size_t>(width));
    for (int64_t o = 0; o < out; ++o) {
      decode_range(w, o * in + k0, o * in + k1, seg.data());
      for (int64_t r = 0; r < rows; ++r) {
        const Acc c = g[r * out + o];
        if (c != Acc(0)) axpy(c, seg.data(), gx + r * in + k0, width);
      }
    }
  });
}

// The decode buffer of one thread's tiles, `numel` values of `dtype`. Up to kScratchBytes it is
// one buffer per thread kept across calls: a fresh tensor of a few MiB per product goes back
// to the OS when freed and is faulted in again on the next call, which cost about as much as
// decoding it (measured, 128 x 1024 -> 1024 bf16, one thread: page faults and zeroing were
// 5% of the training step against 7% for the decode). Larger tiles are allocated per call.
constexpr int64_t kScratchBytes = int64_t{2} << 20;

void tile_scratch(at::Tensor& scratch, int64_t numel, at::ScalarType dtype) {
  if (scratch.defined() && scratch.numel() >= numel && scratch.scalar_type() == dtype) return;
  const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
  if (numel * elem > kScratchBytes) {
    scratch = at::empty({numel}, at::TensorOptions().dtype(dtype));
    return;
  }
  struct Buffer {
    void* data = nullptr;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  if (buffer.data == nullptr) {
    buffer.data = std::aligned_alloc(64, static_cast<size_t>(kScratchBytes));
    if (buffer.data == nullptr) throw std::bad_alloc();
  }
  scratch = at::from_blob(buffer.data, {kScratchBytes / elem}, at::TensorOptions().dtype(dtype));
}

// W's rows [o0, o1) x columns [k0, k1) into p, row-major, by decode(e0, e1, dst) over flattened
// element ranges; whole rows are one contiguous range.
template <typename T, typename Decode>
void decode_rows(int64_t in, int64_t o0, int64_t o1, int64_t k0, int64_t k1, T* p,
                 const Decode& decode) {
  const int64_t c = k1 - k0;
  if (c == in) {
    decode(o0 * in, o1 * in, p);
    return;
  }
  for (int64_t o = o0; o < o1; ++o) decode(o * in + k0, o * in + k1, p + (o - o0) * c);
}

// W's rows [o0, o1) x columns [k0, k1) as a dense tensor of the product's dtype, in the
// thread's tile buffer: 16-bit on the 16-bit tile path (tiles_in_16bit), each value rounded as
// nf4_dequantize rounds it; else float32 (converted for float64 input).
at::Tensor decode_tile(const WeightView& w, int64_t in, int64_t o0, int64_t o1, int64_t k0,
                       int64_t k1, at::ScalarType dtype, at::Tensor& scratch) {
  const int64_t r = o1 - o0, c = k1 - k0;
  if (dtype == at::kBFloat16 || dtype == at::kHalf) {
    tile_scratch(scratch, r * c, dtype);
    const bool bf16 = dtype == at::kBFloat16;
    decode_rows(in, o0, o1, k0, k1, static_cast<uint16_t*>(scratch.data_ptr()),
                [&](int64_t e0, int64_t e1, uint16_t* dst) {
                  decode_range_16bit(w, e0, e1, bf16, dst);
                });
    return scratch.narrow(0, 0, r * c).view({r, c});
  }
  tile_scratch(scratch, r * c, at::kFloat);
  decode_rows(in, o0, o1, k0, k1, scratch.data_ptr<float>(),
              [&](int64_t e0, int64_t e1, float* dst) { decode_range(w, e0, e1, dst); });
  at::Tensor tile = scratch.narrow(0, 0, r * c).view({r, c});
  return dtype == at::kFloat ? tile : tile.to(dtype);
}

// body(t, scratch) for t in [0, tiles), split over threads; each thread reuses one decode
// buffer `scratch` for its tiles.
template <typename Body>
void for_each_tile(int64_t tiles, const Body& body) {
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    // OpenMP workers do not inherit the caller's dispatch state: the tiles' ATen calls run
    // below autograd (the op's own autograd formula is registered in Python).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor scratch;
    for (int64_t t = t0; t < t1; ++t) body(t, scratch);
  });
}

// ---- Many rows in a 16-bit dtype on a CPU with arithmetic for it --------------------------

// Whether the many-row products of 16-bit input of dtype t multiply tiles decoded into t
// (ATen's native bf16/fp16 GEMM, fp32 accumulation) instead of float32 tiles. Measured at
// 128 x 1024 -> 1024 on an AVX512-BF16 CPU, one thread: the float32 tiles took 4.6 ms against
// 2.2 ms for dequantize-to-bf16 then ATen's bf16 GEMM. Without the instructions ATen's 16-bit
// GEMM is a slow generic loop, so there the float32 tiles stay. PEFTREG_CPU_WIDEN_16BIT=1/0
// forces float32/16-bit tiles, with the meaning it has for the dense LoRA kernels
// (csrc/fused/lora_cpu.cpp), so the tests run both paths on any CPU.
bool tiles_in_16bit(at::ScalarType t) {
  if (t != at::kBFloat16 && t != at::kHalf) return false;
  if (const char* env = std::getenv("PEFTREG_CPU_WIDEN_16BIT"); env != nullptr && *env != '\0') {
    return std::strcmp(env, "0") == 0;
  }
#if PEFTREG_NF4_X86
  static const bool native_bf16 = __builtin_cpu_supports("avx512bf16");
  static const bool native_fp16 = __builtin_cpu_supports("avx512fp16");
  return t == at::kBFloat16 ? native_bf16 : native_fp16;
#else
  return false;
#endif
}

// A tile of `extent` weight rows (or columns) of `other` elements each is an equal share of
// `total` per thread, rounded up to 16, at least `floor`, and at most kScratchBytes of decoded
// values of `elem` bytes; a small layer on few threads is then decoded whole, into the thread's
// tile buffer (tile_scratch). Large tiles because ATen's GEMM has a cost per call: measured,
// 128 x 1024 -> 1024 bf16, one thread, 32-row tiles were 1.7x slower than one GEMM; fp32
// 512 x 2048 -> 2048 training steps with 32-row forward tiles and 256-column, 512-row
// input-gradient chunks took 1.13x dequantize-then-matmul's time.
int64_t tile_extent(int64_t total, int64_t other, int64_t floor, int64_t elem) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t share = (total + threads - 1) / threads;
  share = (share + 15) / 16 * 16;
  const int64_t by_bytes =
      std::max<int64_t>(16, kScratchBytes / std::max<int64_t>(elem * other, 1));
  return std::max<int64_t>(1, std::min(std::max(share, floor), by_bytes));
}

int64_t decoded_bytes(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf ? 2 : 4;
}

// y = x @ W^T: each task decodes a tile of weight rows and multiplies.
void gemm_forward(const WeightView& w, const at::Tensor& x, int64_t in, int64_t out,
                  at::Tensor& y) {
  const int64_t tile = tile_extent(out, in, kTileRows, decoded_bytes(x.scalar_type()));
  for_each_tile((out + tile - 1) / tile, [&](int64_t t, at::Tensor& scratch) {
    const int64_t o0 = t * tile, o1 = std::min(out, o0 + tile);
    const at::Tensor wt = decode_tile(w, in, o0, o1, 0, in, x.scalar_type(), scratch);
    at::Tensor y_slice = y.narrow(1, o0, o1 - o0);
    at::mm_out(y_slice, x, wt.t());
  });
}

// gx = g @ W: each task decodes all weight rows of a band of columns, so every output element
// comes from one GEMM over the whole sum (one rounding; accumulating chunks in a 16-bit output
// would round once per chunk).
void gemm_grad_input(const WeightView& w, const at::Tensor& g, int64_t in, int64_t out,
                     at::Tensor& gx) {
  const int64_t band = tile_extent(in, out, kBandCols, decoded_bytes(g.scalar_type()));
  for_each_tile((in + band - 1) / band, [&](int64_t t, at::Tensor& scratch) {
    const int64_t k0 = t * band, k1 = std::min(in, k0 + band);
    const at::Tensor wt = decode_tile(w, in, 0, out, k0, k1, g.scalar_type(), scratch);
    at::Tensor gx_slice = gx.narrow(1, k0, k1 - k0);
    at::mm_out(gx_slice, g, wt);
  });
}

// result (rows, n_cols) = input @ op(W); `forward` selects W^T (nf4_linear) or W. In the acc
// dtype (float32, float64 for float64 input), except on the 16-bit tile path (tiles_in_16bit),
// whose result is already rounded to the input's dtype.
at::Tensor product(const WeightView& w_in, const at::Tensor& input2d, int64_t in, int64_t out,
                   bool forward) {
  // With double quantization, decode every block's scale once up front (blocks = numel / 64:
  // a small pass) rather than once per block visit inside the hot loops.
  // (The batch-1 row kernels read each scale once anyway and decode it inline.)
  WeightView w = w_in;
  at::Tensor scales;
  const bool one_row = forward && input2d.size(0) == 1 && in % 2 == 0;
  if (w.absmax == nullptr && w.numel > 0 && !one_row) {
    const int64_t blocks = num_blocks(w.numel, w.blocksize);
    scales = at::empty({blocks}, at::TensorOptions().dtype(at::kFloat));
    float* dst = scales.data_ptr<float>();
    at::parallel_for(0, blocks, kGrainElements, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) dst[b] = w_in.scale(b);
    });
    w.absmax = dst;
  }
  if (cpu_products_in_16bit(input2d.scalar_type(), input2d.size(0))) {
    const at::Tensor a = input2d.contiguous();
    const int64_t n_cols = forward ? out : in;
    at::Tensor result = at::empty({a.size(0), n_cols}, a.options());
    if (n_cols == 0) return result;
    if (!forward && out == 0) return result.zero_();
    if (forward) {
      gemm_forward(w, a, in, out, result);
    } else {
      gemm_grad_input(w, a, in, out, result);
    }
    return result;
  }
  const at::ScalarType acc = input2d.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor a = input2d.scalar_type() == acc ? input2d.contiguous()
                                                    : input2d.to(acc).contiguous();
  const int64_t rows = a.size(0);
  const int64_t n_cols = forward ? out : in;
  at::Tensor result = at::empty({rows, n_cols}, a.options());
  if (rows == 0 || n_cols == 0) return result;
  if (!forward && out == 0) return result.zero_();
  if (rows <= kGemvMaxRows) {
    if (acc == at::kDouble) {
      if (forward) {
        gemv_forward<double>(w, a.const_data_ptr<double>(), rows, in, out,
                             result.data_ptr<double>());
      } else {
        gemv_grad_input<double>(w, a.const_data_ptr<double>(), rows, in, out,
                                result.data_ptr<double>());
      }
    } else if (forward && rows == 1 && in % 2 == 0) {
      gemv_forward_one_row(w, a.const_data_ptr<float>(), in, out, result.data_ptr<float>());
    } else if (forward) {
      gemv_forward<float>(w, a.const_data_ptr<float>(), rows, in, out, result.data_ptr<float>());
    } else {
      gemv_grad_input<float>(w, a.const_data_ptr<float>(), rows, in, out,
                             result.data_ptr<float>());
    }
  } else if (forward) {
    gemm_forward(w, a, in, out, result);
  } else {
    gemm_grad_input(w, a, in, out, result);
  }
  return result;
}

at::Tensor product_cpu(const Nf4Weight& w, const at::Tensor& input2d, int64_t out_features,
                       int64_t in_features, bool forward) {
  return product(make_view(w), input2d, in_features, out_features, forward);
}

}  // namespace

bool cpu_products_in_16bit(at::ScalarType t, int64_t rows) {
  return rows > kGemvMaxRows && tiles_in_16bit(t);
}

const Nf4Kernels& cpu_nf4_kernels() {
  static const Nf4Kernels table{&quantize_cpu, &double_quantize_cpu, &dequantize_cpu,
                                &product_cpu};
  return table;
}

}  // namespace peftreg::nf4
