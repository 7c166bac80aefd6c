// SPDX-License-Identifier: Apache-2.0
//
// The one TORCH_LIBRARY(peftreg, m) block (PyTorch allows a single definition block per
// namespace): what belongs to no op family, the page pool class. The families add their op
// schemas with TORCH_LIBRARY_FRAGMENT beside their entries; kernels use TORCH_LIBRARY_IMPL.
// Python reaches the ops through torch.ops.peftreg.*; nothing is exported through pybind11.
// See csrc/README.md for the recipe to add an op.

// Python.h first: it sets feature macros that must precede the standard headers.
#include <Python.h>

#include <torch/library.h>

#include "paged/page_pool.h"

#ifndef PEFTREG_WITH_CUDA
#define PEFTREG_WITH_CUDA 0
#endif

TORCH_LIBRARY(peftreg, m) {
  // The op schemas are not here: each family defines its own with TORCH_LIBRARY_FRAGMENT(peftreg,
  // m) beside its entries (fused/lora_ops.cpp, fused/lora_grouped.cpp, fused/adapters_ops.cpp,
  // nf4/nf4_ops.cpp), so adding an op touches no file outside its family.

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
