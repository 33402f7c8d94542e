// Householder reflectors of the linalg kernels: making one (house), applying it to a column
// (reflect) or to many (reflect_cols: column-major; reflect_rows / reflect_rows_pair /
// apply_reflectors_rows: row-major blocks, the back-transforms of the bidiagonal SVD), and the
// QR with column pivoting that preconditions the per-matrix Jacobi SVD (qrcp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <utility>

#include "simd.h"

namespace sparsecore::linalg {

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

// Householder QR with column pivoting of the r x c column-major M (leading dimension ld; in
// place: R above the diagonal, the reflectors' tails below it, scalars in tau; perm[k] =
// original column).
template <typename T>
void qrcp(T* M, int64_t r, int64_t c, int64_t ld, T* tau, int* perm) {
  std::iota(perm, perm + c, 0);
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
      std::swap(perm[k], perm[best]);
    }
    T* x = M + k * ld + k;
    const int64_t len = r - k;
    const T tk = house(x, len);
    tau[k] = tk;
    if (tk == 0) continue;
    for (int64_t j = k + 1; j < c; ++j) reflect(tk, x + 1, M + j * ld + k, len);
  }
}

// Columns Y_j (j < ncols, ld apart, len entries each) <- (I - tau v v^T) Y_j, v = [1, vt...],
// four columns per pass: their dots share v's loads and their horizontal sums overlap (one
// column at a time was latency-bound on the sum). The loops run in whole SIMD vectors past
// len: the caller guarantees at least W readable entries of zeros after each column and after
// v (BidiagWork's padding), which stay zero.
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

// Y <- (I - tau v v^T) Y for a row-major block Y (len rows from Y, ld apart; ncols columns,
// a multiple of the SIMD width with readable padding), v = [1, vt...]: s = v^T Y accumulated
// in registers per strip of columns, then Y -= tau v s^T. Row-major keeps every operation a
// straight vector loop over columns, with no horizontal sums (the per-column dot + axpy form
// was a large share of the SVD's time).
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

}  // namespace sparsecore::linalg
