// Batched SVD / symmetric eigendecomposition of many small matrices on the CPU: the batch
// drivers, input checks and op registrations. The kernels live in headers beside this file:
//
//   simd.h           SIMD traits (AVX2 / FMA), column padding, dot / axpy / plane rotation
//   linalg_common.h  status codes, stable ordering, the symmetric matrix from one triangle
//   householder.h    Householder reflectors, the pivoted QR
//   jacobi.h         one-sided Jacobi (Drmac-Veselic), one matrix at a time
//   jacobi_simd.h    one-sided Jacobi with one SIMD lane per matrix, for small matrices
//   bidiag.h         Golub-Kahan-Reinsch: bidiagonalisation, implicit-shift QR on the bidiagonal
//
// They define inline functions and templates in namespace sparsecore::linalg, a name of this
// op family's own, so that no other file's helpers can collide with them.
//
// Two kernels, each an op: Jacobi (_svd_jacobi_cpu, _eigh_jacobi_cpu; matrices up to
// kSmallMax take the SIMD-across-batch path where AVX2 is built in, larger ones the
// per-matrix path) and Golub-Kahan-Reinsch (_svd_bidiag_cpu, _eigh_bidiag_cpu; a matrix whose
// QR iteration reaches its step cap is redone by per-matrix Jacobi). Which op runs which size
// is decided by the routing in sparsecore/linalg.py (JACOBI_MAX_SIZE, EIGH_JACOBI_MAX_SIZE),
// chosen by measurement: see bench/RESULTS.md (linalg).
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
#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

#include "bidiag.h"
#include "jacobi.h"
#include "jacobi_simd.h"
#include "linalg_common.h"
#include "simd.h"

namespace sparsecore::linalg {
namespace {

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
  const std::vector<int64_t> ushape =
      compute_uv ? std::vector<int64_t>{batch, m, k} : std::vector<int64_t>{0};
  const std::vector<int64_t> vshape =
      compute_uv ? std::vector<int64_t>{batch, k, n} : std::vector<int64_t>{0};
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
}  // namespace sparsecore::linalg

namespace sparsecore {

TORCH_LIBRARY_IMPL(sparsecore, CPU, m) {
  m.impl("_svd_jacobi_cpu", &linalg::svd_jacobi);
  m.impl("_eigh_jacobi_cpu", &linalg::eigh_jacobi);
  m.impl("_svd_bidiag_cpu", &linalg::svd_bidiag);
  m.impl("_eigh_bidiag_cpu", &linalg::eigh_bidiag);
}

}  // namespace sparsecore
