// Batched SVD / symmetric eigendecomposition of many small matrices on the CPU.
//
// Two kernels, chosen per size by sparsecore/linalg.py from measurements (bench/linalg.py):
//
// 1. Golub-Kahan-Reinsch (_svd_bidiag_cpu, _eigh_bidiag_cpu; everything above ~16 x 16):
//    Householder bidiagonalisation M = Q_L B P_R^T, implicit-shift QR on the bidiagonal B
//    (Wilkinson shift, deflation to eps * ||B||, zero diagonals chased out), the rotations
//    accumulated into c x c factors, then U = Q_L Ub, V = P_R Vb. The QR iteration runs in
//    double also for float matrices (its O(c^2) rotations in float cost the values a factor
//    ~100 in accuracy at 512), and above 128 x 128 a float matrix's factors are accumulated
//    in double too (kDoubleAccumAbove). Eight matrices are worked as a group: their QR chases run in
//    two sets of four SIMD lanes (chase_sets: one sqrt / division instruction serves four
//    serial chains, and the two sets' chains overlap), and each chase's rotations are applied
//    to the vectors afterwards as a wave down strips of rows (one load and store per rotation
//    and strip). The back-transforms
//    work on row-major vectors two reflectors at a time (no horizontal sums). This replaced
//    Jacobi above 16 x 16: at 100 x 100 float32, Jacobi's ~7 sweeps of n^2 / 2 dependent
//    (dot -> sqrt / div -> rotate) chains took ~1.1 ms per matrix for the values alone; this
//    kernel takes ~0.4 ms with vectors (one thread).
//
// 2. One-sided Jacobi (_svd_jacobi_cpu, _eigh_jacobi_cpu), the Drmac-Veselic preconditioned
//    scheme. Each matrix M (r x c, r >= c; a wide matrix is transposed) gets a Householder QR
//    with column pivoting, M P = Q R; one-sided (Hestenes) Jacobi then orthogonalises the
//    columns of X = R^T (c x c) with de Rijk's pivoting. Small matrices (<= 32) instead run
//    plain cyclic Jacobi with one SIMD lane per matrix (svd_small_group), the fastest at <= 16.
//    Jacobi is also the fallback for a matrix whose QR iteration reaches its step cap.
//   M = (Q W) S (P Ux)^T   with X W = Ux S  (W: accumulated rotations)
// so the left vectors (Q W) are orthogonal by construction and the right ones are the
// normalised columns of X, re-orthogonalised where a singular value is tiny or zero.
//
// Symmetric eigh (both kernels) works on B = S + c I, with the Gershgorin shift c >= -lambda_min
// making B positive semi-definite, where the SVD is the eigendecomposition (left vectors =
// eigenvectors, orthogonal by construction); lambda_i are their Rayleigh quotients with S.
// Accuracy is absolute, ~eps * ||S||.
//
// Memory layout: every matrix is worked in a per-thread workspace, columns contiguous and
// padded to a multiple of the SIMD width, so that the inner loops are straight AVX2/FMA loops
// over L1/L2-resident data. OpenMP runs across the batch; there is no per-matrix allocation,
// Python or dispatcher work.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SC_LINALG_AVX2 1
#endif

namespace {

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
    alignas(32) static const int32_t t[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
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
constexpr int kPadFloat = 8;
#else
constexpr int kPadFloat = 1;
#endif

template <typename T>
constexpr int64_t pad_to() {
  return std::is_same_v<T, float> ? kPadFloat : std::max(1, kPadFloat / 2);
}

template <typename T>
int64_t padded(int64_t n) {
  constexpr int64_t p = pad_to<T>();
  return (n + p - 1) / p * p;
}

// Columns below tiny_ratio * (largest column) count as zero in the Jacobi sweeps (see jacobi()).
template <typename T>
T tiny_ratio(int64_t n) {
  return 2 * std::numeric_limits<T>::epsilon() * std::sqrt(T(std::max<int64_t>(n, 1)));
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

// Per-thread scratch, sized once for the batch's shape.
template <typename T>
struct Work {
  int64_t r, c, ldr, ldc;
  std::vector<T> M, X, W, Y, Z, Zt, Sym, tau, d, sig;
  std::vector<int> perm, ord;
  Work(int64_t r_, int64_t c_, bool vectors)
      : r(r_), c(c_), ldr(padded<T>(r_)), ldc(padded<T>(c_)),
        M(ldr * c_), X(ldc * c_), W(vectors ? ldc * c_ : 0), Y(vectors ? ldr * c_ : 0),
        Z(vectors ? ldc * c_ : 0), Zt(vectors ? ldc * c_ : 0), Sym(vectors && r_ == c_ ? ldr * c_ : 0), tau(c_), d(c_), sig(c_), perm(c_), ord(c_) {}
};

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

// Householder vector for x (len entries): on return x[0] = mu (H x = mu e1, mu >= 0), x[1..]
// = v's tail (v(0) = 1); returns the reflector's scalar, 0 (identity) when the tail is zero.
// A sum of squares below min / eps has lost digits to underflow (a graded matrix's tail):
// then x is scaled to max |x_i| = 1 first (v and tau do not depend on the scale), as LAPACK's
// larfg does; if the tail is still that small next to x(0), it is negligible and H = I.
template <typename T>
inline T house(T* x, int64_t len) {
  T sigma = len > 1 ? dot(x + 1, x + 1, len - 1) : T(0);
  T alpha = x[0], scale = 1;
  static const T safe = std::numeric_limits<T>::min() / std::numeric_limits<T>::epsilon();
  if (sigma < safe) {
    if (sigma == 0 && len > 1) {
      bool zero = true;
      for (int64_t i = 1; i < len && zero; ++i) zero = x[i] == 0;
      if (zero) return 0;
    }
    T amax = 0;
    for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::abs(x[i]));
    if (amax == 0 || len < 2) return 0;
    const T inv = 1 / amax;
    for (int64_t i = 0; i < len; ++i) x[i] *= inv;
    sigma = dot(x + 1, x + 1, len - 1);
    alpha = x[0];
    if (!(sigma >= safe)) {
      for (int64_t i = 0; i < len; ++i) x[i] *= amax;
      return 0;
    }
    scale = amax;
  }
  const T mu = std::sqrt(alpha * alpha + sigma);
  const T v0 = alpha <= 0 ? alpha - mu : -sigma / (alpha + mu);
  const T inv = 1 / v0;
  for (int64_t i = 1; i < len; ++i) x[i] *= inv;
  x[0] = mu * scale;
  return 2 * v0 * v0 / (sigma + v0 * v0);
}

// y <- (I - tau v v^T) y over len entries; v(0) = 1 implicit, v's tail at vt.
template <typename T>
inline void reflect(T tau, const T* vt, T* y, int64_t len) {
  const T s = tau * (y[0] + dot(vt, y + 1, len - 1));
  y[0] -= s;
  axpy(-s, vt, y + 1, len - 1);
}

// Householder QR with column pivoting of the r x c column-major M (in place: R above the
// diagonal, the reflectors' tails below it, scalars in tau; perm[k] = original column).
template <typename T>
void qrcp(Work<T>& w) {
  const int64_t r = w.r, c = w.c, ld = w.ldr;
  T* M = w.M.data();
  std::iota(w.perm.begin(), w.perm.end(), 0);
  for (int64_t k = 0; k < c; ++k) {
    int64_t best = k;
    T bn = -1;
    for (int64_t j = k; j < c; ++j) {
      const T* col = M + j * ld + k;
      const T nj = dot(col, col, r - k);
      if (nj > bn) bn = nj, best = j;
    }
    if (best != k) {
      std::swap_ranges(M + k * ld, M + k * ld + r, M + best * ld);
      std::swap(w.perm[k], w.perm[best]);
    }
    T* x = M + k * ld + k;
    const int64_t len = r - k;
    const T tau = house(x, len);
    w.tau[k] = tau;
    if (tau == 0) continue;
    for (int64_t j = k + 1; j < c; ++j) reflect(tau, x + 1, M + j * ld + k, len);
  }
}

// One-sided Jacobi on the n columns of X (each `len` long, stride ldx), rotations also
// applied to W's columns when W is given. Returns true when converged: a sweep with every
// pair orthogonal to `tol` relative (|x_p . x_q| <= tol ||x_p|| ||x_q||). Columns below
// tiny_ratio(n) * max ||x_j|| are roundoff of a (numerically) zero singular value: rotating
// them only makes new roundoff, so they are left out here and re-orthogonalised afterwards
// (fix_columns); without this a rank-deficient matrix never converges.
template <typename T>
bool jacobi(T* X, int64_t ldx, int64_t len, int64_t n, T* W, int64_t ldw, T tol, int max_sweeps,
            T* d, int* ord) {
  const T big = 1 / std::sqrt(std::numeric_limits<T>::epsilon());
  std::iota(ord, ord + n, 0);
  T maxoff = 0;
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    T dmax = 0;
    for (int64_t j = 0; j < n; ++j) {
      d[j] = dot(X + j * ldx, X + j * ldx, len);
      dmax = std::max(dmax, d[j]);
    }
    const T tiny = tiny_ratio<T>(n);
    const T floor2 = tiny * tiny * dmax;
    bool rotated = false;
    maxoff = 0;
    for (int64_t p = 0; p + 1 < n; ++p) {
      // de Rijk: the largest remaining column becomes the pivot of this row of the sweep.
      int64_t jm = p;
      for (int64_t j = p + 1; j < n; ++j)
        if (d[ord[j]] > d[ord[jm]]) jm = j;
      std::swap(ord[p], ord[jm]);
      const int op = ord[p];
      if (d[op] <= floor2) break;  // every remaining column is (numerically) zero
      T* xp = X + op * ldx;
      for (int64_t q = p + 1; q < n; ++q) {
        const int oq = ord[q];
        const T ap = d[op], aq = d[oq];
        if (aq <= floor2) continue;
        T* xq = X + oq * ldx;
        const T g = dot(xp, xq, len);
        const T rel = std::abs(g) / (std::sqrt(ap) * std::sqrt(aq));
        maxoff = std::max(maxoff, rel);
        if (!(rel > tol)) continue;
        rotated = true;
        const T zeta = (aq - ap) / (2 * g);
        const T az = std::abs(zeta);
        T t = az > big ? T(0.5) / az : 1 / (az + std::sqrt(1 + zeta * zeta));
        if (zeta < 0) t = -t;
        const T cs = 1 / std::sqrt(1 + t * t), sn = cs * t;
        rot(xp, xq, len, cs, sn);
        if (W) rot(W + op * ldw, W + oq * ldw, ldw, cs, sn);
        // Updated norms (exact in exact arithmetic); recomputed where cancellation bites.
        T nap = ap - t * g, naq = aq + t * g;
        if (!(nap > T(0.5) * ap)) nap = dot(xp, xp, len);
        if (!(naq > T(0.5) * aq)) naq = dot(xq, xq, len);
        d[op] = nap;
        d[oq] = naq;
      }
    }
    if (!rotated) return true;
  }
  return maxoff <= 64 * tol;
}

// Orthonormalise the columns Z[:, k] with small or zero norm against the earlier ones
// (modified Gram-Schmidt, twice), completing with unit vectors where a column vanishes.
template <typename T>
void fix_columns(T* Z, int64_t ld, int64_t len, int64_t ncols, const T* sig, T small) {
  for (int64_t k = 0; k < ncols; ++k) {
    if (sig[k] > small) continue;
    T* z = Z + k * ld;
    int64_t next_unit = 0;
    for (int attempt = 0;; ++attempt) {
      for (int pass = 0; pass < 2; ++pass)
        for (int64_t j = 0; j < k; ++j) axpy(-dot(Z + j * ld, z, len), Z + j * ld, z, len);
      const T nz = std::sqrt(dot(z, z, len));
      if (nz > T(0.5) || (attempt > 0 && nz > T(1e-3))) {
        const T inv = 1 / nz;
        for (int64_t i = 0; i < len; ++i) z[i] *= inv;
        break;
      }
      if (next_unit >= len) break;  // cannot happen for k < len
      std::fill(z, z + len, T(0));
      z[next_unit++] = 1;
    }
  }
}

enum Status : int { kOk = 0, kNoConvergence = 1, kNonFinite = 2 };

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

// The SVD of one r x c column-major matrix already in w.M (r >= c), scaled to max |m_ij| = 1.
// Fills w.sig (descending) and, with vectors, w.Y (left, r x c) and, with right, w.Z
// (right, c x c).
template <typename T>
int svd_core(Work<T>& w, bool vectors, bool right) {
  const int64_t r = w.r, c = w.c, ldr = w.ldr, ldc = w.ldc;
  qrcp(w);
  // X = R^T: column i of X is row i of R.
  T* X = w.X.data();
  std::fill(w.X.begin(), w.X.end(), T(0));
  for (int64_t j = 0; j < c; ++j)
    for (int64_t i = 0; i <= j; ++i) X[i * ldc + j] = w.M[j * ldr + i];
  T* W = nullptr;
  if (vectors) {
    std::fill(w.W.begin(), w.W.end(), T(0));
    W = w.W.data();
    for (int64_t i = 0; i < c; ++i) W[i * ldc + i] = 1;
  }
  const T eps = std::numeric_limits<T>::epsilon();
  const T tol = eps * std::sqrt(T(std::max<int64_t>(c, 4)));
  const bool ok = jacobi(X, ldc, ldc, c, W, ldc, tol, 30, w.d.data(), w.ord.data());
  // Column norms, sorted descending (stable: ties keep the pivoted order).
  std::vector<int>& ord = w.ord;
  for (int64_t j = 0; j < c; ++j) w.d[j] = std::sqrt(dot(X + j * ldc, X + j * ldc, ldc));
  stable_order(ord, [&](int a, int b) { return w.d[a] > w.d[b]; });
  for (int64_t i = 0; i < c; ++i) w.sig[i] = w.d[ord[i]];
  if (vectors && right) {
    // Right vectors of M: P * (columns of X normalised), fixed up where sigma is tiny.
    std::vector<T>& zc = w.Zt;
    for (int64_t i = 0; i < c; ++i) {
      const T s = w.sig[i];
      const T inv = s > 0 ? 1 / s : T(0);
      const T* xs = X + ord[i] * ldc;
      T* z = zc.data() + i * ldc;
      for (int64_t j = 0; j < c; ++j) z[j] = xs[j] * inv;
    }
    const T small = c > 0 ? w.sig[0] * 2 * tiny_ratio<T>(c) : T(0);
    fix_columns(zc.data(), ldc, c, c, w.sig.data(), small);
    for (int64_t i = 0; i < c; ++i) {
      T* z = w.Z.data() + i * ldc;
      for (int64_t j = 0; j < c; ++j) z[w.perm[j]] = zc[i * ldc + j];
    }
  }
  if (vectors) {
    // Left vectors of M: Q [W; 0], applying the reflectors from the last to the first.
    T* Y = w.Y.data();
    std::fill(w.Y.begin(), w.Y.end(), T(0));
    for (int64_t i = 0; i < c; ++i) std::copy_n(W + ord[i] * ldc, c, Y + i * ldr);
    for (int64_t k = c - 1; k >= 0; --k) {
      const T tau = w.tau[k];
      if (tau == 0) continue;
      const T* vt = w.M.data() + k * ldr + k + 1;  // v(0) = 1 implicit
      for (int64_t i = 0; i < c; ++i) reflect(tau, vt, Y + i * ldr + k, r - k);
    }
  }
  return ok ? kOk : kNoConvergence;
}

// Index of the largest-magnitude entry (first on ties) of x.
template <typename T>
int64_t argmax_abs(const T* x, int64_t n, int64_t stride) {
  int64_t best = 0;
  T bv = -1;
  for (int64_t i = 0; i < n; ++i) {
    const T v = std::abs(x[i * stride]);
    if (v > bv) bv = v, best = i;
  }
  return best;
}

template <typename T>
int svd_one(const T* A, int64_t m, int64_t n, T* U, T* S, T* Vh, Work<T>& w) {
  const bool vectors = U != nullptr;
  const bool trans = m < n;
  const int64_t r = w.r, c = w.c, ldr = w.ldr, k = c;
  T amax = 0;
  for (int64_t i = 0; i < m * n; ++i) amax = std::max(amax, std::abs(A[i]));
  if (!std::isfinite(amax)) return kNonFinite;
  for (int64_t i = 0; i < m * n; ++i)
    if (!std::isfinite(A[i])) return kNonFinite;
  // M (r x c, column-major): A itself, or A^T when A is wide (then its columns are A's rows).
  std::fill(w.M.begin(), w.M.end(), T(0));
  const T scale = amax > 0 ? 1 / amax : T(1);
  if (trans) {
    for (int64_t j = 0; j < c; ++j)
      for (int64_t i = 0; i < r; ++i) w.M[j * ldr + i] = A[j * n + i] * scale;
  } else {
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < c; ++j) w.M[j * ldr + i] = A[i * n + j] * scale;
  }
  const int status = svd_core(w, vectors, true);
  for (int64_t i = 0; i < k; ++i) S[i] = w.sig[i] * amax;
  if (!vectors) return status;
  // A = (left of M) S (right of M)^T, or its transpose for a wide A.
  const T* Lm = trans ? w.Z.data() : w.Y.data();  // columns: A's left vectors (length m)
  const T* Rm = trans ? w.Y.data() : w.Z.data();  // columns: A's right vectors (length n)
  const int64_t ldl = trans ? w.ldc : ldr, ldrr = trans ? ldr : w.ldc;
  for (int64_t i = 0; i < k; ++i) {
    const T* u = Lm + i * ldl;
    const T* v = Rm + i * ldrr;
    // Sign convention: the largest-magnitude entry of each left singular vector is positive.
    const T sg = u[argmax_abs(u, m, 1)] < 0 ? T(-1) : T(1);
    for (int64_t j = 0; j < m; ++j) U[j * k + i] = sg * u[j];
    for (int64_t j = 0; j < n; ++j) Vh[i * n + j] = sg * v[j];
  }
  return status;
}

template <typename T>
int eigh_one(const T* A, int64_t n, bool lower, T* L, T* Qo, Work<T>& w) {
  const int64_t ldr = w.ldr;
  // Full symmetric B from the referenced triangle.
  T amax;
  if (symmetric_from_triangle(A, n, lower, w.M.data(), ldr, amax) != kOk) return kNonFinite;
  const T scale = amax > 0 ? 1 / amax : T(1);
  // Gershgorin shift: c >= -lambda_min makes B = S + c I positive semi-definite.
  T shift = 0;
  for (int64_t j = 0; j < n; ++j) {
    T* col = w.M.data() + j * ldr;
    T off = 0;
    for (int64_t i = 0; i < n; ++i) {
      col[i] *= scale;
      if (i != j) off += std::abs(col[i]);
    }
    shift = std::max(shift, off - col[j]);
  }
  std::copy(w.M.begin(), w.M.end(), w.Sym.begin());
  for (int64_t j = 0; j < n; ++j) w.M[j * ldr + j] += shift;
  const int status = svd_core(w, true, false);
  // Eigenvalues: Rayleigh quotients q^T S q of the (orthonormal) left vectors. Their error is
  // ~ eps ||S|| plus the square of the vectors' error, so the shift does not degrade them.
  T* lam = w.d.data();  // free again once svd_core is done
  for (int64_t i = 0; i < n; ++i) {
    const T* q = w.Y.data() + i * ldr;
    T acc = 0;
    for (int64_t j = 0; j < n; ++j) acc += q[j] * dot(w.Sym.data() + j * ldr, q, n);
    lam[i] = acc;
  }
  std::vector<int>& o = w.ord;
  stable_order(o, [&](int a, int b) { return lam[a] < lam[b]; });
  for (int64_t i = 0; i < n; ++i) {
    L[i] = lam[o[i]] * amax;
    const T* q = w.Y.data() + o[i] * ldr;
    const T sg = q[argmax_abs(q, n, 1)] < 0 ? T(-1) : T(1);
    for (int64_t j = 0; j < n; ++j) Qo[j * n + i] = sg * q[j];
  }
  return status;
}


// ---------------------------------------------------------------------------------------------
// Golub-Kahan-Reinsch SVD for the matrices above the SIMD path: Householder bidiagonalisation
// M = Q_L B P_R^T (B upper bidiagonal, r >= c), implicit-shift QR on B (Wilkinson shift,
// deflation to absolute accuracy eps * ||B||, zero diagonals chased out), its plane rotations
// accumulated into c x c factors Ub, Vb, then U = Q_L [Ub; 0], V = P_R Vb.
// Why not Jacobi here (measured, 100 x 100 float32, one thread): Jacobi needs ~7 sweeps of
// n^2 / 2 pairs, each a serial chain (dot -> sqrt / div -> rotate the pivot column that the
// next pair reads), ~1.1 ms per matrix for the values alone; here the O(n^3) work is
// cache-resident BLAS-2 and only O(n^2) short chase steps are serial.

template <typename T>
inline void givens(T f, T g, T& cs, T& sn, T& r) {
  if (g == 0) {
    cs = 1, sn = 0, r = f;
    return;
  }
  if (f == 0) {
    cs = 0, sn = 1, r = g;
    return;
  }
  static const T lo = std::sqrt(std::numeric_limits<T>::min()) * 4, hi = 1 / lo;
  const T mx = std::max(std::abs(f), std::abs(g));
  if (mx > lo && mx < hi) {
    r = std::sqrt(f * f + g * g);
  } else {
    const T fs = f / mx, gs = g / mx;
    r = mx * std::sqrt(fs * fs + gs * gs);
  }
  const T inv = 1 / r;
  cs = f * inv;
  sn = g * inv;
}

// Above this size a float matrix's QR rotations are accumulated in double (Ubd, Vbd): each
// vector entry goes through O(c) sequential rotations, and in float the orthogonality of the
// vectors reached 1.2-1.6e-5 at 256-512 (LAPACK: ~2e-6). Below it float is accurate enough
// (<= 6.9e-6 at 100 x 100 over 4000 matrices) and the rotations, the largest phase, stay at
// twice the SIMD width.
constexpr int64_t kDoubleAccumAbove = 128;

template <typename T>
struct BidiagWork {
  int64_t r, c, ldr, ldc;
  bool acc_double;  // rotations accumulated into Ubd / Vbd, copied to Ub / Vb at the end
  bool left = false, right = false;  // which factors the QR state accumulates
  std::vector<T> M, Pu, Ub, Vb;
  std::vector<double> d, e;  // the bidiagonal: its QR iteration runs in double (BidiagQR)
  std::vector<T> tauL, tauR, wv, row, sig, pair;
  std::vector<int> ord, fills;
  std::vector<double> Ubd, Vbd;
  T amax = 0;
  BidiagWork(int64_t r_, int64_t c_, bool vectors)
      : r(r_), c(c_), ldr(padded<T>(r_) + pad_to<T>()), ldc(padded<T>(c_)),
        acc_double(vectors && std::is_same_v<T, float> && c_ > kDoubleAccumAbove),
        M(ldr * c_), Pu(vectors ? ldc * c_ : 0), Ub(vectors ? ldc * c_ : 0),
        Vb(vectors ? ldc * c_ : 0), d(c_), e(c_ + 1), tauL(c_), tauR(c_), wv(ldr), row(c_ + 1),
        sig(c_), pair(2 * ldr + 2), ord(c_), fills(3 * c_ + 1),
        Ubd(acc_double ? ldc * c_ : 0), Vbd(acc_double ? ldc * c_ : 0) {}
  // The factors' identity start; the QR state q then rotates the double or the T ones.
  template <typename Q>
  void start_factors(Q& q, bool left_, bool right_) {
    left = left_, right = right_;
    q.Ub = q.Vb = nullptr;
    q.Ubd = q.Vbd = nullptr;
    const auto eye = [&](auto& X) {
      std::fill(X.begin(), X.end(), 0);
      for (int64_t i = 0; i < c; ++i) X[i * ldc + i] = 1;
      return X.data();
    };
    if (acc_double) {
      if (left) q.Ubd = eye(Ubd);
      if (right) q.Vbd = eye(Vbd);
    } else {
      if (left) q.Ub = eye(Ub);
      if (right) q.Vb = eye(Vb);
    }
  }
  // Ub / Vb (T) from the double factors, before the back-transforms read them.
  void finish_factors() {
    if (!acc_double) return;
    if (left) std::copy(Ubd.begin(), Ubd.end(), Ub.begin());
    if (right) std::copy(Vbd.begin(), Vbd.end(), Vb.begin());
  }
};

// Columns Y_j (j < ncols, ld apart, len entries each) <- (I - tau v v^T) Y_j, v = [1, vt...],
// four columns per pass: their dots share v's loads and their horizontal sums overlap (one
// column at a time was latency-bound on the sum, ~3x slower at 100 x 100). The loops run in
// whole SIMD vectors past len: the caller guarantees at least W readable entries of zeros
// after each column and after v (BidiagWork's padding), which stay zero.
template <typename T>
void reflect_cols(T tau, const T* vt, T* Y, int64_t ld, int64_t len, int64_t ncols) {
  int64_t j = 0;
  const int64_t n = len - 1;  // entries of each column after its first
#ifdef SC_LINALG_AVX2
  using V = Simd<T>;
  constexpr int W = V::W;
  for (; j + 4 <= ncols; j += 4) {
    T* y0 = Y + j * ld;
    T* y1 = y0 + ld;
    T* y2 = y1 + ld;
    T* y3 = y2 + ld;
    auto a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
    for (int64_t i = 0; i < n; i += W) {
      const auto v = V::load(vt + i);
      a0 = V::fma(v, V::load(y0 + 1 + i), a0);
      a1 = V::fma(v, V::load(y1 + 1 + i), a1);
      a2 = V::fma(v, V::load(y2 + 1 + i), a2);
      a3 = V::fma(v, V::load(y3 + 1 + i), a3);
    }
    T s0 = V::sum(a0) + y0[0], s1 = V::sum(a1) + y1[0], s2 = V::sum(a2) + y2[0],
      s3 = V::sum(a3) + y3[0];
    s0 *= tau, s1 *= tau, s2 *= tau, s3 *= tau;
    y0[0] -= s0, y1[0] -= s1, y2[0] -= s2, y3[0] -= s3;
    const auto b0 = V::set1(s0), b1 = V::set1(s1), b2 = V::set1(s2), b3 = V::set1(s3);
    for (int64_t i = 0; i < n; i += W) {
      const auto v = V::load(vt + i);
      V::store(y0 + 1 + i, V::fnma(b0, v, V::load(y0 + 1 + i)));
      V::store(y1 + 1 + i, V::fnma(b1, v, V::load(y1 + 1 + i)));
      V::store(y2 + 1 + i, V::fnma(b2, v, V::load(y2 + 1 + i)));
      V::store(y3 + 1 + i, V::fnma(b3, v, V::load(y3 + 1 + i)));
    }
  }
  for (; j < ncols; ++j) {
    T* y = Y + j * ld;
    auto a0 = V::zero();
    for (int64_t i = 0; i < n; i += W) a0 = V::fma(V::load(vt + i), V::load(y + 1 + i), a0);
    const T s0 = tau * (V::sum(a0) + y[0]);
    y[0] -= s0;
    const auto b0 = V::set1(s0);
    for (int64_t i = 0; i < n; i += W)
      V::store(y + 1 + i, V::fnma(b0, V::load(vt + i), V::load(y + 1 + i)));
  }
#endif
  for (; j < ncols; ++j) reflect(tau, vt, Y + j * ld, len);
}

// M (r x c, column-major, r >= c) -> d, e. Left reflectors stay in M (tails below the
// diagonal); with vectors, right reflector k's tail (acting on k+2..c-1) is column k of Pu.
template <typename T>
__attribute__((noinline)) void bidiagonalize(BidiagWork<T>& w, bool vectors) {
  const int64_t r = w.r, c = w.c, ld = w.ldr;
  T* M = w.M.data();
  T* wv = w.wv.data();
  T* u = w.row.data();
  for (int64_t k = 0; k < c; ++k) {
    T* x = M + k * ld + k;
    const int64_t len = r - k;
    const T tl = house(x, len);
    w.tauL[k] = tl;
    w.d[k] = x[0];
    if (tl != 0) reflect_cols(tl, x + 1, x + ld, ld, len, c - k - 1);
    if (k + 1 >= c) break;
    // Right reflector from row k, columns k+1..c-1 (gathered: the row is strided).
    const int64_t len2 = c - k - 1;
    for (int64_t j = 0; j < len2; ++j) u[j] = M[(k + 1 + j) * ld + k];
    const T tr = house(u, len2);
    w.tauR[k] = tr;
    w.e[k] = u[0];
    if (vectors && len2 > 1) std::copy_n(u + 1, len2 - 1, w.Pu.data() + k * w.ldc);
    if (tr == 0) continue;
    // Rows k+1..r-1 of columns k+1..c-1: A <- A - tr (A u) u^T with u(0) = 1; four columns
    // per pass in both the product and the update.
    const int64_t rows = r - k - 1;
    T* const c0 = M + (k + 1) * ld + k + 1;
    std::copy_n(c0, rows + pad_to<T>(), wv);  // with W zeros of padding for the overrun
    u[0] = 1;
    int64_t j = 1;
    for (; j + 4 <= len2; j += 4) {
      const T* p0 = c0 + j * ld;
      const T u0 = u[j], u1 = u[j + 1], u2 = u[j + 2], u3 = u[j + 3];
      int64_t i = 0;
#ifdef SC_LINALG_AVX2
      using V = Simd<T>;
      const auto b0 = V::set1(u0), b1 = V::set1(u1), b2 = V::set1(u2), b3 = V::set1(u3);
      for (; i < rows; i += V::W) {  // past rows: zero padding (see reflect_cols)
        auto acc = V::load(wv + i);
        acc = V::fma(b0, V::load(p0 + i), acc);
        acc = V::fma(b1, V::load(p0 + ld + i), acc);
        acc = V::fma(b2, V::load(p0 + 2 * ld + i), acc);
        acc = V::fma(b3, V::load(p0 + 3 * ld + i), acc);
        V::store(wv + i, acc);
      }
#endif
      for (; i < rows; ++i)
        wv[i] += u0 * p0[i] + u1 * p0[ld + i] + u2 * p0[2 * ld + i] + u3 * p0[3 * ld + i];
    }
    for (; j < len2; ++j) axpy(u[j], c0 + j * ld, wv, rows);
    j = 0;
    for (; j + 4 <= len2; j += 4) {
      T* p0 = c0 + j * ld;
      const T u0 = -tr * u[j], u1 = -tr * u[j + 1], u2 = -tr * u[j + 2], u3 = -tr * u[j + 3];
      int64_t i = 0;
#ifdef SC_LINALG_AVX2
      using V = Simd<T>;
      const auto b0 = V::set1(u0), b1 = V::set1(u1), b2 = V::set1(u2), b3 = V::set1(u3);
      for (; i < rows; i += V::W) {
        const auto wvi = V::load(wv + i);
        V::store(p0 + i, V::fma(b0, wvi, V::load(p0 + i)));
        V::store(p0 + ld + i, V::fma(b1, wvi, V::load(p0 + ld + i)));
        V::store(p0 + 2 * ld + i, V::fma(b2, wvi, V::load(p0 + 2 * ld + i)));
        V::store(p0 + 3 * ld + i, V::fma(b3, wvi, V::load(p0 + 3 * ld + i)));
      }
#endif
      for (; i < rows; ++i) {
        p0[i] += u0 * wv[i], p0[ld + i] += u1 * wv[i];
        p0[2 * ld + i] += u2 * wv[i], p0[3 * ld + i] += u3 * wv[i];
      }
    }
    for (; j < len2; ++j) axpy(-tr * u[j], wv, c0 + j * ld, rows);
  }
}

// Apply the rotation sequence of one chase, k = p..h-1 in order, to the columns of X (column
// major, leading dimension ld, nrows rows, a multiple of the SIMD width):
//   x_k <- c_k x_k + s_k x_{k+1},  x_{k+1} <- -s_k x_k + c_k x_{k+1}.
// Done as a wave down each strip of rows (LAPACK's slasr idea): the running column stays in
// registers, so each rotation costs one load and one store per strip instead of two of each,
// and four strips keep four independent chains in flight.
template <typename T, typename C>
void rotate_wave(T* X, int64_t ld, int64_t nrows, int64_t p, int64_t h, const C* cs,
                 const C* sn, int64_t rs, const int* g) {
  // g[i] (i < h - p): the last row that may be nonzero in any of columns p..p+i+1. Rotations
  // before the first i with g[i] >= a strip's first row only mix zeros there: the strip's wave
  // starts after them (the factors start as the identity and fill in chase by chase).
  const auto first = [&](int64_t row0) {
    int64_t i = 0;
    while (i < h - p && g[i] < row0) ++i;
    return p + i;
  };
  int64_t i0 = 0;
#ifdef SC_LINALG_AVX2
  using V = Simd<T>;
  constexpr int W = V::W;
  for (; i0 + 4 * W <= nrows; i0 += 4 * W) {
    T* x = X + i0;
    const int64_t k0 = first(i0);
    if (k0 >= h) continue;
    auto a0 = V::load(x + k0 * ld), a1 = V::load(x + k0 * ld + W);
    auto a2 = V::load(x + k0 * ld + 2 * W), a3 = V::load(x + k0 * ld + 3 * W);
    for (int64_t k = k0; k < h; ++k) {
      const auto c = V::set1(T(cs[(k - p) * rs])), s = V::set1(T(sn[(k - p) * rs]));
      T* xk = x + k * ld;
      T* xn = xk + ld;
      const auto b0 = V::load(xn), b1 = V::load(xn + W), b2 = V::load(xn + 2 * W),
                 b3 = V::load(xn + 3 * W);
      V::store(xk, V::fma(s, b0, V::mul(c, a0)));
      V::store(xk + W, V::fma(s, b1, V::mul(c, a1)));
      V::store(xk + 2 * W, V::fma(s, b2, V::mul(c, a2)));
      V::store(xk + 3 * W, V::fma(s, b3, V::mul(c, a3)));
      a0 = V::fnma(s, a0, V::mul(c, b0));
      a1 = V::fnma(s, a1, V::mul(c, b1));
      a2 = V::fnma(s, a2, V::mul(c, b2));
      a3 = V::fnma(s, a3, V::mul(c, b3));
    }
    T* xh = x + h * ld;
    V::store(xh, a0), V::store(xh + W, a1), V::store(xh + 2 * W, a2), V::store(xh + 3 * W, a3);
  }
  for (; i0 + W <= nrows; i0 += W) {
    T* x = X + i0;
    const int64_t k0 = first(i0);
    if (k0 >= h) continue;
    auto a0 = V::load(x + k0 * ld);
    for (int64_t k = k0; k < h; ++k) {
      const auto c = V::set1(T(cs[(k - p) * rs])), s = V::set1(T(sn[(k - p) * rs]));
      const auto b0 = V::load(x + (k + 1) * ld);
      V::store(x + k * ld, V::fma(s, b0, V::mul(c, a0)));
      a0 = V::fnma(s, a0, V::mul(c, b0));
    }
    V::store(x + h * ld, a0);
  }
#endif
  for (; i0 < nrows; ++i0) {
    T* x = X + i0;
    T a = x[p * ld];
    for (int64_t k = p; k < h; ++k) {
      const T b = x[(k + 1) * ld], c = T(cs[(k - p) * rs]), s = T(sn[(k - p) * rs]);
      x[k * ld] = c * a + s * b;
      a = c * b - s * a;
    }
    x[h * ld] = a;
  }
}

// Implicit-shift QR on a c x c upper bidiagonal (d, e) until it is diagonal; rotations go into
// the columns of Ub / Vb (c x c, leading dimension ld) when they are given.
template <typename T>
struct BidiagQR {
  using Q = double;  // the bidiagonal's arithmetic, also for float matrices (see init())
  Q* d;
  Q* e;
  int64_t c;
  T* Ub;
  T* Vb;
  double* Ubd = nullptr;  // or the factors in double (BidiagWork::acc_double)
  double* Vbd = nullptr;
  int64_t ld;
  Q tol = 0;
  int64_t h = 0, steps = 0, max_steps = 0;
  bool ok = true;
  // The planned chase: block p..h, its running bulge (y, zb), rotation buffers (c entries).
  int64_t p = 0, len = 0;
  Q y = 0, zb = 0, dk_ = 0, ek_ = 0;
  Q *cv, *sv, *cu, *su;  // rotations of the chase, rs apart (interleaved across a group)
  int64_t rs = 1;
  // fillU[k] / fillV[k]: the last row of column k of Ub / Vb that may be nonzero (both start
  // as the identity); g: scratch for rotate_wave's prefix maxima. c entries each.
  int* fillU = nullptr;
  int* fillV = nullptr;
  int* g = nullptr;

  void init() {
    for (int64_t k = 0; k < c; ++k) fillU[k] = fillV[k] = static_cast<int>(k);
    // Deflation at T's precision (what the float matrix holds), but every step in double: in
    // float the O(c^2) rotations of the iteration on B itself reached value errors of ~1e-5
    // of ||A|| at 512 x 512 (LAPACK's float SVD: ~2e-6); in double they are below 1e-7, and
    // the iteration is O(c^2) work next to the O(c^3) of the rest.
    const Q eps = std::numeric_limits<T>::epsilon();
    Q anorm = 0;
    for (int64_t i = 0; i < c; ++i)
      anorm = std::max(anorm, std::abs(d[i]) + (i + 1 < c ? std::abs(e[i]) : Q(0)));
    tol = eps * anorm;
    max_steps = 30 * std::max<int64_t>(c, 1);
    steps = 0;
    ok = true;
    h = c - 1;
    len = 0;
  }

  // Deflate, chase out zero diagonals, and set up the next shifted chase (len > 0); len = 0
  // when the matrix is diagonal or the step cap was reached (ok = false).
  void plan() {
    len = 0;
    if (!ok) return;
    while (h > 0) {
      if (std::abs(e[h - 1]) <= tol) {
        e[h - 1] = 0;
        --h;
        continue;
      }
      int64_t q = h - 1;
      while (q > 0 && std::abs(e[q - 1]) > tol) --q;
      if (q > 0) e[q - 1] = 0;
      int64_t z = -1;
      for (int64_t i = q; i <= h; ++i)
        if (std::abs(d[i]) <= tol) {
          z = i;
          break;
        }
      if (z >= 0) {
        zero_diagonal(q, z);
        continue;
      }
      if (++steps > max_steps) {
        ok = false;
        return;
      }
      // Wilkinson shift: the eigenvalue of the trailing 2 x 2 of B^T B nearer its last entry.
      const Q dm = d[h - 1], em = e[h - 1], dh = d[h];
      const Q t11 = dm * dm + (h - 1 > q ? e[h - 2] * e[h - 2] : Q(0));
      const Q t12 = dm * em, t22 = dh * dh + em * em;
      const Q delta = (t11 - t22) / 2;
      const Q den = delta + std::copysign(std::sqrt(delta * delta + t12 * t12), delta);
      const Q mu = den != 0 ? t22 - t12 * t12 / den : t22;
      p = q;
      len = h - q;
      y = d[p] * d[p] - mu;
      zb = d[p] * e[p];
      dk_ = d[p];
      ek_ = e[p];
      return;
    }
  }

  // A (numerically) zero d[z] in the block q..h: rotate its row's off-diagonal entry out to the
  // right (or, for z = h, the last column's up), which splits the block.
  void zero_diagonal(int64_t q, int64_t z) {
    d[z] = 0;
    Q cs, sn, rr;
    if (z < h) {
      Q f = e[z];
      e[z] = 0;
      for (int64_t j = z + 1; j <= h; ++j) {
        givens(d[j], f, cs, sn, rr);
        d[j] = rr;
        if (j < h) {
          f = -sn * e[j];
          e[j] *= cs;
        }
        if (Ubd) rot(Ubd + j * ld, Ubd + z * ld, c, cs, -sn);
        if (Ub) rot(Ub + j * ld, Ub + z * ld, c, T(cs), T(-sn));
        if (Ub || Ubd) fillU[j] = fillU[z] = std::max(fillU[j], fillU[z]);
        if (f == 0) break;
      }
    } else {
      Q f = e[h - 1];
      e[h - 1] = 0;
      for (int64_t j = h - 1; j >= q; --j) {
        givens(d[j], f, cs, sn, rr);
        d[j] = rr;
        if (j > q) {
          f = -sn * e[j - 1];
          e[j - 1] *= cs;
        }
        if (Vbd) rot(Vbd + j * ld, Vbd + h * ld, c, cs, -sn);
        if (Vb) rot(Vb + j * ld, Vb + h * ld, c, T(cs), T(-sn));
        if (Vb || Vbd) fillV[j] = fillV[h] = std::max(fillV[j], fillV[h]);
        if (f == 0) break;
      }
    }
  }

  // Step i of the planned chase (k = p + i): the column rotation zeroing the bulge against y,
  // then the row rotation zeroing the one below the diagonal.
  inline void step(int64_t i) {
    // d[k] and e[k] as the previous step left them are carried in dk_, ek_ (a store and
    // reload would put store-to-load forwarding on this serial chain).
    const int64_t k = p + i;
    Q cs, sn, rr;
    givens(y, zb, cs, sn, rr);
    if (i > 0) e[k - 1] = rr;
    const Q dk = dk_, ek = ek_, dn = d[k + 1];
    y = cs * dk + sn * ek;
    const Q e1 = cs * ek - sn * dk;
    zb = sn * dn;
    const Q dn1 = cs * dn;
    cv[i * rs] = cs, sv[i * rs] = sn;
    givens(y, zb, cs, sn, rr);
    d[k] = rr;
    const Q ekn = cs * e1 + sn * dn1;
    dk_ = cs * dn1 - sn * e1;
    e[k] = ekn;
    d[k + 1] = dk_;
    if (k + 1 < p + len) {
      const Q en = e[k + 1];
      zb = sn * en;
      ek_ = cs * en;
      y = ekn;
    }
    cu[i * rs] = cs, su[i * rs] = sn;
  }

  void apply() {
    if (Vbd) wave(Vbd, fillV, cv, sv);
    if (Vb) wave(Vb, fillV, cv, sv);
    if (Ubd) wave(Ubd, fillU, cu, su);
    if (Ub) wave(Ub, fillU, cu, su);
  }

  template <typename X_t>
  void wave(X_t* X, int* fill, const Q* cs, const Q* sn) {
    int run = fill[p];
    for (int64_t i = 0; i < len; ++i) g[i] = run = std::max(run, fill[p + i + 1]);
    rotate_wave(X, ld, ld, p, p + len, cs, sn, rs, g);
    for (int64_t i = 0; i < len; ++i) fill[p + i] = g[i];
    fill[p + len] = g[len - 1];
  }
};

#ifdef SC_LINALG_AVX2
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

// Givens rotations of four (f, g) pairs at once; lanes whose f^2 + g^2 is zero or near the
// ends of the range go through the scalar givens() (rare).
template <typename T>
inline void givens4(typename V4<T>::R f, typename V4<T>::R g, typename V4<T>::R& cs,
                    typename V4<T>::R& sn, typename V4<T>::R& r) {
  using V = V4<T>;
  static const T lo = std::sqrt(std::numeric_limits<T>::min()) * 4, hi = 1 / lo;
  static const typename V::R lo2 = V::set1(lo * lo), hi2 = V::set1(hi * hi);
  const auto q = V::fma(f, f, V::mul(g, g));
  if (V::outside(q, lo2, hi2)) {
    alignas(32) T fs[4], gs[4], c4[4], s4[4], r4[4];
    V::store(fs, f), V::store(gs, g);
    for (int l = 0; l < 4; ++l) givens(fs[l], gs[l], c4[l], s4[l], r4[l]);
    cs = V::set(c4[0], c4[1], c4[2], c4[3]);
    sn = V::set(s4[0], s4[1], s4[2], s4[3]);
    r = V::set(r4[0], r4[1], r4[2], r4[3]);
    return;
  }
  r = V::sqrt(q);
  const auto inv = V::div(V::set1(T(1)), r);
  cs = V::mul(f, inv);
  sn = V::mul(g, inv);
}

// Steps 0..common-1 of 4 S planned chases (common <= every lens), one matrix per SIMD lane,
// S sets of four lanes: the square roots and divisions of four chases cost one instruction
// each, and the S sets' serial chains are explicit and independent (in double, one set's
// chain of two Givens rotations per step left the divider idle between its steps). Each
// lane's scalar state is written back for the remaining steps (BidiagQR::step) and its
// rotations are stored lane-interleaved, rs apart (see group_rotation_buffers).
template <typename T, int S>
void chase_sets(BidiagQR<T>* q, int64_t common) {
  using Q = typename BidiagQR<T>::Q;
  using V = V4<Q>;
  using R = typename V::R;
  const int64_t rs = q[0].rs;  // >= 4 S: the group's rotation buffers' lane stride
  alignas(32) Q b[4];
  R y[S], zb[S], dk[S], ek[S], ekn[S];
  Q *d[S][4], *e[S][4];
  for (int t = 0; t < S; ++t) {
    BidiagQR<T>* g = q + 4 * t;
    y[t] = V::set(g[0].y, g[1].y, g[2].y, g[3].y);
    zb[t] = V::set(g[0].zb, g[1].zb, g[2].zb, g[3].zb);
    dk[t] = V::set(g[0].dk_, g[1].dk_, g[2].dk_, g[3].dk_);
    ek[t] = V::set(g[0].ek_, g[1].ek_, g[2].ek_, g[3].ek_);
    ekn[t] = ek[t];
    for (int l = 0; l < 4; ++l) d[t][l] = g[l].d + g[l].p, e[t][l] = g[l].e + g[l].p;
  }
  Q* cv = q[0].cv; Q* sv = q[0].sv; Q* cu = q[0].cu; Q* su = q[0].su;  // lane 0's
  for (int64_t i = 0; i < common; ++i) {
    for (int t = 0; t < S; ++t) {
      R cs, sn, rr;
      givens4<Q>(y[t], zb[t], cs, sn, rr);
      if (i > 0) {
        V::store(b, rr);
        for (int l = 0; l < 4; ++l) e[t][l][i - 1] = b[l];
      }
      const R dn = V::set(d[t][0][i + 1], d[t][1][i + 1], d[t][2][i + 1], d[t][3][i + 1]);
      const R ny = V::fma(cs, dk[t], V::mul(sn, ek[t]));
      const R ee = V::fms(cs, ek[t], V::mul(sn, dk[t]));
      const R nzb = V::mul(sn, dn);
      const R dn1 = V::mul(cs, dn);
      V::store(cv + rs * i + 4 * t, cs), V::store(sv + rs * i + 4 * t, sn);
      givens4<Q>(ny, nzb, cs, sn, rr);
      V::store(b, rr);
      for (int l = 0; l < 4; ++l) d[t][l][i] = b[l];
      ekn[t] = V::fma(cs, ee, V::mul(sn, dn1));
      dk[t] = V::fms(cs, dn1, V::mul(sn, ee));
      const R en = V::set(e[t][0][i + 1], e[t][1][i + 1], e[t][2][i + 1], e[t][3][i + 1]);
      zb[t] = V::mul(sn, en);
      ek[t] = V::mul(cs, en);
      y[t] = ekn[t];
      V::store(cu + rs * i + 4 * t, cs), V::store(su + rs * i + 4 * t, sn);
    }
  }
  for (int t = 0; t < S; ++t) {
    alignas(32) Q ys[4], zs[4], ds[4], es[4], ns[4];
    V::store(ys, y[t]), V::store(zs, zb[t]), V::store(ds, dk[t]), V::store(es, ek[t]);
    V::store(ns, ekn[t]);
    for (int l = 0; l < 4; ++l) {
      BidiagQR<T>& g = q[4 * t + l];
      g.y = ys[l], g.zb = zs[l], g.dk_ = ds[l], g.ek_ = es[l];
      g.e[g.p + common - 1] = ns[l];  // final unless the lane's chase goes on
      g.d[g.p + common] = ds[l];
    }
  }
}
#endif

// QR iterations of G bidiagonals at once: each round plans one chase per matrix and runs the
// chases' steps interleaved, so the out-of-order core overlaps their serial chains (each step
// is two Givens rotations, a sqrt and a division deep; one matrix alone leaves the core idle
// most of the time).
template <typename T, int G>
__attribute__((noinline)) void bidiag_qr_group(BidiagQR<T>* q, int count) {
  for (int g = 0; g < count; ++g) q[g].init();
  for (;;) {
    int64_t most = 0;
    for (int g = 0; g < count; ++g) {
      q[g].plan();
      most = std::max(most, q[g].len);
    }
    if (most == 0) return;
    if (count == G) {
      int64_t common = most;
      for (int g = 0; g < G; ++g) common = std::min(common, q[g].len);
#ifdef SC_LINALG_AVX2
      if constexpr (G % 4 == 0) {
        if (common > 0) chase_sets<T, G / 4>(q, common);
      } else
#endif
      {
        for (int64_t i = 0; i < common; ++i)
          for (int g = 0; g < G; ++g) q[g].step(i);
      }
      for (int64_t i = common; i < most; ++i)
        for (int g = 0; g < G; ++g)
          if (i < q[g].len) q[g].step(i);
    } else {
      for (int64_t i = 0; i < most; ++i)
        for (int g = 0; g < count; ++g)
          if (i < q[g].len) q[g].step(i);
    }
    for (int g = 0; g < count; ++g)
      if (q[g].len > 0) q[g].apply();
  }
}

// Y <- (I - tau v v^T) Y for a row-major block Y (len rows from Y, ld apart; ncols columns,
// a multiple of the SIMD width with readable padding), v = [1, vt...]: s = v^T Y accumulated
// in registers per strip of columns, then Y -= tau v s^T. Row-major keeps every operation a
// straight vector loop over columns, with no horizontal sums (the per-column dot + axpy form
// was a third of the SVD's time at 100 x 100).
template <typename T>
void reflect_rows(T tau, const T* vt, T* Y, int64_t ld, int64_t len, int64_t ncols) {
  int64_t j0 = 0;
#ifdef SC_LINALG_AVX2
  using V = Simd<T>;
  constexpr int W = V::W;
  const auto vtau = V::set1(tau);
  for (; j0 + 4 * W <= ncols; j0 += 4 * W) {
    T* y = Y + j0;
    auto a0 = V::load(y), a1 = V::load(y + W), a2 = V::load(y + 2 * W), a3 = V::load(y + 3 * W);
    for (int64_t i = 1; i < len; ++i) {
      const auto vi = V::set1(vt[i - 1]);
      const T* yi = y + i * ld;
      a0 = V::fma(vi, V::load(yi), a0);
      a1 = V::fma(vi, V::load(yi + W), a1);
      a2 = V::fma(vi, V::load(yi + 2 * W), a2);
      a3 = V::fma(vi, V::load(yi + 3 * W), a3);
    }
    a0 = V::mul(a0, vtau), a1 = V::mul(a1, vtau), a2 = V::mul(a2, vtau), a3 = V::mul(a3, vtau);
    V::store(y, V::sub(V::load(y), a0));
    V::store(y + W, V::sub(V::load(y + W), a1));
    V::store(y + 2 * W, V::sub(V::load(y + 2 * W), a2));
    V::store(y + 3 * W, V::sub(V::load(y + 3 * W), a3));
    for (int64_t i = 1; i < len; ++i) {
      const auto vi = V::set1(vt[i - 1]);
      T* yi = y + i * ld;
      V::store(yi, V::fnma(vi, a0, V::load(yi)));
      V::store(yi + W, V::fnma(vi, a1, V::load(yi + W)));
      V::store(yi + 2 * W, V::fnma(vi, a2, V::load(yi + 2 * W)));
      V::store(yi + 3 * W, V::fnma(vi, a3, V::load(yi + 3 * W)));
    }
  }
  for (; j0 + W <= ncols; j0 += W) {
    T* y = Y + j0;
    auto a0 = V::load(y);
    for (int64_t i = 1; i < len; ++i) a0 = V::fma(V::set1(vt[i - 1]), V::load(y + i * ld), a0);
    a0 = V::mul(a0, vtau);
    V::store(y, V::sub(V::load(y), a0));
    for (int64_t i = 1; i < len; ++i)
      V::store(y + i * ld, V::fnma(V::set1(vt[i - 1]), a0, V::load(y + i * ld)));
  }
#endif
  for (; j0 < ncols; ++j0) {
    T* y = Y + j0;
    T a = y[0];
    for (int64_t i = 1; i < len; ++i) a += vt[i - 1] * y[i * ld];
    a *= tau;
    y[0] -= a;
    for (int64_t i = 1; i < len; ++i) y[i * ld] -= vt[i - 1] * a;
  }
}

// Two reflectors at once on a row-major block Y (len rows, ld apart, ncols columns, a multiple
// of the SIMD width with readable padding): Y <- (I - ta a a^T)(I - tb b b^T) Y, with a and b
// given densely over the len rows (b applied first; zeros where a reflector does not reach).
// s_b = tb b^T Y, s_a = ta (a^T Y - (a . b) s_b), Y -= b s_b^T + a s_a^T: one read pass and
// one update pass for two reflectors, half the memory traffic of reflect_rows twice.
template <typename T>
void reflect_rows_pair(T ta, const T* a, T tb, const T* b, T* Y, int64_t ld, int64_t len,
                       int64_t ncols) {
  T ab = 0;
  for (int64_t i = 0; i < len; ++i) ab += a[i] * b[i];
  int64_t j0 = 0;
#ifdef SC_LINALG_AVX2
  using V = Simd<T>;
  constexpr int W = V::W;
  const auto vta = V::set1(ta), vtb = V::set1(tb), vab = V::set1(ab);
  for (; j0 + 4 * W <= ncols; j0 += 4 * W) {
    T* y = Y + j0;
    auto pa0 = V::zero(), pa1 = V::zero(), pa2 = V::zero(), pa3 = V::zero();
    auto pb0 = V::zero(), pb1 = V::zero(), pb2 = V::zero(), pb3 = V::zero();
    for (int64_t i = 0; i < len; ++i) {
      const auto ai = V::set1(a[i]), bi = V::set1(b[i]);
      const T* yi = y + i * ld;
      const auto y0 = V::load(yi), y1 = V::load(yi + W), y2 = V::load(yi + 2 * W),
                 y3 = V::load(yi + 3 * W);
      pa0 = V::fma(ai, y0, pa0), pa1 = V::fma(ai, y1, pa1);
      pa2 = V::fma(ai, y2, pa2), pa3 = V::fma(ai, y3, pa3);
      pb0 = V::fma(bi, y0, pb0), pb1 = V::fma(bi, y1, pb1);
      pb2 = V::fma(bi, y2, pb2), pb3 = V::fma(bi, y3, pb3);
    }
    pb0 = V::mul(vtb, pb0), pb1 = V::mul(vtb, pb1), pb2 = V::mul(vtb, pb2), pb3 = V::mul(vtb, pb3);
    pa0 = V::mul(vta, V::fnma(vab, pb0, pa0)), pa1 = V::mul(vta, V::fnma(vab, pb1, pa1));
    pa2 = V::mul(vta, V::fnma(vab, pb2, pa2)), pa3 = V::mul(vta, V::fnma(vab, pb3, pa3));
    for (int64_t i = 0; i < len; ++i) {
      const auto ai = V::set1(a[i]), bi = V::set1(b[i]);
      T* yi = y + i * ld;
      V::store(yi, V::fnma(ai, pa0, V::fnma(bi, pb0, V::load(yi))));
      V::store(yi + W, V::fnma(ai, pa1, V::fnma(bi, pb1, V::load(yi + W))));
      V::store(yi + 2 * W, V::fnma(ai, pa2, V::fnma(bi, pb2, V::load(yi + 2 * W))));
      V::store(yi + 3 * W, V::fnma(ai, pa3, V::fnma(bi, pb3, V::load(yi + 3 * W))));
    }
  }
  for (; j0 + W <= ncols; j0 += W) {
    T* y = Y + j0;
    auto pa0 = V::zero(), pa1 = V::zero(), pb0 = V::zero(), pb1 = V::zero();
    int64_t i = 0;
    for (; i + 1 < len; i += 2) {  // two chains each: this strip is latency-bound otherwise
      const auto y0 = V::load(y + i * ld), y1 = V::load(y + (i + 1) * ld);
      pa0 = V::fma(V::set1(a[i]), y0, pa0), pb0 = V::fma(V::set1(b[i]), y0, pb0);
      pa1 = V::fma(V::set1(a[i + 1]), y1, pa1), pb1 = V::fma(V::set1(b[i + 1]), y1, pb1);
    }
    if (i < len) {
      const auto y0 = V::load(y + i * ld);
      pa0 = V::fma(V::set1(a[i]), y0, pa0), pb0 = V::fma(V::set1(b[i]), y0, pb0);
    }
    const auto sb = V::mul(vtb, V::add(pb0, pb1));
    const auto sa = V::mul(vta, V::fnma(vab, sb, V::add(pa0, pa1)));
    for (i = 0; i < len; ++i) {
      T* yi = y + i * ld;
      V::store(yi, V::fnma(V::set1(a[i]), sa, V::fnma(V::set1(b[i]), sb, V::load(yi))));
    }
  }
#endif
  for (; j0 < ncols; ++j0) {
    T* y = Y + j0;
    T pa = 0, pb = 0;
    for (int64_t i = 0; i < len; ++i) pa += a[i] * y[i * ld], pb += b[i] * y[i * ld];
    const T sb = tb * pb, sa = ta * (pa - ab * sb);
    for (int64_t i = 0; i < len; ++i) y[i * ld] -= a[i] * sa + b[i] * sb;
  }
}

// Y (row-major, rows first..first+len-1 touched) <- H_0 H_1 ... H_{nref-1} Y for reflectors
// H_j = I - tau[j] v_j v_j^T acting on rows off + j.. (v_j = [1, tail_j...], tail_j at
// tails + j * tail_ld), applied last to first, two at a time.
template <typename T>
void apply_reflectors_rows(const T* tau, const T* tails, int64_t tail_ld, int64_t nref,
                           int64_t off, int64_t total, T* Y, int64_t ld, int64_t ncols,
                           T* buf) {
  int64_t j = nref - 1;
  for (; j >= 1; j -= 2) {
    // Pair (j applied first, then j - 1), both over rows off + j - 1 .. total - 1.
    const int64_t row0 = off + j - 1, len = total - row0;
    if (tau[j] == 0 && tau[j - 1] == 0) continue;
    T* a = buf;
    T* b = buf + len;
    a[0] = 1;
    std::copy_n(tails + (j - 1) * tail_ld, len - 1, a + 1);
    b[0] = 0;
    b[1] = 1;
    std::copy_n(tails + j * tail_ld, len - 2, b + 2);
    reflect_rows_pair(tau[j - 1], a, tau[j], b, Y + row0 * ld, ld, len, ncols);
  }
  if (j == 0 && tau[0] != 0)
    reflect_rows(tau[0], tails, Y + off * ld, ld, total - off, ncols);
}

// Point a QR state at a workspace's bidiagonal (d, e) and factors (left / right: kept, starting
// as the identity).
template <typename T>
void attach_qr(BidiagQR<T>& q, BidiagWork<T>& w, bool left, bool right) {
  q.d = w.d.data();
  q.e = w.e.data();
  q.c = w.c;
  w.start_factors(q, left, right);
  q.ld = w.ldc;
  q.fillU = w.fills.data();
  q.fillV = q.fillU + w.c;
  q.g = q.fillV + w.c;
}

// Phase 1 for one matrix: load A (m x n, row-major) as the r x c column-major M (A or A^T,
// scaled to max |entry| = 1), bidiagonalise, set up the QR state. kNonFinite on NaN / Inf.
template <typename T>
int bidiag_load(const T* A, int64_t m, int64_t n, BidiagWork<T>& w, BidiagQR<T>& q,
                bool vectors) {
  const int64_t r = w.r, c = w.c, ldr = w.ldr;
  T amax = 0;
  for (int64_t i = 0; i < m * n; ++i) {
    if (!std::isfinite(A[i])) return kNonFinite;
    amax = std::max(amax, std::abs(A[i]));
  }
  w.amax = amax;
  const T scale = amax > 0 ? 1 / amax : T(1);
  T* M = w.M.data();
  if (m <= n) {  // A^T is A read column-major: no transpose (square A included)
    for (int64_t j = 0; j < c; ++j)
      for (int64_t i = 0; i < r; ++i) M[j * ldr + i] = A[j * n + i] * scale;
  } else {
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < c; ++j) M[j * ldr + i] = A[i * n + j] * scale;
  }
  bidiagonalize(w, vectors);
  attach_qr(q, w, vectors, vectors);
  return kOk;
}

// Phase 3 for one matrix once its bidiagonal is diagonal: values non-negative (a sign moves
// into V) and descending (stable sort); with vectors, U = Q_L [Ub; 0] and V = P_R Vb built
// row-major in Y (r x c) and Z (c x c) (column i = vector i), then written out with the sign
// convention (largest-|.| entry of each left vector positive).
template <typename T>
void bidiag_finish(BidiagWork<T>& w, int64_t m, int64_t n, T* U, T* S, T* Vh, T* Y, T* Z) {
  const bool vectors = U != nullptr;
  const int64_t r = w.r, c = w.c, ldc = w.ldc, k = c;
  T* sgn = w.sig.data();
  for (int64_t i = 0; i < c; ++i) {
    sgn[i] = 1;
    if (w.d[i] < 0) w.d[i] = -w.d[i], sgn[i] = -1;
  }
  std::vector<int>& ord = w.ord;
  stable_order(ord, [&](int a, int b) { return w.d[a] > w.d[b]; });
  for (int64_t i = 0; i < k; ++i) S[i] = w.d[ord[i]] * w.amax;
  if (!vectors) return;
  w.finish_factors();
  const T* Ub = w.Ub.data();
  const T* Vb = w.Vb.data();
  // Left: reflectors applied last to first (reflector k touches rows >= k).
  std::fill(Y, Y + r * ldc, T(0));
  for (int64_t i = 0; i < c; ++i) {
    const T* ub = Ub + ord[i] * ldc;
    for (int64_t j = 0; j < c; ++j) Y[j * ldc + i] = ub[j];
  }
  const T* M = w.M.data();
  apply_reflectors_rows(w.tauL.data(), M + 1, w.ldr + 1, c, 0, r, Y, ldc, ldc, w.pair.data());
  // Right: right reflector j acts on entries j+1..c-1.
  std::fill(Z, Z + c * ldc, T(0));
  for (int64_t i = 0; i < c; ++i) {
    const T* vb = Vb + ord[i] * ldc;
    const T sg = sgn[ord[i]];
    for (int64_t j = 0; j < c; ++j) Z[j * ldc + i] = sg * vb[j];
  }
  if (c > 1)
    apply_reflectors_rows(w.tauR.data(), w.Pu.data(), ldc, c - 1, 1, c, Z, ldc, ldc,
                          w.pair.data());
  // A = M (Y: left, Z: right) or M^T (Z: left, Y: right).
  const bool trans = m <= n;  // as in bidiag_load
  const T* Lm = trans ? Z : Y;
  const T* Rm = trans ? Y : Z;
  T* sg = w.row.data();
  T* best = w.wv.data();
  std::fill(best, best + k, T(-1));
  for (int64_t j = 0; j < m; ++j)
    for (int64_t i = 0; i < k; ++i) {
      const T v = Lm[j * ldc + i];
      if (std::abs(v) > best[i]) best[i] = std::abs(v), sg[i] = v < 0 ? T(-1) : T(1);
    }
  for (int64_t j = 0; j < m; ++j)
    for (int64_t i = 0; i < k; ++i) U[j * k + i] = sg[i] * Lm[j * ldc + i];
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < k; ++i) Vh[i * n + j] = sg[i] * Rm[j * ldc + i];
}


// eigh through the same kernel, for the sizes where Jacobi sweeps lose to LAPACK: B = S + c I
// with the Gershgorin bound c >= -lambda_min (B positive semi-definite, so its SVD is its
// eigendecomposition); only B's left vectors are accumulated, and the eigenvalues are their
// Rayleigh quotients with S (error ~ eps ||S||, the shift does not enter).
template <typename T>
int eigh_bidiag_load(const T* A, int64_t n, bool lower, BidiagWork<T>& w, BidiagQR<T>& q,
                     T* Sym) {
  const int64_t ldr = w.ldr, ldc = w.ldc;
  T amax;
  if (symmetric_from_triangle(A, n, lower, Sym, ldc, amax) != kOk) return kNonFinite;
  w.amax = amax;
  const T scale = amax > 0 ? 1 / amax : T(1);
  T shift = 0;
  for (int64_t i = 0; i < n; ++i) {
    T* row = Sym + i * ldc;
    T off = 0;
    for (int64_t j = 0; j < n; ++j) {
      row[j] *= scale;
      if (j != i) off += std::abs(row[j]);
    }
    shift = std::max(shift, off - row[i]);
  }
  T* M = w.M.data();
  for (int64_t j = 0; j < n; ++j) {  // symmetric: row j of Sym is column j of B
    std::copy_n(Sym + j * ldc, n, M + j * ldr);
    M[j * ldr + j] += shift;
  }
  bidiagonalize(w, false);
  attach_qr(q, w, true, false);
  return kOk;
}

// Eigenvectors Y = Q_L Ub (row-major n x ldc, column i = vector i), their Rayleigh quotients
// with Sym, ascending order, sign convention, output.
template <typename T>
void eigh_bidiag_finish(BidiagWork<T>& w, int64_t n, T* L, T* Qo, T* Y, const T* Sym) {
  const int64_t ldc = w.ldc;
  w.finish_factors();
  std::fill(Y, Y + n * ldc, T(0));
  for (int64_t i = 0; i < n; ++i) {
    const T* ub = w.Ub.data() + i * ldc;
    for (int64_t j = 0; j < n; ++j) Y[j * ldc + i] = ub[j];
  }
  apply_reflectors_rows(w.tauL.data(), w.M.data() + 1, w.ldr + 1, n, 0, n, Y, ldc, ldc,
                        w.pair.data());
  // lam_i = sum_j Y[j][i] (Sym Y)[j][i]: (Sym Y) is formed a strip of columns and two rows at
  // a time in registers, never stored.
  T* lam = w.wv.data();  // ldr >= ldc entries
  std::fill(lam, lam + ldc, T(0));
  int64_t j = 0;
#ifdef SC_LINALG_AVX2
  using V = Simd<T>;
  constexpr int W = V::W;
  for (int64_t i0 = 0; i0 < ldc; i0 += 2 * W) {
    const bool two = i0 + 2 * W <= ldc;
    auto l0 = V::zero(), l1 = V::zero();
    for (j = 0; j < n; j += 2) {
      const bool pair = j + 1 < n;
      const T* s0 = Sym + j * ldc;
      const T* s1 = pair ? s0 + ldc : s0;
      auto a0 = V::zero(), a1 = V::zero(), b0 = V::zero(), b1 = V::zero();
      for (int64_t t = 0; t < n; ++t) {
        const T* yt = Y + t * ldc + i0;
        const auto y0 = V::load(yt), y1 = two ? V::load(yt + W) : V::zero();
        const auto c0 = V::set1(s0[t]), c1 = V::set1(s1[t]);
        a0 = V::fma(c0, y0, a0), a1 = V::fma(c0, y1, a1);
        b0 = V::fma(c1, y0, b0), b1 = V::fma(c1, y1, b1);
      }
      const T* yj = Y + j * ldc + i0;
      l0 = V::fma(V::load(yj), a0, l0);
      if (two) l1 = V::fma(V::load(yj + W), a1, l1);
      if (pair) {
        l0 = V::fma(V::load(yj + ldc), b0, l0);
        if (two) l1 = V::fma(V::load(yj + ldc + W), b1, l1);
      }
    }
    V::store(lam + i0, l0);
    if (two) V::store(lam + i0 + W, l1);
  }
#else
  std::vector<T> trow(ldc);
  for (j = 0; j < n; ++j) {
    std::fill(trow.begin(), trow.end(), T(0));
    for (int64_t t = 0; t < n; ++t) axpy(Sym[j * ldc + t], Y + t * ldc, trow.data(), ldc);
    for (int64_t i = 0; i < ldc; ++i) lam[i] += Y[j * ldc + i] * trow[i];
  }
#endif
  std::vector<int>& o = w.ord;
  stable_order(o, [&](int a, int b) { return lam[a] < lam[b]; });
  T* sg = w.row.data();
  T* best = w.sig.data();
  std::fill(best, best + n, T(-1));
  for (j = 0; j < n; ++j)
    for (int64_t i = 0; i < n; ++i) {
      const T v = Y[j * ldc + i];
      if (std::abs(v) > best[i]) best[i] = std::abs(v), sg[i] = v < 0 ? T(-1) : T(1);
    }
  for (int64_t i = 0; i < n; ++i) L[i] = lam[o[i]] * w.amax;
  for (j = 0; j < n; ++j)
    for (int64_t i = 0; i < n; ++i) Qo[j * n + i] = sg[o[i]] * Y[j * ldc + o[i]];
}

#ifdef SC_LINALG_AVX2
// Small matrices (max(m, n) <= kSmallMax): one SIMD lane per matrix. A group of W matrices
// (8 float / 4 double) is stored interleaved, entry (i, j) of all W matrices in one vector,
// and plain cyclic one-sided Jacobi runs on all lanes at once: the rotation parameters
// (sqrt, divisions) are computed for W matrices per instruction and a converged lane just
// gets the identity rotation. At 16 x 16 the per-matrix path spends most of its time on
// that scalar per-pair work; this one was ~3.7x faster there on 4000 x 16 x 16 float32.
constexpr int64_t kSmallMax = 32;

template <typename T>
struct SmallWork {
  static constexpr int W = Simd<T>::W;
  int64_t r, c;
  std::vector<T> X, V, d, sigv, rank, Z, Vc, sig, sig_sorted;
  std::vector<int> ord;
  // Round-robin (tournament) order: consecutive pairs share no column, so the out-of-order
  // core overlaps one pair's sqrt/div chain with the next pair's dot products (the cyclic
  // row order serialises them; this order measured ~2x faster at 16 x 16).
  std::vector<std::pair<int, int>> pairs;
  std::vector<int> round_start;  // pairs[round_start[k] .. round_start[k + 1]) = round k
  int64_t bad_lane = 0;  // the matrix of the group that a non-OK status refers to
  SmallWork(int64_t r_, int64_t c_, bool vectors)
      : r(r_), c(c_), X(r_ * c_ * W), V(vectors ? c_ * c_ * W : 0), d(c_ * W), sigv(c_ * W),
        rank(c_ * W), Z(r_ * c_),
        Vc(c_ * c_), sig(c_), sig_sorted(c_), ord(c_) {
    const int N = static_cast<int>(c_ + (c_ & 1));  // an odd count gets a bye (index c_)
    std::vector<int> arr(N);
    std::iota(arr.begin(), arr.end(), 0);
    for (int round = 0; round + 1 < N; ++round) {
      round_start.push_back(static_cast<int>(pairs.size()));
      for (int i = 0; i < N / 2; ++i) {
        const int a = arr[i], b = arr[N - 1 - i];
        if (a < c_ && b < c_) pairs.emplace_back(std::min(a, b), std::max(a, b));
      }
      std::rotate(arr.begin() + 1, arr.end() - 1, arr.end());
    }
    round_start.push_back(static_cast<int>(pairs.size()));
  }
};

// SVD of `count` <= W matrices A[g] (m x n, row-major, consecutive) at once.
// RC > 0: compiled for r = c = RC (the loops' trip counts known, fully unrolled).
template <typename T, int RC>
int svd_small_group_impl(const T* A, int64_t m, int64_t n, int64_t count, T* U, T* S, T* Vh,
                         SmallWork<T>& w) {
  using Vt = Simd<T>;
  using R = typename Vt::R;
  constexpr int W = Vt::W;
  const bool vectors = U != nullptr, trans = m < n;
  const int64_t r = RC ? RC : w.r, c = RC ? RC : w.c, k = c;
  T amax[W];
  for (int l = 0; l < W; ++l) {
    amax[l] = 0;
    if (l >= count) continue;
    const T* a = A + l * m * n;
    // max |a_i| in SIMD; x * 0 is NaN exactly for a NaN or infinite x, and sums to 0 else.
    const int64_t mn = m * n, mv = mn / W * W;
    R vmax = Vt::zero(), bad = Vt::zero();
    for (int64_t i = 0; i < mv; i += W) {
      const R x = Vt::load(a + i);
      vmax = Vt::max(vmax, Vt::abs(x));
      bad = Vt::add(bad, Vt::mul(x, Vt::zero()));
    }
    T vm[W], vb[W];
    Vt::store(vm, vmax);
    Vt::store(vb, bad);
    T nonfinite = 0;
    for (int e = 0; e < W; ++e) {
      amax[l] = std::max(amax[l], vm[e]);
      nonfinite += vb[e];
    }
    for (int64_t i = mv; i < mn; ++i) {
      amax[l] = std::max(amax[l], std::abs(a[i]));
      nonfinite += a[i] * 0;
    }
    if (nonfinite != 0) {  // NaN
      w.bad_lane = l;
      return kNonFinite;
    }
  }
  // X[(j * r + i) * W + l] = M_l(i, j), M = A or A^T (r >= c), scaled to max |entry| = 1.
  T* X = w.X.data();
  for (int l = 0; l < W; ++l) {
    const T sc = amax[l] > 0 ? 1 / amax[l] : T(0);
    const T* a = A + l * m * n;
    for (int64_t j = 0; j < c; ++j)
      for (int64_t i = 0; i < r; ++i)
        X[(j * r + i) * W + l] = l < count ? (trans ? a[j * n + i] : a[i * n + j]) * sc : T(0);
  }
  T* V = w.V.data();
  if (vectors) {
    std::fill(w.V.begin(), w.V.end(), T(0));
    for (int64_t j = 0; j < c; ++j)
      for (int l = 0; l < W; ++l) V[(j * c + j) * W + l] = 1;
  }
  const T eps = std::numeric_limits<T>::epsilon();
  const T tol = eps * std::sqrt(T(std::max<int64_t>(r, 4)));
  const R tol2 = Vt::set1(tol * tol), one = Vt::set1(1), zero = Vt::zero();
  T* d = w.d.data();
  for (int64_t j = 0; j < c; ++j) {
    R acc = zero;
    for (int64_t i = 0; i < r; ++i) {
      const R x = Vt::load(X + (j * r + i) * W);
      acc = Vt::fma(x, x, acc);
    }
    Vt::store(d + j * W, acc);
  }
  bool converged = false;
  const T tiny = tiny_ratio<T>(c);
  const R tiny2 = Vt::set1(tiny * tiny);
  for (int sweep = 0; sweep < 30 && !converged; ++sweep) {
    R rotated = zero;
    R dmax = zero;
    for (int64_t j = 0; j < c; ++j) dmax = Vt::max(dmax, Vt::load(d + j * W));
    const R floor2 = Vt::mul(tiny2, dmax);  // see jacobi(): tiny columns are left out
    // K pairs of one round at a time (disjoint columns): their dot products, then their
    // rotation parameters, then their rotations, so that the K sqrt / division chains overlap
    // (one pair's chain is most of its time at 16 x 16).
    const auto run = [&]<int K>(int pi) {
      T* xs[K][2];
      R g[K], ap[K], aq[K], mask[K];
      bool any = false;
      for (int k = 0; k < K; ++k) {
        const auto [p, q] = w.pairs[pi + k];
        xs[k][0] = X + p * r * W;
        xs[k][1] = X + q * r * W;
        R g0 = zero, g1 = zero;
        int64_t i = 0;
        for (; i + 1 < r; i += 2) {
          g0 = Vt::fma(Vt::load(xs[k][0] + i * W), Vt::load(xs[k][1] + i * W), g0);
          g1 = Vt::fma(Vt::load(xs[k][0] + (i + 1) * W), Vt::load(xs[k][1] + (i + 1) * W), g1);
        }
        if (i < r) g0 = Vt::fma(Vt::load(xs[k][0] + i * W), Vt::load(xs[k][1] + i * W), g0);
        g[k] = Vt::add(g0, g1);
        ap[k] = Vt::load(d + p * W);
        aq[k] = Vt::load(d + q * W);
        mask[k] = Vt::band(Vt::gt(Vt::mul(g[k], g[k]), Vt::mul(tol2, Vt::mul(ap[k], aq[k]))),
                           Vt::band(Vt::gt(ap[k], floor2), Vt::gt(aq[k], floor2)));
        any = any || Vt::any(mask[k]);
      }
      if (!any) return;
      R cs[K], sn[K];
      for (int k = 0; k < K; ++k) {
        rotated = Vt::bor(rotated, mask[k]);
        // t = sign(zeta) / (|zeta| + sqrt(1 + zeta^2)), zeta = (aq - ap) / (2 g), written with
        // one division: t = sign(aq - ap) 2 g / (|aq - ap| + sqrt((aq - ap)^2 + 4 g^2)).
        const R delta = Vt::sub(aq[k], ap[k]), g2 = Vt::add(g[k], g[k]);
        const R den = Vt::add(Vt::abs(delta), Vt::sqrt(Vt::fma(delta, delta, Vt::mul(g2, g2))));
        const R t = Vt::blend(zero, Vt::div(Vt::xorsign(g2, delta), den), mask[k]);
        cs[k] = Vt::div(one, Vt::sqrt(Vt::fma(t, t, one)));  // 1 where t = 0: no rotation
        sn[k] = Vt::mul(cs[k], t);
      }
      for (int k = 0; k < K; ++k) {
        if (!Vt::any(mask[k])) continue;
        const auto [p, q] = w.pairs[pi + k];
        T* xp = xs[k][0];
        T* xq = xs[k][1];
        R np0 = zero, nq0 = zero, np1 = zero, nq1 = zero;
        for (int64_t i = 0; i < r; ++i) {
          const R x = Vt::load(xp + i * W), y = Vt::load(xq + i * W);
          const R x2 = Vt::fnma(sn[k], y, Vt::mul(cs[k], x));
          const R y2 = Vt::fma(sn[k], x, Vt::mul(cs[k], y));
          Vt::store(xp + i * W, x2);
          Vt::store(xq + i * W, y2);
          if (i & 1) {
            np1 = Vt::fma(x2, x2, np1);
            nq1 = Vt::fma(y2, y2, nq1);
          } else {
            np0 = Vt::fma(x2, x2, np0);
            nq0 = Vt::fma(y2, y2, nq0);
          }
        }
        Vt::store(d + p * W, Vt::add(np0, np1));
        Vt::store(d + q * W, Vt::add(nq0, nq1));
        if (vectors) {
          T* vp = V + p * c * W;
          T* vq = V + q * c * W;
          for (int64_t i = 0; i < c; ++i) {
            const R x = Vt::load(vp + i * W), y = Vt::load(vq + i * W);
            Vt::store(vp + i * W, Vt::fnma(sn[k], y, Vt::mul(cs[k], x)));
            Vt::store(vq + i * W, Vt::fma(sn[k], x, Vt::mul(cs[k], y)));
          }
        }
      }
    };
    constexpr int kPairs = 4;
    for (size_t rd = 0; rd + 1 < w.round_start.size(); ++rd) {
      int pi = w.round_start[rd];
      const int end = w.round_start[rd + 1];
      for (; pi + kPairs <= end; pi += kPairs) run.template operator()<kPairs>(pi);
      for (; pi + 2 <= end; pi += 2) run.template operator()<2>(pi);
      if (pi < end) run.template operator()<1>(pi);
    }
    converged = !Vt::any(rotated);
  }
  int status = kOk;
  if (!converged) {  // accept a sweep cap reached within 64 tol of orthogonality
    for (int l = 0; l < count; ++l) {
      T worst = 0, dm = 0;
      for (int64_t j = 0; j < c; ++j) dm = std::max(dm, d[j * W + l]);
      for (int64_t p = 0; p < c; ++p)
        for (int64_t q = p + 1; q < c; ++q) {
          T g = 0;
          for (int64_t i = 0; i < r; ++i) g += X[(p * r + i) * W + l] * X[(q * r + i) * W + l];
          const T den = std::sqrt(d[p * W + l]) * std::sqrt(d[q * W + l]);
          if (std::min(d[p * W + l], d[q * W + l]) > tiny * tiny * dm)
            worst = std::max(worst, std::abs(g) / den);
        }
      if (worst > 64 * tol) {
        w.bad_lane = l;
        status = kNoConvergence;
      }
    }
  }
  // The values, and their stable descending order as ranks computed for all lanes at once:
  // rank_j = #{i < j: s_i >= s_j} + #{i > j: s_i > s_j} (branch-free; an insertion sort per
  // lane was a visible part of the 16 x 16 time).
  T* sv = w.sigv.data();
  T* rk = w.rank.data();
  // d holds each column's squared norm, recomputed by every rotation that touched it.
  for (int64_t j = 0; j < c; ++j) Vt::store(sv + j * W, Vt::sqrt(Vt::load(d + j * W)));
  for (int64_t j = 0; j < c; ++j) {
    const R sj = Vt::load(sv + j * W);
    R acc = zero;
    for (int64_t i = 0; i < j; ++i) acc = Vt::add(acc, Vt::band(Vt::ge(Vt::load(sv + i * W), sj), one));
    for (int64_t i = j + 1; i < c; ++i)
      acc = Vt::add(acc, Vt::band(Vt::gt(Vt::load(sv + i * W), sj), one));
    Vt::store(rk + j * W, acc);
  }
  // With vectors, lanes where no value is small (<= 2 tiny sigma_max) are finished in the
  // interleaved layout: left columns normalised and both sides' signs set (largest-magnitude
  // entry of each left vector positive) for all lanes at once. The others (rank-deficient,
  // zero) need fix_columns and take the per-lane path below on the untouched X, V.
  int fix_lanes = 0;
  if (vectors) {
    R smax = zero;
    for (int64_t j = 0; j < c; ++j) smax = Vt::max(smax, Vt::load(sv + j * W));
    const R small = Vt::mul(smax, Vt::set1(2 * tiny));
    R fix = zero;
    for (int64_t j = 0; j < c; ++j) fix = Vt::bor(fix, Vt::ge(small, Vt::load(sv + j * W)));
    fix_lanes = Vt::movemask(fix);
    const R minus = Vt::set1(-1);
    for (int64_t j = 0; j < c; ++j) {
      T* x = X + j * r * W;
      T* v = V + j * c * W;
      // Sign of the left vector's first largest-magnitude entry (M's left vectors are X's
      // columns, or V's for a transposed wide matrix).
      const T* lead = trans ? v : x;
      R best = Vt::abs(Vt::load(lead)), val = Vt::load(lead);
      for (int64_t e = 1; e < (trans ? c : r); ++e) {
        const R y = Vt::load(lead + e * W), ay = Vt::abs(y), gtm = Vt::gt(ay, best);
        best = Vt::blend(best, ay, gtm);
        val = Vt::blend(val, y, gtm);
      }
      const R sg = Vt::blend(Vt::blend(one, minus, Vt::gt(zero, val)), one, fix);
      const R mx = Vt::blend(Vt::div(sg, Vt::load(sv + j * W)), one, fix);
      for (int64_t e = 0; e < r; ++e) Vt::store(x + e * W, Vt::mul(Vt::load(x + e * W), mx));
      for (int64_t e = 0; e < c; ++e) Vt::store(v + e * W, Vt::mul(Vt::load(v + e * W), sg));
    }
  }
  std::vector<int>& ord = w.ord;
  for (int l = 0; l < count; ++l) {
    for (int64_t j = 0; j < c; ++j) {
      w.sig[j] = sv[j * W + l];
      ord[static_cast<int64_t>(rk[j * W + l])] = static_cast<int>(j);
    }
    T* Sl = S + l * k;
    for (int64_t i = 0; i < k; ++i) Sl[i] = w.sig[ord[i]] * amax[l];
    if (!vectors) continue;
    T* Ul = U + l * m * k;
    T* Vhl = Vh + l * k * n;
    if (!((fix_lanes >> l) & 1)) {
      // Finished above: gather lane l's columns in sorted order.
      const T* Lm = trans ? V : X;
      const T* Rm = trans ? X : V;
      const int64_t ldl = (trans ? c : r) * W, ldrr = (trans ? r : c) * W;
      for (int64_t i = 0; i < k; ++i) {
        const T* u = Lm + ord[i] * ldl + l;
        const T* v = Rm + ord[i] * ldrr + l;
        for (int64_t j = 0; j < m; ++j) Ul[j * k + i] = u[j * W];
        for (int64_t j = 0; j < n; ++j) Vhl[i * n + j] = v[j * W];
      }
      continue;
    }
    // Columns of M's left vectors (Z, r x c) and right vectors (Vc, c x c), sorted.
    for (int64_t i = 0; i < c; ++i) {
      const int j = ord[i];
      const T inv = w.sig[j] > 0 ? 1 / w.sig[j] : T(0);
      for (int64_t e = 0; e < r; ++e) w.Z[i * r + e] = X[(j * r + e) * W + l] * inv;
      for (int64_t e = 0; e < c; ++e) w.Vc[i * c + e] = V[(j * c + e) * W + l];
    }
    const T small = w.sig[ord[0]] * 2 * tiny;
    for (int64_t i = 0; i < c; ++i) w.sig_sorted[i] = w.sig[ord[i]];
    fix_columns(w.Z.data(), r, r, c, w.sig_sorted.data(), small);
    const T* Lm = trans ? w.Vc.data() : w.Z.data();
    const T* Rm = trans ? w.Z.data() : w.Vc.data();
    const int64_t ldl = trans ? c : r, ldrr = trans ? r : c;
    for (int64_t i = 0; i < k; ++i) {
      const T* u = Lm + i * ldl;
      const T* v = Rm + i * ldrr;
      const T sg = u[argmax_abs(u, m, 1)] < 0 ? T(-1) : T(1);
      for (int64_t j = 0; j < m; ++j) Ul[j * k + i] = sg * u[j];
      for (int64_t j = 0; j < n; ++j) Vhl[i * n + j] = sg * v[j];
    }
  }
  return status;
}

template <typename T>
int svd_small_group(const T* A, int64_t m, int64_t n, int64_t count, T* U, T* S, T* Vh,
                    SmallWork<T>& w) {
  if (w.r == 16 && w.c == 16) return svd_small_group_impl<T, 16>(A, m, n, count, U, S, Vh, w);
  return svd_small_group_impl<T, 0>(A, m, n, count, U, S, Vh, w);
}

// Symmetric eigh of `count` <= W small matrices: the SVD of B = S + c I (Gershgorin c, as in
// eigh_one) on the SIMD-across-batch path, then Rayleigh quotients of the left vectors.
template <typename T>
int eigh_small_group(const T* A, int64_t n, int64_t count, bool lower, T* L, T* Qo,
                     SmallWork<T>& w, std::vector<T>& buf) {
  constexpr int W = Simd<T>::W;
  const int64_t nn = n * n;
  T* B = buf.data();
  T* Sym = B + W * nn;
  T* U = Sym + W * nn;
  T* Vh = U + W * nn;
  T* S = Vh + W * nn;
  for (int64_t l = 0; l < count; ++l) {
    const T* a = A + l * nn;
    T* sy = Sym + l * nn;
    T amax;  // unused: the SVD scales B itself
    if (symmetric_from_triangle(a, n, lower, sy, n, amax) != kOk) {
      w.bad_lane = l;
      return kNonFinite;
    }
    T shift = 0;
    for (int64_t i = 0; i < n; ++i) {
      T off = 0;
      for (int64_t j = 0; j < n; ++j)
        if (j != i) off += std::abs(sy[i * n + j]);
      shift = std::max(shift, off - sy[i * n + i]);
    }
    std::copy_n(sy, nn, B + l * nn);
    for (int64_t i = 0; i < n; ++i) B[l * nn + i * n + i] += shift;
  }
  const int status = svd_small_group(B, n, n, count, U, S, Vh, w);
  if (status == kNonFinite) return status;
  T* lam = w.d.data();
  std::vector<int>& o = w.ord;
  for (int64_t l = 0; l < count; ++l) {
    const T* u = U + l * nn;  // row-major n x n, eigenvector i = column i
    const T* sy = Sym + l * nn;
    for (int64_t i = 0; i < n; ++i) {
      T acc = 0;
      for (int64_t j = 0; j < n; ++j) {
        T sj = 0;
        for (int64_t e = 0; e < n; ++e) sj += sy[j * n + e] * u[e * n + i];
        acc += u[j * n + i] * sj;
      }
      lam[i] = acc;
    }
    stable_order(o, [&](int x, int y) { return lam[x] < lam[y]; });
    for (int64_t i = 0; i < n; ++i) {
      L[l * n + i] = lam[o[i]];
      for (int64_t j = 0; j < n; ++j) Qo[l * nn + j * n + i] = u[j * n + o[i]];
    }
  }
  return status;
}
#endif

void raise_status(const char* op, std::atomic<int64_t>& bad_conv, std::atomic<int64_t>& bad_val,
                  int sweeps) {
  TORCH_CHECK(bad_val.load() < 0, "sparsecore::", op, ": input matrix ", bad_val.load(),
              " of the (flattened) batch contains NaN or Inf");
  TORCH_CHECK(bad_conv.load() < 0, "sparsecore::", op, ": Jacobi did not converge in ", sweeps,
              " sweeps for matrix ", bad_conv.load(), " of the (flattened) batch");
}

void note(int status, int64_t b, std::atomic<int64_t>& bad_conv, std::atomic<int64_t>& bad_val) {
  if (status == kNonFinite) bad_val.store(b);
  if (status == kNoConvergence) bad_conv.store(b);
}

int num_threads_for(int64_t batch) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch)));
}

// One matrix per OpenMP iteration; each thread keeps one workspace for the whole batch.
template <typename T>
void svd_batch(const at::Tensor& A, at::Tensor& U, at::Tensor& S, at::Tensor& Vh, bool compute_uv,
               std::atomic<int64_t>& bad_conv, std::atomic<int64_t>& bad_val) {
  const int64_t batch = A.size(0), m = A.size(1), n = A.size(2), k = std::min(m, n);
  const T* a = A.data_ptr<T>();
  T* s = S.data_ptr<T>();
  T* u = compute_uv ? U.data_ptr<T>() : nullptr;
  T* vh = compute_uv ? Vh.data_ptr<T>() : nullptr;
#ifdef SC_LINALG_AVX2
  if (std::max(m, n) <= kSmallMax) {
    constexpr int W = Simd<T>::W;
    const int64_t groups = (batch + W - 1) / W;
#pragma omp parallel num_threads(num_threads_for(groups))
    {
      SmallWork<T> w(std::max(m, n), k, compute_uv);
#pragma omp for schedule(dynamic, 2)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t b = g * W, count = std::min<int64_t>(W, batch - b);
        const int st = svd_small_group(a + b * m * n, m, n, count, u ? u + b * m * k : nullptr,
                                       s + b * k, vh ? vh + b * k * n : nullptr, w);
        if (st != kOk) note(st, b + w.bad_lane, bad_conv, bad_val);
      }
    }
    return;
  }
#endif
#pragma omp parallel num_threads(num_threads_for(batch))
  {
    Work<T> w(std::max(m, n), k, compute_uv);
#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < batch; ++b) {
      const int st = svd_one(a + b * m * n, m, n, u ? u + b * m * k : nullptr, s + b * k,
                             vh ? vh + b * k * n : nullptr, w);
      if (st != kOk) note(st, b, bad_conv, bad_val);
    }
  }
}


// Golub-Kahan-Reinsch path: OpenMP over groups of kQRGroup matrices; each group is
// bidiagonalised one matrix at a time, then its QR iterations run interleaved
// (bidiag_qr_group), then each matrix is finished. A matrix whose QR iteration reaches the step
// cap is redone by the Jacobi path (never seen on the tests' or benches' matrices).
constexpr int kQRGroup = 8;

// The rotations of a group's chases, lane-interleaved (rs = kQRGroup; see chase_sets), c per chase.
template <typename T>
void group_rotation_buffers(BidiagQR<T>* q, std::vector<double>& rots, int64_t c) {
  c = std::max<int64_t>(c, 1);
  rots.assign(4 * kQRGroup * c, 0.0);
  for (int g = 0; g < kQRGroup; ++g) {
    q[g].cv = rots.data() + g;
    q[g].sv = q[g].cv + kQRGroup * c;
    q[g].cu = q[g].sv + kQRGroup * c;
    q[g].su = q[g].cu + kQRGroup * c;
    q[g].rs = kQRGroup;
  }
}

// The grouped driver shared by svd and eigh: OpenMP over groups of kQRGroup matrices; each
// thread makes its context (ctx = make()), whose load(b, g, w, q) bidiagonalises matrix b into
// slot g (a Status), then the group's QR iterations run interleaved, then ctx.finish(b, g, w)
// writes the results, or ctx.fallback(b) redoes a matrix whose QR reached its step cap by
// Jacobi (never seen on the tests' or benches' matrices).
template <typename T, typename Make>
void bidiag_groups(int64_t batch, int64_t r, int64_t c, bool vectors, Make make,
                   std::atomic<int64_t>& bad_conv, std::atomic<int64_t>& bad_val) {
  const int64_t groups = (batch + kQRGroup - 1) / kQRGroup;
#pragma omp parallel num_threads(num_threads_for(groups))
  {
    auto ctx = make();
    std::vector<BidiagWork<T>> ws;
    for (int g = 0; g < kQRGroup; ++g) ws.emplace_back(r, c, vectors);
    BidiagQR<T> q[kQRGroup];
    int64_t idx[kQRGroup];
    std::vector<double> rots;
    group_rotation_buffers(q, rots, c);
#pragma omp for schedule(dynamic, 1)
    for (int64_t grp = 0; grp < groups; ++grp) {
      const int64_t b0 = grp * kQRGroup, nb = std::min<int64_t>(kQRGroup, batch - b0);
      int count = 0;
      for (int64_t b = b0; b < b0 + nb; ++b) {
        if (ctx.load(b, count, ws[count], q[count]) != kOk) {
          note(kNonFinite, b, bad_conv, bad_val);
          continue;
        }
        idx[count++] = b;
      }
      if (count == kQRGroup) {
        bidiag_qr_group<T, kQRGroup>(q, count);
      } else if (count >= 4) {  // a partial group: four in SIMD lanes, the rest interleaved
        bidiag_qr_group<T, 4>(q, 4);
        bidiag_qr_group<T, 1>(q + 4, count - 4);
      } else {
        bidiag_qr_group<T, 1>(q, count);
      }
      for (int g = 0; g < count; ++g) {
        if (q[g].ok) {
          ctx.finish(idx[g], g, ws[g]);
          continue;
        }
        const int st = ctx.fallback(idx[g]);
        if (st != kOk) note(st, idx[g], bad_conv, bad_val);
      }
    }
  }
}

template <typename T>
void svd_bidiag_batch(const at::Tensor& A, at::Tensor& U, at::Tensor& S, at::Tensor& Vh,
                      bool compute_uv, std::atomic<int64_t>& bad_conv,
                      std::atomic<int64_t>& bad_val) {
  const int64_t batch = A.size(0), m = A.size(1), n = A.size(2), k = std::min(m, n);
  const int64_t r = std::max(m, n), ldc = padded<T>(k);
  struct Ctx {
    const T* a;
    int64_t m, n, k, r;
    T *s, *u, *vh;
    std::vector<T> Y, Z;
    std::unique_ptr<Work<T>> jw;
    int load(int64_t b, int, BidiagWork<T>& w, BidiagQR<T>& q) {
      return bidiag_load(a + b * m * n, m, n, w, q, u != nullptr);
    }
    void finish(int64_t b, int, BidiagWork<T>& w) {
      bidiag_finish(w, m, n, u ? u + b * m * k : nullptr, s + b * k,
                    vh ? vh + b * k * n : nullptr, Y.data(), Z.data());
    }
    int fallback(int64_t b) {
      if (!jw) jw = std::make_unique<Work<T>>(r, k, u != nullptr);
      return svd_one(a + b * m * n, m, n, u ? u + b * m * k : nullptr, s + b * k,
                     vh ? vh + b * k * n : nullptr, *jw);
    }
  };
  const T* a = A.data_ptr<T>();
  T* s = S.data_ptr<T>();
  T* u = compute_uv ? U.data_ptr<T>() : nullptr;
  T* vh = compute_uv ? Vh.data_ptr<T>() : nullptr;
  const auto make = [&] {
    return Ctx{a, m, n, k, r, s, u, vh, std::vector<T>(compute_uv ? r * ldc : 0),
               std::vector<T>(compute_uv ? k * ldc : 0), nullptr};
  };
  bidiag_groups<T>(batch, r, k, compute_uv, make, bad_conv, bad_val);
}

// eigh by the Golub-Kahan-Reinsch kernel (see eigh_bidiag_load).
template <typename T>
void eigh_bidiag_batch(const at::Tensor& A, at::Tensor& L, at::Tensor& Q, bool lower,
                       std::atomic<int64_t>& bad_conv, std::atomic<int64_t>& bad_val) {
  const int64_t batch = A.size(0), n = A.size(1), ldc = padded<T>(n);
  struct Ctx {
    const T* a;
    int64_t n, ldc;
    bool lower;
    T *l, *qo;
    std::vector<T> sym, Y;  // sym: one scaled symmetric matrix per group slot
    std::unique_ptr<Work<T>> jw;
    int load(int64_t b, int g, BidiagWork<T>& w, BidiagQR<T>& q) {
      return eigh_bidiag_load(a + b * n * n, n, lower, w, q, sym.data() + g * n * ldc);
    }
    void finish(int64_t b, int g, BidiagWork<T>& w) {
      eigh_bidiag_finish(w, n, l + b * n, qo + b * n * n, Y.data(), sym.data() + g * n * ldc);
    }
    int fallback(int64_t b) {
      if (!jw) jw = std::make_unique<Work<T>>(n, n, true);
      return eigh_one(a + b * n * n, n, lower, l + b * n, qo + b * n * n, *jw);
    }
  };
  const T* a = A.data_ptr<T>();
  T* l = L.data_ptr<T>();
  T* qo = Q.data_ptr<T>();
  const auto make = [&] {
    return Ctx{a, n, ldc, lower, l, qo, std::vector<T>(kQRGroup * n * ldc),
               std::vector<T>(n * ldc), nullptr};
  };
  bidiag_groups<T>(batch, n, n, true, make, bad_conv, bad_val);
}

template <typename T>
void eigh_batch(const at::Tensor& A, at::Tensor& L, at::Tensor& Q, bool lower,
                std::atomic<int64_t>& bad_conv, std::atomic<int64_t>& bad_val) {
  const int64_t batch = A.size(0), n = A.size(1);
  const T* a = A.data_ptr<T>();
  T* l = L.data_ptr<T>();
  T* q = Q.data_ptr<T>();
#ifdef SC_LINALG_AVX2
  if (n <= kSmallMax) {
    constexpr int W = Simd<T>::W;
    const int64_t groups = (batch + W - 1) / W;
#pragma omp parallel num_threads(num_threads_for(groups))
    {
      SmallWork<T> w(n, n, true);
      std::vector<T> buf(4 * W * n * n + W * n);
#pragma omp for schedule(dynamic, 2)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t b = g * W, count = std::min<int64_t>(W, batch - b);
        const int st = eigh_small_group(a + b * n * n, n, count, lower, l + b * n, q + b * n * n,
                                        w, buf);
        if (st != kOk) note(st, b + w.bad_lane, bad_conv, bad_val);
      }
    }
    return;
  }
#endif
#pragma omp parallel num_threads(num_threads_for(batch))
  {
    Work<T> w(n, n, true);
#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < batch; ++b) {
      const int st = eigh_one(a + b * n * n, n, lower, l + b * n, q + b * n * n, w);
      if (st != kOk) note(st, b, bad_conv, bad_val);
    }
  }
}

void check_input(const at::Tensor& A, const char* op) {
  TORCH_CHECK(A.device().is_cpu(), "sparsecore::", op, ": expected a CPU tensor, got ", A.device());
  TORCH_CHECK(A.dim() == 3, "sparsecore::", op, ": expected a (batch, m, n) tensor, got shape ",
              A.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble, "sparsecore::", op,
              ": expected float32 or float64, got ", A.scalar_type());
}

// Shared entry of the svd ops: checks, outputs, dispatch on dtype; run(tag, ...) runs a
// batch function for the dtype of `tag`.
template <typename Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_entry(const at::Tensor& A_, bool compute_uv,
                                                         const char* op, Run run) {
  check_input(A_, op);
  const at::Tensor A = A_.contiguous();
  const int64_t batch = A.size(0), m = A.size(1), n = A.size(2), k = std::min(m, n);
  at::Tensor S = at::empty({batch, k}, A.options());
  const std::vector<int64_t> ushape = compute_uv ? std::vector<int64_t>{batch, m, k} : std::vector<int64_t>{0};
  const std::vector<int64_t> vshape = compute_uv ? std::vector<int64_t>{batch, k, n} : std::vector<int64_t>{0};
  at::Tensor U = at::empty(ushape, A.options());
  at::Tensor Vh = at::empty(vshape, A.options());
  if (batch == 0 || k == 0) return {U, S, Vh};
  std::atomic<int64_t> bad_conv{-1}, bad_val{-1};
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "sparsecore_linalg", [&] {
    run(scalar_t{}, A, U, S, Vh, compute_uv, bad_conv, bad_val);
  });
  raise_status(op, bad_conv, bad_val, 30);
  return {U, S, Vh};
}

template <typename Run>
std::tuple<at::Tensor, at::Tensor> eigh_entry(const at::Tensor& A_, bool lower, const char* op,
                                              Run run) {
  check_input(A_, op);
  TORCH_CHECK(A_.size(1) == A_.size(2), "sparsecore::", op, ": expected square matrices, got ",
              A_.sizes());
  const at::Tensor A = A_.contiguous();
  const int64_t batch = A.size(0), n = A.size(1);
  at::Tensor L = at::empty({batch, n}, A.options());
  at::Tensor Q = at::empty({batch, n, n}, A.options());
  if (batch == 0 || n == 0) return {L, Q};
  std::atomic<int64_t> bad_conv{-1}, bad_val{-1};
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "sparsecore_linalg", [&] {
    run(scalar_t{}, A, L, Q, lower, bad_conv, bad_val);
  });
  raise_status(op, bad_conv, bad_val, 30);
  return {L, Q};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_jacobi(const at::Tensor& A, bool compute_uv) {
  return svd_entry(A, compute_uv, "_svd_jacobi_cpu",
                   [](auto tag, auto&&... args) { svd_batch<decltype(tag)>(args...); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_bidiag(const at::Tensor& A, bool compute_uv) {
  return svd_entry(A, compute_uv, "_svd_bidiag_cpu",
                   [](auto tag, auto&&... args) { svd_bidiag_batch<decltype(tag)>(args...); });
}

std::tuple<at::Tensor, at::Tensor> eigh_jacobi(const at::Tensor& A, bool lower) {
  return eigh_entry(A, lower, "_eigh_jacobi_cpu",
                    [](auto tag, auto&&... args) { eigh_batch<decltype(tag)>(args...); });
}

std::tuple<at::Tensor, at::Tensor> eigh_bidiag(const at::Tensor& A, bool lower) {
  return eigh_entry(A, lower, "_eigh_bidiag_cpu",
                    [](auto tag, auto&&... args) { eigh_bidiag_batch<decltype(tag)>(args...); });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsecore, CPU, m) {
  m.impl("_svd_jacobi_cpu", &svd_jacobi);
  m.impl("_eigh_jacobi_cpu", &eigh_jacobi);
  m.impl("_svd_bidiag_cpu", &svd_bidiag);
  m.impl("_eigh_bidiag_cpu", &eigh_bidiag);
}
