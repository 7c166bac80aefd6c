// SPDX-License-Identifier: Apache-2.0
//
// ScalarKind: the element type a CUDA launch API takes instead of a torch dtype, so the .cu files
// include no torch header. One definition for every family (the launch APIs in
// csrc/*/*_kernels.h); the torch side maps at::ScalarType to it once, in common/cuda_glue.h.
#pragma once

namespace peftreg {

// Tensors of one call share this type; kernels accumulate in float (double for kFloat64).
enum class ScalarKind : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

}  // namespace peftreg
