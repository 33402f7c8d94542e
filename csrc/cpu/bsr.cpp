// Block-sparse (BSR) x dense products on the CPU: the forward / input-gradient product
// (_bsr_dsd_cpu) and the block SDDMM for the gradient of the kept blocks (_bsr_sddmm_cpu).
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
// conv2d (_bsr_conv2d_cpu, _dx_cpu, _dw_cpu): the same micro-kernel on the im2col view of
//        the input without forming it (an im2col matrix is kh*kw times the input, and
//        writing it cost more than the whole sparse product at CIFAR shapes): the forward
//        and the block gradient gather their broadcast operands from the zero-padded input
//        through per-pixel origins + per-column offsets; the input gradient adds each
//        register tile of dY W straight into the padded gradient.
//
// The dsd runs kept blocks at about dense torch's FLOP rate (packing X is a fixed cost, felt
// at low density), and prefetching the next block's X rows pays at low density; the numbers:
// see bench/RESULTS.md (layers-bsr).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "arena.h"
#include "threads.h"

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
// A operands (the broadcast side): element (m, t) of segment s, after a.begin<MR>(s).
// Strided: base + off[s] + m * rs + t * ts (packed X panels; dY columns in the sddmm).
template <typename T>
struct StridedA {
  const T* base;
  const int64_t* off;  // per-segment offset, or nullptr (one segment)
  int64_t rs, ts, ns, depth;
  const T* seg = nullptr;
  template <int MR>
  void begin(int64_t s) {
    seg = base + (off ? off[s] : 0);
    if (off && s + 1 < ns) {  // the next block's inputs: its panel rows sit elsewhere
      const char* an = reinterpret_cast<const char*>(base + off[s + 1]);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m)
        for (int64_t o = 0; o < depth * int64_t(sizeof(T)); o += 64)
          __builtin_prefetch(an + (m * rs) * int64_t(sizeof(T)) + o);
    }
  }
  const T* at(int m, int64_t t) const { return seg + m * rs + t * ts; }
};

// Indirect (convolution without an im2col matrix, as in Dukhan's indirect convolution):
// rows[m] is output pixel m's receptive-field origin in the zero-padded input, and
// koff[segoff[s] + t] the offset of im2col column (channel, tap) from it.
template <typename T>
struct IndirectA {
  const T* const* rows;
  const int64_t* koff;
  const int64_t* segoff;
  const int64_t* ko = nullptr;
  template <int MR>
  void begin(int64_t s) { ko = koff + segoff[s]; }
  const T* at(int m, int64_t t) const { return rows[m] + ko[t]; }
};

// Gather (the conv's block gradient): a(m, t) = base + orig[t] + kofs[m], t = output pixel
// (orig: its receptive-field origin), m = im2col column (kofs: its offset).
template <typename T>
struct GatherA {
  const T* base;
  const int64_t* orig;
  const int64_t* kofs;
  template <int MR>
  void begin(int64_t) {}
  const T* at(int m, int64_t t) const { return base + orig[t] + kofs[m]; }
};

// acc[m][v] = sum_s sum_t a[s](m, t) * b[s](t, v*L .. v*L+L) over `ns` segments s, where
//   b[s](t, .) = b_base + s * b_seg + t * b_ts   (NV contiguous vectors), t < depth,
// then out[m * out_rs + 0 .. n_valid) = acc[m] (n_valid <= NV * L).
// dsd: segments = kept blocks of a block row, t = j, m = batch row, vectors = outputs i.
// sddmm: one segment, t = batch row b, m = output i, vectors = inputs j.
template <typename T, int MR, int NV, typename A>
inline void micro(A a, int64_t ns, int64_t depth, const T* b_base, int64_t b_seg, int64_t b_ts,
                  T* out, int64_t out_rs, int64_t n_valid, bool accumulate = false) {
  using S = Simd<T>;
  constexpr int L = S::L;
  typename S::reg acc[MR][NV];
  // accumulate (out += ...) needs a full chunk: n_valid == NV * L
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[m][v] = accumulate ? S::load(out + m * out_rs + v * L) : S::zero();
  for (int64_t s = 0; s < ns; ++s) {
    a.template begin<MR>(s);
    const T* b = b_base + s * b_seg;
    for (int64_t t = 0; t < depth; ++t) {
      typename S::reg bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = S::load(b + t * b_ts + v * L);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const typename S::reg am = S::bcast(a.at(m, t));
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
template <typename T, int NV, int MR, typename A, typename... Args>
inline void micro_mr(int mr, const A& a, Args... args) {
  if constexpr (MR > 1) {
    if (mr < MR) return micro_mr<T, NV, MR - 1>(mr, a, args...);
  }
  micro<T, MR, NV>(a, args...);
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
// op (gradcheck, a small layer) would otherwise wait on descheduled workers. (Tests lower
// the threshold through min_work_per_thread, threads.h.)
int threads_for(int64_t work) {
  return work >= min_work_per_thread(int64_t(1) << 20) ? at::get_num_threads() : 1;
}

// Xp[c][b][t] = x[b, c * w + t] for t < w, zero up to wpad: column-block panels, so that
// the rows a micro-tile reads from one block are contiguous (and prefetchable).
// (A plain x.view(B, C, w).transpose(0, 1).contiguous() was several times slower than this
// copy; see bench/RESULTS.md (layers-bsr).)
template <typename T>
at::Tensor block_panels(const at::Tensor& x_in, int64_t w, int64_t wpad) {
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1), C = K / w;
  at::Tensor out = at::empty({C, B, wpad}, x.options());
  const T* src = x.const_data_ptr<T>();
  T* dst = out.data_ptr<T>();
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads_for(B * K))
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t b = 0; b < B; ++b) {
      T* d = dst + (c * B + b) * wpad;
      std::memcpy(d, src + b * K + c * w, sizeof(T) * w);
      std::fill(d + w, d + wpad, T(0));
    }
  }
  return out;
}

// The kept blocks as the kernels read them: W_p[i, j] = W[q * s0 + i * si + j * sj] with
// q = idx[p] (or p); swapping si and sj reads every block transposed.
template <typename T>
struct BlockView {
  const T* W;
  int64_t s0, si, sj;
  const int32_t* idx;

  BlockView(const at::Tensor& blocks, bool trans, const int32_t* block_idx)
      : W(blocks.const_data_ptr<T>()),
        s0(blocks.stride(0)),
        si(trans ? blocks.stride(2) : blocks.stride(1)),
        sj(trans ? blocks.stride(1) : blocks.stride(2)),
        idx(block_idx) {}

  // dst[c][p][j][ii] = W_{p0+p}[c*CW + ii, j] for the nb blocks of one block row, zero past
  // bs_r: each chunk's panel is contiguous, and a step in j is one vector load per NV.
  void pack_row(int64_t p0, int64_t nb, int64_t bs_r, int64_t bs_c, int64_t CW, T* dst) const {
    const int64_t nchunks = (bs_r + CW - 1) / CW;
    std::fill(dst, dst + nchunks * nb * bs_c * CW, T(0));
    for (int64_t p = 0; p < nb; ++p) {
      const T* wq = W + (idx ? idx[p0 + p] : p0 + p) * s0;
      for (int64_t i = 0; i < bs_r; ++i) {
        T* d = dst + (((i / CW) * nb + p) * bs_c) * CW + i % CW;
        for (int64_t j = 0; j < bs_c; ++j) d[j * CW] = wq[i * si + j * sj];
      }
    }
  }
};

// ---- dsd ------------------------------------------------------------------------------
template <typename T, int NV>
void dsd_impl(const at::Tensor& xp, int64_t B, const BlockView<T>& w, const int32_t* col_idx,
              const int32_t* row_ptr, int64_t n_brows, int64_t bs_r, int64_t bs_c,
              at::Tensor& y) {
  constexpr int L = Simd<T>::L;
  constexpr int MRMAX = NV == 2 ? kMaxMR2 : kMaxMR1;
  constexpr int64_t CW = NV * L;  // outputs per accumulator row
  const int64_t N = y.size(1);
  const int64_t nchunks = (bs_r + CW - 1) / CW;
  const T* X = xp.const_data_ptr<T>();
  const int64_t x_rs = bs_c, x_blk = B * bs_c;  // Xp row and panel strides
  T* Y = y.data_ptr<T>();
  const Tiles bt(B, MRMAX);

#pragma omp parallel num_threads(threads_for(B * row_ptr[n_brows] * bs_r * bs_c))
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
      wp.resize(nchunks * nb * bs_c * CW);
      w.pack_row(p0, nb, bs_r, bs_c, CW, wp.data());
      xoff.resize(nb);
      for (int64_t p = 0; p < nb; ++p) xoff[p] = col_idx[p0 + p] * x_blk;
      for (int64_t t = 0; t < bt.count; ++t) {
        const int64_t b0 = bt.start(t);
        for (int64_t c = 0; c < nchunks; ++c) {
          const T* wc = wp.data() + c * nb * bs_c * CW;
          const int64_t nvalid = std::min(CW, bs_r - c * CW);
          const StridedA<T> a{X + b0 * x_rs, xoff.data(), x_rs, 1, nb, bs_c};
          micro_mr<T, NV, MRMAX>(bt.size(t), a, nb, bs_c, wc, bs_c * CW, CW,
                                 yr + b0 * N + c * CW, N, nvalid);
        }
      }
    }
  }
}

// ---- conv2d (forward, no im2col matrix) -----------------------------------------------
// Geometry of a conv over the zero-padded input xpad (B, C, Hp, Wp): output pixel
// q = (b, oy, ox) reads im2col column k = (c, i, jj) at origin(q) + koff[k].
struct ConvGeom {
  int64_t B, C, Hp, Wp, Ho, Wo, kh, kw, sh, sw, dh, dw;
  int64_t origin(int64_t q) const {
    const int64_t b = q / (Ho * Wo), oy = (q / Wo) % Ho, ox = q % Wo;
    return b * C * Hp * Wp + oy * sh * Wp + ox * sw;
  }
  std::vector<int64_t> koff() const {
    std::vector<int64_t> k(C * kh * kw);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j)
          k[(c * kh + i) * kw + j] = c * Hp * Wp + i * dh * Wp + j * dw;
    return k;
  }
};

// Y (B*Ho*Wo, N) = im2col(x) W^T, reading the input in place through IndirectA. Work items
// are (pixel chunk, block row), block row fastest, so a thread's consecutive items share
// the chunk's input in cache; the weights are packed once, up front.
template <typename T, int NV>
void conv_impl(const T* xpad, const ConvGeom& g, const BlockView<T>& w, const int32_t* col_idx,
               const int32_t* row_ptr, int64_t n_brows, int64_t bs_r, int64_t bs_c, T* Y,
               int64_t N) {
  constexpr int L = Simd<T>::L;
  constexpr int MRMAX = NV == 2 ? kMaxMR2 : kMaxMR1;
  constexpr int64_t CW = NV * L;
  constexpr int64_t PC = 8 * MRMAX;  // pixels per work item
  const int64_t nchunks = (bs_r + CW - 1) / CW;
  const int64_t nnzb = row_ptr[n_brows], P = g.B * g.Ho * g.Wo;
  const int64_t panel = nchunks * bs_c * CW;  // packed floats per block
  const int nthreads = threads_for(P * nnzb * bs_r * bs_c);
  std::vector<T> wp(nnzb * panel);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t r = 0; r < n_brows; ++r)
    w.pack_row(row_ptr[r], row_ptr[r + 1] - row_ptr[r], bs_r, bs_c, CW,
               wp.data() + row_ptr[r] * panel);
  const std::vector<int64_t> koff = g.koff();
  std::vector<int64_t> segoff(nnzb);
  for (int64_t p = 0; p < nnzb; ++p) segoff[p] = int64_t(col_idx[p]) * bs_c;
  const int64_t nitems = (P + PC - 1) / PC * n_brows;

#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t item = 0; item < nitems; ++item) {
    const int64_t r = item % n_brows, q0 = item / n_brows * PC, nq = std::min(PC, P - q0);
    const int64_t p0 = row_ptr[r], nb = row_ptr[r + 1] - p0;
    if (nb == 0) {
      for (int64_t q = q0; q < q0 + nq; ++q)
        std::fill(Y + q * N + r * bs_r, Y + q * N + (r + 1) * bs_r, T(0));
      continue;
    }
    const Tiles qt(nq, MRMAX);
    const T* rows[MRMAX];
    for (int64_t t = 0; t < qt.count; ++t) {
      const int64_t qs = q0 + qt.start(t);
      const int mr = qt.size(t);
      for (int m = 0; m < mr; ++m) rows[m] = xpad + g.origin(qs + m);
      const IndirectA<T> a{rows, koff.data(), segoff.data() + p0};
      for (int64_t c = 0; c < nchunks; ++c) {
        micro_mr<T, NV, MRMAX>(mr, a, nb, bs_c, wp.data() + p0 * panel + c * nb * bs_c * CW,
                               bs_c * CW, CW, Y + qs * N + r * bs_r + c * CW, N,
                               std::min(CW, bs_r - c * CW));
      }
    }
  }
}

// dxpad (B, C, Hp, Wp) = col2im(dY W) without the (B*Ho*Wo, C*kh*kw) matrix: each work
// item owns whole images (their receptive fields overlap only inside an image), runs the
// transposed product one (pixel tile, W^T block row) at a time into registers and adds the
// tile into the padded input gradient. w reads W^T's blocks (W's, transposed, in t order).
template <typename T, int NV>
void conv_dx_impl(const T* dy, const ConvGeom& g, const BlockView<T>& w, const int32_t* t_col_idx,
                  const int32_t* t_row_ptr, int64_t n_trows, int64_t bs_r, int64_t bs_c,
                  int64_t n_out, T* dxpad) {
  constexpr int L = Simd<T>::L;
  constexpr int MRMAX = NV == 2 ? kMaxMR2 : kMaxMR1;
  constexpr int64_t CW = NV * L;
  // W^T: block rows of bs_c outputs (im2col columns), depth bs_r (output channels)
  const int64_t nchunks = (bs_c + CW - 1) / CW, nnzb = t_row_ptr[n_trows];
  const int64_t panel = nchunks * bs_r * CW;
  const int64_t L_img = g.Ho * g.Wo;
  const int64_t imgs = std::max<int64_t>(1, 96 / std::max<int64_t>(L_img, 1));  // >= ~96 px
  const int64_t nitems = (g.B + imgs - 1) / imgs;
  const int nthreads = threads_for(g.B * L_img * nnzb * bs_r * bs_c);
  std::vector<T> wp(nnzb * panel);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t r = 0; r < n_trows; ++r)
    w.pack_row(t_row_ptr[r], t_row_ptr[r + 1] - t_row_ptr[r], bs_c, bs_r, CW,
               wp.data() + t_row_ptr[r] * panel);
  const std::vector<int64_t> koff = g.koff();
  std::vector<int64_t> segoff(nnzb);
  for (int64_t p = 0; p < nnzb; ++p) segoff[p] = int64_t(t_col_idx[p]) * bs_r;

#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t item = 0; item < nitems; ++item) {
    const int64_t q0 = item * imgs * L_img, q1 = std::min(g.B, (item + 1) * imgs) * L_img;
    const Tiles qt(q1 - q0, MRMAX);
    T tmp[MRMAX * CW];
    for (int64_t r = 0; r < n_trows; ++r) {
      const int64_t p0 = t_row_ptr[r], nb = t_row_ptr[r + 1] - p0;
      if (nb == 0) continue;
      for (int64_t t = 0; t < qt.count; ++t) {
        const int64_t qs = q0 + qt.start(t);
        const int mr = qt.size(t);
        const StridedA<T> a{dy + qs * n_out, segoff.data() + p0, n_out, 1, nb, bs_r};
        for (int64_t c = 0; c < nchunks; ++c) {
          const int64_t nvalid = std::min(CW, bs_c - c * CW);
          micro_mr<T, NV, MRMAX>(mr, a, nb, bs_r, wp.data() + p0 * panel + c * nb * bs_r * CW,
                                 bs_r * CW, CW, tmp, CW, nvalid);
          const int64_t* ko = koff.data() + r * bs_c + c * CW;
          for (int m = 0; m < mr; ++m) {
            T* o = dxpad + g.origin(qs + m);
            for (int64_t i = 0; i < nvalid; ++i) o[ko[i]] += tmp[m * CW + i];
          }
        }
      }
    }
  }
}

// dW_p = sum over pixels q of dY[q, rows of p]^T im2col(x)[q, cols of p], gathered from the
// padded input in place. Work items are pixel chunks; each thread accumulates every block
// (transposed, [p][j][i padded]) in a private buffer, summed at the end: a block's sum runs
// over all pixels, so splitting pixels is what gives the threads (and the cache) work.
template <typename T, int NV>
void conv_dw_impl(const T* dy, const T* xpad, const ConvGeom& g, const int32_t* col_idx,
                  const int32_t* row_ptr, int64_t n_brows, int64_t bs_r, int64_t bs_c,
                  int64_t n_out, T* out) {
  constexpr int L = Simd<T>::L;
  constexpr int MRMAX = NV == 2 ? kMaxMR2 : kMaxMR1;
  constexpr int64_t CW = NV * L;
  constexpr int64_t PC = 256;  // pixels per work item
  const int64_t nnzb = row_ptr[n_brows], P = g.B * g.Ho * g.Wo;
  const int64_t rpad = round_up(bs_r, CW), blk = bs_c * rpad;
  const int nthreads = threads_for(P * nnzb * bs_r * bs_c);
  std::vector<T> acc(int64_t(nthreads) * nnzb * blk, T(0));
  std::vector<int64_t> orig(P);
  for (int64_t q = 0; q < P; ++q) orig[q] = g.origin(q);
  const std::vector<int64_t> koff = g.koff();
  const Tiles jt(bs_c, MRMAX);
  const int64_t nitems = (P + PC - 1) / PC;
  // dY is read NV*L outputs at a time; a block row's last chunk may run past n_out
  std::vector<T> dyp;
  const T* dyr = dy;
  int64_t dy_rs = n_out;
  if (rpad != bs_r || n_out % CW) {
    dy_rs = n_brows * rpad;
    dyp.assign(P * dy_rs, T(0));
    for (int64_t q = 0; q < P; ++q)
      for (int64_t r = 0; r < n_brows; ++r)
        std::memcpy(&dyp[q * dy_rs + r * rpad], dy + q * n_out + r * bs_r, sizeof(T) * bs_r);
    dyr = dyp.data();
  }
  const int64_t rs_blk = dy_rs == n_out ? bs_r : rpad;

#pragma omp parallel num_threads(nthreads)
  {
    T* mine = acc.data() + int64_t(omp_get_thread_num()) * nnzb * blk;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < nitems; ++item) {
      const int64_t q0 = item * PC, nq = std::min(PC, P - q0);
      for (int64_t r = 0; r < n_brows; ++r) {
        for (int64_t p = row_ptr[r]; p < row_ptr[r + 1]; ++p) {
          for (int64_t t = 0; t < jt.count; ++t) {
            const int64_t j0 = jt.start(t);
            const GatherA<T> a{xpad, orig.data() + q0, koff.data() + col_idx[p] * bs_c + j0};
            for (int64_t i0 = 0; i0 < bs_r; i0 += CW)
              micro_mr<T, NV, MRMAX>(jt.size(t), a, int64_t(1), nq,
                                     dyr + q0 * dy_rs + r * rs_blk + i0, int64_t(0), dy_rs,
                                     mine + p * blk + j0 * rpad + i0, rpad, CW, true);
          }
        }
      }
    }
  }
  // out[p][i][j] = sum over threads of acc[thread][p][j][i]
  at::parallel_for(0, nnzb, 16, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p)
      for (int64_t j = 0; j < bs_c; ++j)
        for (int64_t i = 0; i < bs_r; ++i) {
          T v = 0;
          for (int th = 0; th < nthreads; ++th) v += acc[(th * nnzb + p) * blk + j * rpad + i];
          out[(p * bs_r + i) * bs_c + j] = v;
        }
  });
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
          const StridedA<T> a{dyr + i0, nullptr, 1, bs_r, 1, B};
          micro_mr<T, NV, MRMAX>(it.size(t), a, int64_t(1), B, xc + j0, int64_t(0), cpad,
                                 op + i0 * bs_c + j0, bs_c, std::min(CW, bs_c - j0));
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
at::Tensor _bsr_dsd_cpu(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& col_idx,
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

  at::Tensor y = arena_empty({B, n_out}, x.options());
  if (B == 0 || n_out == 0) return y;
  const at::Tensor bi = block_idx ? block_idx->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "_bsr_dsd_cpu", [&] {
    constexpr int L = Simd<scalar_t>::L;
    const at::Tensor xp = block_panels<scalar_t>(x, bs_c, bs_c);
    const BlockView<scalar_t> w(blocks, trans_blocks,
                                bi.defined() ? bi.const_data_ptr<int32_t>() : nullptr);
    auto run = [&](auto nv) {
      dsd_impl<scalar_t, decltype(nv)::value>(xp, B, w, ci.const_data_ptr<int32_t>(),
                                              rp.const_data_ptr<int32_t>(), n_brows, bs_r,
                                              bs_c, y);
    };
    if (bs_r > L) run(std::integral_constant<int, 2>{});
    else run(std::integral_constant<int, 1>{});
  });
  return y;
}

// dW_p = dY[:, rows of block p]^T X[:, cols of block p]; dy: (B, N), x: (B, K).
at::Tensor _bsr_sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
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
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "_bsr_sddmm_cpu", [&] {
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

namespace {
ConvGeom conv_geom(at::IntArrayRef x_shape, at::IntArrayRef kernel, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x_shape.size() == 4, "sparsecore.bsr_conv2d: input must be 4-D (B, C, H, W), got ",
              x_shape);
  for (auto [name, v] : {std::pair{"kernel_size", kernel}, std::pair{"stride", stride},
                         std::pair{"padding", padding}, std::pair{"dilation", dilation}})
    TORCH_CHECK(v.size() == 2, "sparsecore.bsr_conv2d: ", name, " must have 2 entries, got ", v);
  TORCH_CHECK(kernel[0] > 0 && kernel[1] > 0 && stride[0] > 0 && stride[1] > 0 &&
                  dilation[0] > 0 && dilation[1] > 0 && padding[0] >= 0 && padding[1] >= 0,
              "sparsecore.bsr_conv2d: bad geometry kernel ", kernel, " stride ", stride,
              " padding ", padding, " dilation ", dilation);
  ConvGeom g{};
  g.B = x_shape[0], g.C = x_shape[1];
  g.Hp = x_shape[2] + 2 * padding[0], g.Wp = x_shape[3] + 2 * padding[1];
  g.kh = kernel[0], g.kw = kernel[1], g.sh = stride[0], g.sw = stride[1];
  g.dh = dilation[0], g.dw = dilation[1];
  g.Ho = (g.Hp - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.Wp - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.Hp >= g.dh * (g.kh - 1) + 1 && g.Wp >= g.dw * (g.kw - 1) + 1,
              "sparsecore.bsr_conv2d: the (padded) input ", x_shape,
              " is smaller than the dilated kernel");
  return g;
}

at::Tensor pad_input(const at::Tensor& x, at::IntArrayRef padding) {
  if (padding[0] == 0 && padding[1] == 0) return x.contiguous();
  return at::constant_pad_nd(x, {padding[1], padding[1], padding[0], padding[0]}).contiguous();
}
}  // namespace

// y (B*Ho*Wo, n_out), rows in (b, oy, ox) order = conv2d(x, W) for the BSR W of the conv
// weight's matrix view (n_out, C*kh*kw); x: (B, C, H, W).
at::Tensor _bsr_conv2d_cpu(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& col_idx,
                          const at::Tensor& row_ptr, at::IntArrayRef kernel,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation) {
  check_value(x, "x", 4);
  check_value(blocks, "blocks", 3);
  TORCH_CHECK(blocks.scalar_type() == x.scalar_type(), "sparsecore.bsr_conv2d: blocks dtype ",
              blocks.scalar_type(), " differs from x dtype ", x.scalar_type());
  const ConvGeom g = conv_geom(x.sizes(), kernel, stride, padding, dilation);
  const int64_t K = g.C * g.kh * g.kw, bs_r = blocks.size(1), bs_c = blocks.size(2);
  const int64_t nnzb = col_idx.numel(), n_brows = row_ptr.numel() - 1;
  TORCH_CHECK(bs_r > 0 && bs_c > 0 && K % bs_c == 0, "sparsecore.bsr_conv2d: the block width ",
              bs_c, " does not divide C*kh*kw=", K);
  TORCH_CHECK(blocks.size(0) == nnzb, "sparsecore.bsr_conv2d: blocks hold ", blocks.size(0),
              " blocks but col_idx has ", nnzb);
  check_index(col_idx, "col_idx", nnzb);
  TORCH_CHECK(n_brows >= 0, "sparsecore.bsr_conv2d: row_ptr must not be empty");
  check_index(row_ptr, "row_ptr", n_brows + 1);
  const auto ci = col_idx.contiguous(), rp = row_ptr.contiguous();
  check_structure(rp.const_data_ptr<int32_t>(), n_brows, ci.const_data_ptr<int32_t>(), nnzb,
                  K / bs_c);
  const int64_t n_out = n_brows * bs_r;
  at::Tensor y = arena_empty({g.B * g.Ho * g.Wo, n_out}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor xpad = pad_input(x, padding);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "_bsr_conv2d_cpu", [&] {
    constexpr int L = Simd<scalar_t>::L;
    const BlockView<scalar_t> w(blocks, false, nullptr);
    auto run = [&](auto nv) {
      conv_impl<scalar_t, decltype(nv)::value>(xpad.const_data_ptr<scalar_t>(), g, w,
                                               ci.const_data_ptr<int32_t>(),
                                               rp.const_data_ptr<int32_t>(), n_brows, bs_r,
                                               bs_c, y.data_ptr<scalar_t>(), n_out);
    };
    if (bs_r > L) run(std::integral_constant<int, 2>{});
    else run(std::integral_constant<int, 1>{});
  });
  return y;
}

// dx (B, C, H, W) = the input gradient of _bsr_conv2d_cpu, from dy2 (B*Ho*Wo, n_out) and the
// transposed structure of W (t_col_idx, t_row_ptr, t_perm over W's blocks).
at::Tensor _bsr_conv2d_dx_cpu(const at::Tensor& dy2, const at::Tensor& blocks,
                             const at::Tensor& t_col_idx, const at::Tensor& t_row_ptr,
                             const at::Tensor& t_perm, at::IntArrayRef x_shape,
                             at::IntArrayRef kernel, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_value(dy2, "dy", 2);
  check_value(blocks, "blocks", 3);
  TORCH_CHECK(blocks.scalar_type() == dy2.scalar_type(), "sparsecore.bsr_conv2d_dx: blocks dtype ",
              blocks.scalar_type(), " differs from dy dtype ", dy2.scalar_type());
  const ConvGeom g = conv_geom(x_shape, kernel, stride, padding, dilation);
  const int64_t K = g.C * g.kh * g.kw, bs_r = blocks.size(1), bs_c = blocks.size(2);
  const int64_t nnzb = blocks.size(0), n_out = dy2.size(1);
  TORCH_CHECK(bs_r > 0 && bs_c > 0 && K % bs_c == 0 && n_out % bs_r == 0,
              "sparsecore.bsr_conv2d_dx: block ", bs_r, "x", bs_c, " does not divide (", n_out,
              ", ", K, ")");
  TORCH_CHECK(dy2.size(0) == g.B * g.Ho * g.Wo, "sparsecore.bsr_conv2d_dx: dy has ", dy2.size(0),
              " rows, expected B*Ho*Wo=", g.B * g.Ho * g.Wo);
  const int64_t n_trows = K / bs_c;
  check_index(t_col_idx, "t_col_idx", nnzb);
  check_index(t_perm, "t_perm", nnzb);
  check_index(t_row_ptr, "t_row_ptr", n_trows + 1);
  const auto ci = t_col_idx.contiguous(), rp = t_row_ptr.contiguous(), pm = t_perm.contiguous();
  check_structure(rp.const_data_ptr<int32_t>(), n_trows, ci.const_data_ptr<int32_t>(), nnzb,
                  n_out / bs_r);
  const int32_t* perm = pm.const_data_ptr<int32_t>();
  for (int64_t p = 0; p < nnzb; ++p)
    TORCH_CHECK(perm[p] >= 0 && perm[p] < nnzb, "sparsecore.bsr_conv2d_dx: t_perm[", p, "]=",
                perm[p], " is outside [0, ", nnzb, ")");
  at::Tensor dxpad = at::zeros({g.B, g.C, g.Hp, g.Wp}, dy2.options());
  if (dy2.numel() > 0 && nnzb > 0) {
    const at::Tensor dy = dy2.contiguous();
    AT_DISPATCH_FLOATING_TYPES(dy2.scalar_type(), "_bsr_conv2d_dx_cpu", [&] {
      constexpr int L = Simd<scalar_t>::L;
      const BlockView<scalar_t> w(blocks, true, perm);
      auto run = [&](auto nv) {
        conv_dx_impl<scalar_t, decltype(nv)::value>(
            dy.const_data_ptr<scalar_t>(), g, w, ci.const_data_ptr<int32_t>(),
            rp.const_data_ptr<int32_t>(), n_trows, bs_r, bs_c, n_out,
            dxpad.data_ptr<scalar_t>());
      };
      if (bs_c > L) run(std::integral_constant<int, 2>{});
      else run(std::integral_constant<int, 1>{});
    });
  }
  if (padding[0] == 0 && padding[1] == 0) return dxpad;
  return dxpad.narrow(2, padding[0], x_shape[2]).narrow(3, padding[1], x_shape[3]).contiguous();
}

// (nnzb, bs_r, bs_c): the gradient of the kept blocks of _bsr_conv2d_cpu's W, from
// dy2 (B*Ho*Wo, n_out) and x (B, C, H, W).
at::Tensor _bsr_conv2d_dw_cpu(const at::Tensor& dy2, const at::Tensor& x, const at::Tensor& row_ptr,
                             const at::Tensor& col_idx, int64_t bs_r, int64_t bs_c,
                             at::IntArrayRef kernel, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_value(dy2, "dy", 2);
  check_value(x, "x", 4);
  TORCH_CHECK(dy2.scalar_type() == x.scalar_type(), "sparsecore.bsr_conv2d_dw: dy dtype ",
              dy2.scalar_type(), " differs from x dtype ", x.scalar_type());
  const ConvGeom g = conv_geom(x.sizes(), kernel, stride, padding, dilation);
  const int64_t K = g.C * g.kh * g.kw, n_out = dy2.size(1);
  TORCH_CHECK(bs_r > 0 && bs_c > 0 && K % bs_c == 0 && n_out % bs_r == 0,
              "sparsecore.bsr_conv2d_dw: block ", bs_r, "x", bs_c, " does not divide (", n_out,
              ", ", K, ")");
  TORCH_CHECK(dy2.size(0) == g.B * g.Ho * g.Wo, "sparsecore.bsr_conv2d_dw: dy has ", dy2.size(0),
              " rows, expected B*Ho*Wo=", g.B * g.Ho * g.Wo);
  const int64_t nnzb = col_idx.numel(), n_brows = n_out / bs_r;
  check_index(col_idx, "col_idx", nnzb);
  check_index(row_ptr, "row_ptr", n_brows + 1);
  const auto ci = col_idx.contiguous(), rp = row_ptr.contiguous();
  check_structure(rp.const_data_ptr<int32_t>(), n_brows, ci.const_data_ptr<int32_t>(), nnzb,
                  K / bs_c);
  at::Tensor out = at::zeros({nnzb, bs_r, bs_c}, x.options());
  if (dy2.size(0) == 0 || nnzb == 0) return out;
  const at::Tensor xpad = pad_input(x, padding), dy = dy2.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "_bsr_conv2d_dw_cpu", [&] {
    constexpr int L = Simd<scalar_t>::L;
    auto run = [&](auto nv) {
      conv_dw_impl<scalar_t, decltype(nv)::value>(
          dy.const_data_ptr<scalar_t>(), xpad.const_data_ptr<scalar_t>(), g,
          ci.const_data_ptr<int32_t>(), rp.const_data_ptr<int32_t>(), n_brows, bs_r, bs_c,
          n_out, out.data_ptr<scalar_t>());
    };
    if (bs_r > L) run(std::integral_constant<int, 2>{});
    else run(std::integral_constant<int, 1>{});
  });
  return out;
}

TORCH_LIBRARY_IMPL(sparsecore, CPU, m) {
  m.impl("_bsr_conv2d_cpu", &_bsr_conv2d_cpu);
  m.impl("_bsr_conv2d_dx_cpu", &_bsr_conv2d_dx_cpu);
  m.impl("_bsr_conv2d_dw_cpu", &_bsr_conv2d_dw_cpu);
  m.impl("_bsr_dsd_cpu", &_bsr_dsd_cpu);
  m.impl("_bsr_sddmm_cpu", &_bsr_sddmm_cpu);
}

}  // namespace sparsecore
