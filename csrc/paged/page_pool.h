// SPDX-License-Identifier: Apache-2.0
//
// PagePool: optimizer state kept in fixed-size pages under a resident-bytes budget for the fast
// tier (issue 7). When admitting a page would exceed the budget, the least-recently-used
// unpinned pages are moved to a backing tier and brought back on their next access. Callers
// never see where a page lives: they ask for a page and get a pointer to a resident copy.
//
// The pool itself is device-neutral and free of torch types; a PageBackend does the moving:
//   CPU   fast tier = page buffers in process memory; backing tier = one file in a chosen
//         directory, unlinked as soon as it is created (so it disappears with the process,
//         even on SIGKILL), sized up front with posix_fallocate (a full disk is reported when
//         pages are added, before training) and written with pwrite/read with pread.
//         Why not a shared mapping of the file: a failed write through a mapping arrives as
//         SIGBUS and kills the process, while pwrite returns an error the pool can report
//         with the page still resident and intact.
//   CUDA  fast tier = device memory; backing tier = pinned host memory; copies run on a side
//         stream ordered with the compute stream by events, so the next page is prefetched
//         while the current one is updated (page_pool_cuda_ops.cpp).
//
// Failure contract: a page-out that fails leaves the page resident and dirty (nothing is
// lost), the pool stops paging out for the rest of the operation (so the step still completes,
// above the budget), and the error is raised when the operation ends, naming the backing tier
// and the OS error. Reading or writing single pages (state_dict / load_state_dict) never
// raises for a failed page-out, so a checkpoint can be taken while the backing tier fails. A
// page-in that fails raises at once; the backing copy is untouched.
//
// Residency never exceeds max(budget, one page) on the CPU (one page is pinned at a time) and
// budget + one page on CUDA (the page being updated plus the one being prefetched).
//
// The paged AdamW update also lives here (adamw_step) rather than in a dispatcher op: the
// optimizer state is owned by the pool and has no tensor identity, so a torch op schema could
// not describe it, and a method on the registered class keeps `peftreg.ops.OPS` unchanged.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace torch {
class Library;
}

namespace peftreg::paged {

// dtype codes of parameters and gradients handed to the AdamW update.
enum class ParamDType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One parameter (or its slice) updated by adamw_step. Its exp_avg and exp_avg_sq occupy
// elements [state_offset, state_offset + numel) of the pool's state array (see PagePool).
struct AdamWParam {
  void* param = nullptr;
  const void* grad = nullptr;
  ParamDType dtype = ParamDType::kFloat32;
  int64_t numel = 0;
  int64_t state_offset = 0;
  double step = 1;  // this parameter's step count after the increment (bias correction)
};

struct AdamWHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
  bool maximize = false;
};

// Scalars of one parameter's update, rounded to float32 the way torch.optim.AdamW's
// single-tensor path rounds its Python-float scalars when it passes them to float32 kernels.
struct AdamWScalars {
  float decay;       // 1 - lr * weight_decay
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float bc2_sqrt;    // sqrt(1 - beta2 ** step)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1 ** step)
  bool maximize;
};
AdamWScalars adamw_scalars(const AdamWHyper& h, double step);

// A contiguous run of one parameter inside one page: param/grad elements [0, count) at the
// given pointers, state elements [state_index, state_index + count) of that page.
struct AdamWSegment {
  void* param;
  const void* grad;
  ParamDType dtype;
  int64_t count;
  int64_t state_index;
  AdamWScalars s;
};

// Blockwise 8-bit moments (issue 17): each moment is stored as one uint8 code per element and
// one float32 absmax per block of kQuantBlock elements; element x of a block with absmax A is
// encoded as the index of the map value nearest to x * (1 / A) (ties to the lower index; x / A
// where 1 / A overflows) and decoded as map[code] * A.
// Page layout, B = blocks_per_page8(page_bytes), E = B * kQuantBlock:
//   bytes [0, E)          exp_avg codes        [E, 2E)        exp_avg_sq codes
//   bytes [2E, 2E + 4B)   exp_avg absmax       [2E + 4B, 2E + 8B) exp_avg_sq absmax
// A block never straddles pages, and parameters start on block boundaries (the optimizer
// aligns their offsets), so every block belongs to one parameter and one update.
constexpr int64_t kQuantBlock = 256;
constexpr int64_t kQuantBlockBytes = 2 * kQuantBlock + 2 * static_cast<int64_t>(sizeof(float));
inline int64_t blocks_per_page8(int64_t page_bytes) { return page_bytes / kQuantBlockBytes; }

// Nearest-code encoder of one sorted 256-entry map. mid[j] is the midpoint of code[j] and
// code[j + 1] in float32 (mid[255] = +inf), and a code is the number of midpoints below the
// value. To find it without a binary search, the value's float32 bits (made order-preserving)
// are cut into buckets of 2^kBucketShift patterns; start[b] is the code at the bottom of
// bucket b and `refine` the most midpoints inside any bucket, so at most `refine` compares
// finish the count.
//
// When refine is 1 (both dynamic maps) a bucket holds at most one midpoint, and its compare
// can be made on the low 16 bits of the order-preserving key instead of on a gathered float:
// entry[c] = start | (low key bits of the bucket's midpoint, or 0xFFFF for none) << 16, and
// the code is start + (those bits < the value's). The run of identical buckets around zero
// (tiny magnitudes, all of one code) is folded into one entry, so the table is about 24 KiB,
// not 128: bucket r = b - first_bucket maps to entry r - clamp(r - fold_at, 0, fold_len).
struct Quantizer {
  // 2^16 bit patterns: 7 mantissa bits, so one compare finishes both dynamic maps' codes.
  static constexpr int kBucketShift = 16;
  float code[256];
  float mid[256];
  std::vector<uint8_t> start;  // padded by 3 bytes for 32-bit gathers
  uint32_t first_bucket = 0;
  uint32_t last_bucket = 0;
  int refine = 0;
  std::vector<uint32_t> entry;  // the one-compare table above; empty when refine > 1
  int32_t fold_at = 0;
  int32_t fold_len = 0;
  // The same table without the fold, entry_full[b - first_bucket] (about 127 KiB): the AVX-512
  // encoder's gathers run faster on it than on the folded one (measured on Zen 4, where the
  // AVX2 gathers run slower on it), and it spares that encoder the fold's four operations.
  // Only the buckets of the magnitudes a step's moments take are ever touched.
  std::vector<uint32_t> entry_full;
  // code[] as four byte planes (least significant first), for decoders that look codes up
  // with byte permutes instead of gathers.
  uint8_t planes[4][256];
  explicit Quantizer(const float* map);  // throws unless sorted, within [-1, 1], with 0
  uint8_t encode(float q) const;
};

// The CPU kernels of the 8-bit step, slowest first. All give bit-identical results (tests);
// kAuto picks the fastest the CPU supports, at run time.
//   kScalar      plain C++ loops.
//   kAvx2Gather  AVX2; decode by gathers, encode by a bucket gather plus a midpoint gather.
//   kAvx2        AVX2; encode by one gather from the one-compare table (when refine <= 1).
//   kAvx512      AVX-512 F/BW/VBMI; decode by byte permutes over the code planes, update
//                16 lanes at a time, encode as kAvx2 but 16 lanes wide (from entry_full), each
//                full block's encode run inside the next block's update loop.
enum class Kernel8 : int { kAuto = 0, kScalar = 1, kAvx2Gather = 2, kAvx2 = 3, kAvx512 = 4 };
// Whether this CPU (and build) can run `k`; kAuto and kScalar always can.
bool kernel8_supported(Kernel8 k);
// kAuto resolved to the fastest supported kernel; throws for an unsupported one.
Kernel8 resolve_kernel8(Kernel8 k);
const char* kernel8_name(Kernel8 k);

struct Quant8Maps {
  Quant8Maps(const float* signed_map, const float* unsigned_map, Kernel8 k = Kernel8::kAuto)
      : m(signed_map), v(unsigned_map), kernel(resolve_kernel8(k)) {}
  Quantizer m;  // exp_avg: the signed dynamic map
  Quantizer v;  // exp_avg_sq: the unsigned dynamic map
  Kernel8 kernel;  // the CPU kernel of the step and of quantize_blockwise; never kAuto
};

// Encodes x[0, n) as codes[0, n) and absmax[0, ceil(n / kQuantBlock)) (CPU memory).
void quantize_blockwise(const float* x, int64_t n, const Quantizer& q, uint8_t* codes,
                        float* absmax, Kernel8 kernel);

// One resident, pinned page and the segments to update in it.
struct PageWork {
  int64_t page;
  void* buf;
  const std::vector<AdamWSegment>* segments;
};

struct Counters {
  int64_t resident_bytes = 0;
  int64_t peak_resident_bytes = 0;
  int64_t pages_out = 0;
  int64_t pages_in = 0;
  int64_t bytes_out = 0;
  int64_t bytes_in = 0;
};

// Moves pages between the tiers; one implementation per device.
class PageBackend {
 public:
  virtual ~PageBackend() = default;
  virtual void* alloc_fast() = 0;
  virtual void free_fast(void* buf) = 0;
  // Make the backing tier able to hold pages [0, num_pages); throws a clear error if it cannot.
  virtual void reserve(int64_t num_pages) = 0;
  // Page-out: copy `buf` to the backing slot of `page`. Returns "" or an error message; on
  // error the backing slot may be partial but `buf` is untouched.
  virtual std::string page_out(int64_t page, void* buf) = 0;
  // Page-in (throws on failure) and zero-fill of a fresh page.
  virtual void page_in(int64_t page, void* buf) = 0;
  virtual void zero(int64_t page, void* buf) = 0;
  // Ordering hooks around a use of a resident page (CUDA: stream events; CPU: nothing).
  virtual void before_use(int64_t /*page*/) {}
  virtual void after_use(int64_t /*page*/) {}
  // Whether page-ins are asynchronous, so prefetching the next page overlaps the update.
  virtual bool async_prefetch() const { return false; }
  // Update the segments of a batch of resident pages (each page: elements_per_page floats of
  // exp_avg followed by as many of exp_avg_sq).
  virtual void adamw(const std::vector<PageWork>& batch, int64_t elements_per_page) = 0;
  // The same for 8-bit pages (layout above); segments start on block boundaries.
  virtual void adamw8(const std::vector<PageWork>& batch, int64_t blocks_per_page,
                      const Quant8Maps& maps) = 0;
  // Copy a resident page out to / in from a caller buffer of the same device.
  virtual void copy_out(int64_t page, const void* buf, void* dst) = 0;
  virtual void copy_in(int64_t page, void* buf, const void* src) = 0;
  virtual std::string describe() const = 0;
  // Testing hook: the next `after` page-outs succeed, then each fails with a simulated ENOSPC
  // (negative: never).
  void inject_write_failure(int64_t after) { fail_after_ = after; }

 protected:
  // Returns true when the current page-out must fail (fault injection).
  bool injected_failure() {
    if (fail_after_ < 0) return false;
    if (fail_after_ == 0) return true;
    --fail_after_;
    return false;
  }

 private:
  int64_t fail_after_ = -1;
};

std::unique_ptr<PageBackend> make_cpu_backend(int64_t page_bytes, const std::string& directory);
#if defined(PEFTREG_WITH_CUDA) && PEFTREG_WITH_CUDA
std::unique_ptr<PageBackend> make_cuda_backend(int64_t page_bytes, int device_index);
#endif

class PagePool {
 public:
  // page_bytes: a positive multiple of 4096; budget_bytes: at least one page.
  PagePool(std::unique_ptr<PageBackend> backend, int64_t page_bytes, int64_t budget_bytes);
  ~PagePool();

  int64_t page_bytes() const { return page_bytes_; }
  int64_t budget_bytes() const { return budget_bytes_; }
  int64_t num_pages() const;
  // float32 elements of one state (exp_avg or exp_avg_sq) per page: page_bytes / 8.
  int64_t elements_per_page() const { return page_bytes_ / 8; }

  // Appends `count` zero pages; returns the id of the first. Reserves backing space once the
  // pages no longer fit the budget, so a full disk is reported here.
  int64_t add_pages(int64_t count);
  // One AdamW step over `params` (AdamW, Loshchilov & Hutter 2019, algorithm 2, with torch's
  // bias correction and eps placement). Pages are swept once each, alternating direction from
  // one call to the next so the pages LRU kept resident at the end are the first reused. On
  // the CPU as many pages as the budget holds are pinned and updated in one parallel pass
  // (small parameters alone would leave threads idle); on CUDA one page at a time, with the
  // next one prefetched.
  void adamw_step(const std::vector<AdamWParam>& params, const AdamWHyper& hyper);
  // The same over 8-bit pages (see Quant8Maps); needs set_quant_maps first, and every
  // state_offset must be a multiple of kQuantBlock.
  void adamw8_step(const std::vector<AdamWParam>& params, const AdamWHyper& hyper);
  void set_quant_maps(std::shared_ptr<const Quant8Maps> maps);
  std::shared_ptr<const Quant8Maps> quant_maps() const;
  // Copy page `page` out to / in from a device buffer of page_bytes.
  void read_page(int64_t page, void* dst);
  void write_page(int64_t page, const void* src);
  Counters counters() const;
  void reset_peak();
  std::string describe() const;
  PageBackend& backend() { return *backend_; }
  // Drops every page and the backing tier; the pool is unusable afterwards.
  void close();
  bool closed() const;

 private:
  struct Page {
    void* buf = nullptr;        // resident copy, or nullptr
    bool on_backing = false;    // the backing tier holds a valid copy
    bool dirty = false;         // the resident copy differs from the backing copy
    int pins = 0;
    std::list<int64_t>::iterator lru_pos;
  };

  void* acquire(int64_t page);  // resident + pinned + most recently used
  void release(int64_t page);
  void make_room();
  void trim();
  bool evict(int64_t page);
  void* take_buffer();
  void check_open(const char* what) const;
  void check_page(int64_t page, const char* what) const;
  void raise_pending();
  // Segments of `params` grouped by page (per_page state elements each), pages in sweep order.
  void plan(const std::vector<AdamWParam>& params, const AdamWHyper& hyper, int64_t per_page,
            const char* what, std::vector<std::vector<AdamWSegment>>* by_page,
            std::vector<int64_t>* touched);
  // Pins the touched pages batch by batch and runs `update` on each batch.
  void sweep(const std::vector<int64_t>& touched,
             std::vector<std::vector<AdamWSegment>>& by_page,
             const std::function<void(const std::vector<PageWork>&)>& update);

  mutable std::mutex mutex_;
  std::unique_ptr<PageBackend> backend_;
  int64_t page_bytes_;
  int64_t budget_bytes_;
  int64_t reserved_pages_ = 0;
  std::vector<Page> pages_;
  std::list<int64_t> lru_;       // resident pages, least recently used first
  std::vector<void*> free_bufs_; // fast-tier buffers to reuse (never more than the peak)
  Counters counters_;
  std::string pending_error_;    // first page-out failure of the current operation
  std::shared_ptr<const Quant8Maps> quant_;
  bool forward_ = true;
  bool closed_ = false;
};

// Registers the torch custom class peftreg.PagePool; called from the TORCH_LIBRARY block in
// csrc/registration.cpp (the only one of the namespace).
void register_page_pool(torch::Library& m);

}  // namespace peftreg::paged
