// One-sided Jacobi SVD of small matrices (max(m, n) <= kSmallMax) with one SIMD lane per
// matrix, the small sizes of _svd_jacobi_cpu / _eigh_jacobi_cpu where AVX2 is built in. A group
// of W matrices (8 float / 4 double) is stored interleaved, entry (i, j) of all W matrices in
// one vector, and plain cyclic one-sided Jacobi runs on all lanes at once: the rotation
// parameters (sqrt, divisions) are computed for W matrices per instruction and a converged
// lane just gets the identity rotation. At these sizes the per-matrix path (jacobi.h) spends
// most of its time on that scalar per-pair work (this path was chosen over it by measurement:
// see bench/RESULTS.md (linalg)). A group goes through three phases, as the bidiagonal
// kernel's matrices do: small_group_load, small_group_sweep, small_group_finish.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "jacobi.h"
#include "linalg_common.h"
#include "simd.h"

namespace sparsecore::linalg {

#ifdef SC_LINALG_AVX2
inline constexpr int64_t kSmallMax = 32;

template <typename T>
struct SmallWork {
  static constexpr int W = Simd<T>::W;
  int64_t r, c;
  std::vector<T> X, V, d, sigv, rank, Z, Vc, sig, sig_sorted;
  std::vector<int> ord;
  // Round-robin (tournament) order: consecutive pairs share no column, so the out-of-order
  // core overlaps one pair's sqrt/div chain with the next pair's dot products (the cyclic
  // row order serialises them).
  std::vector<std::pair<int, int>> pairs;
  std::vector<int> round_start;  // pairs[round_start[k] .. round_start[k + 1]) = round k
  T amax[W] = {};  // each lane's max |entry|, its scale (small_group_load)
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

// Phase 1 of svd_small_group: each lane's max |entry| into w.amax (kNonFinite, with
// w.bad_lane, on NaN / Inf), then the group interleaved into w.X scaled to max |entry| = 1
// (lanes from count on: zeros), and w.V = I with vectors.
template <typename T, int RC>
int small_group_load(const T* A, int64_t m, int64_t n, int64_t count, bool vectors,
                     SmallWork<T>& w) {
  using Vt = Simd<T>;
  using R = typename Vt::R;
  constexpr int W = Vt::W;
  const bool trans = m < n;
  const int64_t r = RC ? RC : w.r, c = RC ? RC : w.c;
  T* amax = w.amax;
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
  return kOk;
}

// Phase 2: cyclic one-sided Jacobi sweeps on all lanes of w.X at once (the rotations also
// applied to w.V with vectors) until a sweep rotates no pair or the sweep cap; w.d ends with
// each column's squared norm. kNoConvergence (w.bad_lane) for a lane the cap left further than
// 64 tol from orthogonality.
template <typename T, int RC>
int small_group_sweep(int64_t count, bool vectors, SmallWork<T>& w) {
  using Vt = Simd<T>;
  using R = typename Vt::R;
  constexpr int W = Vt::W;
  const int64_t r = RC ? RC : w.r, c = RC ? RC : w.c;
  T* X = w.X.data();
  T* V = w.V.data();
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
  return status;
}

// Phase 3: the values in descending order (stable) and, with vectors, the left vectors
// (normalised columns of X, re-orthogonalised where a value is small) and right ones (V), the
// largest-magnitude entry of each left vector positive; written out per lane.
template <typename T, int RC>
void small_group_finish(int64_t m, int64_t n, int64_t count, T* U, T* S, T* Vh,
                        SmallWork<T>& w) {
  using Vt = Simd<T>;
  using R = typename Vt::R;
  constexpr int W = Vt::W;
  const bool vectors = U != nullptr, trans = m < n;
  const int64_t r = RC ? RC : w.r, c = RC ? RC : w.c, k = c;
  T* X = w.X.data();
  T* V = w.V.data();
  const T* d = w.d.data();
  const T* amax = w.amax;
  const T tiny = tiny_ratio<T>(c);
  const R one = Vt::set1(1), zero = Vt::zero();
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
    for (int64_t i = 0; i < j; ++i)
      acc = Vt::add(acc, Vt::band(Vt::ge(Vt::load(sv + i * W), sj), one));
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
}

// SVD of `count` <= W matrices A[g] (m x n, row-major, consecutive) at once.
// RC > 0: compiled for r = c = RC (the loops' trip counts known, fully unrolled).
template <typename T, int RC>
int svd_small_group_impl(const T* A, int64_t m, int64_t n, int64_t count, T* U, T* S, T* Vh,
                         SmallWork<T>& w) {
  const bool vectors = U != nullptr;
  if (small_group_load<T, RC>(A, m, n, count, vectors, w) != kOk) return kNonFinite;
  const int status = small_group_sweep<T, RC>(count, vectors, w);
  small_group_finish<T, RC>(m, n, count, U, S, Vh, w);
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

}  // namespace sparsecore::linalg
