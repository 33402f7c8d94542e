// Batched SVD / symmetric eigendecomposition of many small matrices on the CPU.
//
// Algorithm (chosen by measurement, see bench/linalg.py and the notes in sparsecore/linalg.py):
// Drmac-Veselic preconditioned one-sided Jacobi. Each matrix M (r x c, r >= c; a wide matrix
// is transposed) gets a Householder QR with column pivoting, M P = Q R; one-sided (Hestenes)
// Jacobi then orthogonalises the columns of X = R^T (c x c) with de Rijk's pivoting (the
// largest remaining column is moved to the pivot position before each row of the sweep).
// Pivoted QR makes X graded, which speeds Jacobi's convergence (measured on random 100 x 100:
// 7.1 sweeps in float32, 8.5 in float64, tolerance eps * sqrt(n)), and working on c x c
// instead of r x c makes tall matrices cheap (the R-SVD).
// One-sided Jacobi keeps singular values accurate relative to ||A|| (and usually relative to
// themselves), unlike eigh of A^T A, which squares the condition number.
//   M = (Q W) S (P Ux)^T   with X W = Ux S  (W: accumulated rotations)
// so the left vectors (Q W) are orthogonal by construction and the right ones are the
// normalised columns of X, re-orthogonalised where a singular value is tiny or zero.
//
// Symmetric eigh uses the same path on B = S + c I, with the Gershgorin shift c >= -lambda_min
// making B positive semi-definite, where the SVD is the eigendecomposition (left vectors =
// eigenvectors, orthogonal by construction); lambda_i are their Rayleigh quotients with S.
// Accuracy is absolute, ~eps * ||S||.
//
// Memory layout: every matrix is worked column-major in a per-thread workspace, each column
// contiguous and padded to a multiple of the SIMD width, so that dots and plane rotations are
// straight AVX2/FMA loops over L1/L2-resident data. OpenMP runs across the batch; there is no
// per-matrix allocation, Python or dispatcher work.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
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
  static R copysign(R mag, R sgn) {
    const R sm = _mm256_set1_ps(-0.0f);
    return _mm256_or_ps(_mm256_and_ps(sm, sgn), _mm256_andnot_ps(sm, mag));
  }
  static R abs(R a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static bool any(R mask) { return _mm256_movemask_ps(mask) != 0; }
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
  static R copysign(R mag, R sgn) {
    const R sm = _mm256_set1_pd(-0.0);
    return _mm256_or_pd(_mm256_and_pd(sm, sgn), _mm256_andnot_pd(sm, mag));
  }
  static R abs(R a) { return _mm256_andnot_pd(_mm256_set1_pd(-0.0), a); }
  static bool any(R mask) { return _mm256_movemask_pd(mask) != 0; }
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
    const T sigma = len > 1 ? dot(x + 1, x + 1, len - 1) : T(0);
    if (sigma == 0) {
      w.tau[k] = 0;
      continue;
    }
    // Golub & Van Loan 5.1.1: H x = mu e1 with v(0) = 1, stable for either sign of x(0).
    const T alpha = x[0];
    const T mu = std::sqrt(alpha * alpha + sigma);
    const T v0 = alpha <= 0 ? alpha - mu : -sigma / (alpha + mu);
    const T tau = 2 * v0 * v0 / (sigma + v0 * v0);
    const T inv = 1 / v0;
    for (int64_t i = 1; i < len; ++i) x[i] *= inv;
    x[0] = mu;
    w.tau[k] = tau;
    for (int64_t j = k + 1; j < c; ++j) {
      T* y = M + j * ld + k;
      const T s = tau * (y[0] + dot(x + 1, y + 1, len - 1));
      y[0] -= s;
      axpy(-s, x + 1, y + 1, len - 1);
    }
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
  std::iota(ord.begin(), ord.end(), 0);
  std::stable_sort(ord.begin(), ord.end(), [&](int a, int b) { return w.d[a] > w.d[b]; });
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
      const T* v = w.M.data() + k * ldr + k;  // v(0) = 1 implicit
      const int64_t len = r - k;
      for (int64_t i = 0; i < c; ++i) {
        T* y = Y + i * ldr + k;
        const T s = tau * (y[0] + dot(v + 1, y + 1, len - 1));
        y[0] -= s;
        axpy(-s, v + 1, y + 1, len - 1);
      }
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
  T amax = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const T v = (lower ? (i >= j) : (i <= j)) ? A[i * n + j] : A[j * n + i];
      if (!std::isfinite(v)) return kNonFinite;
      amax = std::max(amax, std::abs(v));
      w.M[j * ldr + i] = v;
    }
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
  std::iota(o.begin(), o.end(), 0);
  std::stable_sort(o.begin(), o.end(), [&](int a, int b) { return lam[a] < lam[b]; });
  for (int64_t i = 0; i < n; ++i) {
    L[i] = lam[o[i]] * amax;
    const T* q = w.Y.data() + o[i] * ldr;
    const T sg = q[argmax_abs(q, n, 1)] < 0 ? T(-1) : T(1);
    for (int64_t j = 0; j < n; ++j) Qo[j * n + i] = sg * q[j];
  }
  return status;
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
  std::vector<T> X, V, d, Z, Vc, sig;
  std::vector<int> ord;
  // Round-robin (tournament) order: consecutive pairs share no column, so the out-of-order
  // core overlaps one pair's sqrt/div chain with the next pair's dot products (the cyclic
  // row order serialises them; this order measured ~2x faster at 16 x 16).
  std::vector<std::pair<int, int>> pairs;
  int64_t bad_lane = 0;  // the matrix of the group that a non-OK status refers to
  SmallWork(int64_t r_, int64_t c_, bool vectors)
      : r(r_), c(c_), X(r_ * c_ * W), V(vectors ? c_ * c_ * W : 0), d(c_ * W), Z(r_ * c_),
        Vc(c_ * c_), sig(c_), ord(c_) {
    const int N = static_cast<int>(c_ + (c_ & 1));  // an odd count gets a bye (index c_)
    std::vector<int> arr(N);
    std::iota(arr.begin(), arr.end(), 0);
    for (int round = 0; round + 1 < N; ++round) {
      for (int i = 0; i < N / 2; ++i) {
        const int a = arr[i], b = arr[N - 1 - i];
        if (a < c_ && b < c_) pairs.emplace_back(std::min(a, b), std::max(a, b));
      }
      std::rotate(arr.begin() + 1, arr.end() - 1, arr.end());
    }
  }
};

// SVD of `count` <= W matrices A[g] (m x n, row-major, consecutive) at once.
template <typename T>
int svd_small_group(const T* A, int64_t m, int64_t n, int64_t count, T* U, T* S, T* Vh,
                    SmallWork<T>& w) {
  using Vt = Simd<T>;
  using R = typename Vt::R;
  constexpr int W = Vt::W;
  const bool vectors = U != nullptr, trans = m < n;
  const int64_t r = w.r, c = w.c, k = c;
  T amax[W];
  for (int l = 0; l < W; ++l) {
    amax[l] = 0;
    if (l >= count) continue;
    const T* a = A + l * m * n;
    for (int64_t i = 0; i < m * n; ++i) {
      if (!std::isfinite(a[i])) {
        w.bad_lane = l;
        return kNonFinite;
      }
      amax[l] = std::max(amax[l], std::abs(a[i]));
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
  const R tol2 = Vt::set1(tol * tol), one = Vt::set1(1), zero = Vt::zero(), two = Vt::set1(2);
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
    for (const auto& [p, q] : w.pairs) {
      {
        T* xp = X + p * r * W;
        T* xq = X + q * r * W;
        R g0 = zero, g1 = zero;
        int64_t i = 0;
        for (; i + 1 < r; i += 2) {
          g0 = Vt::fma(Vt::load(xp + i * W), Vt::load(xq + i * W), g0);
          g1 = Vt::fma(Vt::load(xp + (i + 1) * W), Vt::load(xq + (i + 1) * W), g1);
        }
        if (i < r) g0 = Vt::fma(Vt::load(xp + i * W), Vt::load(xq + i * W), g0);
        const R g = Vt::add(g0, g1);
        const R ap = Vt::load(d + p * W), aq = Vt::load(d + q * W);
        const R mask = Vt::band(Vt::gt(Vt::mul(g, g), Vt::mul(tol2, Vt::mul(ap, aq))),
                                Vt::band(Vt::gt(ap, floor2), Vt::gt(aq, floor2)));
        if (!Vt::any(mask)) continue;
        rotated = Vt::bor(rotated, mask);
        const R zeta = Vt::div(Vt::sub(aq, ap), Vt::mul(two, g));
        const R t = Vt::copysign(
            Vt::div(one, Vt::add(Vt::abs(zeta), Vt::sqrt(Vt::fma(zeta, zeta, one)))), zeta);
        R cs = Vt::div(one, Vt::sqrt(Vt::fma(t, t, one)));
        R sn = Vt::blend(zero, Vt::mul(cs, t), mask);
        cs = Vt::blend(one, cs, mask);
        R np0 = zero, nq0 = zero, np1 = zero, nq1 = zero;
        for (int64_t i = 0; i < r; ++i) {
          const R x = Vt::load(xp + i * W), y = Vt::load(xq + i * W);
          const R x2 = Vt::fnma(sn, y, Vt::mul(cs, x)), y2 = Vt::fma(sn, x, Vt::mul(cs, y));
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
            Vt::store(vp + i * W, Vt::fnma(sn, y, Vt::mul(cs, x)));
            Vt::store(vq + i * W, Vt::fma(sn, x, Vt::mul(cs, y)));
          }
        }
      }
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
  for (int l = 0; l < count; ++l) {
    std::vector<int>& ord = w.ord;
    for (int64_t j = 0; j < c; ++j) {
      T acc = 0;
      for (int64_t i = 0; i < r; ++i) acc += X[(j * r + i) * W + l] * X[(j * r + i) * W + l];
      w.sig[j] = std::sqrt(acc);
    }
    std::iota(ord.begin(), ord.end(), 0);
    std::stable_sort(ord.begin(), ord.end(), [&](int a, int b) { return w.sig[a] > w.sig[b]; });
    T* Sl = S + l * k;
    for (int64_t i = 0; i < k; ++i) Sl[i] = w.sig[ord[i]] * amax[l];
    if (!vectors) continue;
    // Columns of M's left vectors (Z, r x c) and right vectors (Vc, c x c), sorted.
    for (int64_t i = 0; i < c; ++i) {
      const int j = ord[i];
      const T inv = w.sig[j] > 0 ? 1 / w.sig[j] : T(0);
      for (int64_t e = 0; e < r; ++e) w.Z[i * r + e] = X[(j * r + e) * W + l] * inv;
      for (int64_t e = 0; e < c; ++e) w.Vc[i * c + e] = V[(j * c + e) * W + l];
    }
    const T small = w.sig[ord[0]] * 2 * tiny;
    for (int64_t i = 0; i < c; ++i) w.d[i] = w.sig[ord[i]];  // d is free after the sweeps
    fix_columns(w.Z.data(), r, r, c, w.d.data(), small);
    const T* Lm = trans ? w.Vc.data() : w.Z.data();
    const T* Rm = trans ? w.Z.data() : w.Vc.data();
    const int64_t ldl = trans ? c : r, ldrr = trans ? r : c;
    T* Ul = U + l * m * k;
    T* Vhl = Vh + l * k * n;
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
    T amax = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const T v = (lower ? (i >= j) : (i <= j)) ? a[i * n + j] : a[j * n + i];
        if (!std::isfinite(v)) {
          w.bad_lane = l;
          return kNonFinite;
        }
        sy[i * n + j] = v;
        amax = std::max(amax, std::abs(v));
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
    std::iota(o.begin(), o.end(), 0);
    std::stable_sort(o.begin(), o.end(), [&](int x, int y) { return lam[x] < lam[y]; });
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_jacobi(const at::Tensor& A_, bool compute_uv) {
  check_input(A_, "svd_jacobi_cpu");
  const at::Tensor A = A_.contiguous();
  const int64_t batch = A.size(0), m = A.size(1), n = A.size(2), k = std::min(m, n);
  at::Tensor S = at::empty({batch, k}, A.options());
  const std::vector<int64_t> ushape = compute_uv ? std::vector<int64_t>{batch, m, k} : std::vector<int64_t>{0};
  const std::vector<int64_t> vshape = compute_uv ? std::vector<int64_t>{batch, k, n} : std::vector<int64_t>{0};
  at::Tensor U = at::empty(ushape, A.options());
  at::Tensor Vh = at::empty(vshape, A.options());
  if (batch == 0 || k == 0) return {U, S, Vh};
  std::atomic<int64_t> bad_conv{-1}, bad_val{-1};
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "svd_jacobi_cpu", [&] {
    svd_batch<scalar_t>(A, U, S, Vh, compute_uv, bad_conv, bad_val);
  });
  raise_status("svd_jacobi_cpu", bad_conv, bad_val, 30);
  return {U, S, Vh};
}

std::tuple<at::Tensor, at::Tensor> eigh_jacobi(const at::Tensor& A_, bool lower) {
  check_input(A_, "eigh_jacobi_cpu");
  TORCH_CHECK(A_.size(1) == A_.size(2), "sparsecore::eigh_jacobi_cpu: expected square matrices, got ",
              A_.sizes());
  const at::Tensor A = A_.contiguous();
  const int64_t batch = A.size(0), n = A.size(1);
  at::Tensor L = at::empty({batch, n}, A.options());
  at::Tensor Q = at::empty({batch, n, n}, A.options());
  if (batch == 0 || n == 0) return {L, Q};
  std::atomic<int64_t> bad_conv{-1}, bad_val{-1};
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "eigh_jacobi_cpu", [&] {
    eigh_batch<scalar_t>(A, L, Q, lower, bad_conv, bad_val);
  });
  raise_status("eigh_jacobi_cpu", bad_conv, bad_val, 30);
  return {L, Q};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsecore, CPU, m) {
  m.impl("svd_jacobi_cpu", &svd_jacobi);
  m.impl("eigh_jacobi_cpu", &eigh_jacobi);
}
