// SPDX-License-Identifier: Apache-2.0
//
// CUDA page backend: device memory is the fast tier, pinned host memory the backing tier.
// Copies run on a side stream from torch's pool; the compute stream (torch's current stream)
// and the copy stream are ordered by events, never by a host synchronisation:
//   ready[p]  recorded on the copy stream after page p's page-in (or zero fill); the compute
//             stream waits on it before it touches p;
//   fence     recorded on the compute stream before each copy-stream operation, which waits on
//             it: a page is copied out, and a freed slot refilled, only after every update
//             queued so far on it.
// The pool acquires the next page before queuing the current page's update, so that page-in
// waits only for the previous update and overlaps the current one (the prefetch of
// page_pool.cpp). Device memory comes from torch's caching allocator, one page at a time up to
// the budget, never as unified/managed memory.
#include "paged/page_pool.h"
#include "paged/page_pool_cuda.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>
#include <vector>

namespace peftreg::paged {

namespace {

// ParamDType is the pool's own code, shared with the CPU update; the kernels take the ScalarKind
// that every CUDA launch API takes.
ScalarKind scalar_kind(ParamDType t) {
  switch (t) {
    case ParamDType::kFloat32:
      return ScalarKind::kFloat32;
    case ParamDType::kBFloat16:
      return ScalarKind::kBFloat16;
    case ParamDType::kFloat16:
      return ScalarKind::kFloat16;
  }
  TORCH_CHECK(false, "peftreg paged: unknown parameter dtype code ", static_cast<int>(t));
  return ScalarKind::kFloat32;  // unreachable
}

class CudaBackend final : public PageBackend {
 public:
  CudaBackend(int64_t page_bytes, int device_index)
      : page_bytes_(page_bytes),
        device_(static_cast<c10::DeviceIndex>(device_index)),
        copy_stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device_)) {}

  ~CudaBackend() override {
    c10::cuda::CUDAGuard guard(device_);
    // Every copy into pinned memory must have landed before that memory is freed.
    (void)cudaStreamSynchronize(copy_stream_.stream());
    for (cudaEvent_t e : ready_) {
      if (e != nullptr) (void)cudaEventDestroy(e);
    }
    if (fence_ != nullptr) (void)cudaEventDestroy(fence_);
    for (void* chunk : host_chunks_) {
      (void)cudaFreeHost(chunk);
    }
  }

  void* alloc_fast() override {
    c10::cuda::CUDAGuard guard(device_);
    return c10::cuda::CUDACachingAllocator::raw_alloc(static_cast<size_t>(page_bytes_));
  }

  void free_fast(void* buf) override {
    c10::cuda::CUDAGuard guard(device_);
    // Only called when the pool closes: wait for queued work on the page before giving it back.
    C10_CUDA_CHECK(cudaStreamSynchronize(copy_stream_.stream()));
    C10_CUDA_CHECK(cudaStreamSynchronize(compute().stream()));
    c10::cuda::CUDACachingAllocator::raw_delete(buf);
  }

  void reserve(int64_t num_pages) override {
    const int64_t have = static_cast<int64_t>(host_.size());
    if (num_pages <= have) {
      return;
    }
    c10::cuda::CUDAGuard guard(device_);
    const size_t bytes = static_cast<size_t>((num_pages - have) * page_bytes_);
    void* chunk = nullptr;
    const cudaError_t err = cudaHostAlloc(&chunk, bytes, cudaHostAllocDefault);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // clear the error so later CUDA calls are unaffected
      TORCH_CHECK(false, "peftreg paged: cannot pin ", bytes, " bytes of host memory for the "
                  "backing tier of CUDA device ", static_cast<int>(device_), ": ",
                  cudaGetErrorString(err), "; raise the budget or free host memory");
    }
    host_chunks_.push_back(chunk);
    for (int64_t i = 0; i < num_pages - have; ++i) {
      host_.push_back(static_cast<char*>(chunk) + i * page_bytes_);
    }
  }

  std::string page_out(int64_t page, void* buf) override {
    if (injected_failure()) {
      return "copying page " + std::to_string(page) +
             " to pinned host memory: out of memory [simulated by the fault-injection hook]";
    }
    c10::cuda::CUDAGuard guard(device_);
    cudaStream_t copy = copy_stream_.stream();
    cudaError_t err = fence_copy_stream();
    if (err == cudaSuccess) {
      err = cudaMemcpyAsync(host_.at(static_cast<size_t>(page)), buf,
                            static_cast<size_t>(page_bytes_), cudaMemcpyDeviceToHost, copy);
    }
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      return "copying page " + std::to_string(page) + " to pinned host memory: " +
             cudaGetErrorString(err);
    }
    return "";
  }

  void page_in(int64_t page, void* buf) override {
    c10::cuda::CUDAGuard guard(device_);
    cudaStream_t copy = copy_stream_.stream();
    C10_CUDA_CHECK(fence_copy_stream());
    C10_CUDA_CHECK(cudaMemcpyAsync(buf, host_.at(static_cast<size_t>(page)),
                                   static_cast<size_t>(page_bytes_), cudaMemcpyHostToDevice,
                                   copy));
    C10_CUDA_CHECK(cudaEventRecord(event(ready_, page), copy));
  }

  void zero(int64_t page, void* buf) override {
    c10::cuda::CUDAGuard guard(device_);
    cudaStream_t copy = copy_stream_.stream();
    C10_CUDA_CHECK(fence_copy_stream());
    C10_CUDA_CHECK(cudaMemsetAsync(buf, 0, static_cast<size_t>(page_bytes_), copy));
    C10_CUDA_CHECK(cudaEventRecord(event(ready_, page), copy));
  }

  void before_use(int64_t page) override {
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaStreamWaitEvent(compute().stream(), event(ready_, page), 0));
  }

  bool async_prefetch() const override { return true; }

  void adamw(const std::vector<PageWork>& batch, int64_t elements_per_page) override {
    c10::cuda::CUDAGuard guard(device_);
    cudaStream_t stream = compute().stream();
    for (const PageWork& w : batch) {
      float* m = static_cast<float*>(w.buf);
      float* v = m + elements_per_page;
      for (const AdamWSegment& seg : *w.segments) {
        const cuda::AdamWLaunch launch{seg.param, seg.grad, scalar_kind(seg.dtype), seg.count,
                                       m + seg.state_index, v + seg.state_index, seg.s};
        C10_CUDA_CHECK(cuda::launch_adamw(launch, stream));
      }
    }
  }

  void adamw8(const std::vector<PageWork>& batch, int64_t blocks_per_page,
              const Quant8Maps& maps) override {
    c10::cuda::CUDAGuard guard(device_);
    cudaStream_t stream = compute().stream();
    const int64_t codes = blocks_per_page * kQuantBlock;
    cuda::AdamW8Launch launch{};
    std::copy(maps.m.code, maps.m.code + 256, launch.map1);
    std::copy(maps.v.code, maps.v.code + 256, launch.map2);
    for (const PageWork& w : batch) {
      unsigned char* base = static_cast<unsigned char*>(w.buf);
      float* a1 = reinterpret_cast<float*>(base + 2 * codes);
      for (const AdamWSegment& seg : *w.segments) {
        launch.param = seg.param;
        launch.grad = seg.grad;
        launch.dtype = scalar_kind(seg.dtype);
        launch.count = seg.count;
        launch.c1 = base + seg.state_index;
        launch.c2 = base + codes + seg.state_index;
        launch.a1 = a1 + seg.state_index / kQuantBlock;
        launch.a2 = a1 + blocks_per_page + seg.state_index / kQuantBlock;
        launch.s = seg.s;
        C10_CUDA_CHECK(cuda::launch_adamw8(launch, stream));
      }
    }
  }

  void copy_out(int64_t /*page*/, const void* buf, void* dst) override {
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, buf, static_cast<size_t>(page_bytes_),
                                   cudaMemcpyDeviceToDevice, compute().stream()));
  }

  void copy_in(int64_t /*page*/, void* buf, const void* src) override {
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaMemcpyAsync(buf, src, static_cast<size_t>(page_bytes_),
                                   cudaMemcpyDeviceToDevice, compute().stream()));
  }

  std::string describe() const override {
    return "cuda:" + std::to_string(static_cast<int>(device_)) +
           ": device memory, backing in pinned host memory";
  }

 private:
  c10::cuda::CUDAStream compute() const { return c10::cuda::getCurrentCUDAStream(device_); }

  // The copy stream waits for everything queued on the compute stream so far.
  cudaError_t fence_copy_stream() {
    if (fence_ == nullptr) {
      const cudaError_t err = cudaEventCreateWithFlags(&fence_, cudaEventDisableTiming);
      if (err != cudaSuccess) return err;
    }
    cudaError_t err = cudaEventRecord(fence_, compute().stream());
    if (err == cudaSuccess) err = cudaStreamWaitEvent(copy_stream_.stream(), fence_, 0);
    return err;
  }

  cudaEvent_t event(std::vector<cudaEvent_t>& events, int64_t page) {
    if (events.size() <= static_cast<size_t>(page)) {
      events.resize(static_cast<size_t>(page) + 1, nullptr);
    }
    cudaEvent_t& e = events[static_cast<size_t>(page)];
    if (e == nullptr) {
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
    return e;
  }

  int64_t page_bytes_;
  c10::DeviceIndex device_;
  c10::cuda::CUDAStream copy_stream_;
  std::vector<void*> host_chunks_;
  std::vector<char*> host_;  // backing slot of each page
  std::vector<cudaEvent_t> ready_;
  cudaEvent_t fence_ = nullptr;
};

}  // namespace

std::unique_ptr<PageBackend> make_cuda_backend(int64_t page_bytes, int device_index) {
  return std::make_unique<CudaBackend>(page_bytes, device_index);
}

}  // namespace peftreg::paged
