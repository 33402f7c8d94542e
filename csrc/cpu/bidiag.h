// Golub-Kahan-Reinsch SVD (_svd_bidiag_cpu, _eigh_bidiag_cpu): Householder bidiagonalisation
// M = Q_L B P_R^T (B upper bidiagonal, r >= c), implicit-shift QR on B (Wilkinson shift,
// deflation to absolute accuracy eps * ||B||, zero diagonals chased out), its plane rotations
// accumulated into c x c factors Ub, Vb, then U = Q_L [Ub; 0], V = P_R Vb.
//
// The QR iteration runs in double also for float matrices (in float its O(c^2) rotations cost
// the values accuracy at the large sizes, see BidiagQR::init), and above kDoubleAccumAbove a
// float matrix's factors are accumulated in double too. The batch driver (linalg.cpp) works
// the matrices in groups: their QR chases run interleaved (bidiag_qr_group), four in SIMD
// lanes at a time (chase_sets: one sqrt / division instruction serves four serial chains, and
// two sets' chains overlap), and each chase's rotations are applied to the vectors afterwards
// as a wave down strips of rows (rotate_wave: one load and store per rotation and strip). The
// back-transforms work on row-major vectors two reflectors at a time (no horizontal sums).
//
// Why not Jacobi at these sizes: Jacobi's sweeps of n^2 / 2 pairs are each a serial chain
// (dot -> sqrt / div -> rotate the pivot column that the next pair reads); here the O(n^3)
// work is cache-resident BLAS-2 and only O(n^2) short chase steps are serial. Where the two
// kernels cross over was chosen by measurement: see bench/RESULTS.md (linalg).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "householder.h"
#include "linalg_common.h"
#include "simd.h"

namespace sparsecore::linalg {

// Givens rotation: cs f + sn g = r, -sn f + cs g = 0; f and g are scaled first where f^2 + g^2
// would under- or overflow.
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
// vectors fell well short of LAPACK's at 256-512. Below it float is accurate enough and the
// rotations, the largest phase, stay at twice the SIMD width (the threshold was chosen by
// measurement: see bench/RESULTS.md (linalg)).
inline constexpr int64_t kDoubleAccumAbove = 128;

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
    // float the O(c^2) rotations of the iteration on B itself left the values' errors well
    // above LAPACK's float SVD at 512 x 512; in double they are far below float's, and the
    // iteration is O(c^2) work next to the O(c^3) of the rest.
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

}  // namespace sparsecore::linalg
