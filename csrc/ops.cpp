// Schemas of the C++ kernels, one TORCH_LIBRARY for the whole extension. Implementations
// live in csrc/cpu/<op>.cpp (TORCH_LIBRARY_IMPL(sparsecore, CPU, m)) and, where built,
// csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL(sparsecore, CUDA, m)). The public ops are the Python
// custom ops in sparsecore/ops.py (and sparsecore/linalg.py), which dispatch to these.
#include <Python.h>
#include <torch/library.h>

// The module only carries the op registrations above; importing it runs them.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(sparsecore, m) {
  // --- csr (unstructured sparse Linear / Conv2d) ---
  // --- bsr (block-sparse Linear / Conv2d) ---
  // --- linalg (batched SVD / eigh) ---
  // --- similarity (centered Gram / cross-covariance accumulation) ---
}
