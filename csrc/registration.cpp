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

#ifndef PEFTREG_WITH_CUDA
#define PEFTREG_WITH_CUDA 0
#endif

TORCH_LIBRARY(peftreg, m) {
  // Missing fake (meta) kernels point here: torch imports this module for the Python-side
  // registrations (register_fake) of every op below.
  m.set_python_module("peftreg.ops._fake");

  // y = x @ weight^T + bias + scaling * ((x_lora or x) @ lora_a^T) @ lora_b^T
  // (LoRA, Hu et al. 2021, eq. 3, with the alpha/r factor passed as `scaling`). x may have any
  // number of leading dims; x_lora is dropout(x) computed by the caller. The kernels never form
  // the dense lora_b @ lora_a product.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scaling, Tensor? x_lora=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

// A minimal module object so that `import peftreg._C` loads the shared library and runs the
// static registrations above. WITH_CUDA tells Python whether CUDA kernels were compiled in.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "peftreg._C",
      "peftreg compiled operators; call them through torch.ops.peftreg.* or peftreg.ops.",
      -1,
      nullptr,
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
