// SPDX-License-Identifier: Apache-2.0
//
// The device-neutral part of the page pool: residency, LRU order, budget, counters, and the
// page sweep of the AdamW step. Devices plug in through PageBackend (page_pool.h).
#include "paged/page_pool.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

namespace peftreg::paged {

namespace {
constexpr int64_t kPageAlign = 4096;
}  // namespace

AdamWScalars adamw_scalars(const AdamWHyper& h, double step) {
  // Computed in double, as torch.optim.AdamW computes them in Python floats, then rounded once.
  const double bias_correction1 = 1.0 - std::pow(h.beta1, step);
  const double bias_correction2 = 1.0 - std::pow(h.beta2, step);
  AdamWScalars s{};
  s.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  s.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  s.beta2 = static_cast<float>(h.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  s.bc2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  s.eps = static_cast<float>(h.eps);
  s.neg_step_size = static_cast<float>(-(h.lr / bias_correction1));
  s.maximize = h.maximize;
  return s;
}

PagePool::PagePool(std::unique_ptr<PageBackend> backend, int64_t page_bytes,
                   int64_t budget_bytes)
    : backend_(std::move(backend)), page_bytes_(page_bytes), budget_bytes_(budget_bytes) {
  TORCH_CHECK(page_bytes > 0 && page_bytes % kPageAlign == 0,
              "peftreg paged: page_bytes must be a positive multiple of ", kPageAlign,
              ", got ", page_bytes);
  TORCH_CHECK(budget_bytes >= page_bytes, "peftreg paged: budget_bytes (", budget_bytes,
              ") must hold at least one page of page_bytes (", page_bytes, ")");
}

PagePool::~PagePool() {
  try {
    close();
  } catch (...) {  // a destructor must not throw; close() only frees memory
  }
}

void PagePool::check_open(const char* what) const {
  TORCH_CHECK(!closed_, "peftreg paged: ", what, " on a closed page pool");
}

void PagePool::check_page(int64_t page, const char* what) const {
  TORCH_CHECK(page >= 0 && page < static_cast<int64_t>(pages_.size()), "peftreg paged: ", what,
              ": page ", page, " does not exist (the pool has ", pages_.size(), " pages)");
}

int64_t PagePool::num_pages() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(pages_.size());
}

bool PagePool::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closed_;
}

int64_t PagePool::add_pages(int64_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open("add_pages");
  TORCH_CHECK(count >= 0, "peftreg paged: add_pages: count must be >= 0, got ", count);
  const int64_t first = static_cast<int64_t>(pages_.size());
  const int64_t total = first + count;
  // Backing space is needed only once the pages cannot all stay resident; reserving it here
  // (not at the first page-out) reports a full disk before training rather than mid-step.
  if (total * page_bytes_ > budget_bytes_ && total > reserved_pages_) {
    backend_->reserve(total);  // throws with the pages not added
    reserved_pages_ = total;
  }
  pages_.resize(static_cast<size_t>(total));
  return first;
}

void* PagePool::take_buffer() {
  if (!free_bufs_.empty()) {
    void* buf = free_bufs_.back();
    free_bufs_.pop_back();
    return buf;
  }
  return backend_->alloc_fast();
}

bool PagePool::evict(int64_t id) {
  Page& page = pages_[static_cast<size_t>(id)];
  if (page.dirty || !page.on_backing) {
    if (!pending_error_.empty()) {
      return false;  // the backing tier failed in this operation: keep everything resident
    }
    std::string error = backend_->page_out(id, page.buf);
    if (!error.empty()) {
      pending_error_ = std::move(error);
      return false;
    }
    page.on_backing = true;
    page.dirty = false;
    counters_.pages_out += 1;
    counters_.bytes_out += page_bytes_;
  }
  lru_.erase(page.lru_pos);
  free_bufs_.push_back(page.buf);
  page.buf = nullptr;
  counters_.resident_bytes -= page_bytes_;
  return true;
}

void PagePool::make_room() {
  auto it = lru_.begin();
  while (counters_.resident_bytes + page_bytes_ > budget_bytes_ && it != lru_.end()) {
    const int64_t id = *it;
    ++it;  // evict() erases the current node
    if (pages_[static_cast<size_t>(id)].pins > 0) {
      continue;
    }
    if (!evict(id)) {
      return;  // page-out failed: stay above the budget rather than lose state
    }
  }
}

void PagePool::trim() {
  // After a failed page-out the pool may sit above the budget; shrink back once paging works.
  auto it = lru_.begin();
  while (counters_.resident_bytes > budget_bytes_ && it != lru_.end()) {
    const int64_t id = *it;
    ++it;
    if (pages_[static_cast<size_t>(id)].pins == 0 && !evict(id)) {
      return;
    }
  }
}

void* PagePool::acquire(int64_t id) {
  Page& page = pages_[static_cast<size_t>(id)];
  if (page.buf != nullptr) {
    lru_.splice(lru_.end(), lru_, page.lru_pos);
    page.pins += 1;
    return page.buf;
  }
  make_room();
  void* buf = take_buffer();
  try {
    if (page.on_backing) {
      backend_->page_in(id, buf);
      counters_.pages_in += 1;
      counters_.bytes_in += page_bytes_;
    } else {
      backend_->zero(id, buf);
      page.dirty = true;  // not on the backing tier yet
    }
  } catch (...) {
    free_bufs_.push_back(buf);
    throw;
  }
  page.buf = buf;
  page.pins = 1;
  page.lru_pos = lru_.insert(lru_.end(), id);
  counters_.resident_bytes += page_bytes_;
  counters_.peak_resident_bytes =
      std::max(counters_.peak_resident_bytes, counters_.resident_bytes);
  return buf;
}

void PagePool::release(int64_t id) {
  Page& page = pages_[static_cast<size_t>(id)];
  page.pins -= 1;
}

void PagePool::raise_pending() {
  if (pending_error_.empty()) {
    return;
  }
  std::string error = std::move(pending_error_);
  pending_error_.clear();
  TORCH_CHECK(false, "peftreg paged: moving a page to the backing tier failed: ", error,
              ". No optimizer state was lost: the pages that could not be moved stay in the "
              "fast tier (above the budget) and the operation completed; free space in the "
              "backing tier or raise the budget before the next step");
}

void PagePool::plan(const std::vector<AdamWParam>& params, const AdamWHyper& hyper,
                    int64_t per_page, const char* what,
                    std::vector<std::vector<AdamWSegment>>* by_page,
                    std::vector<int64_t>* touched) {
  // Segments grouped by page: each page is visited once per step whatever the parameters.
  by_page->assign(pages_.size(), {});
  for (size_t i = 0; i < params.size(); ++i) {
    const AdamWParam& p = params[i];
    TORCH_CHECK(p.numel >= 0 && p.state_offset >= 0 &&
                    p.state_offset + p.numel <= static_cast<int64_t>(pages_.size()) * per_page,
                "peftreg paged: ", what, ": parameter ", i, " (", p.numel,
                " elements at state offset ", p.state_offset, ") lies outside the pool's ",
                pages_.size(), " pages");
    const AdamWScalars s = adamw_scalars(hyper, p.step);
    const int64_t elem = p.dtype == ParamDType::kFloat32 ? 4 : 2;
    int64_t done = 0;
    while (done < p.numel) {
      const int64_t index = p.state_offset + done;
      const int64_t page = index / per_page;
      const int64_t within = index % per_page;
      const int64_t count = std::min(p.numel - done, per_page - within);
      auto& segments = (*by_page)[static_cast<size_t>(page)];
      if (segments.empty()) {
        touched->push_back(page);
      }
      segments.push_back(
          AdamWSegment{static_cast<char*>(p.param) + done * elem,
                       static_cast<const char*>(p.grad) + done * elem, p.dtype, count, within, s});
      done += count;
    }
  }
  std::sort(touched->begin(), touched->end());
  if (!forward_) {
    std::reverse(touched->begin(), touched->end());
  }
  forward_ = !forward_;
}

void PagePool::sweep(const std::vector<int64_t>& touched,
                     std::vector<std::vector<AdamWSegment>>& by_page,
                     const std::function<void(const std::vector<PageWork>&)>& update) {
  const bool prefetch = backend_->async_prefetch();
  trim();
  // Pages pinned together; never more than the budget holds, so making room for the last of
  // them can always evict enough unpinned pages.
  const int64_t max_batch = prefetch ? 1 : std::max<int64_t>(1, budget_bytes_ / page_bytes_);
  size_t k = 0;
  while (k < touched.size()) {
    std::vector<PageWork> batch;
    try {
      while (k < touched.size() && static_cast<int64_t>(batch.size()) < max_batch) {
        const int64_t page = touched[k];
        void* buf = acquire(page);
        batch.push_back(PageWork{page, buf, &by_page[static_cast<size_t>(page)]});
        ++k;
      }
      if (prefetch && k < touched.size()) {
        // Queue the next page's copy now so it overlaps this batch's update. With a budget
        // of under two pages the pinned current page cannot make room for it, which is why
        // residency may reach budget + one page on CUDA.
        acquire(touched[k]);
        release(touched[k]);  // unpinned but most recently used: LRU evicts it last
      }
      for (const PageWork& w : batch) {
        backend_->before_use(w.page);
      }
      update(batch);
    } catch (...) {
      for (const PageWork& w : batch) {
        release(w.page);
      }
      throw;
    }
    for (const PageWork& w : batch) {
      backend_->after_use(w.page);
      pages_[static_cast<size_t>(w.page)].dirty = true;
      release(w.page);
    }
  }
  raise_pending();
}

void PagePool::adamw_step(const std::vector<AdamWParam>& params, const AdamWHyper& hyper) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open("adamw_step");
  const int64_t per_page = elements_per_page();
  std::vector<std::vector<AdamWSegment>> by_page;
  std::vector<int64_t> touched;
  plan(params, hyper, per_page, "adamw_step", &by_page, &touched);
  sweep(touched, by_page,
        [&](const std::vector<PageWork>& batch) { backend_->adamw(batch, per_page); });
}

void PagePool::adamw8_step(const std::vector<AdamWParam>& params, const AdamWHyper& hyper) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open("adamw8_step");
  TORCH_CHECK(quant_ != nullptr, "peftreg paged: adamw8_step: the pool has no quantization "
              "maps (set_quant_maps was not called)");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].state_offset % kQuantBlock == 0, "peftreg paged: adamw8_step: "
                "parameter ", i, " has state offset ", params[i].state_offset,
                ", not a multiple of the block size ", kQuantBlock);
  }
  const int64_t blocks = blocks_per_page8(page_bytes_);
  std::vector<std::vector<AdamWSegment>> by_page;
  std::vector<int64_t> touched;
  plan(params, hyper, blocks * kQuantBlock, "adamw8_step", &by_page, &touched);
  const std::shared_ptr<const Quant8Maps> maps = quant_;
  sweep(touched, by_page, [&](const std::vector<PageWork>& batch) {
    backend_->adamw8(batch, blocks, *maps);
  });
}

void PagePool::set_quant_maps(std::shared_ptr<const Quant8Maps> maps) {
  std::lock_guard<std::mutex> lock(mutex_);
  quant_ = std::move(maps);
}

std::shared_ptr<const Quant8Maps> PagePool::quant_maps() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return quant_;
}

void PagePool::read_page(int64_t page, void* dst) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open("read_page");
  check_page(page, "read_page");
  void* buf = acquire(page);
  backend_->before_use(page);
  backend_->copy_out(page, buf, dst);
  backend_->after_use(page);
  release(page);
  // Reads and writes do not raise for a failed page-out: the page stayed resident, and a
  // checkpoint (state_dict) is exactly what a user wants to take while the backing tier fails.
  // The next step tries to page out again and raises if it still fails.
  pending_error_.clear();
}

void PagePool::write_page(int64_t page, const void* src) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open("write_page");
  check_page(page, "write_page");
  void* buf = acquire(page);
  backend_->before_use(page);
  backend_->copy_in(page, buf, src);
  backend_->after_use(page);
  pages_[static_cast<size_t>(page)].dirty = true;
  release(page);
  pending_error_.clear();  // as in read_page
}

Counters PagePool::counters() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return counters_;
}

void PagePool::reset_peak() {
  std::lock_guard<std::mutex> lock(mutex_);
  counters_.peak_resident_bytes = counters_.resident_bytes;
}

std::string PagePool::describe() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return backend_ ? backend_->describe() : std::string("closed");
}

void PagePool::close() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) {
    return;
  }
  closed_ = true;
  for (Page& page : pages_) {
    if (page.buf != nullptr) {
      backend_->free_fast(page.buf);
      page.buf = nullptr;
    }
  }
  for (void* buf : free_bufs_) {
    backend_->free_fast(buf);
  }
  free_bufs_.clear();
  pages_.clear();
  lru_.clear();
  counters_.resident_bytes = 0;
  backend_.reset();  // closes the backing file / frees the pinned memory
}

}  // namespace peftreg::paged
