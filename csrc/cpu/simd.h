// SIMD traits of the linalg kernels (AVX2 / FMA where the build enables them), the column
// padding that lets their inner loops run in whole vectors, and the level-1 vector operations
// (dot, axpy, plane rotation) that every kernel is built on. Without AVX2 / FMA only the scalar
// paths are compiled (SC_LINALG_AVX2 undefined, no padding).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SC_LINALG_AVX2 1
#endif

namespace sparsecore::linalg {

#ifdef SC_LINALG_AVX2
template <typename T>
struct Simd;

template <>
struct Simd<float> {
  using R = __m256;
  static constexpr int W = 8;
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R fnma(R a, R b, R c) { return _mm256_fnmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R div(R a, R b) { return _mm256_div_ps(a, b); }
  static R sqrt(R a) { return _mm256_sqrt_ps(a); }
  static R gt(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static R blend(R a, R b, R mask) { return _mm256_blendv_ps(a, b, mask); }
  static R bor(R a, R b) { return _mm256_or_ps(a, b); }
  static R band(R a, R b) { return _mm256_and_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static R abs(R a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  // a with its sign flipped where s is negative
  static R xorsign(R a, R s) { return _mm256_xor_ps(a, _mm256_and_ps(_mm256_set1_ps(-0.0f), s)); }
  static bool any(R mask) { return _mm256_movemask_ps(mask) != 0; }
  static int movemask(R mask) { return _mm256_movemask_ps(mask); }
  static R ge(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  // Lanes [0, rem) of a partial vector (0 < rem < W): masked loads read zeros elsewhere.
  static __m256i tail(int64_t rem) {
    alignas(32) static const int32_t t[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                              0,  0,  0,  0,  0,  0,  0,  0};
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 8 - rem));
  }
  static R mload(const float* p, __m256i m) { return _mm256_maskload_ps(p, m); }
  static float sum(R v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
  }
};

template <>
struct Simd<double> {
  using R = __m256d;
  static constexpr int W = 4;
  static R load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, R v) { _mm256_storeu_pd(p, v); }
  static R zero() { return _mm256_setzero_pd(); }
  static R set1(double x) { return _mm256_set1_pd(x); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static R fnma(R a, R b, R c) { return _mm256_fnmadd_pd(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  static R add(R a, R b) { return _mm256_add_pd(a, b); }
  static R sub(R a, R b) { return _mm256_sub_pd(a, b); }
  static R div(R a, R b) { return _mm256_div_pd(a, b); }
  static R sqrt(R a) { return _mm256_sqrt_pd(a); }
  static R gt(R a, R b) { return _mm256_cmp_pd(a, b, _CMP_GT_OQ); }
  static R blend(R a, R b, R mask) { return _mm256_blendv_pd(a, b, mask); }
  static R bor(R a, R b) { return _mm256_or_pd(a, b); }
  static R band(R a, R b) { return _mm256_and_pd(a, b); }
  static R max(R a, R b) { return _mm256_max_pd(a, b); }
  static R abs(R a) { return _mm256_andnot_pd(_mm256_set1_pd(-0.0), a); }
  static R xorsign(R a, R s) { return _mm256_xor_pd(a, _mm256_and_pd(_mm256_set1_pd(-0.0), s)); }
  static bool any(R mask) { return _mm256_movemask_pd(mask) != 0; }
  static int movemask(R mask) { return _mm256_movemask_pd(mask); }
  static R ge(R a, R b) { return _mm256_cmp_pd(a, b, _CMP_GE_OQ); }
  static __m256i tail(int64_t rem) {
    alignas(32) static const int64_t t[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 4 - rem));
  }
  static R mload(const double* p, __m256i m) { return _mm256_maskload_pd(p, m); }
  static double sum(R v) {
    __m128d lo = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(lo, _mm_unpackhi_pd(lo, lo)));
  }
};

// Four lanes of double (the QR iteration's arithmetic, for float matrices too).
template <typename T>
struct V4;
template <>
struct V4<double> {
  using R = __m256d;
  static R set(double a, double b, double c, double d) { return _mm256_setr_pd(a, b, c, d); }
  static R set1(double a) { return _mm256_set1_pd(a); }
  static R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static R fms(R a, R b, R c) { return _mm256_fmsub_pd(a, b, c); }
  static R div(R a, R b) { return _mm256_div_pd(a, b); }
  static R sqrt(R a) { return _mm256_sqrt_pd(a); }
  static int outside(R q, R lo, R hi) {
    return _mm256_movemask_pd(
        _mm256_or_pd(_mm256_cmp_pd(q, lo, _CMP_LT_OQ), _mm256_cmp_pd(q, hi, _CMP_GT_OQ)));
  }
  static void store(double* p, R v) { _mm256_storeu_pd(p, v); }
};

inline constexpr int kPadFloat = 8;
#else
inline constexpr int kPadFloat = 1;
#endif

// Workspace columns are padded to a multiple of pad_to<T>() entries: one SIMD vector of T with
// AVX2, one entry without.
template <typename T>
constexpr int64_t pad_to() {
  return std::is_same_v<T, float> ? kPadFloat : std::max(1, kPadFloat / 2);
}

template <typename T>
int64_t padded(int64_t n) {
  constexpr int64_t p = pad_to<T>();
  return (n + p - 1) / p * p;
}

// x . y over n entries; four independent accumulators hide the FMA latency.
template <typename T>
inline T dot(const T* x, const T* y, int64_t n) {
  int64_t i = 0;
  T s = 0;
#ifdef SC_LINALG_AVX2
  using V = Simd<T>;
  constexpr int W = V::W;
  auto a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 = V::fma(V::load(x + i), V::load(y + i), a0);
    a1 = V::fma(V::load(x + i + W), V::load(y + i + W), a1);
    a2 = V::fma(V::load(x + i + 2 * W), V::load(y + i + 2 * W), a2);
    a3 = V::fma(V::load(x + i + 3 * W), V::load(y + i + 3 * W), a3);
  }
  for (; i + W <= n; i += W) a0 = V::fma(V::load(x + i), V::load(y + i), a0);
  if (i < n) {
    const __m256i m = V::tail(n - i);
    a1 = V::fma(V::mload(x + i, m), V::mload(y + i, m), a1);
    i = n;
  }
  s = V::sum(V::add(V::add(a0, a1), V::add(a2, a3)));
#endif
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

// y += a x
template <typename T>
inline void axpy(T a, const T* x, T* y, int64_t n) {
  int64_t i = 0;
#ifdef SC_LINALG_AVX2
  using V = Simd<T>;
  const auto va = V::set1(a);
  for (; i + V::W <= n; i += V::W) V::store(y + i, V::fma(va, V::load(x + i), V::load(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

// Plane rotation of two columns: x <- c x - s y, y <- s x + c y.
template <typename T>
inline void rot(T* x, T* y, int64_t n, T c, T s) {
  int64_t i = 0;
#ifdef SC_LINALG_AVX2
  using V = Simd<T>;
  const auto vc = V::set1(c), vs = V::set1(s);
  for (; i + V::W <= n; i += V::W) {
    const auto xv = V::load(x + i), yv = V::load(y + i);
    V::store(x + i, V::fnma(vs, yv, V::mul(vc, xv)));
    V::store(y + i, V::fma(vs, xv, V::mul(vc, yv)));
  }
#endif
  for (; i < n; ++i) {
    const T xi = x[i], yi = y[i];
    x[i] = c * xi - s * yi;
    y[i] = s * xi + c * yi;
  }
}

}  // namespace sparsecore::linalg
