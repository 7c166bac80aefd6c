// SPDX-License-Identifier: Apache-2.0
//
// The LoRA dropout of csrc/fused/lora_dropout.h: parallel loops over CPU tensors; on other
// devices (the CUDA glue) the same mask is built from ATen integer ops, bit for bit.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "fused/lora_dropout.h"

namespace peftreg::fused {
namespace {

constexpr int64_t kGrain = 1 << 14;

// keep(i) for i in [0, n) as a bool tensor on `device`, from int64 ATen ops (values < 2^32 are
// non-negative, so arithmetic shifts equal the logical ones of the uint32 hash).
at::Tensor keep_mask_aten(const LoraDropout& d, int64_t n, const at::Tensor& like) {
  const int64_t m32 = 0xFFFFFFFFLL;
  const at::Tensor i = at::arange(n, like.options().dtype(at::kLong));
  const int64_t seed_lo = static_cast<int64_t>(d.seed & 0xFFFFFFFFull);
  const int64_t seed_hi = static_cast<int64_t>(d.seed >> 32);
  at::Tensor h = i.bitwise_and(m32).mul(0x9E3779B1LL).bitwise_and(m32)
                     .add(i.bitwise_right_shift(32).mul(0x85EBCA77LL).bitwise_and(m32))
                     .add(seed_lo)
                     .bitwise_and(m32);
  h = h.bitwise_xor(seed_hi);
  h = h.bitwise_xor(h.bitwise_right_shift(16));
  h = h.mul(0x85EBCA6BLL).bitwise_and(m32);
  h = h.bitwise_xor(h.bitwise_right_shift(13));
  h = h.mul(0xC2B2AE35LL).bitwise_and(m32);
  h = h.bitwise_xor(h.bitwise_right_shift(16));
  return h.ge(static_cast<int64_t>(lora_dropout_threshold(d.p)));
}

}  // namespace

LoraDropout lora_dropout_args(const char* op, double p, const std::optional<at::Tensor>& seed,
                              const std::optional<at::Tensor>& x_lora) {
  LoraDropout d;
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1) but is ", p);
  if (p == 0.0) return d;
  TORCH_CHECK(seed.has_value(), op, ": dropout_p = ", p, " needs dropout_seed (an int64 tensor "
              "with one element)");
  TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong, op,
              ": dropout_seed must be an int64 tensor with one element but has dtype ",
              seed->scalar_type(), " and shape ", seed->sizes());
  TORCH_CHECK(!x_lora.has_value(), op, ": pass either x_lora or dropout_p > 0, not both (both "
              "would define the LoRA path's input)");
  d.p = p;
  d.seed = static_cast<uint64_t>(seed->item<int64_t>());
  return d;
}

at::Tensor lora_dropout_apply(const at::Tensor& x2d, const LoraDropout& d) {
  const double scale = 1.0 / (1.0 - d.p);
  if (!x2d.is_cpu()) {
    const at::Tensor keep = keep_mask_aten(d, x2d.numel(), x2d).view(x2d.sizes());
    return at::where(keep, x2d.mul(scale), at::zeros_like(x2d));
  }
  at::Tensor out = at::empty_like(x2d);
  const uint32_t threshold = lora_dropout_threshold(d.p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2d.scalar_type(),
                                  "lora_dropout_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = x2d.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const auto s = static_cast<acc_t>(scale);
    at::parallel_for(0, x2d.numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const bool keep = lora_dropout_hash(d.seed, static_cast<uint64_t>(i)) >= threshold;
        dst[i] = keep ? static_cast<scalar_t>(static_cast<acc_t>(src[i]) * s) : scalar_t(0);
      }
    });
  });
  return out;
}

void lora_dropout_accumulate_grad(at::Tensor& dst, const at::Tensor& t, const LoraDropout& d) {
  const double scale = 1.0 / (1.0 - d.p);
  if (!dst.is_cpu()) {
    const at::Tensor keep = keep_mask_aten(d, t.numel(), t).view(t.sizes());
    dst.add_(at::where(keep, t.mul(scale), at::zeros_like(t)));
    return;
  }
  const uint32_t threshold = lora_dropout_threshold(d.p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dst.scalar_type(),
                                  "lora_dropout_accumulate_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    const auto s = static_cast<acc_t>(scale);
    at::parallel_for(0, t.numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (lora_dropout_hash(d.seed, static_cast<uint64_t>(i)) >= threshold) {
          out[i] = static_cast<scalar_t>(static_cast<acc_t>(out[i]) +
                                         static_cast<acc_t>(src[i]) * s);
        }
      }
    });
  });
}

}  // namespace peftreg::fused
