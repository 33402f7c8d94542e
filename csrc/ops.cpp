// Schemas of the C++ kernels, one TORCH_LIBRARY for the whole extension. Implementations
// live in csrc/cpu/<op>.cpp (TORCH_LIBRARY_IMPL(sparsecore, CPU, m)) and, where built,
// csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL(sparsecore, CUDA, m)). The public ops are the Python
// custom ops in sparsecore/ops.py (and sparsecore/linalg.py), which dispatch to these.
#include <torch/library.h>

TORCH_LIBRARY(sparsecore, m) {
  // --- csr (unstructured sparse Linear / Conv2d) ---
  // --- bsr (block-sparse Linear / Conv2d) ---
  // --- linalg (batched SVD / eigh) ---
  // --- similarity (centered Gram / cross-covariance accumulation) ---
}
