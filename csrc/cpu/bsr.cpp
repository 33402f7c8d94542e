// Block-sparse (BSR) x dense products on the CPU: the forward / input-gradient product
// (bsr_dsd_cpu) and the block SDDMM for the gradient of the kept blocks (bsr_sddmm_cpu).
//
// BSR here: the weight W (N x K) is cut into bs_r x bs_c blocks; block row r keeps blocks
// p in [row_ptr[r], row_ptr[r+1]), block p sits at block column col_idx[p].
//
// Both kernels run every kept block as a small dense GEMM through one register-blocked
// micro-kernel (MR rows x NV SIMD vectors of accumulators, AVX2/FMA where compiled for it,
// the same code on scalar "vectors" of width 1 otherwise), with OpenMP over block rows
// (dynamic schedule: block rows hold different numbers of blocks).
//
// dsd:   Y[b, r*bs_r + i] = sum_p sum_j X[b, col_p*bs_c + j] * W_p[i, j]
//        The vector runs along the outputs i, so each thread packs its block row's weights
//        once as [chunk of NV*L outputs][block][j][i] (transposing each block; reused by
//        every batch tile), and the accumulators go straight to rows of Y. X is packed once
//        into column-block panels Xp[col][b][j] so that a tile's inputs are contiguous.
//        W_p is blocks[q] (q = block_idx[p], or p) or, with trans_blocks, blocks[q]^T: the
//        input gradient dX = dY W runs on the transposed BSR without copying any block.
// sddmm: dW_p[i, j] = sum_b dY[b, r*bs_r + i] * X[b, col_p*bs_c + j]
//        The vector runs along j; dY and X are packed into block panels once per call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace sparsecore {
namespace {

// ---- SIMD wrapper: width L; L = 1 (plain scalars) without AVX2/FMA --------------------
template <typename T>
struct Simd;

#if defined(__AVX2__) && defined(__FMA__)
template <>
struct Simd<float> {
  using reg = __m256;
  static constexpr int L = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
};
template <>
struct Simd<double> {
  using reg = __m256d;
  static constexpr int L = 4;
  static reg zero() { return _mm256_setzero_pd(); }
  static reg load(const double* p) { return _mm256_loadu_pd(p); }
  static reg bcast(const double* p) { return _mm256_broadcast_sd(p); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
  static void store(double* p, reg v) { _mm256_storeu_pd(p, v); }
};
#else
template <typename T>
struct Simd {
  using reg = T;
  static constexpr int L = 1;
  static reg zero() { return T(0); }
  static reg load(const T* p) { return *p; }
  static reg bcast(const T* p) { return *p; }
  static reg fma(reg a, reg b, reg c) { return a * b + c; }
  static void store(T* p, reg v) { *p = v; }
};
#endif

// Accumulator budget: MR * NV accumulators + NV operand registers + 1 broadcast must fit in
// the 16 ymm registers; MR * NV >= 8 keeps the two FMA pipes (latency 4) busy.
constexpr int kMaxMR2 = 6;   // NV = 2: 12 accumulators
constexpr int kMaxMR1 = 12;  // NV = 1: 12 accumulators

// ---- the micro-kernel -------------------------------------------------------------------
// acc[m][v] = sum_s sum_t a[s](m, t) * b[s](t, v*L .. v*L+L) over `ns` segments s, where
//   a[s](m, t) = a_base + a_off[s] + m * a_rs + t * a_ts   (broadcast scalars, t < depth)
//   b[s](t, .) = b_base + s * b_seg + t * b_ts              (NV contiguous vectors)
// then out[m * out_rs + 0 .. n_valid) = acc[m] (n_valid <= NV * L).
// dsd: segments = kept blocks of a block row, t = j, m = batch row, vectors = outputs i.
// sddmm: one segment, t = batch row b, m = output i, vectors = inputs j.
template <typename T, int MR, int NV>
inline void micro(int64_t ns, int64_t depth, const T* a_base, const int64_t* a_off, int64_t a_rs,
                  int64_t a_ts, const T* b_base, int64_t b_seg, int64_t b_ts, T* out,
                  int64_t out_rs, int64_t n_valid) {
  using S = Simd<T>;
  constexpr int L = S::L;
  typename S::reg acc[MR][NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = S::zero();
  for (int64_t s = 0; s < ns; ++s) {
    const T* a = a_base + (a_off ? a_off[s] : 0);
    const T* b = b_base + s * b_seg;
    if (a_off && s + 1 < ns) {  // the next block's inputs: its panel rows sit elsewhere
      const char* an = reinterpret_cast<const char*>(a_base + a_off[s + 1]);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m)
        for (int64_t o = 0; o < depth * int64_t(sizeof(T)); o += 64)
          __builtin_prefetch(an + m * a_rs * sizeof(T) + o);
    }
    for (int64_t t = 0; t < depth; ++t) {
      typename S::reg bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = S::load(b + t * b_ts + v * L);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const typename S::reg am = S::bcast(a + m * a_rs + t * a_ts);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = S::fma(am, bv[v], acc[m][v]);
      }
    }
  }
  if (n_valid == NV * L) {
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) S::store(out + m * out_rs + v * L, acc[m][v]);
  } else {
    // Partial chunk: spill through a buffer (indexing acc with a runtime m would force
    // the accumulators out of registers in the main loop too).
    T tmp[MR][NV * L];
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) S::store(tmp[m] + v * L, acc[m][v]);
    for (int m = 0; m < MR; ++m) std::memcpy(out + m * out_rs, tmp[m], sizeof(T) * n_valid);
  }
}

// Runs micro<T, mr, NV> for a runtime mr in [1, MR].
template <typename T, int NV, int MR, typename... Args>
inline void micro_mr(int mr, Args... args) {
  if constexpr (MR > 1) {
    if (mr < MR) return micro_mr<T, NV, MR - 1>(mr, args...);
  }
  micro<T, MR, NV>(args...);
}

// Splits n rows into ceil(n / max_mr) tiles of near-equal size (e.g. 32 -> 6,6,5,5,5,5
// rather than 6,6,6,6,6,2: a thin tail tile would run latency-bound).
struct Tiles {
  int64_t n, count, base, extra;
  Tiles(int64_t n_, int max_mr) : n(n_) {
    count = (n + max_mr - 1) / max_mr;
    base = count ? n / count : 0;
    extra = count ? n % count : 0;
  }
  int64_t start(int64_t t) const { return t * base + std::min(t, extra); }
  int size(int64_t t) const { return static_cast<int>(base + (t < extra ? 1 : 0)); }
};

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Threads only pay off above ~a million multiply-adds (or copied elements): waking the
// OpenMP team costs tens of microseconds, and far more on a loaded machine, where a tiny
// op (gradcheck, a small layer) would otherwise wait on descheduled workers.
int threads_for(int64_t work) { return work >= (int64_t(1) << 20) ? at::get_num_threads() : 1; }

// Xp[c][b][t] = x[b, c * w + t] for t < w, zero up to wpad: column-block panels, so that
// the rows a micro-tile reads from one block are contiguous (and prefetchable).
// (A plain x.view(B, C, w).transpose(0, 1).contiguous() was 5x slower than this copy.)
template <typename T>
at::Tensor block_panels(const at::Tensor& x_in, int64_t w, int64_t wpad) {
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1), C = K / w;
  at::Tensor out = at::empty({C, B, wpad}, x.options());
  const T* src = x.const_data_ptr<T>();
  T* dst = out.data_ptr<T>();
#pragma omp parallel for schedule(static) num_threads(threads_for(B * K))
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t b = 0; b < B; ++b) {
      T* d = dst + (c * B + b) * wpad;
      std::memcpy(d, src + b * K + c * w, sizeof(T) * w);
      std::fill(d + w, d + wpad, T(0));
    }
  }
  return out;
}

// ---- dsd ------------------------------------------------------------------------------
template <typename T, int NV>
void dsd_impl(const at::Tensor& xp, int64_t B, const at::Tensor& blocks, bool trans,
              const int32_t* col_idx, const int32_t* row_ptr, const int32_t* block_idx,
              int64_t n_brows, int64_t bs_r, int64_t bs_c, at::Tensor& y) {
  constexpr int L = Simd<T>::L;
  constexpr int MRMAX = NV == 2 ? kMaxMR2 : kMaxMR1;
  constexpr int64_t CW = NV * L;  // outputs per accumulator row
  const int64_t N = y.size(1);
  const int64_t nchunks = (bs_r + CW - 1) / CW;
  const T* X = xp.const_data_ptr<T>();
  const int64_t x_rs = bs_c, x_blk = B * bs_c;  // Xp row and panel strides
  const T* W = blocks.const_data_ptr<T>();
  const int64_t s0 = blocks.stride(0);
  const int64_t si = trans ? blocks.stride(2) : blocks.stride(1);
  const int64_t sj = trans ? blocks.stride(1) : blocks.stride(2);
  T* Y = y.data_ptr<T>();
  const Tiles bt(B, MRMAX);

#pragma omp parallel num_threads(threads_for(B * blocks.numel()))
  {
    std::vector<T> wp;
    std::vector<int64_t> xoff;
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < n_brows; ++r) {
      const int64_t p0 = row_ptr[r], nb = row_ptr[r + 1] - p0;
      T* yr = Y + r * bs_r;
      if (nb == 0) {
        for (int64_t b = 0; b < B; ++b) std::fill(yr + b * N, yr + b * N + bs_r, T(0));
        continue;
      }
      // Pack: wp[c][p][j][ii] = W_p[c*CW + ii, j], zero past bs_r.
      wp.assign(nchunks * nb * bs_c * CW, T(0));
      xoff.resize(nb);
      for (int64_t p = 0; p < nb; ++p) {
        const int64_t q = block_idx ? block_idx[p0 + p] : p0 + p;
        const T* wq = W + q * s0;
        for (int64_t i = 0; i < bs_r; ++i) {
          T* dst = wp.data() + (((i / CW) * nb + p) * bs_c) * CW + i % CW;
          for (int64_t j = 0; j < bs_c; ++j) dst[j * CW] = wq[i * si + j * sj];
        }
        xoff[p] = col_idx[p0 + p] * x_blk;
      }
      for (int64_t t = 0; t < bt.count; ++t) {
        const int64_t b0 = bt.start(t);
        for (int64_t c = 0; c < nchunks; ++c) {
          const T* wc = wp.data() + c * nb * bs_c * CW;
          const int64_t nvalid = std::min(CW, bs_r - c * CW);
          micro_mr<T, NV, MRMAX>(bt.size(t), nb, bs_c, X + b0 * x_rs, xoff.data(), x_rs,
                                 int64_t(1), wc, bs_c * CW, CW, yr + b0 * N + c * CW, N, nvalid);
        }
      }
    }
  }
}

// ---- sddmm ----------------------------------------------------------------------------
template <typename T, int NV>
void sddmm_impl(const at::Tensor& dyp, const at::Tensor& xp, int64_t B, const int32_t* col_idx,
                const int32_t* row_ptr, int64_t n_brows, int64_t bs_r, int64_t bs_c,
                at::Tensor& out) {
  constexpr int L = Simd<T>::L;
  constexpr int MRMAX = NV == 2 ? kMaxMR2 : kMaxMR1;
  constexpr int64_t CW = NV * L;
  const int64_t cpad = round_up(bs_c, CW);
  const T* DY = dyp.const_data_ptr<T>();  // [R][B][bs_r]
  const T* X = xp.const_data_ptr<T>();    // [C][B][cpad]
  T* O = out.data_ptr<T>();
  const Tiles it(bs_r, MRMAX);

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(B * out.numel()))
  for (int64_t r = 0; r < n_brows; ++r) {
    const T* dyr = DY + r * B * bs_r;
    for (int64_t p = row_ptr[r]; p < row_ptr[r + 1]; ++p) {
      const T* xc = X + int64_t(col_idx[p]) * B * cpad;
      T* op = O + p * bs_r * bs_c;
      for (int64_t j0 = 0; j0 < bs_c; j0 += CW) {
        for (int64_t t = 0; t < it.count; ++t) {
          const int64_t i0 = it.start(t);
          // a(m, b) = dyr[b * bs_r + i0 + m]; b(b, .) = xc[b * cpad + j0 ..]
          micro_mr<T, NV, MRMAX>(it.size(t), int64_t(1), B, dyr + i0,
                                 static_cast<const int64_t*>(nullptr), int64_t(1), bs_r,
                                 xc + j0, int64_t(0), cpad, op + i0 * bs_c + j0, bs_c,
                                 std::min(CW, bs_c - j0));
        }
      }
    }
  }
}

// ---- argument checks ------------------------------------------------------------------
void check_index(const at::Tensor& t, const char* name, int64_t len) {
  TORCH_CHECK(t.device().is_cpu(), "sparsecore.bsr: ", name, " must be on the CPU, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, "sparsecore.bsr: ", name, " must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, "sparsecore.bsr: ", name,
              " must have shape (", len, ",), got ", t.sizes());
}

void check_value(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "sparsecore.bsr: ", name, " must be on the CPU, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "sparsecore.bsr: ", name, " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "sparsecore.bsr: ", name, " must be ", dim, "-D, got shape ",
              t.sizes());
}

// row_ptr: starts at 0, non-decreasing, ends at nnzb; col_idx in [0, n_cols).
void check_structure(const int32_t* row_ptr, int64_t n_rows, const int32_t* col_idx,
                     int64_t nnzb, int64_t n_cols) {
  TORCH_CHECK(row_ptr[0] == 0 && row_ptr[n_rows] == nnzb, "sparsecore.bsr: row_ptr must run ",
              "from 0 to nnzb=", nnzb, ", got ", row_ptr[0], " .. ", row_ptr[n_rows]);
  for (int64_t r = 0; r < n_rows; ++r)
    TORCH_CHECK(row_ptr[r] <= row_ptr[r + 1], "sparsecore.bsr: row_ptr decreases at ", r);
  for (int64_t p = 0; p < nnzb; ++p)
    TORCH_CHECK(col_idx[p] >= 0 && col_idx[p] < n_cols, "sparsecore.bsr: col_idx[", p,
                "]=", col_idx[p], " is outside [0, ", n_cols, ")");
}

}  // namespace

// Y = X W^T for the BSR W of shape (n_out, K); x: (B, K).
at::Tensor bsr_dsd_cpu(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& col_idx,
                       const at::Tensor& row_ptr, const std::optional<at::Tensor>& block_idx,
                       bool trans_blocks, int64_t n_out) {
  check_value(x, "x", 2);
  check_value(blocks, "blocks", 3);
  TORCH_CHECK(blocks.scalar_type() == x.scalar_type(), "sparsecore.bsr_dsd: blocks dtype ",
              blocks.scalar_type(), " differs from x dtype ", x.scalar_type());
  const int64_t nnzb = col_idx.numel();
  const int64_t bs_r = trans_blocks ? blocks.size(2) : blocks.size(1);
  const int64_t bs_c = trans_blocks ? blocks.size(1) : blocks.size(2);
  TORCH_CHECK(bs_r > 0 && bs_c > 0, "sparsecore.bsr_dsd: empty block shape ", blocks.sizes());
  const int64_t B = x.size(0), K = x.size(1);
  TORCH_CHECK(K % bs_c == 0, "sparsecore.bsr_dsd: x has ", K,
              " columns, not a multiple of the block width ", bs_c);
  TORCH_CHECK(n_out >= 0 && n_out % bs_r == 0, "sparsecore.bsr_dsd: n_out=", n_out,
              " is not a multiple of the block height ", bs_r);
  const int64_t n_brows = n_out / bs_r;
  check_index(col_idx, "col_idx", nnzb);
  check_index(row_ptr, "row_ptr", n_brows + 1);
  if (block_idx) {
    check_index(*block_idx, "block_idx", nnzb);
    const int32_t* bi = block_idx->const_data_ptr<int32_t>();
    for (int64_t p = 0; p < nnzb; ++p)
      TORCH_CHECK(bi[p] >= 0 && bi[p] < blocks.size(0), "sparsecore.bsr_dsd: block_idx[", p,
                  "]=", bi[p], " is outside [0, ", blocks.size(0), ")");
  } else {
    TORCH_CHECK(blocks.size(0) == nnzb, "sparsecore.bsr_dsd: blocks hold ", blocks.size(0),
                " blocks but col_idx has ", nnzb);
  }
  const auto ci = col_idx.contiguous(), rp = row_ptr.contiguous();
  check_structure(rp.const_data_ptr<int32_t>(), n_brows, ci.const_data_ptr<int32_t>(), nnzb,
                  K / bs_c);

  at::Tensor y = at::empty({B, n_out}, x.options());
  if (B == 0 || n_out == 0) return y;
  const at::Tensor bi = block_idx ? block_idx->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bsr_dsd_cpu", [&] {
    constexpr int L = Simd<scalar_t>::L;
    const at::Tensor xp = block_panels<scalar_t>(x, bs_c, bs_c);
    auto run = [&](auto nv) {
      dsd_impl<scalar_t, decltype(nv)::value>(
          xp, B, blocks, trans_blocks, ci.const_data_ptr<int32_t>(),
          rp.const_data_ptr<int32_t>(), bi.defined() ? bi.const_data_ptr<int32_t>() : nullptr,
          n_brows, bs_r, bs_c, y);
    };
    if (bs_r > L) run(std::integral_constant<int, 2>{});
    else run(std::integral_constant<int, 1>{});
  });
  return y;
}

// dW_p = dY[:, rows of block p]^T X[:, cols of block p]; dy: (B, N), x: (B, K).
at::Tensor bsr_sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                         const at::Tensor& col_idx, int64_t bs_r, int64_t bs_c) {
  check_value(dy, "dy", 2);
  check_value(x, "x", 2);
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "sparsecore.bsr_sddmm: dy dtype ",
              dy.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(dy.size(0) == x.size(0), "sparsecore.bsr_sddmm: dy has ", dy.size(0),
              " rows but x has ", x.size(0));
  TORCH_CHECK(bs_r > 0 && bs_c > 0, "sparsecore.bsr_sddmm: block shape must be positive, got ",
              bs_r, "x", bs_c);
  const int64_t B = x.size(0), N = dy.size(1), K = x.size(1);
  TORCH_CHECK(N % bs_r == 0 && K % bs_c == 0, "sparsecore.bsr_sddmm: (", N, ", ", K,
              ") is not divisible by the block shape ", bs_r, "x", bs_c);
  const int64_t nnzb = col_idx.numel(), n_brows = N / bs_r;
  check_index(col_idx, "col_idx", nnzb);
  check_index(row_ptr, "row_ptr", n_brows + 1);
  const auto ci = col_idx.contiguous(), rp = row_ptr.contiguous();
  check_structure(rp.const_data_ptr<int32_t>(), n_brows, ci.const_data_ptr<int32_t>(), nnzb,
                  K / bs_c);

  at::Tensor out = at::zeros({nnzb, bs_r, bs_c}, x.options());
  if (B == 0 || nnzb == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bsr_sddmm_cpu", [&] {
    constexpr int L = Simd<scalar_t>::L;
    auto run = [&](auto nv) {
      constexpr int NV = decltype(nv)::value;
      const at::Tensor dyp = block_panels<scalar_t>(dy, bs_r, bs_r);
      const at::Tensor xp = block_panels<scalar_t>(x, bs_c, round_up(bs_c, NV * L));
      sddmm_impl<scalar_t, NV>(dyp, xp, B, ci.const_data_ptr<int32_t>(),
                               rp.const_data_ptr<int32_t>(), n_brows, bs_r, bs_c, out);
    };
    if (bs_c > L) run(std::integral_constant<int, 2>{});
    else run(std::integral_constant<int, 1>{});
  });
  return out;
}

TORCH_LIBRARY_IMPL(sparsecore, CPU, m) {
  m.impl("bsr_dsd_cpu", &bsr_dsd_cpu);
  m.impl("bsr_sddmm_cpu", &bsr_sddmm_cpu);
}

}  // namespace sparsecore
