// SPDX-License-Identifier: Apache-2.0
//
// The page pool as the torch custom class `torch.classes.peftreg.PagePool` (used only through
// peftreg/ops/paged.py). A class rather than ops: the pool is long-lived mutable state with a
// backing file, which an op schema cannot own, and class methods leave `peftreg.ops.OPS` as is.
#include "paged/page_pool.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace peftreg::paged {

namespace {

ParamDType param_dtype(const at::Tensor& t, size_t index) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ParamDType::kFloat32;
    case at::kBFloat16:
      return ParamDType::kBFloat16;
    case at::kHalf:
      return ParamDType::kFloat16;
    default:
      TORCH_CHECK(false, "peftreg paged: adamw_step: parameter ", index, " has dtype ",
                  t.scalar_type(), "; expected Float (float32), BFloat16 or Half (float16)");
  }
}

class PagePoolHolder : public torch::CustomClassHolder {
 public:
  PagePoolHolder(const std::string& device, int64_t page_bytes, int64_t budget_bytes,
                 const std::string& backing_dir)
      : device_(device) {
    std::unique_ptr<PageBackend> backend;
    if (device_.is_cpu()) {
      backend = make_cpu_backend(page_bytes, backing_dir);
    } else if (device_.is_cuda()) {
#if defined(PEFTREG_WITH_CUDA) && PEFTREG_WITH_CUDA
      TORCH_CHECK(device_.has_index(), "peftreg paged: give the CUDA device with its index, "
                  "e.g. 'cuda:0', got '", device, "'");
      backend = make_cuda_backend(page_bytes, device_.index());
#else
      TORCH_CHECK(false, "peftreg paged: this build of the extension has no CUDA support, so "
                  "a page pool cannot use device '", device, "'; rebuild with a CUDA torch and "
                  "CUDA_HOME set");
#endif
    } else {
      TORCH_CHECK(false, "peftreg paged: unsupported device '", device,
                  "'; a page pool runs on 'cpu' or 'cuda:N'");
    }
    pool_ = std::make_unique<PagePool>(std::move(backend), page_bytes, budget_bytes);
  }

  int64_t add_pages(int64_t count) { return pool_->add_pages(count); }

  void adamw_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<int64_t>& offsets, const std::vector<double>& steps,
                  double lr, double beta1, double beta2, double eps, double weight_decay,
                  bool maximize) {
    std::vector<at::Tensor> keep;  // contiguous copies of gradients, alive during the step
    const std::vector<AdamWParam> items = describe_params(params, grads, offsets, steps, &keep);
    pool_->adamw_step(items, AdamWHyper{lr, beta1, beta2, eps, weight_decay, maximize});
  }

  void adamw8_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                   const std::vector<int64_t>& offsets, const std::vector<double>& steps,
                   double lr, double beta1, double beta2, double eps, double weight_decay,
                   bool maximize) {
    std::vector<at::Tensor> keep;
    const std::vector<AdamWParam> items = describe_params(params, grads, offsets, steps, &keep);
    pool_->adamw8_step(items, AdamWHyper{lr, beta1, beta2, eps, weight_decay, maximize});
  }

  // The 256-entry maps of exp_avg (signed) and exp_avg_sq (unsigned), float32 on the CPU, and
  // the CPU kernel of the 8-bit step by name (kernel8_name; "auto": the fastest supported).
  void set_quant_maps(const at::Tensor& signed_map, const at::Tensor& unsigned_map,
                      const std::string& kernel) {
    Kernel8 k = Kernel8::kAuto;
    bool known = false;
    for (Kernel8 c : kAllKernels) {
      if (kernel == kernel8_name(c)) {
        k = c;
        known = true;
      }
    }
    TORCH_CHECK(known, "peftreg paged: set_quant_maps: unknown kernel '", kernel,
                "'; expected one of ", kernel_names(false));
    for (const at::Tensor* t : {&signed_map, &unsigned_map}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 &&
                      t->numel() == 256,
                  "peftreg paged: set_quant_maps: expected float32 CPU tensors of 256 "
                  "elements, got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
    }
    const at::Tensor a = signed_map.contiguous();
    const at::Tensor b = unsigned_map.contiguous();
    pool_->set_quant_maps(std::make_shared<const Quant8Maps>(a.const_data_ptr<float>(),
                                                             b.const_data_ptr<float>(), k));
  }

  // The kernels this CPU runs, slowest first, and the one the pool's maps use ("" if none).
  std::vector<std::string> quant8_kernels() {
    std::vector<std::string> out;
    for (Kernel8 c : kAllKernels) {
      if (c != Kernel8::kAuto && kernel8_supported(c)) {
        out.emplace_back(kernel8_name(c));
      }
    }
    return out;
  }

  std::string quant8_kernel() {
    const std::shared_ptr<const Quant8Maps> maps = pool_->quant_maps();
    return maps == nullptr ? "" : kernel8_name(maps->kernel);
  }

  // Blockwise encoding of a float32 CPU tensor with the pool's map of exp_avg (is_signed) or
  // exp_avg_sq: (uint8 codes of x's shape, float32 absmax per block of the flattened x).
  std::tuple<at::Tensor, at::Tensor> quantize8(const at::Tensor& x, bool is_signed) {
    const std::shared_ptr<const Quant8Maps> maps = pool_->quant_maps();
    TORCH_CHECK(maps != nullptr, "peftreg paged: quantize8: the pool has no quantization "
                "maps (set_quant_maps was not called)");
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
                "peftreg paged: quantize8: expected a float32 CPU tensor, got ",
                x.scalar_type(), " on ", x.device());
    const at::Tensor c = x.contiguous();
    const int64_t n = c.numel();
    at::Tensor codes = at::empty(c.sizes(), at::TensorOptions().dtype(at::kByte));
    at::Tensor absmax = at::empty({(n + kQuantBlock - 1) / kQuantBlock},
                                  at::TensorOptions().dtype(at::kFloat));
    quantize_blockwise(c.const_data_ptr<float>(), n, is_signed ? maps->m : maps->v,
                       codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), maps->kernel);
    return {codes, absmax};
  }

  at::Tensor read_page(int64_t page) {
    at::Tensor out = at::empty({pool_->page_bytes() / 4}, at::TensorOptions()
                                                               .dtype(at::kFloat)
                                                               .device(device_));
    pool_->read_page(page, out.data_ptr());
    return out;
  }

  void write_page(int64_t page, const at::Tensor& src) {
    TORCH_CHECK(src.device() == device_ && src.scalar_type() == at::kFloat &&
                    src.numel() == pool_->page_bytes() / 4,
                "peftreg paged: write_page: expected a float32 tensor of ",
                pool_->page_bytes() / 4, " elements on ", device_, ", got ", src.scalar_type(),
                " ", src.sizes(), " on ", src.device());
    const at::Tensor c = src.contiguous();
    pool_->write_page(page, c.const_data_ptr());
  }

  c10::Dict<std::string, int64_t> counters() {
    const Counters c = pool_->counters();
    c10::Dict<std::string, int64_t> out;
    out.insert("resident_bytes", c.resident_bytes);
    out.insert("peak_resident_bytes", c.peak_resident_bytes);
    out.insert("pages_out", c.pages_out);
    out.insert("pages_in", c.pages_in);
    out.insert("bytes_out", c.bytes_out);
    out.insert("bytes_in", c.bytes_in);
    out.insert("num_pages", pool_->num_pages());
    out.insert("page_bytes", pool_->page_bytes());
    out.insert("budget_bytes", pool_->budget_bytes());
    return out;
  }

  void reset_peak() { pool_->reset_peak(); }
  std::string describe() { return pool_->describe(); }
  void close() { pool_->close(); }
  bool closed() { return pool_->closed(); }
  void inject_write_failure(int64_t after) {
    TORCH_CHECK(!pool_->closed(), "peftreg paged: inject_write_failure on a closed page pool");
    pool_->backend().inject_write_failure(after);
  }

 private:
  static constexpr Kernel8 kAllKernels[] = {Kernel8::kAuto, Kernel8::kScalar,
                                            Kernel8::kAvx2Gather, Kernel8::kAvx2,
                                            Kernel8::kAvx512};

  static std::string kernel_names(bool supported_only) {
    std::string out;
    for (Kernel8 c : kAllKernels) {
      if (!supported_only || kernel8_supported(c)) {
        out += std::string(out.empty() ? "" : ", ") + kernel8_name(c);
      }
    }
    return out;
  }

  std::vector<AdamWParam> describe_params(const std::vector<at::Tensor>& params,
                                          const std::vector<at::Tensor>& grads,
                                          const std::vector<int64_t>& offsets,
                                          const std::vector<double>& steps,
                                          std::vector<at::Tensor>* keep) {
    const size_t n = params.size();
    TORCH_CHECK(grads.size() == n && offsets.size() == n && steps.size() == n,
                "peftreg paged: adamw_step: params, grads, offsets and steps must have one "
                "entry per parameter, got ", n, ", ", grads.size(), ", ", offsets.size(),
                " and ", steps.size());
    std::vector<AdamWParam> items;
    items.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& p = params[i];
      const at::Tensor& g = grads[i];
      TORCH_CHECK(p.device() == device_, "peftreg paged: adamw_step: parameter ", i,
                  " is on ", p.device(), " but the page pool is on ", device_);
      TORCH_CHECK(p.is_contiguous(), "peftreg paged: adamw_step: parameter ", i,
                  " is not contiguous (the update writes it in place)");
      TORCH_CHECK(g.device() == p.device() && g.scalar_type() == p.scalar_type() &&
                      g.sizes() == p.sizes(),
                  "peftreg paged: adamw_step: the gradient of parameter ", i, " (",
                  g.scalar_type(), " ", g.sizes(), " on ", g.device(),
                  ") does not match the parameter (", p.scalar_type(), " ", p.sizes(), " on ",
                  p.device(), ")");
      TORCH_CHECK(steps[i] >= 1, "peftreg paged: adamw_step: step of parameter ", i,
                  " must be >= 1, got ", steps[i]);
      const at::Tensor gc = g.contiguous();
      keep->push_back(gc);
      items.push_back(AdamWParam{p.data_ptr(), gc.const_data_ptr(), param_dtype(p, i),
                                 p.numel(), offsets[i], steps[i]});
    }
    return items;
  }

  c10::Device device_;
  std::unique_ptr<PagePool> pool_;
};

}  // namespace

void register_page_pool(torch::Library& m) {
  m.class_<PagePoolHolder>("PagePool")
      .def(torch::init<std::string, int64_t, int64_t, std::string>())
      .def("add_pages", &PagePoolHolder::add_pages)
      .def("adamw_step", &PagePoolHolder::adamw_step)
      .def("adamw8_step", &PagePoolHolder::adamw8_step)
      .def("set_quant_maps", &PagePoolHolder::set_quant_maps)
      .def("quant8_kernels", &PagePoolHolder::quant8_kernels)
      .def("quant8_kernel", &PagePoolHolder::quant8_kernel)
      .def("quantize8", &PagePoolHolder::quantize8)
      .def("read_page", &PagePoolHolder::read_page)
      .def("write_page", &PagePoolHolder::write_page)
      .def("counters", &PagePoolHolder::counters)
      .def("reset_peak", &PagePoolHolder::reset_peak)
      .def("describe", &PagePoolHolder::describe)
      .def("close", &PagePoolHolder::close)
      .def("closed", &PagePoolHolder::closed)
      .def("inject_write_failure", &PagePoolHolder::inject_write_failure);
}

}  // namespace peftreg::paged
