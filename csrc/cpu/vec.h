// SIMD vectors for the C++ kernels: the widest the build has (AVX-512: 16 floats /
// 8 doubles; AVX2: 8 / 4), plain scalars without AVX2/FMA; and per-thread scratch buffers
// (every C++ kernel family's).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

namespace sparsecore {
namespace vec {

// Denormal numbers as zero (inputs and results: MXCSR's DAZ and FTZ) while a kernel runs, in
// the thread that holds the guard: on x86 every operation that meets a denormal takes a
// microcode assist, which made a deep random-weight net's activations (decayed into
// denormals) run several times slower in the sparse kernels; the dense engines compared with flush
// them too. Results move by less than the smallest normal float. The thread's mode is
// restored on exit, so torch's own ops on the same threads keep IEEE denormals.
struct DenormalsAsZero {
#if defined(__SSE__) || defined(__x86_64__)
  unsigned saved;
  DenormalsAsZero() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }
  ~DenormalsAsZero() { _mm_setcsr(saved); }
#else
  DenormalsAsZero() = default;
#endif
  DenormalsAsZero(const DenormalsAsZero&) = delete;
  DenormalsAsZero& operator=(const DenormalsAsZero&) = delete;
};

// ---- SIMD vectors: the widest the build has, scalars without AVX2/FMA ---------------------
template <typename T>
struct ScalarV {
  static constexpr int W = 1;
  T v;
  static ScalarV zero() { return {T(0)}; }
  static ScalarV load(const T* p) { return {*p}; }
  static ScalarV bcast(T x) { return {x}; }
  void store(T* p) const { *p = v; }
  void fma(ScalarV a, ScalarV b) { v += a.v * b.v; }
  void add(ScalarV a) { v += a.v; }
  T sum() const { return v; }
};

#if defined(__AVX512F__)
struct VF {
  static constexpr int W = 16;
  __m512 v;
  static VF zero() { return {_mm512_setzero_ps()}; }
  static VF load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static VF bcast(float x) { return {_mm512_set1_ps(x)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void fma(VF a, VF b) { v = _mm512_fmadd_ps(a.v, b.v, v); }
  void add(VF a) { v = _mm512_add_ps(v, a.v); }
  float sum() const {  // through memory: GCC 12's reduce / extract intrinsics warn
    alignas(64) float t[16];
    _mm512_store_ps(t, v);
    float s = 0;
    for (int i = 0; i < 16; ++i) s += t[i];
    return s;
  }
};
struct VD {
  static constexpr int W = 8;
  __m512d v;
  static VD zero() { return {_mm512_setzero_pd()}; }
  static VD load(const double* p) { return {_mm512_loadu_pd(p)}; }
  static VD bcast(double x) { return {_mm512_set1_pd(x)}; }
  void store(double* p) const { _mm512_storeu_pd(p, v); }
  void fma(VD a, VD b) { v = _mm512_fmadd_pd(a.v, b.v, v); }
  void add(VD a) { v = _mm512_add_pd(v, a.v); }
  double sum() const {
    alignas(64) double t[8];
    _mm512_store_pd(t, v);
    double s = 0;
    for (int i = 0; i < 8; ++i) s += t[i];
    return s;
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct VF {
  static constexpr int W = 8;
  __m256 v;
  static VF zero() { return {_mm256_setzero_ps()}; }
  static VF load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static VF bcast(float x) { return {_mm256_set1_ps(x)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void fma(VF a, VF b) { v = _mm256_fmadd_ps(a.v, b.v, v); }
  void add(VF a) { v = _mm256_add_ps(v, a.v); }
  float sum() const {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  }
};
struct VD {
  static constexpr int W = 4;
  __m256d v;
  static VD zero() { return {_mm256_setzero_pd()}; }
  static VD load(const double* p) { return {_mm256_loadu_pd(p)}; }
  static VD bcast(double x) { return {_mm256_set1_pd(x)}; }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  void fma(VD a, VD b) { v = _mm256_fmadd_pd(a.v, b.v, v); }
  void add(VD a) { v = _mm256_add_pd(v, a.v); }
  double sum() const {
    alignas(32) double t[4];
    _mm256_store_pd(t, v);
    return (t[0] + t[1]) + (t[2] + t[3]);
  }
};
#else
using VF = ScalarV<float>;
using VD = ScalarV<double>;
#endif

template <typename T>
struct VecOf {
  using V = VF;
};
template <>
struct VecOf<double> {
  using V = VD;
};

// Per-thread scratch buffers, 64-byte aligned (a 256-byte row of a CSR chunk then spans 4
// cache lines, not 5), kept across calls (fresh multi-MiB buffers would be page-faulted in on
// every call). Four slots per thread, shared by every kernel family: no kernel runs inside
// another, and within one call each slot holds one buffer.
template <typename T>
inline T* vec_scratch(int slot, int64_t n) {
  struct Buf {
    void* p = nullptr;
    int64_t bytes = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf bufs[4];
  Buf& b = bufs[slot];
  const int64_t bytes = (std::max<int64_t>(n, 1) * int64_t(sizeof(T)) + 63) / 64 * 64;
  if (b.bytes < bytes) {
    std::free(b.p);
    b.p = std::aligned_alloc(64, bytes);
    b.bytes = b.p ? bytes : 0;
    TORCH_CHECK(b.p, "sparsecore: out of memory allocating a ", bytes, "-byte workspace");
  }
  return static_cast<T*>(b.p);
}

}  // namespace vec
}  // namespace sparsecore
