// SPDX-License-Identifier: Apache-2.0
//
// CPU kernel table of the IA3, Houlsby and multi-LoRA ops (adapters_kernels.h; entries with the
// checks and schemas in adapters_ops.cpp, maths in peftreg/ops/reference.py,
// backward formulas in peftreg/ops/adapters.py):
//
//   ia3_linear      y = (x W^T + b) * l            (output scaling: keys, values)
//                   y = (x * l) W^T + b            (input scaling: feed-forward down projection)
//                   (IA3, Liu et al. 2022, section 3.3)
//   ia3_scale_grad  dL/dl = sum over rows of g * (x W^T + b), for the output-scaling case
//   houlsby_adapter out = h + act(h Wd^T + bd) Wu^T + bu, and z = h Wd^T + bd for the backward
//                   (Houlsby et al. 2019, section 2.1)
//   lora_multi_add  out[i] = base[i] + s[k] (x[i] A_k^T) B_k^T with k = index[i], or base[i]
//                   when k = -1 (S-LoRA / Punica batched multi-adapter LoRA)
//
// Where the savings come from (the plain PyTorch expressions are in reference.py):
// * IA3 output scaling: the bias and the scale are applied in one vectorised pass over the GEMM
//   output, in place; plain PyTorch writes the linear output and then a second (rows x out)
//   tensor. The backward (peftreg/ops/adapters.py) keeps the op's output and input, not the pre-scale
//   product: ia3_scale_grad recovers it as y / l, and recomputes it from x and W only for
//   channels whose scale is exactly zero (where y carries no information).
// * IA3 input scaling: x * l is formed a block of rows at a time in a small buffer that stays in
//   cache and is multiplied right away, never as a (rows x in) tensor in memory.
// * Houlsby: the up projection, its bias and the residual are one GEMM that accumulates onto a
//   copy of h (the bias rides along as an extra column of ones in the activation buffer), so the
//   (rows x hidden) bottleneck output of plain PyTorch never exists. The op also returns the
//   (rows x bottleneck) pre-activation z, the only activation the backward needs besides h.
// * Multi-LoRA: rows are grouped by adapter in C++ (no Python loop, no per-adapter masks).
//   Adapters with many rows in the batch run as grouped BLAS GEMMs (Punica's SGMV segments);
//   the rest, the usual serving case of a few rows per adapter, in one parallel pass over the
//   rows, each reading its adapter's A and B from cache.
//
// Precision: half-precision inputs are widened to float (double stays double) for every
// elementwise step and for the multi-LoRA dot products; GEMMs go through ATen (fp32 accumulate).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_copy.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "fused/adapters_kernels.h"

namespace peftreg::fused {
namespace {

using at::vec::Vectorized;

// Rows of x scaled per block in the input-scaling IA3 path: 256 rows x 4096 features in fp32 is
// 4 MiB, about an L2/L3 slice, and large enough for the GEMM to run at full speed.
constexpr int64_t kIa3RowBlock = 256;

// Widen n elements of src into dst (acc type).
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, acc_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, scalar_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// The hot loops below are plain loops written so the compiler vectorises them (independent
// partial sums instead of one serial reduction), compiled once per instruction set and picked at
// load time (GCC/Clang target_clones): the extension is built without -march flags, so this is
// what makes AVX2/AVX-512 available to it. Other compilers/architectures get the baseline build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PEFTREG_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PEFTREG_SIMD_CLONES
#endif

constexpr int kLanes = 16;  // independent partial sums: a multiple of every vector width

template <typename T>
inline __attribute__((always_inline)) T dot_impl(const T* a, const T* b, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  }
  T sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += acc[j];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// sum_i a[i] * b[i]
PEFTREG_SIMD_CLONES float dot(const float* a, const float* b, int64_t n) {
  return dot_impl(a, b, n);
}
PEFTREG_SIMD_CLONES double dot(const double* a, const double* b, int64_t n) {
  return dot_impl(a, b, n);
}

// y[i] += alpha * x[i]
PEFTREG_SIMD_CLONES void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}
PEFTREG_SIMD_CLONES void axpy(double alpha, const double* x, double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// v[i] = (v[i] + b[i]) * l[i]
PEFTREG_SIMD_CLONES void bias_scale(float* v, const float* b, const float* l, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = (v[i] + b[i]) * l[i];
}
PEFTREG_SIMD_CLONES void bias_scale(double* v, const double* b, const double* l, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = (v[i] + b[i]) * l[i];
}

// acc[i] += g[i] * y[i]
PEFTREG_SIMD_CLONES void mul_acc(float* acc, const float* g, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += g[i] * y[i];
}
PEFTREG_SIMD_CLONES void mul_acc(double* acc, const double* g, const double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += g[i] * y[i];
}

// Applies f (on Vectorized<acc_t>) and fs (on scalars) to n elements in place.
template <typename acc_t, typename VecF, typename ScalarF>
inline void map_inplace(acc_t* v, int64_t n, VecF f, ScalarF fs) {
  using V = Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) f(V::loadu(v + i)).store(v + i);
  for (; i < n; ++i) v[i] = fs(v[i]);
}

template <typename acc_t>
void activate(acc_t* v, int64_t n, Activation act) {
  using V = Vectorized<acc_t>;
  switch (act) {
    case Activation::kRelu:
      map_inplace<acc_t>(
          v, n, [](V a) { return at::vec::maximum(a, V(acc_t(0))); },
          [](acc_t a) { return a > acc_t(0) ? a : acc_t(0); });
      break;
    case Activation::kGelu: {
      // Exact GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), as nn.GELU().
      const acc_t k = acc_t(M_SQRT1_2);
      map_inplace<acc_t>(
          v, n, [k](V a) { return a * V(acc_t(0.5)) * (V(acc_t(1)) + (a * V(k)).erf()); },
          [k](acc_t a) { return acc_t(0.5) * a * (acc_t(1) + std::erf(a * k)); });
      break;
    }
    case Activation::kSilu:
      map_inplace<acc_t>(
          v, n, [](V a) { return a / (V(acc_t(1)) + a.neg().exp()); },
          [](acc_t a) { return a / (acc_t(1) + std::exp(-a)); });
      break;
    case Activation::kTanh:
      map_inplace<acc_t>(v, n, [](V a) { return a.tanh(); },
                         [](acc_t a) { return std::tanh(a); });
      break;
  }
}

// Grain of at::parallel_for over rows: enough work per task to amortise the dispatch.
inline int64_t row_grain(int64_t work_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row));
}

// ---- ia3_linear ---------------------------------------------------------------------------

void ia3_linear_cpu(const Ia3Sizes& s, const at::Tensor& x2d, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& l, bool scale_input,
                    at::Tensor& y) {

  if (scale_input) {
    // y = (x * l) W^T + b, one cache-sized block of scaled rows at a time.
    const int64_t block = std::min<int64_t>(kIa3RowBlock, std::max<int64_t>(s.rows, 1));
    at::Tensor scratch = at::empty({block, s.in_features}, x2d.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2d.scalar_type(), "ia3_in", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x2d.const_data_ptr<scalar_t>();
      const scalar_t* lp = l.const_data_ptr<scalar_t>();
      scalar_t* sp = scratch.mutable_data_ptr<scalar_t>();
      const int64_t in = s.in_features;
      for (int64_t r0 = 0; r0 < s.rows; r0 += block) {
        const int64_t n = std::min(block, s.rows - r0);
        at::parallel_for(0, n, row_grain(in), [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            const scalar_t* src = xp + (r0 + i) * in;
            scalar_t* dst = sp + i * in;
            for (int64_t j = 0; j < in; ++j) {
              dst[j] = static_cast<scalar_t>(static_cast<acc_t>(src[j]) *
                                             static_cast<acc_t>(lp[j]));
            }
          }
        });
        at::Tensor out_block = y.narrow(0, r0, n);
        const at::Tensor in_block = scratch.narrow(0, 0, n);
        if (bias.has_value()) {
          at::addmm_out(out_block, *bias, in_block, weight.t());
        } else {
          at::mm_out(out_block, in_block, weight.t());
        }
      }
    });
    return;
  }

  // y = (x W^T + b) * l: GEMM, then bias and scale in one in-place pass.
  at::mm_out(y, x2d, weight.t());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2d.scalar_type(), "ia3_out", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t out = s.out_features;
    // The scale and bias widened once, shared by every row.
    std::vector<acc_t> lw(out), bw(out, acc_t(0));
    load_row(l.const_data_ptr<scalar_t>(), lw.data(), out);
    if (b.defined()) load_row(b.const_data_ptr<scalar_t>(), bw.data(), out);
    at::parallel_for(0, s.rows, row_grain(out), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(out);
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* yr = yp + i * out;
        load_row(yr, row.data(), out);
        bias_scale(row.data(), bw.data(), lw.data(), out);
        store_row(row.data(), yr, out);
      }
    });
  });
}

// ---- ia3_scale_grad -----------------------------------------------------------------------

void ia3_scale_grad_cpu(const Ia3Sizes& s, const at::Tensor& g2d, const at::Tensor& y2d,
                        const at::Tensor& x2d, const at::Tensor& wc,
                        const std::optional<at::Tensor>& bias, const at::Tensor& lc,
                        at::Tensor& result) {
  const int64_t rows = s.rows, in = s.in_features, nout = s.out_features;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2d.scalar_type(), "ia3_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g2d.const_data_ptr<scalar_t>();
    const scalar_t* yp = y2d.const_data_ptr<scalar_t>();
    // sum_i g_ij * y_ij per channel: row chunks in parallel, each into its own partial sum.
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
    std::vector<acc_t> partial(static_cast<size_t>(chunks * nout), acc_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<acc_t> gr(nout), yr(nout);
      for (int64_t c = cb; c < ce; ++c) {
        acc_t* acc = partial.data() + c * nout;
        const int64_t r0 = rows * c / chunks, r1 = rows * (c + 1) / chunks;
        for (int64_t i = r0; i < r1; ++i) {
          load_row(gp + i * nout, gr.data(), nout);
          load_row(yp + i * nout, yr.data(), nout);
          mul_acc(acc, gr.data(), yr.data(), nout);
        }
      }
    });
    std::vector<acc_t> total(nout, acc_t(0));
    for (int64_t c = 0; c < chunks; ++c) {
      for (int64_t j = 0; j < nout; ++j) total[j] += partial[c * nout + j];
    }
    // y = base * l, so sum g * base = (sum g * y) / l wherever l != 0. A zero scale leaves no
    // trace of base in y: recompute base = x W_j^T + b_j for those channels only.
    const scalar_t* lp = lc.const_data_ptr<scalar_t>();
    std::vector<int64_t> zero_channels;
    for (int64_t j = 0; j < nout; ++j) {
      const acc_t lj = static_cast<acc_t>(lp[j]);
      if (lj != acc_t(0)) {
        total[j] /= lj;
      } else {
        zero_channels.push_back(j);
      }
    }
    if (!zero_channels.empty()) {
      const scalar_t* xp = x2d.const_data_ptr<scalar_t>();
      const scalar_t* wp = wc.const_data_ptr<scalar_t>();
      const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
      const scalar_t* bp = bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr;
      const int64_t nz = static_cast<int64_t>(zero_channels.size());
      at::parallel_for(0, nz, 1, [&](int64_t zb, int64_t ze) {
        std::vector<acc_t> wr(in), xr(in);
        for (int64_t z = zb; z < ze; ++z) {
          const int64_t j = zero_channels[z];
          load_row(wp + j * in, wr.data(), in);
          const acc_t bj = bp ? static_cast<acc_t>(bp[j]) : acc_t(0);
          acc_t acc = 0;
          for (int64_t i = 0; i < rows; ++i) {
            load_row(xp + i * in, xr.data(), in);
            acc += static_cast<acc_t>(gp[i * nout + j]) * (dot(xr.data(), wr.data(), in) + bj);
          }
          total[j] = acc;
        }
      });
    }
    store_row(total.data(), result.mutable_data_ptr<scalar_t>(), nout);
  });
}

// ---- houlsby_adapter ------------------------------------------------------------------------

void houlsby_adapter_cpu(const HoulsbySizes& s, const at::Tensor& h2d, const at::Tensor& w_down,
                         const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                         const std::optional<at::Tensor>& b_up, Activation act, at::Tensor& z,
                         at::Tensor& out) {
  const int64_t rows = s.rows, m = s.bottleneck;
  if (b_down.has_value()) {
    at::addmm_out(z, *b_down, h2d, w_down.t());
  } else {
    at::mm_out(z, h2d, w_down.t());
  }
  // a = [act(z), 1]: the column of ones multiplies b_up inside the up-projection GEMM.
  const int64_t cols = m + (b_up.has_value() ? 1 : 0);
  at::Tensor a = at::empty({rows, cols}, h2d.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h2d.scalar_type(), "houlsby_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* ap = a.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(m * 8), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(m);
      for (int64_t i = begin; i < end; ++i) {
        load_row(zp + i * m, row.data(), m);
        activate(row.data(), m, act);
        store_row(row.data(), ap + i * cols, m);
        if (cols > m) ap[i * cols + m] = static_cast<scalar_t>(1);
      }
    });
  });
  const at::Tensor w_up_ext =
      b_up.has_value() ? at::cat({w_up, b_up->unsqueeze(1)}, 1) : w_up;  // (hidden, cols)
  at::addmm_out(out, h2d, a, w_up_ext.t());  // h + [act(z), 1] [Wu, bu]^T
}

// ---- lora_multi_add -----------------------------------------------------------------------

// Adapters with at least this many rows in a batch take the grouped-GEMM path (their rows
// gathered, two BLAS products, scattered back); fewer rows, the per-row kernel. A BLAS call costs
// microseconds to set up, which a handful of rows does not repay; 16 rows of a 1024-wide layer
// already run faster through BLAS than through the row kernel's dot products on AVX2.
constexpr int64_t kGemmRows = 16;

struct RowOrder {
  std::vector<int64_t> order;  // row numbers grouped by adapter: -1 first, then 0, 1, ...
  std::vector<int64_t> begin;  // adapter k's rows are order[begin[k + 1] : begin[k + 2]]
};

// Checks every row's adapter index is -1 or a valid adapter and groups the rows by adapter (a
// counting sort), so consecutive rows of a thread share their adapter's weights.
RowOrder rows_by_adapter(const at::Tensor& index, int64_t adapters) {
  const int64_t rows = index.numel();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  RowOrder result;
  std::vector<int64_t>& begin = result.begin;
  begin.assign(static_cast<size_t>(adapters + 2), 0);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t k = ip[i];
    TORCH_CHECK(k >= -1 && k < adapters, kLoraMultiOp, ": argument 'index' has value ", k,
                " at row ", i, "; expected -1 (no adapter) or an adapter in [0, ", adapters, ")");
    ++begin[k + 2];
  }
  for (size_t k = 1; k < begin.size(); ++k) begin[k] += begin[k - 1];  // begin[k+1]: rows below k
  begin.push_back(rows);
  std::vector<int64_t> next(begin.begin(), begin.end() - 1);
  result.order.resize(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; ++i) result.order[next[ip[i] + 1]++] = i;
  return result;
}

void lora_multi_add_cpu(const LoraMultiSizes& s, const at::Tensor& base2d, const at::Tensor& x2d,
                        const at::Tensor& lora_a, const at::Tensor& lora_b,
                        const at::Tensor& scaling, const at::Tensor& idx, at::Tensor& out) {
  const int64_t in = s.in_features, nout = s.out_features, r = s.rank;
  const RowOrder grouped = rows_by_adapter(idx, s.adapters);
  const std::vector<int64_t>& order = grouped.order;

  // Positions in `order` for the row kernel: rows without an adapter and rows of adapters with
  // fewer than kGemmRows rows. The other adapters go through BLAS below.
  std::vector<int64_t> row_positions;
  std::vector<int64_t> gemm_adapters;
  for (int64_t k = -1; k < s.adapters; ++k) {
    const int64_t b = grouped.begin[k + 1], e = grouped.begin[k + 2];
    if (k >= 0 && e - b >= kGemmRows) {
      gemm_adapters.push_back(k);
    } else {
      for (int64_t p = b; p < e; ++p) row_positions.push_back(p);
    }
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2d.scalar_type(), "lora_multi", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    // The update is r contiguous axpys along the output row, so B is read as (n, r, out). A
    // caller that stores B that way (lora_b a transposed view, as peftreg.row_adapters does)
    // costs no copy; otherwise it is transposed (and half precision widened) once per call,
    // n * r * (in + out) elements, small next to the rows.
    const at::Tensor a_acc = lora_a.to(acc_type).contiguous();
    const at::Tensor bt_acc = lora_b.to(acc_type).transpose(1, 2).contiguous();  // no-op then
    const at::Tensor s_acc = scaling.to(acc_type).contiguous();
    const acc_t* ap = a_acc.const_data_ptr<acc_t>();
    const acc_t* btp = bt_acc.const_data_ptr<acc_t>();
    const acc_t* sp = s_acc.const_data_ptr<acc_t>();

    // Grouped GEMM (Punica's SGMV shape, as BLAS calls): per adapter, its rows' x gathered,
    // u = x_k A_k^T and y_k = base_k + s_k u B_k^T in the accumulation type, rounded once.
    for (const int64_t k : gemm_adapters) {
      const int64_t b = grouped.begin[k + 1], n_k = grouped.begin[k + 2] - b;
      at::Tensor rows_k = at::empty({n_k}, idx.options());
      std::copy(order.begin() + b, order.begin() + b + n_k, rows_k.mutable_data_ptr<int64_t>());
      const at::Tensor u = at::mm(x2d.index_select(0, rows_k).to(acc_type), a_acc[k].t());
      at::Tensor y_k = base2d.index_select(0, rows_k).to(acc_type);
      y_k.addmm_(u, bt_acc[k], /*beta=*/1, /*alpha=*/sp[k]);
      out.index_copy_(0, rows_k, y_k.to(x2d.scalar_type()));
    }

    const scalar_t* xp = x2d.const_data_ptr<scalar_t>();
    const scalar_t* bp = base2d.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t n_rows = static_cast<int64_t>(row_positions.size());
    at::parallel_for(0, n_rows, row_grain(r * (in + nout)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> xr(in), yr(nout), u(r);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t i = order[row_positions[p]];
        const int64_t k = ip[i];
        if (k < 0) {
          std::copy(bp + i * nout, bp + (i + 1) * nout, op + i * nout);
          continue;
        }
        load_row(xp + i * in, xr.data(), in);
        const acc_t* ak = ap + k * r * in;
        for (int64_t q = 0; q < r; ++q) u[q] = sp[k] * dot(ak + q * in, xr.data(), in);
        load_row(bp + i * nout, yr.data(), nout);
        const acc_t* bk = btp + k * r * nout;
        for (int64_t q = 0; q < r; ++q) axpy(u[q], bk + q * nout, yr.data(), nout);
        store_row(yr.data(), op + i * nout, nout);
      }
    });
  });
}

}  // namespace

const AdapterKernels& cpu_adapter_kernels() {
  static const AdapterKernels table{&ia3_linear_cpu, &ia3_scale_grad_cpu, &houlsby_adapter_cpu,
                                    &lora_multi_add_cpu};
  return table;
}

}  // namespace peftreg::fused
