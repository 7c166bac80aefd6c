// SPDX-License-Identifier: Apache-2.0
//
// Dropout on the LoRA path inside the fused ops, with a mask that is never stored.
//
// Element i of the rows-flattened input (rows, in) is kept when hash(seed, i) >= p * 2^32 and
// then scaled by 1 / (1 - p) (inverted dropout, as torch.nn.Dropout). The hash is a
// counter-based generator: the backward regenerates exactly the forward's mask from the 64-bit
// seed, so training saves neither the mask nor dropout(x), only x, which the LoRA gradient
// needs anyway. That removes the largest activation LoRA with dropout adds per adapted layer
// (rows x in values plus a rows x in mask).
//
// The same function is written with torch integer ops in peftreg/ops/reference.py
// (lora_dropout_mask); the tests check the two produce the same bits.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace peftreg::fused {

struct LoraDropout {
  double p = 0.0;     // drop probability in [0, 1); 0 means no dropout
  uint64_t seed = 0;  // from the op's dropout_seed tensor
  bool active() const { return p > 0.0; }
};

// fmix32 (MurmurHash3's finaliser) of the element index mixed with the seed.
inline uint32_t lora_dropout_hash(uint64_t seed, uint64_t i) {
  uint32_t h = static_cast<uint32_t>(i) * 0x9E3779B1u +
               static_cast<uint32_t>(i >> 32) * 0x85EBCA77u + static_cast<uint32_t>(seed);
  h ^= static_cast<uint32_t>(seed >> 32);
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Elements whose hash is below this are dropped.
inline uint32_t lora_dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// Reads p and the seed from the op's arguments, checking them (messages name `op`).
LoraDropout lora_dropout_args(const char* op, double p,
                              const std::optional<at::Tensor>& seed,
                              const std::optional<at::Tensor>& x_lora);

// dropout(x2d) as a new tensor of x2d's dtype; x2d is (rows, in), contiguous, on any device.
at::Tensor lora_dropout_apply(const at::Tensor& x2d, const LoraDropout& d);

// dst += dropout'(t): dst[i] += keep(i) * t[i] / (1 - p), the input gradient of the dropout;
// dst and t are (rows, in), contiguous, one dtype.
void lora_dropout_accumulate_grad(at::Tensor& dst, const at::Tensor& t, const LoraDropout& d);

}  // namespace peftreg::fused
