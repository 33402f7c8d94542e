// What the linalg kernels share besides SIMD: the per-matrix status codes, a stable ordering
// of small index sets, and the full symmetric matrix read from one triangle (the eigh loaders).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace sparsecore::linalg {

enum Status : int { kOk = 0, kNoConvergence = 1, kNonFinite = 2 };

// ord = 0..n-1 stably sorted by `before`; insertion sort for small n (std::stable_sort
// allocates a buffer on every call, which showed in the per-matrix cost at 16 x 16).
template <typename Before>
void stable_order(std::vector<int>& ord, Before before) {
  const int n = static_cast<int>(ord.size());
  std::iota(ord.begin(), ord.end(), 0);
  if (n > 64) {
    std::stable_sort(ord.begin(), ord.end(), before);
    return;
  }
  for (int i = 1; i < n; ++i) {
    const int v = ord[i];
    int j = i;
    for (; j > 0 && before(v, ord[j - 1]); --j) ord[j] = ord[j - 1];
    ord[j] = v;
  }
}

// The full symmetric matrix from the referenced triangle of A (n x n, row-major) into out
// (row i at out + i ld), its largest |entry| in amax; kNonFinite on NaN / Inf.
template <typename T>
int symmetric_from_triangle(const T* A, int64_t n, bool lower, T* out, int64_t ld, T& amax) {
  amax = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const T v = (lower ? (i >= j) : (i <= j)) ? A[i * n + j] : A[j * n + i];
      if (!std::isfinite(v)) return kNonFinite;
      amax = std::max(amax, std::abs(v));
      out[i * ld + j] = v;
    }
  return kOk;
}

}  // namespace sparsecore::linalg
