// SPDX-License-Identifier: Apache-2.0
//
// CPU page backend: page buffers in process memory (the fast tier) and one backing file per
// pool in a caller-chosen directory (see page_pool.h for why pread/pwrite and not a mapping),
// plus the fused AdamW update of one resident page.
#include "paged/page_pool.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <type_traits>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PEFTREG_X86_DISPATCH 1
#include <immintrin.h>
#else
#define PEFTREG_X86_DISPATCH 0
#endif
#define PEFTREG_ALWAYS_INLINE inline __attribute__((always_inline))

namespace peftreg::paged {

namespace {

constexpr size_t kAlign = 64;       // cache line; lets the compiler use aligned vector loads
constexpr int64_t kGrain = 16384;   // elements per parallel task: ~200 KiB of traffic

std::string os_error(int err) {
  return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")";
}

// Element access with the conversions written out for float32 and bfloat16, so the loop
// below vectorises (c10's conversion operators are opaque to GCC's vectoriser). bfloat16 is
// rounded to nearest even with NaN kept quiet, exactly as c10::BFloat16 rounds.
PEFTREG_ALWAYS_INLINE float load(const float* p, int64_t i) { return p[i]; }
PEFTREG_ALWAYS_INLINE void store(float* p, int64_t i, float x) { p[i] = x; }
PEFTREG_ALWAYS_INLINE float load(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i].x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
PEFTREG_ALWAYS_INLINE void store(c10::BFloat16* p, int64_t i, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
  p[i].x = x != x ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}
PEFTREG_ALWAYS_INLINE float load(const c10::Half* p, int64_t i) {
  return static_cast<float>(p[i]);
}
PEFTREG_ALWAYS_INLINE void store(c10::Half* p, int64_t i, float x) { p[i] = c10::Half(x); }

// One element of torch.optim.AdamW's single-tensor step (torch/optim/adamw.py), in its order:
//   g  = -g if maximize
//   p  = p * (1 - lr wd)                      decoupled weight decay (Loshchilov & Hutter)
//   m  = lerp(m, g, 1 - beta1)                torch's lerp: m + w (g - m) for w < 0.5
//   v  = v * beta2 + (1 - beta2) g g          addcmul
//   d  = sqrt(v) / sqrt(1 - beta2^t) + eps
//   p  = p + (-lr / (1 - beta1^t)) m / d      addcdiv
// Compiled with -ffp-contract=off, so no step is fused into an FMA. The lerp form is a
// template argument and maximize a multiplication by an exact +-1, so the loop has no
// branches. This scalar loop runs the tails and CPUs without AVX2.
template <typename T, bool kSmallWeight>
PEFTREG_ALWAYS_INLINE void adamw_body(const AdamWSegment& seg, float* __restrict m,
                                      float* __restrict v, int64_t begin, int64_t end) {
  const AdamWScalars s = seg.s;
  const float w = s.one_minus_beta1;
  const float one_minus_w = 1.0f - w;
  const float sign = s.maximize ? -1.0f : 1.0f;
  const T* __restrict grad = static_cast<const T*>(seg.grad);
  T* __restrict param = static_cast<T*>(seg.param);
  for (int64_t i = begin; i < end; ++i) {
    const float g = load(grad, i) * sign;
    const float p = load(param, i) * s.decay;
    const float m0 = m[i];
    const float mi = kSmallWeight ? m0 + w * (g - m0) : g - (g - m0) * one_minus_w;
    const float vi = v[i] * s.beta2 + s.one_minus_beta2 * g * g;
    const float denom = std::sqrt(vi) / s.bc2_sqrt + s.eps;
    m[i] = mi;
    v[i] = vi;
    store(param, i, p + s.neg_step_size * mi / denom);
  }
}

// The extension is built for baseline x86-64, and GCC will not vectorise sqrtf without
// -fno-math-errno (a flag the per-function optimize attribute does not carry), so the float32
// and bfloat16 loops get an explicit AVX2 version chosen at run time. It performs the same
// IEEE operations in the same order without FMA, so it rounds exactly as the scalar loop.
#if PEFTREG_X86_DISPATCH
__attribute__((target("avx2"))) inline __m256 avx2_load(const float* p) {
  return _mm256_loadu_ps(p);
}
__attribute__((target("avx2"))) inline void avx2_store(float* p, __m256 x) {
  _mm256_storeu_ps(p, x);
}
__attribute__((target("avx2"))) inline __m256 avx2_load(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
__attribute__((target("avx2"))) inline void avx2_store(c10::BFloat16* p, __m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

template <typename T, bool kSmallWeight>
__attribute__((target("avx2"))) void adamw_range_avx2(const AdamWSegment& seg, float* m,
                                                      float* v, int64_t begin, int64_t end) {
  const AdamWScalars& s = seg.s;
  const __m256 w = _mm256_set1_ps(s.one_minus_beta1);
  const __m256 one_minus_w = _mm256_set1_ps(1.0f - s.one_minus_beta1);
  const __m256 sign = _mm256_set1_ps(s.maximize ? -1.0f : 1.0f);
  const __m256 decay = _mm256_set1_ps(s.decay);
  const __m256 beta2 = _mm256_set1_ps(s.beta2);
  const __m256 one_minus_beta2 = _mm256_set1_ps(s.one_minus_beta2);
  const __m256 bc2_sqrt = _mm256_set1_ps(s.bc2_sqrt);
  const __m256 eps = _mm256_set1_ps(s.eps);
  const __m256 neg_step = _mm256_set1_ps(s.neg_step_size);
  const T* grad = static_cast<const T*>(seg.grad);
  T* param = static_cast<T*>(seg.param);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 g = _mm256_mul_ps(avx2_load(grad + i), sign);
    const __m256 p = _mm256_mul_ps(avx2_load(param + i), decay);
    const __m256 m0 = _mm256_loadu_ps(m + i);
    const __m256 diff = _mm256_sub_ps(g, m0);
    const __m256 mi = kSmallWeight ? _mm256_add_ps(m0, _mm256_mul_ps(w, diff))
                                   : _mm256_sub_ps(g, _mm256_mul_ps(diff, one_minus_w));
    const __m256 vi = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(v + i), beta2),
                                    _mm256_mul_ps(_mm256_mul_ps(one_minus_beta2, g), g));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2_sqrt), eps);
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
    avx2_store(param + i, _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(neg_step, mi), denom)));
  }
  adamw_body<T, kSmallWeight>(seg, m, v, i, end);  // the tail
}
const bool kHasAvx2 = __builtin_cpu_supports("avx2");
// The 8-bit step's fastest kernel needs byte permutes over two registers (VBMI's vpermi2b).
const bool kHasAvx512Vbmi = __builtin_cpu_supports("avx512f") &&
                            __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vbmi");
#endif

template <typename T, bool kSmallWeight>
void adamw_range(const AdamWSegment& seg, float* m, float* v, int64_t begin, int64_t end) {
#if PEFTREG_X86_DISPATCH
  if constexpr (!std::is_same_v<T, c10::Half>) {
    if (kHasAvx2) {
      adamw_range_avx2<T, kSmallWeight>(seg, m, v, begin, end);
      return;
    }
  }
#endif
  adamw_body<T, kSmallWeight>(seg, m, v, begin, end);
}

template <typename T>
void adamw_range_dispatch_weight(const AdamWSegment& seg, float* m, float* v, int64_t begin,
                                 int64_t end) {
  if (seg.s.one_minus_beta1 < 0.5f) {
    adamw_range<T, true>(seg, m, v, begin, end);
  } else {
    adamw_range<T, false>(seg, m, v, begin, end);
  }
}

// Elements [begin, end) of one segment whose page's moments start at m / v.
void adamw_part(const AdamWSegment& seg, float* m, float* v, int64_t begin, int64_t end) {
  float* ms = m + seg.state_index;
  float* vs = v + seg.state_index;
  switch (seg.dtype) {
    case ParamDType::kFloat32:
      adamw_range_dispatch_weight<float>(seg, ms, vs, begin, end);
      break;
    case ParamDType::kBFloat16:
      adamw_range_dispatch_weight<c10::BFloat16>(seg, ms, vs, begin, end);
      break;
    case ParamDType::kFloat16:
      adamw_range_dispatch_weight<c10::Half>(seg, ms, vs, begin, end);
      break;
  }
}

// ---- blockwise 8-bit moments (issue 17; layout and encoding in page_pool.h) ---------------

PEFTREG_ALWAYS_INLINE uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
PEFTREG_ALWAYS_INLINE float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
// Order-preserving: a < b as floats (neither NaN) iff key(a) <= key(b) as unsigned integers
// (-0 and +0 get neighbouring keys). Negative floats are reversed and put below the positive.
PEFTREG_ALWAYS_INLINE uint32_t order_key(uint32_t u) {
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
PEFTREG_ALWAYS_INLINE uint32_t key_to_bits(uint32_t k) {
  return (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
}

// One moment's update of one block, the same arithmetic as adamw_body on decoded moments.
template <typename T, bool kSmallWeight>
PEFTREG_ALWAYS_INLINE void adamw8_update_scalar(const AdamWScalars& s, const T* __restrict grad,
                                                T* __restrict param, const uint8_t* c1,
                                                const uint8_t* c2, float a1, float a2,
                                                const Quant8Maps& q, float* __restrict m,
                                                float* __restrict v, int64_t begin,
                                                int64_t end) {
  const float w = s.one_minus_beta1;
  const float one_minus_w = 1.0f - w;
  const float sign = s.maximize ? -1.0f : 1.0f;
  for (int64_t i = begin; i < end; ++i) {
    const float g = load(grad, i) * sign;
    const float p = load(param, i) * s.decay;
    const float m0 = q.m.code[c1[i]] * a1;
    const float v0 = q.v.code[c2[i]] * a2;
    const float mi = kSmallWeight ? m0 + w * (g - m0) : g - (g - m0) * one_minus_w;
    const float vi = v0 * s.beta2 + s.one_minus_beta2 * g * g;
    const float denom = std::sqrt(vi) / s.bc2_sqrt + s.eps;
    m[i] = mi;
    v[i] = vi;
    store(param, i, p + s.neg_step_size * mi / denom);
  }
}

// What a block's elements are multiplied by before encoding: the reciprocal of its absmax, as
// bitsandbytes does, so a block costs one division instead of one per element; 1 for an
// all-zero block (stored with the code of 0), which keeps 0 * inf out. Infinite for a
// subnormal absmax below 2^-128, whose block divides instead (encode_block).
PEFTREG_ALWAYS_INLINE float block_scale(float absmax) {
  return absmax > 0.0f ? 1.0f / absmax : 1.0f;
}

PEFTREG_ALWAYS_INLINE void encode_scalar(const Quantizer& q, const float* x, float scale,
                                         uint8_t* codes, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    codes[i] = q.encode(x[i] * scale);
  }
}

#if PEFTREG_X86_DISPATCH
// The largest of 8 NaN-free lanes by a reduction tree (maxima round nothing, so any order gives
// the scalar loop's value), off the step's critical path unlike 8 dependent scalar maxima.
__attribute__((target("avx2"))) inline float reduce_max_avx2(__m256 x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

template <typename T, bool kSmallWeight>
__attribute__((target("avx2"))) int64_t adamw8_update_avx2(
    const AdamWScalars& s, const T* grad, T* param, const uint8_t* c1, const uint8_t* c2,
    float a1, float a2, const Quant8Maps& q, float* m, float* v, int64_t end, float* max1,
    float* max2) {
  const __m256 w = _mm256_set1_ps(s.one_minus_beta1);
  const __m256 one_minus_w = _mm256_set1_ps(1.0f - s.one_minus_beta1);
  const __m256 sign = _mm256_set1_ps(s.maximize ? -1.0f : 1.0f);
  const __m256 decay = _mm256_set1_ps(s.decay);
  const __m256 beta2 = _mm256_set1_ps(s.beta2);
  const __m256 one_minus_beta2 = _mm256_set1_ps(s.one_minus_beta2);
  const __m256 bc2_sqrt = _mm256_set1_ps(s.bc2_sqrt);
  const __m256 eps = _mm256_set1_ps(s.eps);
  const __m256 neg_step = _mm256_set1_ps(s.neg_step_size);
  const __m256 scale1 = _mm256_set1_ps(a1);
  const __m256 scale2 = _mm256_set1_ps(a2);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // Running maxima: max_ps(x, acc) keeps acc when x is NaN, as std::max(acc, x) does.
  __m256 acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= end; i += 8) {
    const __m256i i1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c1 + i)));
    const __m256i i2 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c2 + i)));
    const __m256 m0 = _mm256_mul_ps(_mm256_i32gather_ps(q.m.code, i1, 4), scale1);
    const __m256 v0 = _mm256_mul_ps(_mm256_i32gather_ps(q.v.code, i2, 4), scale2);
    const __m256 g = _mm256_mul_ps(avx2_load(grad + i), sign);
    const __m256 p = _mm256_mul_ps(avx2_load(param + i), decay);
    const __m256 diff = _mm256_sub_ps(g, m0);
    const __m256 mi = kSmallWeight ? _mm256_add_ps(m0, _mm256_mul_ps(w, diff))
                                   : _mm256_sub_ps(g, _mm256_mul_ps(diff, one_minus_w));
    const __m256 vi = _mm256_add_ps(_mm256_mul_ps(v0, beta2),
                                    _mm256_mul_ps(_mm256_mul_ps(one_minus_beta2, g), g));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2_sqrt), eps);
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
    acc1 = _mm256_max_ps(_mm256_and_ps(mi, abs_mask), acc1);
    acc2 = _mm256_max_ps(_mm256_and_ps(vi, abs_mask), acc2);
    avx2_store(param + i, _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(neg_step, mi), denom)));
  }
  *max1 = std::max(*max1, reduce_max_avx2(acc1));
  *max2 = std::max(*max2, reduce_max_avx2(acc2));
  return i;
}

// Eight encodes at once: the bucket's start code by a gather, then `refine` compares with
// gathered midpoints, each adding one while the midpoint lies below the value.
__attribute__((target("avx2"))) int64_t encode_avx2(const Quantizer& q, const float* x,
                                                    float scale, uint8_t* codes, int64_t end) {
  const __m256 by = _mm256_set1_ps(scale);
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i first = _mm256_set1_epi32(static_cast<int>(q.first_bucket));
  const __m256i last = _mm256_set1_epi32(static_cast<int>(q.last_bucket));
  const __m256i low_byte = _mm256_set1_epi32(0xFF);
  const int* start = reinterpret_cast<const int*>(q.start.data());
  int64_t i = 0;
  for (; i + 8 <= end; i += 8) {
    const __m256 value = _mm256_mul_ps(_mm256_loadu_ps(x + i), by);
    const __m256i bits = _mm256_castps_si256(value);
    const __m256i key = _mm256_xor_si256(bits, _mm256_or_si256(_mm256_srai_epi32(bits, 31), top));
    __m256i bucket = _mm256_srli_epi32(key, Quantizer::kBucketShift);
    bucket = _mm256_sub_epi32(_mm256_min_epu32(_mm256_max_epu32(bucket, first), last), first);
    __m256i idx = _mm256_and_si256(
        _mm256_i32gather_epi32(start, bucket, 1), low_byte);  // start is padded for this
    for (int r = 0; r < q.refine; ++r) {
      const __m256 mid = _mm256_i32gather_ps(q.mid, idx, 4);
      idx = _mm256_sub_epi32(idx, _mm256_castps_si256(_mm256_cmp_ps(mid, value, _CMP_LT_OQ)));
    }
    const __m256i w16 = _mm256_packus_epi32(idx, idx);
    const __m256i w8 = _mm256_packus_epi16(w16, w16);
    const uint32_t lo = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_castsi256_si128(w8)));
    const uint32_t hi = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_extracti128_si256(w8, 1)));
    std::memcpy(codes + i, &lo, 4);
    std::memcpy(codes + i + 4, &hi, 4);
  }
  return i;
}

// The one-compare encoder (Quantizer::entry): one gather per 8 values instead of two. The
// compare is skipped for NaN, whose code is then the bucket's start, as refine's float
// compare gives.
__attribute__((target("avx2"))) int64_t encode_entry_avx2(const Quantizer& q, const float* x,
                                                          float scale, uint8_t* codes,
                                                          int64_t end) {
  const __m256 by = _mm256_set1_ps(scale);
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i first = _mm256_set1_epi32(static_cast<int>(q.first_bucket));
  const __m256i last = _mm256_set1_epi32(static_cast<int>(q.last_bucket));
  const __m256i fold_at = _mm256_set1_epi32(q.fold_at);
  const __m256i fold_len = _mm256_set1_epi32(q.fold_len);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i low16 = _mm256_set1_epi32(0xFFFF);
  const __m256i low_byte = _mm256_set1_epi32(0xFF);
  const int* entry = reinterpret_cast<const int*>(q.entry.data());
  int64_t i = 0;
  for (; i + 8 <= end; i += 8) {
    const __m256 value = _mm256_mul_ps(_mm256_loadu_ps(x + i), by);
    const __m256i bits = _mm256_castps_si256(value);
    const __m256i key = _mm256_xor_si256(bits, _mm256_or_si256(_mm256_srai_epi32(bits, 31), top));
    __m256i r = _mm256_srli_epi32(key, Quantizer::kBucketShift);
    r = _mm256_sub_epi32(_mm256_min_epu32(_mm256_max_epu32(r, first), last), first);
    r = _mm256_sub_epi32(
        r, _mm256_min_epi32(_mm256_max_epi32(_mm256_sub_epi32(r, fold_at), zero), fold_len));
    const __m256i e = _mm256_i32gather_epi32(entry, r, 4);
    const __m256i above = _mm256_and_si256(
        _mm256_cmpgt_epi32(_mm256_and_si256(key, low16), _mm256_srli_epi32(e, 16)),
        _mm256_castps_si256(_mm256_cmp_ps(value, value, _CMP_ORD_Q)));
    const __m256i idx = _mm256_sub_epi32(_mm256_and_si256(e, low_byte), above);
    const __m256i w16 = _mm256_packus_epi32(idx, idx);
    const __m256i w8 = _mm256_packus_epi16(w16, w16);
    const uint32_t lo = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_castsi256_si128(w8)));
    const uint32_t hi = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_extracti128_si256(w8, 1)));
    std::memcpy(codes + i, &lo, 4);
    std::memcpy(codes + i + 4, &hi, 4);
  }
  return i;
}

#define PEFTREG_AVX512 __attribute__((target("avx512f,avx512bw,avx512vbmi")))

// encode_entry_avx2, 16 lanes wide, on the unfolded table and in fewer operations: with e
// the entry, (key << 16) > e exactly when the key's low 16 bits exceed the midpoint's (the
// shifted key has zero low bits, e's low bits hold only the start code), and start + 1 never
// carries out of the low byte (a bucket whose start is 255 has no midpoint: mid[255] is +inf),
// so the truncating pack of e + above is the code. The table's base address is moved back by
// first_bucket entries so that the clamped bucket indexes it directly (the gather adds the
// scaled index to the address as integers).
struct EntryEncoder512 {
  __m512i first;
  __m512i last;
  const void* entry;  // entry_full moved back by first_bucket entries
};

PEFTREG_AVX512 inline EntryEncoder512 entry_encoder512(const Quantizer& q) {
  return {_mm512_set1_epi32(static_cast<int>(q.first_bucket)),
          _mm512_set1_epi32(static_cast<int>(q.last_bucket)),
          reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(q.entry_full.data()) -
                                        sizeof(uint32_t) * q.first_bucket)};
}

// The codes of 16 values (already scaled) into codes[0, 16).
PEFTREG_AVX512 PEFTREG_ALWAYS_INLINE void encode16_entry_avx512(const EntryEncoder512& k,
                                                                __m512 value, uint8_t* codes) {
  const __m512i bits = _mm512_castps_si512(value);
  // bits ^ (sign ? 0xFFFFFFFF : 0x80000000) in one ternary-logic operation.
  const __m512i key = _mm512_ternarylogic_epi32(
      bits, _mm512_srai_epi32(bits, 31), _mm512_set1_epi32(static_cast<int>(0x80000000u)), 0x1E);
  const __m512i b = _mm512_min_epu32(
      _mm512_max_epu32(_mm512_srli_epi32(key, Quantizer::kBucketShift), k.first), k.last);
  const __m512i e = _mm512_i32gather_epi32(b, k.entry, 4);
  const __mmask16 ordered = _mm512_cmp_ps_mask(value, value, _CMP_ORD_Q);
  const __mmask16 above = _mm512_mask_cmpgt_epu32_mask(ordered, _mm512_slli_epi32(key, 16), e);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes),
                   _mm512_cvtepi32_epi8(_mm512_mask_add_epi32(e, above, e, _mm512_set1_epi32(1))));
}

PEFTREG_AVX512 int64_t encode_entry_avx512(const Quantizer& q, const float* x, float scale,
                                           uint8_t* codes, int64_t end) {
  const EntryEncoder512 k = entry_encoder512(q);
  const __m512 by = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= end; i += 16) {
    encode16_entry_avx512(k, _mm512_mul_ps(_mm512_loadu_ps(x + i), by), codes + i);
  }
  return i;
}

// Byte k of the 64 codes goes to position kPlaneOrder[k] before the plane lookups, so that
// the two rounds of in-lane unpacking that assemble the four bytes of each float put the
// 64 floats back in the codes' order.
constexpr uint8_t kPlaneOrder[64] = {
    0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51,
    4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55,
    8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59,
    12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};

// out[0, n) = code[codes[0, n)] for n a multiple of 64: per plane two 128-entry byte
// permutes and a blend on the code's top bit replace 64 gathered loads.
PEFTREG_AVX512 void decode_planes_avx512(const Quantizer& q, const uint8_t* codes, float* out,
                                         int64_t n) {
  __m512i table[4][4];
  for (int b = 0; b < 4; ++b) {
    for (int k = 0; k < 4; ++k) {
      table[b][k] = _mm512_loadu_si512(q.planes[b] + 64 * k);
    }
  }
  const __m512i order = _mm512_loadu_si512(kPlaneOrder);
  for (int64_t i = 0; i < n; i += 64) {
    const __m512i c = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(codes + i));
    const __mmask64 high = _mm512_movepi8_mask(c);
    __m512i byte[4];
    for (int b = 0; b < 4; ++b) {
      byte[b] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(table[b][0], c, table[b][1]),
                                       _mm512_permutex2var_epi8(table[b][2], c, table[b][3]));
    }
    const __m512i lo01 = _mm512_unpacklo_epi8(byte[0], byte[1]);
    const __m512i hi01 = _mm512_unpackhi_epi8(byte[0], byte[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(byte[2], byte[3]);
    const __m512i hi23 = _mm512_unpackhi_epi8(byte[2], byte[3]);
    _mm512_storeu_si512(out + i, _mm512_unpacklo_epi16(lo01, lo23));
    _mm512_storeu_si512(out + i + 16, _mm512_unpackhi_epi16(lo01, lo23));
    _mm512_storeu_si512(out + i + 32, _mm512_unpacklo_epi16(hi01, hi23));
    _mm512_storeu_si512(out + i + 48, _mm512_unpackhi_epi16(hi01, hi23));
  }
}

PEFTREG_AVX512 inline __m512 avx512_load(const float* p) { return _mm512_loadu_ps(p); }
PEFTREG_AVX512 inline void avx512_store(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
PEFTREG_AVX512 inline __m512 avx512_load(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
// Rounds as store() above: to nearest even, NaN as the quiet 0x7FC0.
PEFTREG_AVX512 inline void avx512_store(c10::BFloat16* p, __m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                                  _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}

// adamw8_update_avx2 on a full block whose codes are already looked up (d1, d2: map values),
// 16 lanes at a time; the same operations in the same order, so the same roundings.
// With kEncode, the 16-lane steps also encode the previous block's moments (pm, pv times
// ps1, ps2 into pc1, pc2), so that its gathers run beside this block's divisions.
struct PendingEncode {
  const float* m;
  const float* v;
  float scale1;
  float scale2;
  uint8_t* c1;
  uint8_t* c2;
};

template <typename T, bool kSmallWeight, bool kEncode = false>
PEFTREG_AVX512 void adamw8_update_avx512(const AdamWScalars& s, const T* grad, T* param,
                                         const float* d1, const float* d2, float a1, float a2,
                                         float* m, float* v, float* max1, float* max2,
                                         const Quant8Maps* q = nullptr,
                                         const PendingEncode* pending = nullptr) {
  EntryEncoder512 enc1{};
  EntryEncoder512 enc2{};
  __m512 ps1 = _mm512_setzero_ps();
  __m512 ps2 = _mm512_setzero_ps();
  if constexpr (kEncode) {
    enc1 = entry_encoder512(q->m);
    enc2 = entry_encoder512(q->v);
    ps1 = _mm512_set1_ps(pending->scale1);
    ps2 = _mm512_set1_ps(pending->scale2);
  }
  const __m512 w = _mm512_set1_ps(s.one_minus_beta1);
  const __m512 one_minus_w = _mm512_set1_ps(1.0f - s.one_minus_beta1);
  const __m512 sign = _mm512_set1_ps(s.maximize ? -1.0f : 1.0f);
  const __m512 decay = _mm512_set1_ps(s.decay);
  const __m512 beta2 = _mm512_set1_ps(s.beta2);
  const __m512 one_minus_beta2 = _mm512_set1_ps(s.one_minus_beta2);
  const __m512 bc2_sqrt = _mm512_set1_ps(s.bc2_sqrt);
  const __m512 eps = _mm512_set1_ps(s.eps);
  const __m512 neg_step = _mm512_set1_ps(s.neg_step_size);
  const __m512 scale1 = _mm512_set1_ps(a1);
  const __m512 scale2 = _mm512_set1_ps(a2);
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  __m512 acc1 = _mm512_setzero_ps();
  __m512 acc2 = _mm512_setzero_ps();
  for (int64_t i = 0; i < kQuantBlock; i += 16) {
    const __m512 m0 = _mm512_mul_ps(_mm512_loadu_ps(d1 + i), scale1);
    const __m512 v0 = _mm512_mul_ps(_mm512_loadu_ps(d2 + i), scale2);
    const __m512 g = _mm512_mul_ps(avx512_load(grad + i), sign);
    const __m512 p = _mm512_mul_ps(avx512_load(param + i), decay);
    const __m512 diff = _mm512_sub_ps(g, m0);
    const __m512 mi = kSmallWeight ? _mm512_add_ps(m0, _mm512_mul_ps(w, diff))
                                   : _mm512_sub_ps(g, _mm512_mul_ps(diff, one_minus_w));
    const __m512 vi = _mm512_add_ps(_mm512_mul_ps(v0, beta2),
                                    _mm512_mul_ps(_mm512_mul_ps(one_minus_beta2, g), g));
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bc2_sqrt), eps);
    _mm512_storeu_ps(m + i, mi);
    _mm512_storeu_ps(v + i, vi);
    // max_ps(x, acc) keeps acc when x is NaN, as std::max(acc, x) does.
    acc1 = _mm512_max_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(mi), abs_mask)),
                         acc1);
    acc2 = _mm512_max_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(vi), abs_mask)),
                         acc2);
    avx512_store(param + i, _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(neg_step, mi), denom)));
    if constexpr (kEncode) {
      encode16_entry_avx512(enc1, _mm512_mul_ps(_mm512_loadu_ps(pending->m + i), ps1),
                            pending->c1 + i);
      encode16_entry_avx512(enc2, _mm512_mul_ps(_mm512_loadu_ps(pending->v + i), ps2),
                            pending->c2 + i);
    }
  }
  // A reduction tree instead of 16 dependent scalar maxima: the lanes hold no NaN (see
  // above) and maxima round nothing, so the result is the scalar loop's.
  *max1 = std::max(*max1, _mm512_reduce_max_ps(acc1));
  *max2 = std::max(*max2, _mm512_reduce_max_ps(acc2));
}

// max(|x[i]|) over [0, n) with NaN skipped, as std::max(a, |x|) skips it: max_ps(x, acc)
// returns acc when x is NaN. Maxima round nothing, so the lane order does not matter.
__attribute__((target("avx2"))) float absmax_avx2(const float* x, int64_t n) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    acc = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask), acc);
  }
  float a = reduce_max_avx2(acc);
  for (; i < n; ++i) {
    a = std::max(a, std::fabs(x[i]));
  }
  return a;
}

PEFTREG_AVX512 float absmax_avx512(const float* x, int64_t n) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i bits = _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(x + i)), abs_mask);
    acc = _mm512_max_ps(_mm512_castsi512_ps(bits), acc);
  }
  float a = _mm512_reduce_max_ps(acc);
  for (; i < n; ++i) {
    a = std::max(a, std::fabs(x[i]));
  }
  return a;
}
#endif

float block_absmax(const float* x, int64_t n, Kernel8 k) {
#if PEFTREG_X86_DISPATCH
  if (k == Kernel8::kAvx512) {
    return absmax_avx512(x, n);
  }
  if (k != Kernel8::kScalar) {
    return absmax_avx2(x, n);
  }
#else
  (void)k;
#endif
  float a = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    a = std::max(a, std::fabs(x[i]));
  }
  return a;
}

// The vector part of encoding x[0, n) * scale with kernel k; returns how many were encoded (the
// caller's scalar loop does the rest).
int64_t encode_vector(const Quantizer& q, const float* x, float scale, uint8_t* codes, int64_t n,
                      Kernel8 k) {
#if PEFTREG_X86_DISPATCH
  const bool one_compare = !q.entry.empty();
  if (k == Kernel8::kAvx512 && one_compare) {
    return encode_entry_avx512(q, x, scale, codes, n);
  }
  if ((k == Kernel8::kAvx2 || k == Kernel8::kAvx512) && one_compare) {
    return encode_entry_avx2(q, x, scale, codes, n);
  }
  if (k != Kernel8::kScalar) {
    return encode_avx2(q, x, scale, codes, n);
  }
#else
  (void)q, (void)x, (void)scale, (void)codes, (void)n, (void)k;
#endif
  return 0;
}

// Encodes one block of x[0, n) against its absmax, times block_scale(absmax), or divided by
// the absmax where that scale is infinite.
void encode_block(const Quantizer& q, const float* x, float absmax, uint8_t* codes, int64_t n,
                  Kernel8 k) {
  const float scale = block_scale(absmax);
  if (std::isinf(scale)) {
    for (int64_t i = 0; i < n; ++i) {
      codes[i] = q.encode(x[i] / absmax);
    }
    return;
  }
  const int64_t done = encode_vector(q, x, scale, codes, n, k);
  encode_scalar(q, x, scale, codes, done, n);
}

// Elements [0, n) of one block: decode, update (parameter written), find the new absmax of
// each moment and encode against it. The parameter update uses the float32 moments before
// encoding, as bitsandbytes' 8-bit optimizers do, so quantization error enters only through
// the stored state.
template <typename T, bool kSmallWeight>
void adamw8_block(const AdamWScalars& s, const T* grad, T* param, int64_t n, uint8_t* c1,
                  uint8_t* c2, float* a1, float* a2, const Quant8Maps& q) {
  alignas(64) float m[kQuantBlock];
  alignas(64) float v[kQuantBlock];
  int64_t done = 0;
  float max1 = 0.0f;
  float max2 = 0.0f;
  const Kernel8 k = q.kernel;
#if PEFTREG_X86_DISPATCH
  if constexpr (!std::is_same_v<T, c10::Half>) {
    if (k == Kernel8::kAvx512 && n == kQuantBlock) {
      // Decoded into m and v first, then updated in place: both fit L1 with the block.
      decode_planes_avx512(q.m, c1, m, kQuantBlock);
      decode_planes_avx512(q.v, c2, v, kQuantBlock);
      adamw8_update_avx512<T, kSmallWeight>(s, grad, param, m, v, *a1, *a2, m, v, &max1,
                                            &max2);
      done = n;
    } else if (k != Kernel8::kScalar) {
      done = adamw8_update_avx2<T, kSmallWeight>(s, grad, param, c1, c2, *a1, *a2, q, m, v, n,
                                                 &max1, &max2);
    }
  }
#endif
  adamw8_update_scalar<T, kSmallWeight>(s, grad, param, c1, c2, *a1, *a2, q, m, v, done, n);
  // Maxima are exact whatever the order (no rounding), so the vector part's and the tail's
  // combine to the scalar loop's result.
  for (int64_t i = done; i < n; ++i) {
    max1 = std::max(max1, std::fabs(m[i]));
    max2 = std::max(max2, std::fabs(v[i]));
  }
  encode_block(q.m, m, max1, c1, n, k);
  encode_block(q.v, v, max2, c2, n, k);
  *a1 = max1;
  *a2 = max2;
}

#if PEFTREG_X86_DISPATCH
// Full blocks [begin, end) with the avx512 kernel, software-pipelined: block b is decoded and
// updated while block b - 1, whose absmax is then known, is encoded in the same loop. Each
// block gets exactly adamw8_block's operations; a block whose reciprocal absmax overflows is
// encoded apart by encode_block's division path.
template <typename T, bool kSmallWeight>
void adamw8_blocks_avx512(const AdamWScalars& s, const T* grad, T* param, uint8_t* c1,
                          uint8_t* c2, float* a1, float* a2, const Quant8Maps& q,
                          int64_t begin, int64_t end) {
  alignas(64) float m[2][kQuantBlock];
  alignas(64) float v[2][kQuantBlock];
  float prev1 = 0.0f;
  float prev2 = 0.0f;
  for (int64_t b = begin; b <= end; ++b) {
    const int cur = static_cast<int>(b & 1);
    const int prev = cur ^ 1;
    const int64_t at = b * kQuantBlock;
    const int64_t prev_at = at - kQuantBlock;
    const bool has_prev = b > begin;
    const float s1 = block_scale(prev1);
    const float s2 = block_scale(prev2);
    const bool interleave = has_prev && b < end && !std::isinf(s1) && !std::isinf(s2);
    if (has_prev && !interleave) {
      encode_block(q.m, m[prev], prev1, c1 + prev_at, kQuantBlock, Kernel8::kAvx512);
      encode_block(q.v, v[prev], prev2, c2 + prev_at, kQuantBlock, Kernel8::kAvx512);
    }
    if (b == end) {
      break;
    }
    decode_planes_avx512(q.m, c1 + at, m[cur], kQuantBlock);
    decode_planes_avx512(q.v, c2 + at, v[cur], kQuantBlock);
    float max1 = 0.0f;
    float max2 = 0.0f;
    if (interleave) {
      const PendingEncode pending{m[prev], v[prev], s1, s2, c1 + prev_at, c2 + prev_at};
      adamw8_update_avx512<T, kSmallWeight, true>(s, grad + at, param + at, m[cur], v[cur],
                                                  a1[b], a2[b], m[cur], v[cur], &max1, &max2,
                                                  &q, &pending);
    } else {
      adamw8_update_avx512<T, kSmallWeight>(s, grad + at, param + at, m[cur], v[cur], a1[b],
                                            a2[b], m[cur], v[cur], &max1, &max2);
    }
    a1[b] = max1;
    a2[b] = max2;
    prev1 = max1;
    prev2 = max2;
  }
}
#endif

template <typename T>
void adamw8_blocks_typed(const AdamWSegment& seg, uint8_t* c1, uint8_t* c2, float* a1,
                         float* a2, const Quant8Maps& q, int64_t begin, int64_t end) {
  const T* grad = static_cast<const T*>(seg.grad);
  T* param = static_cast<T*>(seg.param);
  const bool small = seg.s.one_minus_beta1 < 0.5f;
#if PEFTREG_X86_DISPATCH
  if constexpr (!std::is_same_v<T, c10::Half>) {
    if (q.kernel == Kernel8::kAvx512 && !q.m.entry_full.empty() && !q.v.entry_full.empty()) {
      const int64_t full_end = std::min(end, seg.count / kQuantBlock);
      if (full_end > begin) {
        if (small) {
          adamw8_blocks_avx512<T, true>(seg.s, grad, param, c1, c2, a1, a2, q, begin, full_end);
        } else {
          adamw8_blocks_avx512<T, false>(seg.s, grad, param, c1, c2, a1, a2, q, begin,
                                         full_end);
        }
        begin = full_end;
      }
    }
  }
#endif
  for (int64_t b = begin; b < end; ++b) {
    const int64_t first = b * kQuantBlock;
    const int64_t n = std::min(kQuantBlock, seg.count - first);
    if (small) {
      adamw8_block<T, true>(seg.s, grad + first, param + first, n, c1 + first, c2 + first,
                            a1 + b, a2 + b, q);
    } else {
      adamw8_block<T, false>(seg.s, grad + first, param + first, n, c1 + first, c2 + first,
                             a1 + b, a2 + b, q);
    }
  }
}

// Blocks [begin, end) of one segment whose page's codes and absmax start at c1, c2, a1, a2.
void adamw8_part(const AdamWSegment& seg, uint8_t* c1, uint8_t* c2, float* a1, float* a2,
                 const Quant8Maps& q, int64_t begin, int64_t end) {
  const int64_t block = seg.state_index / kQuantBlock;
  c1 += seg.state_index;
  c2 += seg.state_index;
  a1 += block;
  a2 += block;
  switch (seg.dtype) {
    case ParamDType::kFloat32:
      adamw8_blocks_typed<float>(seg, c1, c2, a1, a2, q, begin, end);
      break;
    case ParamDType::kBFloat16:
      adamw8_blocks_typed<c10::BFloat16>(seg, c1, c2, a1, a2, q, begin, end);
      break;
    case ParamDType::kFloat16:
      adamw8_blocks_typed<c10::Half>(seg, c1, c2, a1, a2, q, begin, end);
      break;
  }
}

class CpuBackend final : public PageBackend {
 public:
  CpuBackend(int64_t page_bytes, std::string directory)
      : page_bytes_(page_bytes), directory_(std::move(directory)) {
    struct stat info {};
    TORCH_CHECK(::stat(directory_.c_str(), &info) == 0 && S_ISDIR(info.st_mode),
                "peftreg paged: the backing directory '", directory_,
                "' does not exist or is not a directory");
    std::string pattern = directory_ + "/.peftreg-paged-XXXXXX";
    fd_ = ::mkstemp(pattern.data());
    TORCH_CHECK(fd_ >= 0, "peftreg paged: cannot create the backing file in directory '",
                directory_, "': ", os_error(errno),
                "; pass a writable backing_dir (or raise the budget so nothing is paged)");
    // Unlinked at once: the file lives exactly as long as this descriptor, so it goes away
    // at close, at exit and on a crash, and no other process can reach it.
    ::unlink(pattern.c_str());
  }

  ~CpuBackend() override {
    if (fd_ >= 0) {
      ::close(fd_);
    }
  }

  void* alloc_fast() override {
    void* buf = std::aligned_alloc(kAlign, static_cast<size_t>(page_bytes_));
    if (buf == nullptr) {
      throw std::bad_alloc();
    }
    return buf;
  }

  void free_fast(void* buf) override { std::free(buf); }

  void reserve(int64_t num_pages) override {
    const off_t old_size = static_cast<off_t>(reserved_pages_ * page_bytes_);
    const off_t new_size = static_cast<off_t>(num_pages * page_bytes_);
    if (new_size <= old_size) {
      return;
    }
    // posix_fallocate allocates the blocks now, so a full disk (or a file-size limit) is
    // reported here instead of by a page-out in the middle of a step.
    int err = ::posix_fallocate(fd_, old_size, new_size - old_size);
    if (err == EOPNOTSUPP || err == EINVAL) {  // file systems without fallocate
      err = ::ftruncate(fd_, new_size) == 0 ? 0 : errno;
    }
    if (err != 0) {
      (void)::ftruncate(fd_, old_size);  // give back what a partial allocation took
      TORCH_CHECK(false, "peftreg paged: the backing directory '", directory_,
                  "' cannot hold ", new_size, " bytes of paged optimizer state: ",
                  os_error(err),
                  "; free space there, choose another backing_dir or raise the budget");
    }
    reserved_pages_ = num_pages;
  }

  std::string page_out(int64_t page, void* buf) override {
    if (injected_failure()) {
      return "writing page " + std::to_string(page) + " to the backing file in '" + directory_ +
             "': " + os_error(ENOSPC) + " [simulated by the fault-injection hook]";
    }
    const char* src = static_cast<const char*>(buf);
    int64_t done = 0;
    while (done < page_bytes_) {
      const ssize_t n = ::pwrite(fd_, src + done, static_cast<size_t>(page_bytes_ - done),
                                 static_cast<off_t>(page * page_bytes_ + done));
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n <= 0) {
        const int err = n < 0 ? errno : ENOSPC;
        return "writing page " + std::to_string(page) + " to the backing file in '" +
               directory_ + "': " + os_error(err);
      }
      done += n;
    }
    return "";
  }

  void page_in(int64_t page, void* buf) override {
    char* dst = static_cast<char*>(buf);
    int64_t done = 0;
    while (done < page_bytes_) {
      const ssize_t n = ::pread(fd_, dst + done, static_cast<size_t>(page_bytes_ - done),
                                static_cast<off_t>(page * page_bytes_ + done));
      if (n < 0 && errno == EINTR) {
        continue;
      }
      TORCH_CHECK(n > 0, "peftreg paged: reading page ", page, " back from the backing file in '",
                  directory_, "' failed: ", n < 0 ? os_error(errno) : "unexpected end of file");
      done += n;
    }
  }

  void zero(int64_t /*page*/, void* buf) override {
    std::memset(buf, 0, static_cast<size_t>(page_bytes_));
  }

  void adamw(const std::vector<PageWork>& batch, int64_t elements_per_page) override {
    // Every segment of the batch as one flat range of elements, split across threads by
    // element count: LoRA-sized parameters are smaller than a thread's share.
    struct Task {
      const AdamWSegment* seg;
      float* m;
      float* v;
    };
    std::vector<Task> tasks;
    std::vector<int64_t> starts;  // first flat element of each task
    int64_t total = 0;
    for (const PageWork& w : batch) {
      float* m = static_cast<float*>(w.buf);
      for (const AdamWSegment& seg : *w.segments) {
        tasks.push_back(Task{&seg, m, m + elements_per_page});
        starts.push_back(total);
        total += seg.count;
      }
    }
    at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
      size_t t = static_cast<size_t>(
          std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1);
      while (begin < end) {
        const Task& task = tasks[t];
        const int64_t stop = std::min(end, starts[t] + task.seg->count);
        adamw_part(*task.seg, task.m, task.v, begin - starts[t], stop - starts[t]);
        begin = stop;
        ++t;
      }
    });
  }

  void adamw8(const std::vector<PageWork>& batch, int64_t blocks_per_page,
              const Quant8Maps& maps) override {
    // As adamw(): every block of the batch in one flat range split across threads.
    struct Task {
      const AdamWSegment* seg;
      uint8_t* base;
    };
    std::vector<Task> tasks;
    std::vector<int64_t> starts;
    int64_t total = 0;
    for (const PageWork& w : batch) {
      for (const AdamWSegment& seg : *w.segments) {
        tasks.push_back(Task{&seg, static_cast<uint8_t*>(w.buf)});
        starts.push_back(total);
        total += (seg.count + kQuantBlock - 1) / kQuantBlock;
      }
    }
    const int64_t codes = blocks_per_page * kQuantBlock;
    at::parallel_for(0, total, kGrain / kQuantBlock, [&](int64_t begin, int64_t end) {
      size_t t = static_cast<size_t>(
          std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1);
      while (begin < end) {
        const Task& task = tasks[t];
        const int64_t blocks = (task.seg->count + kQuantBlock - 1) / kQuantBlock;
        const int64_t stop = std::min(end, starts[t] + blocks);
        float* a1 = reinterpret_cast<float*>(task.base + 2 * codes);
        adamw8_part(*task.seg, task.base, task.base + codes, a1, a1 + blocks_per_page, maps,
                    begin - starts[t], stop - starts[t]);
        begin = stop;
        ++t;
      }
    });
  }

  void copy_out(int64_t /*page*/, const void* buf, void* dst) override {
    std::memcpy(dst, buf, static_cast<size_t>(page_bytes_));
  }

  void copy_in(int64_t /*page*/, void* buf, const void* src) override {
    std::memcpy(buf, src, static_cast<size_t>(page_bytes_));
  }

  std::string describe() const override {
    return "cpu: process memory, backing file in '" + directory_ + "'";
  }

 private:
  int64_t page_bytes_;
  std::string directory_;
  int fd_ = -1;
  int64_t reserved_pages_ = 0;
};

}  // namespace

Quantizer::Quantizer(const float* map) {
  bool has_zero = false;
  for (int j = 0; j < 256; ++j) {
    const float x = map[j];
    TORCH_CHECK(std::isfinite(x) && x >= -1.0f && x <= 1.0f, "peftreg paged: quantization "
                "map entry ", j, " is ", x, "; entries must lie in [-1, 1]");
    TORCH_CHECK(j == 0 || x > map[j - 1], "peftreg paged: the quantization map must be "
                "strictly increasing; entry ", j, " (", x, ") follows ", map[j > 0 ? j - 1 : 0]);
    has_zero = has_zero || x == 0.0f;
    code[j] = x;
  }
  TORCH_CHECK(has_zero, "peftreg paged: the quantization map must contain 0 (all-zero blocks "
              "are encoded with it)");
  for (int j = 0; j < 255; ++j) {
    mid[j] = (code[j] + code[j + 1]) * 0.5f;
  }
  mid[255] = std::numeric_limits<float>::infinity();
  const uint32_t lowest = order_key(float_bits(-1.0f));
  const uint32_t highest = order_key(float_bits(1.0f));
  first_bucket = lowest >> kBucketShift;
  last_bucket = highest >> kBucketShift;
  start.assign(static_cast<size_t>(last_bucket - first_bucket + 1) + 3, 0);
  auto below = [this](float x) {
    return static_cast<int>(std::lower_bound(mid, mid + 255, x) - mid);
  };
  for (uint32_t b = first_bucket; b <= last_bucket; ++b) {
    const uint32_t lo_key = std::max(b << kBucketShift, lowest);
    const uint32_t hi_key = std::min(((b + 1) << kBucketShift) - 1, highest);
    const int lo = below(bits_float(key_to_bits(lo_key)));
    const int hi = below(bits_float(key_to_bits(hi_key)));
    start[b - first_bucket] = static_cast<uint8_t>(lo);
    refine = std::max(refine, hi - lo);
  }
  for (int j = 0; j < 256; ++j) {
    const uint32_t bits = float_bits(code[j]);
    for (int b = 0; b < 4; ++b) {
      planes[b][j] = static_cast<uint8_t>(bits >> (8 * b));
    }
  }
  if (refine > 1) {
    return;  // the one-compare table needs at most one midpoint per bucket
  }
  const int32_t buckets = static_cast<int32_t>(last_bucket - first_bucket + 1);
  std::vector<uint32_t> full(static_cast<size_t>(buckets));
  for (int32_t r = 0; r < buckets; ++r) {
    const uint32_t s = start[static_cast<size_t>(r)];
    // mid[255] is +inf, above every bucket; a midpoint key in another bucket never decides.
    const uint32_t key = order_key(float_bits(mid[s]));
    const uint32_t low = (key >> kBucketShift) == first_bucket + static_cast<uint32_t>(r)
                             ? key & 0xFFFFu : 0xFFFFu;
    full[static_cast<size_t>(r)] = s | (low << 16);
  }
  // Fold the run of identical, midpoint-free buckets around the one of +0.
  const int32_t zero = static_cast<int32_t>((order_key(float_bits(0.0f)) >> kBucketShift) -
                                            first_bucket);
  int32_t lo = zero;
  int32_t hi = zero;
  if ((full[static_cast<size_t>(zero)] >> 16) == 0xFFFFu) {
    while (lo > 0 && full[static_cast<size_t>(lo - 1)] == full[static_cast<size_t>(zero)]) --lo;
    while (hi + 1 < buckets && full[static_cast<size_t>(hi + 1)] == full[static_cast<size_t>(zero)]) ++hi;
  }
  fold_at = lo;
  fold_len = hi - lo;
  entry.reserve(static_cast<size_t>(buckets - fold_len));
  for (int32_t r = 0; r < buckets; ++r) {
    if (r <= lo || r > hi) {
      entry.push_back(full[static_cast<size_t>(r)]);
    }
  }
  entry_full = std::move(full);
}

bool kernel8_supported(Kernel8 k) {
  switch (k) {
    case Kernel8::kAuto:
    case Kernel8::kScalar:
      return true;
#if PEFTREG_X86_DISPATCH
    case Kernel8::kAvx2Gather:
    case Kernel8::kAvx2:
      return kHasAvx2;
    case Kernel8::kAvx512:
      return kHasAvx2 && kHasAvx512Vbmi;
#endif
    default:
      return false;
  }
}

Kernel8 resolve_kernel8(Kernel8 k) {
  if (k == Kernel8::kAuto) {
    for (Kernel8 best : {Kernel8::kAvx512, Kernel8::kAvx2}) {
      if (kernel8_supported(best)) {
        return best;
      }
    }
    return Kernel8::kScalar;
  }
  TORCH_CHECK(kernel8_supported(k), "peftreg paged: the 8-bit kernel '", kernel8_name(k),
              "' is not supported by this CPU or build");
  return k;
}

const char* kernel8_name(Kernel8 k) {
  switch (k) {
    case Kernel8::kAuto: return "auto";
    case Kernel8::kScalar: return "scalar";
    case Kernel8::kAvx2Gather: return "avx2-gather";
    case Kernel8::kAvx2: return "avx2";
    case Kernel8::kAvx512: return "avx512";
  }
  return "unknown";
}

uint8_t Quantizer::encode(float q) const {
  uint32_t bucket = order_key(float_bits(q)) >> kBucketShift;
  bucket = std::min(std::max(bucket, first_bucket), last_bucket);
  int idx = start[bucket - first_bucket];
  for (int r = 0; r < refine; ++r) {
    idx += mid[idx] < q ? 1 : 0;
  }
  return static_cast<uint8_t>(idx);
}

void quantize_blockwise(const float* x, int64_t n, const Quantizer& q, uint8_t* codes,
                        float* absmax, Kernel8 kernel) {
  const Kernel8 k = resolve_kernel8(kernel);
  for (int64_t first = 0, b = 0; first < n; first += kQuantBlock, ++b) {
    const int64_t count = std::min(kQuantBlock, n - first);
    const float a = block_absmax(x + first, count, k);
    encode_block(q, x + first, a, codes + first, count, k);
    absmax[b] = a;
  }
}

std::unique_ptr<PageBackend> make_cpu_backend(int64_t page_bytes, const std::string& directory) {
  return std::make_unique<CpuBackend>(page_bytes, directory);
}

}  // namespace peftreg::paged
