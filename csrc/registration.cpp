// SPDX-License-Identifier: Apache-2.0
//
// The one TORCH_LIBRARY(peftreg, m) block: every operator schema of the project is defined here
// and nowhere else (PyTorch allows a single definition block per namespace; kernels elsewhere use
// TORCH_LIBRARY_IMPL). Python reaches the ops through torch.ops.peftreg.*; nothing is exported
// through pybind11. See csrc/README.md for the recipe to add an op.

// Python.h first: it sets feature macros that must precede the standard headers.
#include <Python.h>

#include <ATen/core/enum_tag.h>
#include <torch/library.h>

#include "paged/page_pool.h"

#ifndef PEFTREG_WITH_CUDA
#define PEFTREG_WITH_CUDA 0
#endif

TORCH_LIBRARY(peftreg, m) {
  // Each family's Python module holds its ops' wrappers, fake (meta) kernels and backwards;
  // naming it before the family's schemas makes a missing fake kernel point there (torch
  // imports that module) and makes torch refuse a fake registered anywhere else.
  m.set_python_module("peftreg.ops.lora");

  // y = x @ weight^T + bias + scaling * ((x_lora or x) @ lora_a^T) @ lora_b^T
  // (LoRA, Hu et al. 2021, eq. 3, with the alpha/r factor passed as `scaling`). x may have any
  // number of leading dims; x_lora is an input of the LoRA path computed by the caller, or
  // dropout_p > 0 applies dropout to x inside the op with a mask regenerated from dropout_seed
  // (an int64 tensor) in the backward (csrc/fused/lora_dropout.h). The kernels never form the
  // dense lora_b @ lora_a product.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scaling, Tensor? x_lora=None, float dropout_p=0., Tensor? dropout_seed=None) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
  // The gradients of lora_linear except the base weight's and bias's (computed with plain
  // matmuls by the autograd formula, since the base is normally frozen): grad_x (the base's
  // g @ W plus, when x_lora is None, the low-rank path's), grad_lora_a, grad_lora_b and
  // grad_x_lora, each only where output_mask asks for it (an empty tensor otherwise). x and
  // weight may be None when no requested gradient reads them.
  m.def(
      "lora_linear_backward(Tensor grad, Tensor? x, Tensor? weight, Tensor lora_a, "
      "Tensor lora_b, float scaling, Tensor? x_lora, bool[4] output_mask, float dropout_p=0., "
      "Tensor? dropout_seed=None) -> "
      "(Tensor grad_x, Tensor grad_lora_a, Tensor grad_lora_b, Tensor grad_x_lora)",
      {at::Tag::pt2_compliant_tag});
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

  // --- IA3, Houlsby, multi-LoRA (kernels: csrc/fused/adapters_*; docs/ops.md) ---------------
  m.set_python_module("peftreg.ops.adapters");
  // IA3 (Liu et al. 2022, section 3.3) fused into the product it scales. scale_input=False:
  // y = (x @ weight^T + bias) * scale, scale (out_features,) (keys, values); scale_input=True:
  // y = (x * scale) @ weight^T + bias, scale (in_features,) (feed-forward down projection).
  m.def(
      "ia3_linear(Tensor x, Tensor weight, Tensor? bias, Tensor scale, bool scale_input) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Gradient of ia3_linear (scale_input=False) with respect to scale, given its output `out`:
  // sum over rows of grad * (x @ weight^T + bias), recovered as out / scale except where a scale
  // entry is zero (recomputed from x and weight there).
  m.def(
      "ia3_scale_grad(Tensor grad, Tensor out, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor scale) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Houlsby bottleneck (Houlsby et al. 2019, section 2.1) as one op:
  // out = h + act(h @ w_down^T + b_down) @ w_up^T + b_up, activation in {relu, gelu, silu,
  // tanh}; also returns z = h @ w_down^T + b_down (rows x bottleneck), saved for the backward.
  m.def(
      "houlsby_adapter(Tensor h, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, "
      "str activation) -> (Tensor out, Tensor z)",
      {at::Tag::pt2_compliant_tag});
  // Batched multi-adapter LoRA (S-LoRA, Sheng et al. 2023; Punica, Chen et al. 2023): row i of
  // x uses adapter k = index[i] of the stacked lora_a (n, r, in), lora_b (n, out, r) and
  // scaling (n,): out[i] = base[i] + scaling[k] * (x[i] @ lora_a[k]^T) @ lora_b[k]^T, or
  // base[i] when k == -1. index has shape x.shape[:-1]. Inference only (peftreg/ops/adapters.py).
  m.def(
      "lora_multi_add(Tensor base, Tensor x, Tensor lora_a, Tensor lora_b, Tensor scaling, "
      "Tensor index) -> Tensor",
      {at::Tag::pt2_compliant_tag});

  m.set_python_module("peftreg.ops.nf4");
  // NF4 4-bit storage (QLoRA, Dettmers et al. 2023, section 3) in bitsandbytes' byte format
  // (csrc/nf4/nf4_format.h; docs/format.md "NF4 storage"; docs/ops.md). A quantized weight is
  // passed as codes (uint8, (numel + 1) // 2 packed bytes), absmax (float32 per block, or uint8
  // with double quantization), nested_absmax and offset (float32; double quantization only),
  // blocksize and nested_blocksize.
  //
  // Flatten x; per block of `blocksize` elements: float32 absmax, nearest NF4 code of x / absmax,
  // two codes per byte (element 2i in the high nibble). codes: ((numel + 1) // 2, 1) uint8.
  m.def("nf4_quantize(Tensor x, int blocksize=64) -> (Tensor codes, Tensor absmax)",
        {at::Tag::pt2_compliant_tag});
  // Double quantization of the absmax: offset = mean(absmax); (absmax - offset) in blocks of
  // nested_blocksize with the signed 8-bit dynamic code, choosing codes as bitsandbytes does
  // (nearest=False) or by the nearest code. offset is a 0-dim float32 tensor.
  m.def(
      "nf4_double_quantize(Tensor absmax, int nested_blocksize=256, bool nearest=False) -> "
      "(Tensor absmax_codes, Tensor nested_absmax, Tensor offset)",
      {at::Tag::pt2_compliant_tag});
  // The dense tensor of `shape` and `dtype`: code value * block scale, each rounded once from
  // float32. nf4_dequantize_into writes into a preallocated contiguous tensor instead (it returns
  // nothing: torch.compile functionalizes custom ops only when mutated inputs are not returned).
  m.def(
      "nf4_dequantize(Tensor codes, Tensor absmax, Tensor? nested_absmax, Tensor? offset, "
      "int blocksize, int nested_blocksize, int[] shape, ScalarType dtype) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "nf4_dequantize_into(Tensor codes, Tensor absmax, Tensor? nested_absmax, Tensor? offset, "
      "int blocksize, int nested_blocksize, Tensor(a!) out) -> ()",
      {at::Tag::pt2_compliant_tag});
  // y = x @ W^T + bias with W (out_features, in_features) stored as NF4; W is decoded tile by
  // tile inside the product, never as a whole. Differentiable in x and bias (W is frozen).
  m.def(
      "nf4_linear(Tensor x, Tensor codes, Tensor absmax, Tensor? nested_absmax, Tensor? offset, "
      "int blocksize, int nested_blocksize, int out_features, int in_features, "
      "Tensor? bias=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // grad_x = grad @ W (the input gradient of nf4_linear), again without a dense W.
  m.def(
      "nf4_linear_grad_input(Tensor grad, Tensor codes, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? offset, int blocksize, int nested_blocksize, int out_features, "
      "int in_features) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // LoRA on an NF4 base (QLoRA): nf4_linear's product plus lora_linear's low-rank update, all
  // summed in float32 and rounded once; W stays 4-bit. Differentiable in x, bias, lora_a,
  // lora_b and x_lora; the backward op has lora_linear_backward's contract (no weight
  // gradient: the quantized base is frozen).
  m.def(
      "nf4_lora_linear(Tensor x, Tensor codes, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? offset, int blocksize, int nested_blocksize, int out_features, int in_features, "
      "Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling, Tensor? x_lora=None, "
      "float dropout_p=0., Tensor? dropout_seed=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "nf4_lora_linear_backward(Tensor grad, Tensor? x, Tensor codes, Tensor absmax, "
      "Tensor? nested_absmax, Tensor? offset, int blocksize, int nested_blocksize, "
      "int out_features, int in_features, Tensor lora_a, Tensor lora_b, float scaling, "
      "Tensor? x_lora, bool[4] output_mask, float dropout_p=0., Tensor? dropout_seed=None) -> "
      "(Tensor grad_x, Tensor grad_lora_a, Tensor grad_lora_b, Tensor grad_x_lora)",
      {at::Tag::pt2_compliant_tag});

  // ---- Paged optimizer state -------------------------------------------------------
  // The torch custom class peftreg.PagePool (csrc/paged/page_pool.h): fixed-size pages of
  // optimizer state under a fast-tier budget, with the fused AdamW update as a method. A class,
  // not ops, so it adds nothing to peftreg.ops.OPS.
  peftreg::paged::register_page_pool(m);
}

// A minimal module object so that `import peftreg._C` loads the shared library and runs the
// static registrations above. WITH_CUDA tells Python whether CUDA kernels were compiled in.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "peftreg._C",
      "peftreg compiled operators; call them through torch.ops.peftreg.* or peftreg.ops.",
      -1,
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddIntConstant(module, "WITH_CUDA", PEFTREG_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
