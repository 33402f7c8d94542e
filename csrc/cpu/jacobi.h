// One-sided Jacobi SVD of one matrix at a time (_svd_jacobi_cpu, _eigh_jacobi_cpu above the
// SIMD-across-batch sizes of jacobi_simd.h; also the fallback of the bidiagonal kernel), the
// Drmac-Veselic preconditioned scheme. Each matrix M (r x c, r >= c; a wide matrix is
// transposed) gets a Householder QR with column pivoting, M P = Q R; one-sided (Hestenes)
// Jacobi then orthogonalises the columns of X = R^T (c x c) with de Rijk's pivoting:
//   M = (Q W) S (P Ux)^T   with X W = Ux S  (W: accumulated rotations)
// so the left vectors (Q W) are orthogonal by construction and the right ones are the
// normalised columns of X, re-orthogonalised where a singular value is tiny or zero.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "householder.h"
#include "linalg_common.h"
#include "simd.h"

namespace sparsecore::linalg {

// Columns below tiny_ratio * (largest column) count as zero in the Jacobi sweeps (see jacobi()).
template <typename T>
T tiny_ratio(int64_t n) {
  return 2 * std::numeric_limits<T>::epsilon() * std::sqrt(T(std::max<int64_t>(n, 1)));
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
        Z(vectors ? ldc * c_ : 0), Zt(vectors ? ldc * c_ : 0),
        Sym(vectors && r_ == c_ ? ldr * c_ : 0), tau(c_), d(c_), sig(c_), perm(c_), ord(c_) {}
};

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

// The SVD of one r x c column-major matrix already in w.M (r >= c), scaled to max |m_ij| = 1.
// Fills w.sig (descending) and, with vectors, w.Y (left, r x c) and, with right, w.Z
// (right, c x c).
template <typename T>
int svd_core(Work<T>& w, bool vectors, bool right) {
  const int64_t r = w.r, c = w.c, ldr = w.ldr, ldc = w.ldc;
  qrcp(w.M.data(), r, c, ldr, w.tau.data(), w.perm.data());
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

}  // namespace sparsecore::linalg
