// SPDX-License-Identifier: Apache-2.0
//
// lora_grouped_add and lora_grouped_add_backward (schemas at the end of this file; Python side
// peftreg/ops/lora.py): the per-row LoRA update of a batch whose rows train different adapters,
// as segmented GEMMs over rows grouped by adapter (the SGMV shape of Punica, Chen et al. 2023).
//
// The caller (peftreg/row_adapters.py) sorts the rows by adapter once per forward, so adapter k
// owns the contiguous slice [offset_k, offset_k + counts[k]) of `rows`. `counts` is an int64
// tensor, not an int list: under torch.compile a list would be baked into the graph and every new
// split of the rows would recompile; as a tensor it is data, read on the host here (the plan
// keeps it on the CPU, so reading it costs no device sync). One gather brings those
// rows together; each adapter's product is then one GEMM on its slice, and the backward runs the
// mirrored GEMMs writing straight into each adapter's slot of the stacked gradients. When every
// adapter holds the same number of rows (one sequence per adapter, the common sweep layout) the
// slices are one batched GEMM instead of a loop. With rows flattened, X_k = x[rows_k],
// G_k = grad[rows_k] and s_k = scaling[k]:
//
//   U_k = s_k X_k A_k^T        (saved: the op's second output)
//   out = base; out[rows_k] += U_k B_k^T
//   grad_U_k = s_k G_k B_k
//   grad_A_k = grad_U_k^T X_k       grad_B_k = G_k^T U_k       grad_x[rows_k] = grad_U_k A_k
//
// Everything is ATen (BLAS on the CPU, cuBLAS on CUDA), so the same entry serves both devices.
// On the CPU 16-bit inputs are widened to float32 for the products (small: rows x features
// gathers and the stacked factors) and rounded once at the end: CPUs without 16-bit arithmetic
// multiply bf16 through a slow generic loop.

#include <ATen/core/Tensor.h>
#include <ATen/core/enum_tag.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/device_table.h"

namespace peftreg::fused {
namespace {

constexpr const char* kGroupedOp = "peftreg::lora_grouped_add";
constexpr const char* kGroupedBackwardOp = "peftreg::lora_grouped_add_backward";

struct GroupedSizes {
  int64_t rows = 0;  // rows of x (leading dims flattened)
  int64_t taken = 0;  // rows that some adapter takes: rows.numel()
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t adapters = 0;
  int64_t rank = 0;
  std::vector<int64_t> offsets;  // adapters + 1 entries
  int64_t uniform = -1;  // the common count when every adapter holds the same number of rows
};

// The factors, rows and counts; shared by the forward and the backward (`op` names the caller).
// The checks on metadata come first, in the order of the fake kernels (_grouped_checks in
// peftreg/ops/lora.py); the values of `counts` last, since only the real kernel can read them.
GroupedSizes check_grouped(const char* op, const at::Tensor& x, const at::Tensor& lora_a,
                           const at::Tensor& lora_b, const at::Tensor& scaling,
                           const at::Tensor& rows, const at::Tensor& counts) {
  namespace ck = peftreg::checks;
  GroupedSizes s;
  ck::check_stacked_lora(s, op, x, lora_a, lora_b, scaling);
  ck::check_dim(rows, op, "rows", 1, "(taken rows,)");
  s.taken = rows.size(0);
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == s.adapters, op,
              ": argument 'counts' must hold one row count per adapter, shape [", s.adapters,
              "] (adapters = lora_a.shape[0]), but has shape ", counts.sizes());
  TORCH_CHECK(counts.scalar_type() == at::kLong, op, ": argument 'counts' has dtype ",
              counts.scalar_type(), "; expected Long (int64)");
  TORCH_CHECK(rows.scalar_type() == at::kLong, op, ": argument 'rows' has dtype ",
              rows.scalar_type(), "; expected Long (int64)");
  ck::check_supported_dtype(x, op, "x");
  ck::check_same_dtypes(op, {{"lora_a", &lora_a}, {"lora_b", &lora_b}}, x, "x");
  TORCH_CHECK(checks::is_supported_float(scaling.scalar_type()), op,
              ": argument 'scaling' has dtype ", scaling.scalar_type(),
              "; expected a floating dtype");
  ck::check_same_devices(op, {{"lora_a", &lora_a}, {"lora_b", &lora_b}, {"scaling", &scaling},
                              {"rows", &rows}},
                         x, "x");
  TORCH_CHECK(counts.device().is_cpu() || counts.device() == x.device(), op,
              ": argument 'counts' is on device ", counts.device(), " but 'x' is on device ",
              x.device(), "; counts must be on the CPU or on x's device");

  const at::Tensor host = counts.to(at::kCPU).contiguous();
  const int64_t* count = host.const_data_ptr<int64_t>();
  s.offsets.resize(s.adapters + 1, 0);
  for (int64_t k = 0; k < s.adapters; ++k) {
    TORCH_CHECK(count[k] >= 0, op, ": argument 'counts' has a negative entry ", count[k],
                " at ", k);
    s.offsets[k + 1] = s.offsets[k] + count[k];
  }
  TORCH_CHECK(s.offsets.back() == s.taken, op, ": argument 'counts' sums to ", s.offsets.back(),
              " but 'rows' holds ", s.taken, " rows");
  if (s.adapters > 0 && s.taken > 0 && s.taken % s.adapters == 0) {
    const int64_t c = s.taken / s.adapters;
    bool same = true;
    for (int64_t k = 0; k < s.adapters && same; ++k) same = count[k] == c;
    if (same) s.uniform = c;
  }
  return s;
}

// Range check of the row indices (after the device checks: min/max must run on one device).
void check_row_range(const char* op, const at::Tensor& rows, int64_t total) {
  if (rows.numel() == 0) return;
  const int64_t lo = rows.min().item<int64_t>();
  const int64_t hi = rows.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < total, op, ": argument 'rows' holds indices from ", lo, " to ", hi,
              " but x has ", total, " rows (its leading dimensions flattened)");
}

// The dtype of the products: float32 for 16-bit CPU inputs (see the file comment).
at::ScalarType compute_dtype(const at::Tensor& x) {
  const bool half = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  return half && x.device().is_cpu() ? at::kFloat : x.scalar_type();
}

std::vector<double> host_scaling(const at::Tensor& scaling) {
  const at::Tensor s = scaling.to(at::kCPU, at::kDouble).contiguous();
  return std::vector<double>(s.data_ptr<double>(), s.data_ptr<double>() + s.numel());
}

// The stacked factors in the compute dtype (no copy when the dtype already matches).
at::Tensor in_compute(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

std::tuple<at::Tensor, at::Tensor> lora_grouped_add(const at::Tensor& base, const at::Tensor& x,
                                                    const at::Tensor& lora_a,
                                                    const at::Tensor& lora_b,
                                                    const at::Tensor& scaling,
                                                    const at::Tensor& rows,
                                                    const at::Tensor& counts) {
  namespace ck = peftreg::checks;
  const GroupedSizes s = check_grouped(kGroupedOp, x, lora_a, lora_b, scaling, rows, counts);
  const auto expected = ck::with_last(x, s.out_features);
  TORCH_CHECK(base.sizes() == c10::IntArrayRef(expected), kGroupedOp,
              ": argument 'base' must have shape (*x.shape[:-1], out_features) = ",
              c10::IntArrayRef(expected), " but has shape ", base.sizes());
  ck::check_like(kGroupedOp, {{"base", &base}}, x, "x");
  check_row_range(kGroupedOp, rows, s.rows);

  const at::ScalarType dtype = compute_dtype(x);
  at::Tensor out = base.reshape({s.rows, s.out_features}).clone(at::MemoryFormat::Contiguous);
  at::Tensor u = at::empty({s.taken, s.rank}, x.options().dtype(dtype));
  if (s.taken > 0 && s.rank > 0) {
    const at::Tensor xs = in_compute(x.reshape({s.rows, s.in_features}).index_select(0, rows),
                                     dtype);
    const at::Tensor a = in_compute(lora_a, dtype);
    const at::Tensor b = in_compute(lora_b, dtype);
    at::Tensor update = at::empty({s.taken, s.out_features}, xs.options());
    if (s.uniform > 0) {
      const int64_t c = s.uniform;
      at::Tensor u3 = u.view({s.adapters, c, s.rank});
      at::bmm_out(u3, xs.view({s.adapters, c, s.in_features}), a.transpose(1, 2));
      u3.mul_(scaling.to(dtype).view({s.adapters, 1, 1}));
      at::Tensor update3 = update.view({s.adapters, c, s.out_features});
      at::bmm_out(update3, u3, b.transpose(1, 2));
    } else {
      const std::vector<double> scale = host_scaling(scaling);
      for (int64_t k = 0; k < s.adapters; ++k) {
        const int64_t lo = s.offsets[k], n = s.offsets[k + 1] - lo;
        if (n == 0) continue;
        at::Tensor uk = u.narrow(0, lo, n);
        at::mm_out(uk, xs.narrow(0, lo, n), a[k].t());
        uk.mul_(scale[k]);
        at::Tensor dk = update.narrow(0, lo, n);
        at::mm_out(dk, uk, b[k].t());
      }
    }
    out.index_add_(0, rows, update.scalar_type() == out.scalar_type()
                                ? update
                                : update.to(out.scalar_type()));
  } else {
    u.zero_();
  }
  return {out.view(base.sizes()), u.scalar_type() == x.scalar_type() ? u : u.to(x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_grouped_add_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scaling, const at::Tensor& rows,
    const at::Tensor& counts, const at::Tensor& u, std::array<bool, 3> output_mask) {
  namespace ck = peftreg::checks;
  const char* op = kGroupedBackwardOp;
  const GroupedSizes s = check_grouped(op, x, lora_a, lora_b, scaling, rows, counts);
  const auto expected = ck::with_last(x, s.out_features);
  TORCH_CHECK(grad.sizes() == c10::IntArrayRef(expected), op,
              ": argument 'grad' must have shape (*x.shape[:-1], out_features) = ",
              c10::IntArrayRef(expected), " but has shape ", grad.sizes());
  TORCH_CHECK(u.dim() == 2 && u.size(0) == s.taken && u.size(1) == s.rank, op,
              ": argument 'u' must have shape (rows.shape[0], r) = [", s.taken, ", ", s.rank,
              "] (the forward's second output) but has shape ", u.sizes());
  ck::check_like(op, {{"grad", &grad}, {"u", &u}}, x, "x");
  check_row_range(op, rows, s.rows);
  const auto [need_x, need_a, need_b] = output_mask;

  const at::ScalarType dtype = compute_dtype(x);
  const auto wide = x.options().dtype(dtype);
  at::Tensor grad_x = need_x ? at::zeros({s.rows, s.in_features}, wide) : x.new_empty({0});
  at::Tensor grad_a = need_a ? at::zeros(lora_a.sizes(), wide) : x.new_empty({0});
  at::Tensor grad_b = need_b ? at::zeros(lora_b.sizes(), wide) : x.new_empty({0});
  if (s.taken > 0 && s.rank > 0 && (need_x || need_a || need_b)) {
    const at::Tensor gs = in_compute(
        grad.reshape({s.rows, s.out_features}).index_select(0, rows), dtype);
    const at::Tensor a = in_compute(lora_a, dtype);
    const at::Tensor b = in_compute(lora_b, dtype);
    const at::Tensor us = in_compute(u, dtype);
    const at::Tensor xs =
        need_a ? in_compute(x.reshape({s.rows, s.in_features}).index_select(0, rows), dtype)
               : at::Tensor();
    const bool need_gu = need_x || need_a;
    at::Tensor gu = need_gu ? at::empty({s.taken, s.rank}, wide) : at::Tensor();
    at::Tensor dx = need_x ? at::empty({s.taken, s.in_features}, wide) : at::Tensor();
    if (s.uniform > 0) {
      const int64_t c = s.uniform, n = s.adapters;
      const at::Tensor g3 = gs.view({n, c, s.out_features});
      if (need_gu) {
        at::Tensor gu3 = gu.view({n, c, s.rank});
        at::bmm_out(gu3, g3, b);
        gu3.mul_(scaling.to(dtype).view({n, 1, 1}));
        if (need_a) at::bmm_out(grad_a, gu3.transpose(1, 2), xs.view({n, c, s.in_features}));
        if (need_x) {
          at::Tensor dx3 = dx.view({n, c, s.in_features});
          at::bmm_out(dx3, gu3, a);
        }
      }
      if (need_b) at::bmm_out(grad_b, g3.transpose(1, 2), us.view({n, c, s.rank}));
    } else {
      const std::vector<double> scale = host_scaling(scaling);
      for (int64_t k = 0; k < s.adapters; ++k) {
        const int64_t lo = s.offsets[k], n = s.offsets[k + 1] - lo;
        if (n == 0) continue;  // an adapter without rows keeps its zero gradient
        const at::Tensor gk = gs.narrow(0, lo, n);
        if (need_gu) {
          at::Tensor guk = gu.narrow(0, lo, n);
          at::mm_out(guk, gk, b[k]);
          guk.mul_(scale[k]);
          if (need_a) {
            at::Tensor gak = grad_a[k];
            at::mm_out(gak, guk.t(), xs.narrow(0, lo, n));
          }
          if (need_x) {
            at::Tensor dxk = dx.narrow(0, lo, n);
            at::mm_out(dxk, guk, a[k]);
          }
        }
        if (need_b) {
          at::Tensor gbk = grad_b[k];
          at::mm_out(gbk, gk.t(), us.narrow(0, lo, n));
        }
      }
    }
    if (need_x) grad_x.index_add_(0, rows, dx);
  }
  const at::ScalarType out_dtype = x.scalar_type();
  auto narrowed = [&](const at::Tensor& t) {
    return t.scalar_type() == out_dtype ? t : t.to(out_dtype);
  };
  return {need_x ? narrowed(grad_x).view(x.sizes()) : grad_x, narrowed(grad_a),
          narrowed(grad_b)};
}

void register_grouped(torch::Library& m) {
  m.impl("lora_grouped_add", &lora_grouped_add);
  m.impl("lora_grouped_add_backward", &lora_grouped_add_backward);
}

}  // namespace
}  // namespace peftreg::fused

// The schemas of lora_grouped_add and its backward (LoRA family).
// csrc/registration.cpp holds the one TORCH_LIBRARY(peftreg, m); each family adds its schemas
// by fragment beside its entries.
TORCH_LIBRARY_FRAGMENT(peftreg, m) {
  // Naming the family's Python module (its wrappers, fake kernels and backwards) before the
  // schemas makes a missing fake kernel point there (torch imports that module) and makes
  // torch refuse a fake registered anywhere else.
  m.set_python_module("peftreg.ops.lora");
  // Training many LoRA adapters in one batch (csrc/fused/lora_grouped.cpp): `rows` (int64) lists
  // the rows of x (leading dims flattened) that some adapter takes, grouped by adapter, adapter k
  // owning the next counts[k] of them; counts (int64, (n,), on the CPU or x's device) is a tensor
  // so that under torch.compile a new split of the rows is new data, not a recompile. out = base with row rows[j] of adapter k increased by
  // scaling[k] * (x[rows[j]] @ lora_a[k]^T) @ lora_b[k]^T (lora_a (n, r, in), lora_b (n, out, r),
  // scaling (n,)); u (rows.numel(), r) is scaling[k] * x[rows[j]] @ lora_a[k]^T, saved for the
  // backward. The backward gives grad_x (the low-rank path's part only), grad_lora_a and
  // grad_lora_b from grad (of out) and u, each only where output_mask asks (empty otherwise).
  m.def(
      "lora_grouped_add(Tensor base, Tensor x, Tensor lora_a, Tensor lora_b, Tensor scaling, "
      "Tensor rows, Tensor counts) -> (Tensor out, Tensor u)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "lora_grouped_add_backward(Tensor grad, Tensor x, Tensor lora_a, Tensor lora_b, "
      "Tensor scaling, Tensor rows, Tensor counts, Tensor u, bool[3] output_mask) -> "
      "(Tensor grad_x, Tensor grad_lora_a, Tensor grad_lora_b)",
      {at::Tag::pt2_compliant_tag});
}

PEFTREG_IMPL_CPU_AND_CUDA(peftreg::fused::register_grouped)
