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

std::unique_ptr<PageBackend> make_cpu_backend(int64_t page_bytes, const std::string& directory) {
  return std::make_unique<CpuBackend>(page_bytes, directory);
}

}  // namespace peftreg::paged
