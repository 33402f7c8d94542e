// A fingerprint of a CSR sparsity pattern, shared by the kernel families that cache
// structures derived from one.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace sparsecore {

// FNV-1a over row_ptr and col_idx: ties a structure built from a sparsity pattern (a CSR
// tiling, a direct conv's plan) to that pattern.
// kLanes interleaved lanes (independent multiply chains, which the compiler vectorises, where
// one chain would wait on every multiply), folded into one hash. Each FNV step is a bijection
// of the running hash, so an edit of a single index always changes the fingerprint. The CSR
// tilings keep 8 lanes (their fingerprints are in saved models); a direct conv's plan, checked
// on every call, takes 64 (four vectors' independent chains).
template <int kLanes = 8>
inline int32_t fingerprint(const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  constexpr uint32_t kPrime = 16777619u;
  uint32_t h[kLanes];
  for (int j = 0; j < kLanes; ++j) h[j] = 2166136261u + uint32_t(j);
  for (const at::Tensor* t : {&row_ptr, &col_idx}) {
    const int32_t* p = t->data_ptr<int32_t>();
    const int64_t n = t->numel();
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int j = 0; j < kLanes; ++j) h[j] = (h[j] ^ uint32_t(p[i + j])) * kPrime;
    for (; i < n; ++i) h[i % kLanes] = (h[i % kLanes] ^ uint32_t(p[i])) * kPrime;
  }
  uint32_t out = 2166136261u;
  for (int j = 0; j < kLanes; ++j) out = (out ^ h[j]) * kPrime;
  return int32_t(out);
}

}  // namespace sparsecore
