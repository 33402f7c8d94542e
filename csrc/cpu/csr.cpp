// Unstructured (CSR) sparse x dense products on the CPU, for SparseLinear and SparseConv2d.
//
// W is (N, K) in CSR: row o keeps nonzeros k in [row_ptr[o], row_ptr[o+1]) at columns
// col_idx[k] (strictly increasing within a row), with values[k].
//
// Both kernels work on "feature-major" operands, where the batch (Linear) or the output pixels
// of one sample (Conv2d) run along the contiguous dimension, so that one nonzero w_k meets a
// contiguous vector of inputs:
//
//   spmm   YT[o, b] = sum_k values[k] * XT[col[k], b]        (Y = X W^T, as YT = W XT)
//   sddmm  dv[k]    = sum_b DYT[row(k), b] * XT[col[k], b]   (dW at the kept positions)
//
// Layout and blocking, chosen by measurement on an AMD EPYC (Zen 3, 32 KiB L1d, 512 KiB L2),
// Linear 4096x4096, batch 256, 90% sparse, one thread (the numbers: see bench/RESULTS.md
// (layers)):
//  - The batch is cut into chunks of 8 SIMD vectors (64 floats / 32 doubles, 256 bytes): the
//    spmm keeps one row's chunk in 8 accumulators, 8 independent FMA chains. Operands are packed
//    chunk-major, XT[chunk][k][0:64), 64-byte aligned, so a chunk's panel is dense in memory
//    (plain (K, B) rows put one chunk at a 1 KiB stride, in a quarter of the cache sets).
//  - K is cut into tiles of kt columns whose panel stays in cache while the rows pass over it,
//    and the nonzeros are laid out tile-major (tile, row, column) in a "tiling", so the kernel
//    streams them sequentially, far faster than walking each row's tile segment in place
//    (software prefetch included), where every segment costs a cache miss. The
//    tiling depends only on the sparsity pattern: _csr_tiling_cpu builds it once (the formats
//    cache it) and each call only copies the values into tile-major order (a caller that
//    knows its values unchanged across calls may keep that copy: _csr_tile_values_cpu /
//    tiled_values; the layers do not, as they cannot know).
//  - The sddmm walks the same tiles; a group of one vector's width of nonzeros shares the
//    chunk's dY vectors, one accumulator each, reduced together by one transposing hsum.
//  - Rows are walked in their natural order, which streams the weight and the output rows:
//    walking them longest first (CSRWeight.row_order, the GPU kernels' schedule) scatters
//    both and ran slower here, most of all at batch 1. Threads take contiguous row
//    ranges balanced by nonzero count (no barriers: a row always belongs to one thread); the
//    small-batch kernels take 16-row blocks under a dynamic schedule.
//
// Every entry point checks its inputs: the CSR arrays (ranges, row_ptr monotone, columns
// sorted where the walk relies on it) in an O(nnz) pass where no tiling is given (or as the
// walk goes), and a given tiling's own structure (so that no index can leave its array) plus a
// fingerprint of row_ptr and col_idx, which catches a tiling built for another sparsity
// pattern (another matrix, or this one's indices edited in place).
#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "arena.h"
#include "fingerprint.h"
#include "threads.h"
#include "vec.h"

namespace sparsecore {
namespace {

// ---- SIMD vectors: V::W lanes; W = 1 (plain scalars) without AVX2/FMA --------------------
template <typename T>
struct ScalarVec {
  static constexpr int W = 1;
  T v;
  static ScalarVec zero() { return {T(0)}; }
  static ScalarVec load(const T* p) { return {*p}; }
  static ScalarVec bcast(T x) { return {x}; }
  void store(T* p) const { *p = v; }
  void fma(ScalarVec a, ScalarVec b) { v += a.v * b.v; }
  void add(ScalarVec a) { v += a.v; }
  // Lane i of the result is the sum of acc[i]'s lanes (a group of W accumulators).
  static ScalarVec hsum_group(const ScalarVec* acc) { return acc[0]; }
};

#if defined(__AVX2__) && defined(__FMA__)
struct F8 {
  static constexpr int W = 8;
  __m256 v;
  static F8 zero() { return {_mm256_setzero_ps()}; }
  static F8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static F8 bcast(float x) { return {_mm256_set1_ps(x)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void fma(F8 a, F8 b) { v = _mm256_fmadd_ps(a.v, b.v, v); }
  void add(F8 a) { v = _mm256_add_ps(v, a.v); }
  static F8 hsum_group(const F8* a) {
    __m256 t0 = _mm256_hadd_ps(a[0].v, a[1].v), t1 = _mm256_hadd_ps(a[2].v, a[3].v);
    __m256 t2 = _mm256_hadd_ps(a[4].v, a[5].v), t3 = _mm256_hadd_ps(a[6].v, a[7].v);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return {_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                          _mm256_permute2f128_ps(u0, u1, 0x31))};
  }
};
struct D4 {
  static constexpr int W = 4;
  __m256d v;
  static D4 zero() { return {_mm256_setzero_pd()}; }
  static D4 load(const double* p) { return {_mm256_loadu_pd(p)}; }
  static D4 bcast(double x) { return {_mm256_set1_pd(x)}; }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  void fma(D4 a, D4 b) { v = _mm256_fmadd_pd(a.v, b.v, v); }
  void add(D4 a) { v = _mm256_add_pd(v, a.v); }
  static D4 hsum_group(const D4* a) {
    __m256d t0 = _mm256_hadd_pd(a[0].v, a[1].v), t1 = _mm256_hadd_pd(a[2].v, a[3].v);
    return {_mm256_add_pd(_mm256_permute2f128_pd(t0, t1, 0x20),
                          _mm256_permute2f128_pd(t0, t1, 0x31))};
  }
};
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  using V = F8;
};
template <>
struct Simd<double> {
  using V = D4;
};
#else
template <typename T>
struct Simd {
  using V = ScalarVec<T>;
};
#endif

// A chunk is kChunkVecs vectors: 8 accumulators keep both FMA pipes (latency 4) busy.
constexpr int kChunkVecs = 8;
template <typename T>
constexpr int64_t kChunk = kChunkVecs * Simd<T>::V::W;
// K tile: at least kMinTileCols columns, wider at high sparsity so that a row's segment still
// holds about kSegNnz nonzeros (a segment's fixed cost, accumulators in and out, stays small).
// A chunk row is 256 bytes in float32 and float64 alike, so the same widths hold for both.
// Measured in the setting of the header: this rule (160 columns at 90%) was the fastest spmm
// of the widths tried, 64 to 512 and whole K; the sddmm prefers slightly longer segments but
// shares the tiling (see bench/RESULTS.md (layers)).
constexpr int64_t kMinTileCols = 128;
constexpr double kSegNnz = 16.0;
// Below this batch the packed layout has too few lanes; Linear uses the gather kernels.
constexpr int64_t kMinBatch = 8;
// Rows per dynamic-schedule grab (gather kernels) and per block of the value re-layout.
constexpr int kRowGrain = 16;

// Team size for the call being served: small products run on fewer threads (waking a team
// costs tens of microseconds on an idle machine and a whole time slice per sleeping thread on
// a loaded one). kWorkPerThread is the kernel work (lane FMAs) that pays for one more thread
// (tests lower it through min_work_per_thread, threads.h).
constexpr int64_t kWorkPerThread = int64_t(2) << 20;
thread_local int tl_team = 0;

int team() { return tl_team > 0 ? tl_team : omp_get_max_threads(); }

struct TeamFor {
  explicit TeamFor(int64_t work) {
    const int64_t want = std::max<int64_t>(1, work / min_work_per_thread(kWorkPerThread));
    tl_team = int(std::min<int64_t>(omp_get_max_threads(), want));
  }
  ~TeamFor() { tl_team = 0; }
};

// ---- checks -----------------------------------------------------------------------------------
void check_index(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kInt && t.is_contiguous() &&
                  t.device().is_cpu(),
              op, ": ", name, " must be a contiguous 1-D int32 CPU tensor, got ", t.scalar_type(),
              " of shape ", t.sizes(), " on ", t.device());
  TORCH_CHECK(n < 0 || t.numel() == n, op, ": ", name, " must have ", n, " entries, got ",
              t.numel());
}

void check_csr_tensors(const char* op, const at::Tensor* values, const at::Tensor& col_idx,
                       const at::Tensor& row_ptr, int64_t n_rows) {
  check_index(op, "col_idx", col_idx, -1);
  check_index(op, "row_ptr", row_ptr, n_rows + 1);
  if (values) {
    TORCH_CHECK(values->dim() == 1 && values->is_contiguous() && values->device().is_cpu(), op,
                ": values must be a contiguous 1-D CPU tensor");
    TORCH_CHECK(values->numel() == col_idx.numel(), op, ": values (", values->numel(),
                ") and col_idx (", col_idx.numel(), ") must have the same length");
  }
}

void check_float(const char* op, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, op,
              ": dtype must be float32 or float64, got ", a.scalar_type());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": dtypes differ (", a.scalar_type(),
              " vs ", b.scalar_type(), ")");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": all tensors must be on the CPU");
}

// The O(nnz) check of the CSR contents.
void check_csr_contents(const char* op, const at::Tensor& col_idx, const at::Tensor& row_ptr,
                        int64_t n_rows, int64_t n_cols) {
  const int32_t* col = col_idx.data_ptr<int32_t>();
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int64_t nnz = col_idx.numel();
  TORCH_CHECK(rp[0] == 0, op, ": row_ptr[0] must be 0, got ", rp[0]);
  TORCH_CHECK(rp[n_rows] == nnz, op, ": row_ptr[-1] must equal nnz = ", nnz, ", got ",
              rp[n_rows]);
  std::atomic<int64_t> bad_row{n_rows};
#pragma omp parallel for num_threads(team()) schedule(static)
  for (int64_t o = 0; o < n_rows; ++o) {
    const int64_t lo = rp[o], hi = rp[o + 1];
    bool ok = lo <= hi && lo >= 0 && hi <= nnz;
    for (int64_t k = lo; ok && k < hi; ++k)
      ok = col[k] >= 0 && col[k] < n_cols && (k == lo || col[k] > col[k - 1]);
    if (!ok) {
      int64_t cur = bad_row.load();
      while (o < cur && !bad_row.compare_exchange_weak(cur, o)) {
      }
    }
  }
  TORCH_CHECK(bad_row.load() == n_rows, op, ": invalid CSR structure at row ", bad_row.load(),
              " (need 0 <= row_ptr[r] <= row_ptr[r+1] <= nnz and 0 <= col_idx < ", n_cols,
              ", strictly increasing within a row)");
}

// ---- the tiling: W's nonzeros laid out tile-major ---------------------------------------------
// One int32 tensor: kHeader fields, then ptr (ntiles * n_rows + 1), src (ntiles * n_rows) and
// col (nnz). Segment s = t * n_rows + o (tile t, row o) is [ptr[s], ptr[s+1]) in the
// tile-major arrays and starts at src[s] in CSR order; col holds the tile-major columns.
enum : int64_t { kMagic, kRows, kCols, kNnz, kTileW, kTiles, kPrint, kHeader };
constexpr int32_t kTilingMagic = 0x43535254;

struct Tiling {
  int64_t n_rows = 0, n_cols = 0, nnz = 0, kt = 1, ntiles = 1;
  const int32_t* row_ptr = nullptr;
  const int32_t* ptr = nullptr;
  const int32_t* src = nullptr;
  const int32_t* col = nullptr;
  int64_t nseg() const { return ntiles * n_rows; }
};

int64_t pick_tile_cols(int64_t n_rows, int64_t n_cols, int64_t nnz) {
  const int64_t full = std::max<int64_t>(n_cols, 1);
  if (nnz == 0) return full;
  const double density = double(nnz) / (double(n_rows) * double(n_cols));
  const int64_t kt = std::max<int64_t>(kMinTileCols, int64_t(kSegNnz / density));
  return std::min<int64_t>(full, (kt + 7) / 8 * 8);
}

at::Tensor build_tiling(const char* op, const at::Tensor& col_idx, const at::Tensor& row_ptr,
                        int64_t n_rows, int64_t n_cols) {
  check_csr_contents(op, col_idx, row_ptr, n_rows, n_cols);
  const int64_t nnz = col_idx.numel(), kt = pick_tile_cols(n_rows, n_cols, nnz);
  const int64_t nt = std::max<int64_t>(1, (n_cols + kt - 1) / kt), nseg = nt * n_rows;
  auto out = at::empty({kHeader + 2 * nseg + 1 + nnz}, col_idx.options());
  int32_t* h = out.data_ptr<int32_t>();
  h[kMagic] = kTilingMagic;
  h[kRows] = int32_t(n_rows);
  h[kCols] = int32_t(n_cols);
  h[kNnz] = int32_t(nnz);
  h[kTileW] = int32_t(kt);
  h[kTiles] = int32_t(nt);
  h[kPrint] = fingerprint(row_ptr, col_idx);
  int32_t* ptr = h + kHeader;
  int32_t* src = ptr + nseg + 1;
  int32_t* tcol = src + nseg;
  const int32_t* col = col_idx.data_ptr<int32_t>();
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  ptr[0] = 0;
#pragma omp parallel for num_threads(team()) schedule(static)
  for (int64_t o = 0; o < n_rows; ++o) {
    const int64_t hi = rp[o + 1];
    int64_t k = rp[o];
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t s = k;
      while (k < hi && col[k] < (t + 1) * kt) ++k;
      src[t * n_rows + o] = int32_t(s);
      ptr[t * n_rows + o + 1] = int32_t(k - s);  // a count for now; prefix-summed below
    }
  }
  for (int64_t s = 1; s <= nseg; ++s) ptr[s] += ptr[s - 1];
#pragma omp parallel for num_threads(team()) schedule(static)
  for (int64_t s = 0; s < nseg; ++s)
    for (int64_t q = ptr[s], from = src[s]; q < ptr[s + 1]; ++q, ++from) tcol[q] = col[from];
  return out;
}

// A view of a tiling built by _csr_tiling_cpu for this (n_rows, n_cols) CSR matrix, after
// checking that it is one (see the header).
Tiling view_tiling(const char* op, const at::Tensor& tiling, const at::Tensor& col_idx,
                   const at::Tensor& row_ptr, int64_t n_rows, int64_t n_cols) {
  TORCH_CHECK(tiling.dim() == 1 && tiling.scalar_type() == at::kInt && tiling.is_contiguous() &&
                  tiling.device().is_cpu() && tiling.numel() >= kHeader,
              op, ": tiling must be a contiguous 1-D int32 CPU tensor from _csr_tiling_cpu");
  const int32_t* h = tiling.data_ptr<int32_t>();
  Tiling m;
  m.n_rows = h[kRows];
  m.n_cols = h[kCols];
  m.nnz = h[kNnz];
  m.kt = h[kTileW];
  m.ntiles = h[kTiles];
  TORCH_CHECK(h[kMagic] == kTilingMagic && m.n_rows == n_rows && m.n_cols == n_cols &&
                  m.nnz == col_idx.numel() && m.kt >= 1 && m.ntiles >= 1 &&
                  tiling.numel() == kHeader + 2 * m.nseg() + 1 + m.nnz &&
                  h[kPrint] == fingerprint(row_ptr, col_idx),
              op, ": the tiling does not belong to this matrix (rebuild it with _csr_tiling_cpu)");
  m.row_ptr = row_ptr.data_ptr<int32_t>();
  m.ptr = h + kHeader;
  m.src = m.ptr + m.nseg() + 1;
  m.col = m.src + m.nseg();
  const int64_t nseg = m.nseg(), nnz = m.nnz, nc = m.n_cols;
  const int32_t *ptr = m.ptr, *src = m.src, *col = m.col;
  bool ok = ptr[0] == 0 && ptr[nseg] == nnz;
#pragma omp parallel for num_threads(team()) schedule(static) reduction(&& : ok)
  for (int64_t s = 0; s < nseg; ++s) {
    const int64_t len = int64_t(ptr[s + 1]) - ptr[s];
    ok = ok && len >= 0 && src[s] >= 0 && int64_t(src[s]) + len <= nnz;
  }
  int32_t bad = 0;
#pragma omp parallel for num_threads(team()) schedule(static) reduction(| : bad)
  for (int64_t q = 0; q < nnz; ++q) bad |= int32_t(uint32_t(col[q]) >= uint32_t(nc));
  TORCH_CHECK(ok && !bad, op, ": the tiling is corrupt (rebuild it with _csr_tiling_cpu)");
  return m;
}

// The tiling given, or one built (and checked) for this call, kept alive in `holder`.
Tiling get_tiling(const char* op, const std::optional<at::Tensor>& tiling,
                  const at::Tensor& col_idx, const at::Tensor& row_ptr, int64_t n_rows,
                  int64_t n_cols, at::Tensor& holder) {
  holder = tiling.has_value() ? *tiling : build_tiling(op, col_idx, row_ptr, n_rows, n_cols);
  return view_tiling(op, holder, col_idx, row_ptr, n_rows, n_cols);
}

// Copies an n-element run (runs are short, ~16 nonzeros). With `slack`, the destination may
// be overwritten up to kRunVecs vectors past the run (the caller writes that part later) and
// the source read that far: short runs then take kRunVecs whole-vector copies and no branch
// on their length (branchy copies spent most of the re-layout on mispredicted loop exits).
constexpr int kRunVecs = 3;

template <typename T>
inline void copy_run(const T* from, T* to, int64_t n, bool slack) {
  using V = typename Simd<T>::V;
  if (slack && n <= kRunVecs * V::W) {
    for (int j = 0; j < kRunVecs; ++j) V::load(from + j * V::W).store(to + j * V::W);
    return;
  }
  int64_t q = 0;
  for (; q + V::W <= n; q += V::W) V::load(from + q).store(to + q);
  for (; q < n; ++q) to[q] = from[q];
}

// values (CSR order) <-> tile-major order. A block of kRowGrain rows at a time, all its tiles:
// the block's CSR runs stay in cache, and each tile's runs of the block are contiguous. Runs
// are written in increasing address order inside a region that only this block writes (in
// tile-major order, one tile's runs of the block; in CSR order, one row), so a run may spill
// into the rest of its region, which is written after it, and read past its source when
// there is room.
template <typename T, bool kToTiles>
void retile_values(const Tiling& m, const T* from, T* to) {
  constexpr int64_t spill = kRunVecs * Simd<T>::V::W;
  const int64_t nb = (m.n_rows + kRowGrain - 1) / kRowGrain;
#pragma omp parallel for num_threads(team()) schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t o0 = b * kRowGrain, o1 = std::min(m.n_rows, o0 + kRowGrain);
    for (int64_t t = 0; t < m.ntiles; ++t) {
      const int64_t region_end = m.ptr[t * m.n_rows + o1];  // this tile's runs of the block
      for (int64_t o = o0; o < o1; ++o) {
        const int64_t s = t * m.n_rows + o, n = int64_t(m.ptr[s + 1]) - m.ptr[s];
        const int64_t tiled = m.ptr[s], csr = m.src[s];
        if (kToTiles)
          copy_run(from + csr, to + tiled, n, tiled + spill <= region_end && csr + spill <= m.nnz);
        else
          copy_run(from + tiled, to + csr, n,
                   csr + spill <= m.row_ptr[o + 1] && tiled + spill <= m.nnz);
      }
    }
  }
}

// ---- packing: chunk-major operands ------------------------------------------------------
// A packed (rows, B) operand is [chunk c][row r][j < kChunk], chunk c holding columns
// c*kChunk + j of the unpacked matrix; the last chunk is narrower (its tail is never read).
template <typename T>
int64_t n_chunks(int64_t B) {
  return (B + kChunk<T> - 1) / kChunk<T>;
}

#if defined(__AVX2__) && defined(__FMA__)
// d[c * ldd + r] = s[r * lds + c] for an 8x8 float block.
inline void transpose8x8(const float* s, int64_t lds, float* d, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(d + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(d + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// d[f * ldd + b] = s[b * sb + f * sf] for b < nb, f < nf (one block of a transpose).
template <typename T>
inline void transpose_block(const T* s, int64_t sb, int64_t sf, int64_t nb, int64_t nf, T* d,
                            int64_t ldd) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) {
    if (sf == 1) {
      int64_t b = 0;
      for (; b + 8 <= nb; b += 8) {
        int64_t f = 0;
        for (; f + 8 <= nf; f += 8) transpose8x8(s + b * sb + f, sb, d + f * ldd + b, ldd);
        for (; f < nf; ++f)
          for (int64_t q = 0; q < 8; ++q) d[f * ldd + b + q] = s[(b + q) * sb + f];
      }
      for (; b < nb; ++b)
        for (int64_t f = 0; f < nf; ++f) d[f * ldd + b] = s[b * sb + f];
      return;
    }
  }
#endif
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t f = 0; f < nf; ++f) d[f * ldd + b] = s[b * sb + f * sf];
}

// Features [f0, f0 + kPackFeatures) of chunk c of src (B, F) with strides (sb, sf), into the
// chunk's packed rows dc (F rows of kChunk).
constexpr int64_t kPackFeatures = 64;
template <typename T>
inline void pack_block(const T* src, int64_t B, int64_t F, int64_t sb, int64_t sf, int64_t c,
                       int64_t f0, T* dc) {
  constexpr int64_t CH = kChunk<T>;
  transpose_block(src + c * CH * sb + f0 * sf, sb, sf, std::min(CH, B - c * CH),
                  std::min(kPackFeatures, F - f0), dc + f0 * CH, CH);
}

// dst(packed, rows = F) from src (B, F) with strides (sb, sf): the transpose of src.
template <typename T>
void pack_transposed(const T* src, int64_t B, int64_t F, int64_t sb, int64_t sf, T* dst) {
  const int64_t nc = n_chunks<T>(B);
#pragma omp parallel for num_threads(team()) collapse(2) schedule(static)
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t f0 = 0; f0 < F; f0 += kPackFeatures)
      pack_block(src, B, F, sb, sf, c, f0, dst + c * F * kChunk<T>);
}

// ---- LayerNorm on the way in (inference) ---------------------------------------------------
// The row-wise LayerNorm of a Linear layer's input, y = (x - mean) / sqrt(var + eps) * gamma +
// beta over each row's K features (gamma, beta optional; biased variance, as torch), applied
// while the input is packed, so that the normalised activation is never written out whole.
template <typename T>
struct LayerNormIn {
  bool on = false;
  const T* gamma = nullptr;
  const T* beta = nullptr;
  double eps = 1e-5;
};

// sum_k f(src[k]) in double over kLanes interleaved partial sums: independent add chains,
// which the compiler vectorises (one chain waits on every add: at K = 512 the two sums of a
// row took longer than the rest of packing it).
template <typename T, typename F>
inline double lane_sum(const T* src, int64_t K, F&& f) {
  constexpr int kLanes = 8;
  double part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += f(double(src[k + j]));
  double sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += part[j];
  for (; k < K; ++k) sum += f(double(src[k]));
  return sum;
}

// dst[0, K) = LayerNorm of src[0, K) (the statistics in double).
template <typename T>
inline void layer_norm_row(const T* src, int64_t K, const LayerNormIn<T>& ln, T* dst) {
  const double n = double(std::max<int64_t>(K, 1));
  const double mean = lane_sum(src, K, [](double v) { return v; }) / n;
  const double sq = lane_sum(src, K, [mean](double v) { return (v - mean) * (v - mean); });
  const T rstd = T(1.0 / std::sqrt(sq / n + ln.eps));
  const T m = T(mean);
  for (int64_t k = 0; k < K; ++k) {
    T v = (src[k] - m) * rstd;
    if (ln.gamma) v *= ln.gamma[k];
    if (ln.beta) v += ln.beta[k];
    dst[k] = v;
  }
}

// Chunk c of LayerNorm(src) (src (B, K) with unit feature stride) into its packed rows dc
// (K rows of kChunk), through a per-thread buffer of normalised rows.
template <typename T>
inline void pack_chunk_ln(const T* src, int64_t B, int64_t K, int64_t sb, const LayerNormIn<T>& ln,
                          int64_t c, T* dc) {
  constexpr int64_t CH = kChunk<T>;
  thread_local std::vector<T> rows;
  rows.resize(CH * K);
  const int64_t nb = std::min(CH, B - c * CH);
  for (int64_t b = 0; b < nb; ++b)
    layer_norm_row(src + (c * CH + b) * sb, K, ln, rows.data() + b * K);
  transpose_block(rows.data(), K, 1, nb, K, dc, CH);
}

// pack_transposed of LayerNorm(src) (src (B, K) with unit feature stride).
template <typename T>
void pack_transposed_ln(const T* src, int64_t B, int64_t K, int64_t sb, const LayerNormIn<T>& ln,
                        T* dst) {
  const int64_t nc = n_chunks<T>(B);
#pragma omp parallel for num_threads(team()) schedule(static)
  for (int64_t c = 0; c < nc; ++c) pack_chunk_ln(src, B, K, sb, ln, c, dst + c * K * kChunk<T>);
}

// ---- the Linear epilogue: y = act(y + bias + residual) -------------------------------------
enum LinearAct : int64_t { kActNone = 0, kActRelu = 1, kActGelu = 2 };

template <typename T>
struct LinearEpilogue {
  const T* bias = nullptr;  // (F,)
  const T* res = nullptr;   // (B, F), contiguous
  int64_t act = kActNone;
  bool any() const { return bias || res || act != kActNone; }
};

// erf(x) in float32 to about 5e-7 (absolute): x * P(x^2) / Q(x^2) on [-4, 4] (outside, erf is
// +-1 in float32), fitted by reweighted least squares; branch-free, so loops of it vectorize.
inline float erf_rational(float x) {
  x = std::min(std::max(x, -4.0f), 4.0f);
  const float z = x * x;
  float p = 1.938560438341696e-08f;
  p = p * z - 1.988269684045416e-06f;
  p = p * z + 0.00015323049769641527f;
  p = p * z + 0.004183493068657915f;
  p = p * z + 0.052070744473258816f;
  p = p * z + 0.21127668009670533f;
  p = p * z + 1.1283787070707756f;
  float q = 0.0010726844469982066f;
  q = q * z + 0.015322047504349548f;
  q = q * z + 0.11968895830452986f;
  q = q * z + 0.5205671035261945f;
  q = q * z + 1.0f;
  return x * p / q;
}

// GELU(x) = x/2 (1 + erf(x / sqrt 2)) (torch's default, approximate="none").
inline float gelu(float x) { return 0.5f * x * (1.0f + erf_rational(x * 0.70710678118654752f)); }
inline double gelu(double x) { return 0.5 * x * (1.0 + std::erf(x * 0.70710678118654752)); }

// Rows [0, nb) x columns [f0, f0 + nf) of y (row stride ldy) through the epilogue; e.res has
// y's layout.
template <typename T>
void linear_epilogue(T* y, int64_t ldy, int64_t nb, int64_t f0, int64_t nf,
                     const LinearEpilogue<T>& e, const T* res) {
  for (int64_t b = 0; b < nb; ++b) {
    T* row = y + b * ldy + f0;
    if (e.bias) {
      const T* bias = e.bias + f0;
      for (int64_t f = 0; f < nf; ++f) row[f] += bias[f];
    }
    if (res) {
      const T* r = res + b * ldy + f0;
      for (int64_t f = 0; f < nf; ++f) row[f] += r[f];
    }
    if (e.act == kActRelu) {
      for (int64_t f = 0; f < nf; ++f) row[f] = std::max(row[f], T(0));
    } else if (e.act == kActGelu) {
      for (int64_t f = 0; f < nf; ++f) row[f] = gelu(row[f]);
    }
  }
}

// dst (B, F) contiguous from src(packed, rows = F): the inverse of pack_transposed, each block
// through the epilogue while it is in cache (unpack_block: features [f0, f0 + kPackFeatures)
// of chunk c, from the chunk's packed rows sc).
template <typename T>
inline void unpack_block(const T* sc, int64_t B, int64_t F, int64_t c, int64_t f0, T* dst,
                         const LinearEpilogue<T>& e) {
  constexpr int64_t CH = kChunk<T>;
  const int64_t nb = std::min(CH, B - c * CH), nf = std::min(kPackFeatures, F - f0);
  transpose_block(sc + f0 * CH, CH, 1, nf, nb, dst + c * CH * F + f0, F);
  if (e.any())
    linear_epilogue(dst + c * CH * F, F, nb, f0, nf, e, e.res ? e.res + c * CH * F : nullptr);
}

template <typename T>
void unpack_transposed(const T* src, int64_t B, int64_t F, T* dst,
                       const LinearEpilogue<T>& e = {}) {
  const int64_t nc = n_chunks<T>(B);
#pragma omp parallel for num_threads(team()) collapse(2) schedule(static)
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t f0 = 0; f0 < F; f0 += kPackFeatures)
      unpack_block(src + c * F * kChunk<T>, B, F, c, f0, dst, e);
}

// dst(packed, rows = R) from src (R, L) contiguous (no transpose: one sample of a conv's dY,
// whose pixels are contiguous).
template <typename T>
void pack_rows(const T* src, int64_t R, int64_t L, T* dst) {
  constexpr int64_t CH = kChunk<T>;
  for (int64_t c = 0; c * CH < L; ++c) {
    const int64_t w = std::min(CH, L - c * CH);
    for (int64_t r = 0; r < R; ++r)
      std::memcpy(dst + (c * R + r) * CH, src + r * L + c * CH, w * sizeof(T));
  }
}

// ---- the walk: every (chunk, tile, row) step -----------------------------------------------
// Rows [lo, hi) of thread `tid` of `nth`: contiguous ranges with equal shares of nonzeros plus
// a per-segment cost, so that every row always belongs to the same thread (no barriers).
struct RowSplit {
  std::vector<int64_t> prefix;  // prefix[o] = cost of rows < o
  explicit RowSplit(const Tiling& m) : prefix(m.n_rows + 1, 0) {
    for (int64_t o = 0; o < m.n_rows; ++o)
      prefix[o + 1] = prefix[o] + (m.row_ptr[o + 1] - m.row_ptr[o]) + 2 * m.ntiles;
  }
  int64_t bound(int64_t k, int64_t nth) const {
    if (k >= nth) return int64_t(prefix.size()) - 1;
    const int64_t target = prefix.back() * k / nth;
    return std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
  }
};

// f(c, width, t, o) for every chunk c of B columns, tile t and row o: all rows, or with `split`
// (call from inside a parallel region) this thread's rows.
template <typename T, class F>
inline void for_each_step(const Tiling& m, int64_t B, const RowSplit* split, F&& f) {
  int64_t r0 = 0, r1 = m.n_rows;
  if (split) {
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
    r0 = split->bound(tid, nth);
    r1 = split->bound(tid + 1, nth);
  }
  for (int64_t c = 0; c < n_chunks<T>(B); ++c) {
    const int64_t w = std::min(kChunk<T>, B - c * kChunk<T>);
    for (int64_t t = 0; t < m.ntiles; ++t)
      for (int64_t o = r0; o < r1; ++o) f(c, w, t, o);
  }
}

// ---- spmm: YT[o, chunk] (+)= sum_k val[k] * XT[col[k], chunk] over one tile segment ---------
template <typename T>
struct SpmmArgs {
  const Tiling* w;
  const T* val;  // tile-major values
  const T* xt;   // packed (rows = n_cols of W)
  T* yt;         // output chunk c, row o at yt + c * y_chunk_stride + o * ldy
  int64_t ldy, y_chunk_stride;
  // Applied to each output row after its last tile, while the row is in L1: y = act(y + bias).
  const T* bias = nullptr;  // (n_rows of W,)
  int64_t act = 0;          // a LinearAct
};

// NV vectors from lane 0 of x / y: tile 0 starts from zero, later tiles add.
template <class V, int NV, typename T>
inline void spmm_vecs(const T* val, const int32_t* col, int64_t lo, int64_t hi, const T* x,
                      T* y, bool first) {
  constexpr int64_t CH = kChunk<T>;
  V acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = first ? V::zero() : V::load(y + j * V::W);
  for (int64_t k = lo; k < hi; ++k) {
    const V w = V::bcast(val[k]);
    const T* xp = x + static_cast<int64_t>(col[k]) * CH;
    for (int j = 0; j < NV; ++j) acc[j].fma(w, V::load(xp + j * V::W));
  }
  for (int j = 0; j < NV; ++j) acc[j].store(y + j * V::W);
}

// y[0, w) = act(y + bias): one packed output row, the lanes of one feature.
template <typename T>
inline void row_epilogue(T* y, int64_t w, T bias, int64_t act) {
  if (act == kActGelu) {
    for (int64_t l = 0; l < w; ++l) y[l] = gelu(y[l] + bias);
  } else if (act == kActRelu) {
    for (int64_t l = 0; l < w; ++l) y[l] = std::max(y[l] + bias, T(0));
  } else {
    for (int64_t l = 0; l < w; ++l) y[l] += bias;
  }
}

// Segment [lo, hi) over chunk c of width w into y: a full chunk takes the whole-chunk path; a
// narrow last chunk is cut into 4/2/1 vectors and then 4/2/1 scalar lanes.
template <typename T>
inline void spmm_product(const SpmmArgs<T>& a, int64_t c, int64_t w, int64_t lo, int64_t hi, T* y,
                         bool first) {
  using V = typename Simd<T>::V;
  using S = ScalarVec<T>;
  constexpr int W = V::W;
  const Tiling& m = *a.w;
  const T* x = a.xt + c * m.n_cols * kChunk<T>;
  if (w == kChunk<T>) {
    // A full chunk in the widest vectors the build has (AVX-512: 4 of 16 floats, where the
    // chunk's 8 AVX2 vectors would take twice the loads and FMAs).
    using VW = typename vec::VecOf<T>::V;
    return spmm_vecs<VW, kChunk<T> / VW::W>(a.val, m.col, lo, hi, x, y, first);
  }
  int64_t b = 0;
  if (w - b >= 4 * W) spmm_vecs<V, 4>(a.val, m.col, lo, hi, x + b, y + b, first), b += 4 * W;
  if (w - b >= 2 * W) spmm_vecs<V, 2>(a.val, m.col, lo, hi, x + b, y + b, first), b += 2 * W;
  if (w - b >= W) spmm_vecs<V, 1>(a.val, m.col, lo, hi, x + b, y + b, first), b += W;
  if (w - b >= 4) spmm_vecs<S, 4>(a.val, m.col, lo, hi, x + b, y + b, first), b += 4;
  if (w - b >= 2) spmm_vecs<S, 2>(a.val, m.col, lo, hi, x + b, y + b, first), b += 2;
  if (w - b >= 1) spmm_vecs<S, 1>(a.val, m.col, lo, hi, x + b, y + b, first);
}

// Segment (t, o) over chunk c of width w (tile 0 starts from zero, later tiles add; empty ones
// are skipped), then the row epilogue after the last tile.
template <typename T>
inline void spmm_segment(const SpmmArgs<T>& a, int64_t c, int64_t w, int64_t t, int64_t o) {
  const Tiling& m = *a.w;
  const int64_t s = t * m.n_rows + o, lo = m.ptr[s], hi = m.ptr[s + 1];
  const bool first = t == 0;
  T* y = a.yt + c * a.y_chunk_stride + o * a.ldy;
  if (first || lo < hi) spmm_product(a, c, w, lo, hi, y, first);
  if (t == m.ntiles - 1 && (a.bias || a.act != kActNone))
    row_epilogue(y, w, a.bias ? a.bias[o] : T(0), a.act);
}

template <typename T>
void spmm_all(const SpmmArgs<T>& a, int64_t B, const RowSplit* split) {
  const vec::DenormalsAsZero daz;
  for_each_step<T>(*a.w, B, split, [&](int64_t c, int64_t w, int64_t t, int64_t o) {
    spmm_segment(a, c, w, t, o);
  });
}

// Chunk 0 of a's operands (width w): every tile and row.
template <typename T>
inline void spmm_chunk(const SpmmArgs<T>& a, int64_t w) {
  for (int64_t t = 0; t < a.w->ntiles; ++t)
    for (int64_t o = 0; o < a.w->n_rows; ++o) spmm_segment(a, 0, w, t, o);
}

// With at least four chunks of the batch per thread, a Linear layer runs by chunks: each
// thread takes whole chunks, one at a time, and does all of a chunk (packs its input, the
// products, unpacks its output) in buffers of its own that stay in its L2, with no barrier
// between the steps; a thread that the machine slows down takes fewer chunks. (The weights
// are streamed once per chunk either way.) Below that, each step runs over all chunks with
// the rows split by nonzeros.
template <typename T>
bool by_chunks(int64_t B) {
  return n_chunks<T>(B) >= 4 * team();
}

// Chunk c of x (B, K) packed into dc, through the LayerNorm when ln.on.
template <typename T>
inline void pack_input(const at::Tensor& x, const LayerNormIn<T>& ln, int64_t c, T* dc) {
  const int64_t B = x.size(0), K = x.size(1);
  if (ln.on) return pack_chunk_ln(x.data_ptr<T>(), B, K, x.stride(0), ln, c, dc);
  for (int64_t f0 = 0; f0 < K; f0 += kPackFeatures)
    pack_block(x.data_ptr<T>(), B, K, x.stride(0), x.stride(1), c, f0, dc);
}

// Where a Linear epilogue runs: bias and activation in the product, on the packed rows, unless
// a residual comes first (added before the activation, in the unpacked layout): then all of
// it in the unpack.
template <typename T>
struct EpilogueSplit {
  const T* bias = nullptr;  // in the product
  int64_t act = kActNone;   // in the product
  LinearEpilogue<T> unpack;
  explicit EpilogueSplit(const LinearEpilogue<T>& e) {
    if (e.res) {
      unpack = e;
    } else {
      bias = e.bias;
      act = e.act;
    }
  }
};

// One Linear layer of a by-chunks pass: its tiling and tile-major values, the bias and
// activation applied in its product, its output width.
template <typename T>
struct ChunkLayer {
  const Tiling* w;
  const T* val;
  const T* bias;
  int64_t act;
  int64_t n_out;
};

// By chunks: each thread takes whole chunks, one at a time, packs chunk c of x (through the
// LayerNorm when ln.on), runs the n layers in order (each one's packed output the next one's
// input, in the thread's own buffers) and unpacks the last one's output into y (B, n_out)
// through e_out.
template <typename T>
void linear_by_chunks(const at::Tensor& x, const LayerNormIn<T>& ln, const ChunkLayer<T>* layers,
                      int n, T* y, const LinearEpilogue<T>& e_out) {
  constexpr int64_t CH = kChunk<T>;
  const int64_t B = x.size(0), K = x.size(1), nc = n_chunks<T>(B), n_out = layers[n - 1].n_out;
#pragma omp parallel num_threads(team())
  {
    const vec::DenormalsAsZero daz;
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t width = std::min(CH, B - c * CH);
      T* in = vec::vec_scratch<T>(1, K * CH);
      pack_input(x, ln, c, in);
      for (int i = 0; i < n; ++i) {
        const ChunkLayer<T>& l = layers[i];
        T* out = vec::vec_scratch<T>(2 + i, l.n_out * CH);
        SpmmArgs<T> a{l.w, l.val, in, out, CH, l.n_out * CH};
        a.bias = l.bias, a.act = l.act;
        spmm_chunk(a, width);
        in = out;
      }
      for (int64_t f0 = 0; f0 < n_out; f0 += kPackFeatures)
        unpack_block(in, B, n_out, c, f0, y, e_out);
    }
  }
}

// ---- sddmm: dv[q] += sum_{b in chunk} DYT[o, b] * XT[col[q], b] over one tile segment --------
template <typename T>
struct SddmmArgs {
  const Tiling* w;
  const T* dyt;  // packed (rows = n_rows of W)
  const T* xt;   // packed (rows = n_cols of W)
  T* dv;         // (nnz,) in tile-major order
};

// Nonzeros in groups of W (one accumulator each, reduced together by hsum_group); the chunk's
// full vectors first, its scalar tail after.
template <typename T>
inline void sddmm_segment(const SddmmArgs<T>& a, int64_t c, int64_t w, int64_t t, int64_t o) {
  using V = typename Simd<T>::V;
  constexpr int G = V::W;
  const Tiling& m = *a.w;
  const int64_t s = t * m.n_rows + o, lo = m.ptr[s], hi = m.ptr[s + 1];
  const T* dy = a.dyt + (c * m.n_rows + o) * kChunk<T>;
  const T* x = a.xt + c * m.n_cols * kChunk<T>;
  const int64_t bt = w / G * G;
  for (int64_t k = lo; k < hi; k += G) {
    const int64_t g = std::min<int64_t>(G, hi - k);
    const T* xp[G];
    // A short last group repeats its last nonzero; the extra lanes are dropped below.
    if (g == G)
      for (int q = 0; q < G; ++q) xp[q] = x + static_cast<int64_t>(m.col[k + q]) * kChunk<T>;
    else
      for (int q = 0; q < G; ++q)
        xp[q] = x + static_cast<int64_t>(m.col[k + std::min<int64_t>(q, g - 1)]) * kChunk<T>;
    V acc[G];
    for (int q = 0; q < G; ++q) acc[q] = V::zero();
    for (int64_t b = 0; b < bt; b += G) {
      const V d = V::load(dy + b);
      for (int q = 0; q < G; ++q) acc[q].fma(d, V::load(xp[q] + b));
    }
    V sum = V::hsum_group(acc);
    if (g == G && bt == w) {
      sum.add(V::load(a.dv + k));
      sum.store(a.dv + k);
      continue;
    }
    T sums[G];
    sum.store(sums);
    for (int64_t q = 0; q < g; ++q) {
      T r = sums[q];
      for (int64_t b = bt; b < w; ++b) r += dy[b] * xp[q][b];
      a.dv[k + q] += r;
    }
  }
}

template <typename T>
void sddmm_all(const SddmmArgs<T>& a, int64_t B, const RowSplit* split) {
  for_each_step<T>(*a.w, B, split, [&](int64_t c, int64_t w, int64_t t, int64_t o) {
    sddmm_segment(a, c, w, t, o);
  });
}

// ---- small-batch gather kernels (B < kMinBatch): X stays (B, K), W stays CSR ---------------
// Rows in blocks of kRowGrain under a dynamic schedule.

// sum_k values[k] * x[col[k]] over [lo, hi); `ok` is cleared by any column outside [0, K),
// which is skipped, never read (the forward checks ranges here instead of in a separate pass).
template <typename T>
inline T gather_dot(const T* x, int64_t K, const T* values, const int32_t* col, int64_t lo,
                    int64_t hi, bool& ok) {
  int64_t k = lo;
  T sum = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) {
    // 8 nonzeros per step with a masked gather: the scalar loop was latency-bound on the
    // gathered loads (several times slower at batch 1; see bench/RESULTS.md (layers)).
    const __m256i kv = _mm256_set1_epi32(int32_t(K)), neg = _mm256_set1_epi32(-1);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int bad = 0;
    for (; k + 16 <= hi; k += 16) {
      const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + k));
      const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + k + 8));
      const __m256i in0 = _mm256_and_si256(_mm256_cmpgt_epi32(kv, c0), _mm256_cmpgt_epi32(c0, neg));
      const __m256i in1 = _mm256_and_si256(_mm256_cmpgt_epi32(kv, c1), _mm256_cmpgt_epi32(c1, neg));
      bad |= ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_and_si256(in0, in1))) & 0xff;
      const __m256 x0 = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, c0,
                                                 _mm256_castsi256_ps(in0), 4);
      const __m256 x1 = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, c1,
                                                 _mm256_castsi256_ps(in1), 4);
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(values + k), x0, acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(values + k + 8), x1, acc1);
    }
    ok = ok && !bad;
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_add_ps(acc0, acc1));
    for (float v : lanes) sum += v;
  }
#endif
  for (; k < hi; ++k) {
    const bool in = uint32_t(col[k]) < uint32_t(K);
    ok = ok && in;
    if (in) sum += values[k] * x[col[k]];
  }
  return sum;
}

template <typename T>
void spmm_gather(const T* x, int64_t ldx, int64_t B, int64_t K, const T* values,
                 const int32_t* col, const int32_t* rp, int64_t n_rows, T* y, int64_t ldy) {
  const int64_t nnz = rp[n_rows];
  bool ok = rp[0] == 0;
#pragma omp parallel for num_threads(team()) schedule(dynamic, kRowGrain) reduction(&& : ok)
  for (int64_t o = 0; o < n_rows; ++o) {
    const int64_t lo = rp[o], hi = rp[o + 1];
    const bool row_ok = lo >= 0 && lo <= hi && hi <= nnz;
    ok = ok && row_ok;
    for (int64_t b = 0; b < B; ++b)
      y[b * ldy + o] = row_ok ? gather_dot(x + b * ldx, K, values, col, lo, hi, ok) : T(0);
  }
  TORCH_CHECK(ok, "_csr_dsd_cpu: invalid CSR structure (need row_ptr rising from 0 to nnz and "
              "0 <= col_idx < ", K, ")");
}

template <typename T>
void sddmm_gather(const T* dy, int64_t lddy, const T* x, int64_t ldx, int64_t B,
                  const int32_t* col, const int32_t* rp, int64_t n_rows, T* dv) {
#pragma omp parallel for num_threads(team()) schedule(dynamic, kRowGrain)
  for (int64_t o = 0; o < n_rows; ++o) {
    const int64_t lo = rp[o], hi = rp[o + 1];
    for (int64_t k = lo; k < hi; ++k) {
      T s = 0;
      for (int64_t b = 0; b < B; ++b) s += dy[b * lddy + o] * x[b * ldx + col[k]];
      dv[k] = s;
    }
  }
}

// ---- Linear ------------------------------------------------------------------------------------
// (The OpenMP regions live in these templates: a #pragma inside the AT_DISPATCH macro's
// argument is not attached to the statement that follows it.)
template <typename T>
void dsd_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_idx,
                const at::Tensor& row_ptr, const std::optional<at::Tensor>& tiling,
                const std::optional<at::Tensor>& tiled_values, at::Tensor& y,
                const LinearEpilogue<T>& e, const LayerNormIn<T>& ln = {}) {
  constexpr const char* op = "_csr_dsd_cpu";
  const int64_t B = x.size(0), K = x.size(1), n_out = y.size(1);
  if (ln.on) TORCH_CHECK(x.stride(1) == 1, op, ": x needs unit feature stride for LayerNorm");
  if (B < kMinBatch && ln.on) {
    at::Tensor xn = at::empty({B, K}, x.options());
    for (int64_t b = 0; b < B; ++b)
      layer_norm_row(x.data_ptr<T>() + b * x.stride(0), K, ln, xn.data_ptr<T>() + b * K);
    dsd_linear<T>(xn, values, col_idx, row_ptr, tiling, tiled_values, y, e);
    return;
  }
  if (B < kMinBatch) {
    TORCH_CHECK(row_ptr.data_ptr<int32_t>()[n_out] == values.numel(), op,
                ": row_ptr[-1] must equal nnz = ", values.numel());
    const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
    spmm_gather(xc.data_ptr<T>(), xc.stride(0), B, K, values.data_ptr<T>(),
                col_idx.data_ptr<int32_t>(), row_ptr.data_ptr<int32_t>(), n_out,
                y.data_ptr<T>(), n_out);
    if (e.any()) linear_epilogue(y.data_ptr<T>(), n_out, B, 0, n_out, e, e.res);
    return;
  }
  at::Tensor holder;
  const Tiling w = get_tiling(op, tiling, col_idx, row_ptr, n_out, K, holder);
  const int64_t nc = n_chunks<T>(B);
  const T* val = tiled_values.has_value() ? tiled_values->data_ptr<T>() : nullptr;
  if (!val) {
    T* buf = vec::vec_scratch<T>(0, w.nnz);
    retile_values<T, true>(w, values.data_ptr<T>(), buf);
    val = buf;
  }
  const EpilogueSplit<T> es(e);
  constexpr int64_t CH = kChunk<T>;
  T* yp = y.data_ptr<T>();
  if (by_chunks<T>(B)) {
    const ChunkLayer<T> layer{&w, val, es.bias, es.act, n_out};
    return linear_by_chunks<T>(x, ln, &layer, 1, yp, es.unpack);
  }
  const RowSplit split(w);
  T* xt = vec::vec_scratch<T>(1, nc * K * CH);
  T* yt = vec::vec_scratch<T>(2, nc * n_out * CH);
  if (ln.on)
    pack_transposed_ln(x.data_ptr<T>(), B, K, x.stride(0), ln, xt);
  else
    pack_transposed(x.data_ptr<T>(), B, K, x.stride(0), x.stride(1), xt);
  SpmmArgs<T> a{&w, val, xt, yt, CH, n_out * CH};
  a.bias = es.bias, a.act = es.act;
#pragma omp parallel num_threads(team())
  spmm_all(a, B, &split);
  unpack_transposed(yt, B, n_out, yp, es.unpack);
}

// Two Linear layers in a row, x -> act2(W2 act1(W1 x + b1) + b2 + residual) (a Transformer's
// MLP), with the hidden activation left in the packed layout between them: W1's packed output
// (chunk, hidden feature, lanes) is exactly W2's packed input, so the hidden activation is
// never transposed back and forth (two passes over the widest activation of the block); its
// bias and activation run in the product, on each row after its last tile. Small batches run
// the two products one by one.
struct CsrOperand {
  const at::Tensor& values;
  const at::Tensor& col_idx;
  const at::Tensor& row_ptr;
  const std::optional<at::Tensor>& tiling;
  const std::optional<at::Tensor>& tiled_values;
};

template <typename T>
const T* tile_major_values(const Tiling& w, const CsrOperand& l, at::Tensor& holder) {
  if (l.tiled_values.has_value()) return l.tiled_values->data_ptr<T>();
  holder = at::empty({std::max<int64_t>(w.nnz, 1)}, l.values.options());
  retile_values<T, true>(w, l.values.data_ptr<T>(), holder.data_ptr<T>());
  return holder.data_ptr<T>();
}

template <typename T>
void mlp_linear(const at::Tensor& x, const CsrOperand& l1, const CsrOperand& l2,
                const LinearEpilogue<T>& e1, const LinearEpilogue<T>& e2, at::Tensor& y,
                const LayerNormIn<T>& ln) {
  constexpr const char* op = "_csr_mlp_cpu";
  const int64_t B = x.size(0), K = x.size(1), H = l1.row_ptr.numel() - 1, n_out = y.size(1);
  if (ln.on) TORCH_CHECK(x.stride(1) == 1, op, ": x needs unit feature stride for LayerNorm");
  if (B < kMinBatch) {
    at::Tensor h = at::empty({B, H}, x.options());
    dsd_linear<T>(x, l1.values, l1.col_idx, l1.row_ptr, l1.tiling, l1.tiled_values, h, e1, ln);
    dsd_linear<T>(h, l2.values, l2.col_idx, l2.row_ptr, l2.tiling, l2.tiled_values, y, e2);
    return;
  }
  at::Tensor hold1, hold2, vhold1, vhold2;
  const Tiling w1 = get_tiling(op, l1.tiling, l1.col_idx, l1.row_ptr, H, K, hold1);
  const Tiling w2 = get_tiling(op, l2.tiling, l2.col_idx, l2.row_ptr, n_out, H, hold2);
  const T* v1 = tile_major_values<T>(w1, l1, vhold1);
  const T* v2 = tile_major_values<T>(w2, l2, vhold2);
  constexpr int64_t CH = kChunk<T>;
  const int64_t nc = n_chunks<T>(B);
  const EpilogueSplit<T> es2(e2);
  T* yp = y.data_ptr<T>();
  if (by_chunks<T>(B)) {
    const ChunkLayer<T> layers[2] = {{&w1, v1, e1.bias, e1.act, H},
                                     {&w2, v2, es2.bias, es2.act, n_out}};
    return linear_by_chunks<T>(x, ln, layers, 2, yp, es2.unpack);
  }
  const RowSplit split1(w1), split2(w2);
  T* xt = vec::vec_scratch<T>(1, nc * K * CH);
  T* ht = vec::vec_scratch<T>(2, nc * H * CH);
  T* yt = vec::vec_scratch<T>(3, nc * n_out * CH);
  if (ln.on)
    pack_transposed_ln(x.data_ptr<T>(), B, K, x.stride(0), ln, xt);
  else
    pack_transposed(x.data_ptr<T>(), B, K, x.stride(0), x.stride(1), xt);
  SpmmArgs<T> a1{&w1, v1, xt, ht, CH, H * CH};
  a1.bias = e1.bias, a1.act = e1.act;
#pragma omp parallel num_threads(team())
  spmm_all(a1, B, &split1);
  SpmmArgs<T> a2{&w2, v2, ht, yt, CH, n_out * CH};
  a2.bias = es2.bias, a2.act = es2.act;
#pragma omp parallel num_threads(team())
  spmm_all(a2, B, &split2);
  unpack_transposed(yt, B, n_out, yp, es2.unpack);
}

template <typename T>
void sddmm_linear(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                  const at::Tensor& col_idx, const std::optional<at::Tensor>& tiling,
                  at::Tensor& dv) {
  constexpr const char* op = "_csr_sddmm_cpu";
  const int64_t B = x.size(0), N = dy.size(1), K = x.size(1);
  if (B < kMinBatch) {
    check_csr_contents(op, col_idx, row_ptr, N, K);
    const at::Tensor dyc = dy.stride(1) == 1 ? dy : dy.contiguous();
    const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
    sddmm_gather(dyc.data_ptr<T>(), dyc.stride(0), xc.data_ptr<T>(), xc.stride(0), B,
                 col_idx.data_ptr<int32_t>(), row_ptr.data_ptr<int32_t>(), N,
                 dv.data_ptr<T>());
    return;
  }
  at::Tensor holder;
  const Tiling w = get_tiling(op, tiling, col_idx, row_ptr, N, K, holder);
  const RowSplit split(w);
  const int64_t nc = n_chunks<T>(B);
  T* dvt = vec::vec_scratch<T>(0, w.nnz);
  T* xt = vec::vec_scratch<T>(1, nc * K * kChunk<T>);
  T* dyt = vec::vec_scratch<T>(2, nc * N * kChunk<T>);
  std::fill(dvt, dvt + w.nnz, T(0));
  pack_transposed(x.data_ptr<T>(), B, K, x.stride(0), x.stride(1), xt);
  pack_transposed(dy.data_ptr<T>(), B, N, dy.stride(0), dy.stride(1), dyt);
  const SddmmArgs<T> a{&w, dyt, xt, dvt};
#pragma omp parallel num_threads(team())
  sddmm_all(a, B, &split);
  retile_values<T, false>(w, dvt, dv.data_ptr<T>());
}

// ---- Conv2d: im2col + spmm, per sample -----------------------------------------------------
// Measured against direct convolution plans: for a sample, the im2col of a zero-padded copy
// of the input is contiguous runs (stride 1), cheap next to the spmm at the sparsities where
// the bench's shapes (VGG/ResNet CIFAR layers) run sparse, and it reuses the Linear kernels with
// the sample's output pixels as the vector dimension. Samples run in parallel (each thread
// packs its own columns) when the batch has at least as many samples as threads; a smaller
// batch runs its samples one after another with the rows shared by the team.
struct ConvGeom {
  int64_t N, C, H, W, Cout, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, Hp, Wp;
  int64_t K() const { return C * kh * kw; }
  int64_t L() const { return OH * OW; }
};

ConvGeom conv_geometry(const char* op, at::IntArrayRef x_shape, at::IntArrayRef weight_shape,
                       at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation) {
  TORCH_CHECK(x_shape.size() == 4, op, ": input must be 4-D (N, C, H, W), got ", x_shape);
  TORCH_CHECK(weight_shape.size() == 4, op, ": weight_shape must be (C_out, C_in, kh, kw)");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 entries each");
  ConvGeom g{x_shape[0], x_shape[1], x_shape[2], x_shape[3], weight_shape[0], weight_shape[2],
             weight_shape[3], stride[0], stride[1], padding[0], padding[1], dilation[0],
             dilation[1], 0, 0, 0, 0};
  TORCH_CHECK(weight_shape[1] == g.C, op, ": input has ", g.C, " channels, the weight expects ",
              weight_shape[1]);
  TORCH_CHECK(g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && g.ph >= 0 && g.pw >= 0 &&
                  g.kh > 0 && g.kw > 0,
              op, ": stride and dilation must be positive, padding non-negative");
  g.Hp = g.H + 2 * g.ph;
  g.Wp = g.W + 2 * g.pw;
  g.OH = (g.Hp - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.OW = (g.Wp - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.Hp >= g.dh * (g.kh - 1) + 1 && g.Wp >= g.dw * (g.kw - 1) + 1, op,
              ": the (padded) input is smaller than the kernel");
  return g;
}

// xp (C, Hp, Wp) = x (C, H, W) zero-padded.
template <typename T>
void pad_sample(const ConvGeom& g, const T* x, T* xp) {
  std::fill(xp, xp + g.C * g.Hp * g.Wp, T(0));
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t h = 0; h < g.H; ++h)
      std::memcpy(xp + (c * g.Hp + h + g.ph) * g.Wp + g.pw, x + (c * g.H + h) * g.W,
                  g.W * sizeof(T));
}

// Calls f(packed_run, plane_run, n, plane_stride) for each run of output pixels of column row
// k: the run of output row oh, cut where it crosses a chunk of the packed (K, L) layout.
template <typename T, typename P, typename Q, class F>
inline void for_each_run(const ConvGeom& g, int64_t k, P* packed, Q* xp, F&& f) {
  constexpr int64_t CH = kChunk<T>;
  const int64_t K = g.K(), ci = k / (g.kh * g.kw), r = k % (g.kh * g.kw);
  const int64_t i = r / g.kw, j = r % g.kw;
  for (int64_t oh = 0; oh < g.OH; ++oh) {
    Q* s = xp + (ci * g.Hp + oh * g.sh + i * g.dh) * g.Wp + j * g.dw;
    int64_t l = oh * g.OW, n = g.OW;
    while (n > 0) {
      const int64_t c = l / CH, lane = l % CH, m = std::min(n, CH - lane);
      f(packed + (c * K + k) * CH + lane, s, m, g.sw);
      s += m * g.sw;
      l += m;
      n -= m;
    }
  }
}

// cols(packed, rows = K, L pixels) = im2col of the padded sample xp, rows k in [k0, k1).
template <typename T>
void im2col_packed(const ConvGeom& g, const T* xp, T* cols, int64_t k0, int64_t k1) {
  if (g.OH * g.OW <= kChunk<T> && g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1) {
    // A whole sample in one chunk (8x8 outputs and smaller), unit stride: row k is OH
    // contiguous runs of OW, with none of for_each_run's per-run chunk arithmetic (a large
    // part of the forward's time at 8x8 outputs; see bench/RESULTS.md (layers)).
    const int64_t khw = g.kh * g.kw;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t ci = k / khw, i = (k % khw) / g.kw, j = k % g.kw;
      const T* src = xp + (ci * g.Hp + i) * g.Wp + j;
      T* dst = cols + k * kChunk<T>;
      if (g.OW == 8) {  // a fixed-size copy: cuts the 8x8 forward's fixed cost
        for (int64_t oh = 0; oh < g.OH; ++oh)
          std::memcpy(dst + oh * 8, src + oh * g.Wp, 8 * sizeof(T));
      } else {
        for (int64_t oh = 0; oh < g.OH; ++oh)
          for (int64_t q = 0; q < g.OW; ++q) dst[oh * g.OW + q] = src[oh * g.Wp + q];
      }
    }
    return;
  }
  for (int64_t k = k0; k < k1; ++k)
    for_each_run<T>(g, k, cols, xp, [](T* d, const T* s, int64_t n, int64_t ss) {
      if (ss == 1)
        for (int64_t q = 0; q < n; ++q) d[q] = s[q];
      else
        for (int64_t q = 0; q < n; ++q) d[q] = s[q * ss];
    });
}

// dxp (C, Hp, Wp) += col2im(dcols), rows k in [k0, k1) (callers split k by channel, so that
// threads never add into the same plane).
template <typename T>
void col2im_packed(const ConvGeom& g, const T* dcols, T* dxp, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k)
    for_each_run<T>(g, k, dcols, dxp, [](const T* d, T* s, int64_t n, int64_t ss) {
      for (int64_t q = 0; q < n; ++q) s[q * ss] += d[q];
    });
}

// dx (C, H, W) = the interior of dxp (C, Hp, Wp).
template <typename T>
void crop_sample(const ConvGeom& g, const T* dxp, T* dx) {
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t h = 0; h < g.H; ++h)
      std::memcpy(dx + (c * g.H + h) * g.W, dxp + (c * g.Hp + h + g.ph) * g.Wp + g.pw,
                  g.W * sizeof(T));
}

bool sample_parallel(int64_t N) { return N >= team(); }

template <typename T>
void conv_forward(const ConvGeom& g, const at::Tensor& x, const Tiling& w, const T* val,
                  at::Tensor& out) {
  const int64_t K = g.K(), L = g.L(), nc = n_chunks<T>(L);
  const RowSplit split(w);
  const T* xd = x.data_ptr<T>();
  T* od = out.data_ptr<T>();
  auto sample = [&](int64_t n, bool parallel) {
    T* xp = vec::vec_scratch<T>(1, g.C * g.Hp * g.Wp);
    T* cols = vec::vec_scratch<T>(2, nc * K * kChunk<T>);
    const SpmmArgs<T> a{&w, val, cols, od + n * g.Cout * L, L, kChunk<T>};
    pad_sample(g, xd + n * g.C * g.H * g.W, xp);
    if (!parallel) {
      im2col_packed(g, xp, cols, 0, K);
      spmm_all(a, L, nullptr);
      return;
    }
#pragma omp parallel num_threads(team())
    {
#pragma omp for schedule(static)
      for (int64_t k = 0; k < K; ++k) im2col_packed(g, xp, cols, k, k + 1);
      spmm_all(a, L, &split);
    }
  };
  if (sample_parallel(g.N)) {
#pragma omp parallel for num_threads(team()) schedule(dynamic, 1)
    for (int64_t n = 0; n < g.N; ++n) sample(n, false);
  } else {
    for (int64_t n = 0; n < g.N; ++n) sample(n, true);
  }
}

template <typename T>
void conv_input_grad(const ConvGeom& g, const at::Tensor& dy, const Tiling& wt, const T* val,
                     at::Tensor& dx) {
  const int64_t K = g.K(), L = g.L(), nc = n_chunks<T>(L), khw = g.kh * g.kw;
  const RowSplit split(wt);
  const T* dyd = dy.data_ptr<T>();
  T* dxd = dx.data_ptr<T>();
  auto sample = [&](int64_t n, bool parallel) {
    T* dyc = vec::vec_scratch<T>(1, nc * g.Cout * kChunk<T>);
    T* dcols = vec::vec_scratch<T>(2, nc * K * kChunk<T>);
    T* dxp = vec::vec_scratch<T>(3, g.C * g.Hp * g.Wp);
    pack_rows(dyd + n * g.Cout * L, g.Cout, L, dyc);
    std::fill(dxp, dxp + g.C * g.Hp * g.Wp, T(0));
    const SpmmArgs<T> a{&wt, val, dyc, dcols, kChunk<T>, K * kChunk<T>};
    if (!parallel) {
      spmm_all(a, L, nullptr);
      col2im_packed(g, dcols, dxp, 0, K);
    } else {
#pragma omp parallel num_threads(team())
      {
        spmm_all(a, L, &split);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t c = 0; c < g.C; ++c) col2im_packed(g, dcols, dxp, c * khw, (c + 1) * khw);
      }
    }
    crop_sample(g, dxp, dxd + n * g.C * g.H * g.W);
  };
  if (sample_parallel(g.N)) {
#pragma omp parallel for num_threads(team()) schedule(dynamic, 1)
    for (int64_t n = 0; n < g.N; ++n) sample(n, false);
  } else {
    for (int64_t n = 0; n < g.N; ++n) sample(n, true);
  }
}

template <typename T>
void conv_weight_grad(const ConvGeom& g, const at::Tensor& dy, const at::Tensor& x,
                      const Tiling& w, at::Tensor& dv) {
  const int64_t K = g.K(), L = g.L(), nc = n_chunks<T>(L), nnz = w.nnz;
  const RowSplit split(w);
  const T* dyd = dy.data_ptr<T>();
  const T* xd = x.data_ptr<T>();
  // One tile-major accumulator per thread when samples run in parallel.
  const bool by_sample = sample_parallel(g.N);
  const int nth = by_sample ? team() : 1;
  std::vector<T> acc(size_t(nth) * std::max<int64_t>(nnz, 1), T(0));
  auto sample = [&](int64_t n, bool parallel, T* dvt) {
    T* xp = vec::vec_scratch<T>(1, g.C * g.Hp * g.Wp);
    T* cols = vec::vec_scratch<T>(2, nc * K * kChunk<T>);
    T* dyc = vec::vec_scratch<T>(3, nc * g.Cout * kChunk<T>);
    pad_sample(g, xd + n * g.C * g.H * g.W, xp);
    pack_rows(dyd + n * g.Cout * L, g.Cout, L, dyc);
    const SddmmArgs<T> a{&w, dyc, cols, dvt};
    if (!parallel) {
      im2col_packed(g, xp, cols, 0, K);
      sddmm_all(a, L, nullptr);
    } else {
#pragma omp parallel num_threads(team())
      {
#pragma omp for schedule(static)
        for (int64_t k = 0; k < K; ++k) im2col_packed(g, xp, cols, k, k + 1);
        sddmm_all(a, L, &split);
      }
    }
  };
  if (by_sample) {
#pragma omp parallel for num_threads(team()) schedule(dynamic, 1)
    for (int64_t n = 0; n < g.N; ++n) sample(n, false, acc.data() + omp_get_thread_num() * nnz);
#pragma omp parallel for num_threads(team()) schedule(static)
    for (int64_t q = 0; q < nnz; ++q)
      for (int t = 1; t < nth; ++t) acc[q] += acc[t * nnz + q];
  } else {
    for (int64_t n = 0; n < g.N; ++n) sample(n, true, acc.data());
  }
  retile_values<T, false>(w, acc.data(), dv.data_ptr<T>());
}

// ---- entry points ----------------------------------------------------------------------------
// The checked epilogue operands of a Linear layer with n_out outputs on a batch of B.
void linear_epilogue_operands(const char* op, const at::Tensor& x, int64_t n_out,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, int64_t act,
                              at::Tensor& b, at::Tensor& r) {
  TORCH_CHECK(act >= kActNone && act <= kActGelu, op, ": act must be 0 (none), 1 (ReLU) or "
              "2 (GELU), got ", act);
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == x.scalar_type() && b.dim() == 1 &&
                    b.numel() == n_out,
                op, ": bias must be a (", n_out, ",) CPU tensor of x's dtype, got ", b.sizes());
  }
  if (residual.has_value()) {
    r = residual->contiguous();
    TORCH_CHECK(r.device().is_cpu() && r.scalar_type() == x.scalar_type() && r.dim() == 2 &&
                    r.size(0) == x.size(0) && r.size(1) == n_out,
                op, ": residual must be a (B, ", n_out, ") CPU tensor of x's dtype, got ",
                r.sizes());
  }
}

// tiled_values (when given): W's values in its tiling's order, from _csr_tile_values_cpu.
void check_tiled_values(const char* op, const at::Tensor& x, const at::Tensor& values,
                        const std::optional<at::Tensor>& tiling,
                        const std::optional<at::Tensor>& tiled_values) {
  if (!tiled_values.has_value()) return;
  TORCH_CHECK(tiling.has_value(), op, ": tiled_values needs the tiling it was laid out by");
  check_float(op, x, *tiled_values);
  TORCH_CHECK(tiled_values->dim() == 1 && tiled_values->is_contiguous() &&
                  tiled_values->numel() == values.numel(),
              op, ": tiled_values must be a contiguous (nnz,) tensor from _csr_tile_values_cpu");
}

// The checked LayerNorm operands (weight / bias: (K,) or absent; only with `ln`).
void layer_norm_operands(const char* op, const at::Tensor& x, bool ln,
                         const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, at::Tensor& w, at::Tensor& b) {
  TORCH_CHECK(ln || (!weight.has_value() && !bias.has_value()), op,
              ": ln_weight / ln_bias given without ln");
  for (auto [given, out, what] : {std::tuple{&weight, &w, "ln_weight"},
                                   std::tuple{&bias, &b, "ln_bias"}}) {
    if (!given->has_value()) continue;
    *out = (*given)->contiguous();
    TORCH_CHECK(out->device().is_cpu() && out->scalar_type() == x.scalar_type() &&
                    out->dim() == 1 && out->numel() == x.size(1),
                op, ": ", what, " must be a (K,) CPU tensor of x's dtype, got ", out->sizes());
  }
}

template <typename T>
LayerNormIn<T> make_layer_norm(bool on, const at::Tensor& w, const at::Tensor& b, double eps) {
  LayerNormIn<T> ln;
  ln.on = on;
  ln.gamma = w.defined() ? w.data_ptr<T>() : nullptr;
  ln.beta = b.defined() ? b.data_ptr<T>() : nullptr;
  ln.eps = eps;
  return ln;
}

template <typename T>
LinearEpilogue<T> make_epilogue(const at::Tensor& b, const at::Tensor& r, int64_t act) {
  LinearEpilogue<T> e;
  e.bias = b.defined() ? b.data_ptr<T>() : nullptr;
  e.res = r.defined() ? r.data_ptr<T>() : nullptr;
  e.act = act;
  return e;
}

// Y = X W^T. x: (B, K) any strides; W (n_out, K) in CSR. Returns (B, n_out), contiguous.
// tiled_values: the values already in the tiling's order (_csr_tile_values_cpu), for callers
// that reuse unchanged values across calls (inference); requires the tiling.
// Epilogue (inference): + bias (n_out,), + residual (B, n_out), then act (0: none, 1: ReLU,
// 2: GELU, erf form).
at::Tensor _csr_dsd_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_idx,
                       const at::Tensor& row_ptr, const std::optional<at::Tensor>& tiling,
                       int64_t n_out, const std::optional<at::Tensor>& tiled_values,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, int64_t act, bool ln,
                       const std::optional<at::Tensor>& ln_weight,
                       const std::optional<at::Tensor>& ln_bias, double ln_eps) {
  constexpr const char* op = "_csr_dsd_cpu";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (B, K), got shape ", x.sizes());
  check_float(op, x, values);
  check_csr_tensors(op, &values, col_idx, row_ptr, n_out);
  check_tiled_values(op, x, values, tiling, tiled_values);
  at::Tensor b, r, lw, lb;
  linear_epilogue_operands(op, x, n_out, bias, residual, act, b, r);
  layer_norm_operands(op, x, ln, ln_weight, ln_bias, lw, lb);
  auto y = arena_empty({x.size(0), n_out}, x.options());
  const TeamFor team_for(values.numel() * x.size(0));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    dsd_linear<scalar_t>(x, values, col_idx, row_ptr, tiling, tiled_values, y,
                         make_epilogue<scalar_t>(b, r, act),
                         make_layer_norm<scalar_t>(ln, lw, lb, ln_eps));
  });
  return y;
}

// y = act2(W2 act1(W1 x + bias1) + bias2 + residual): x (B, K), W1 (H, K) and W2 (n_out, H)
// in CSR (tiling / tiled_values as for _csr_dsd_cpu). Returns (B, n_out), contiguous.
at::Tensor _csr_mlp_cpu(const at::Tensor& x, const at::Tensor& values1,
                        const at::Tensor& col_idx1, const at::Tensor& row_ptr1,
                        const std::optional<at::Tensor>& tiling1,
                        const std::optional<at::Tensor>& tiled_values1,
                        const std::optional<at::Tensor>& bias1, int64_t act1,
                        const at::Tensor& values2, const at::Tensor& col_idx2,
                        const at::Tensor& row_ptr2, const std::optional<at::Tensor>& tiling2,
                        const std::optional<at::Tensor>& tiled_values2,
                        const std::optional<at::Tensor>& bias2,
                        const std::optional<at::Tensor>& residual, int64_t act2, bool ln,
                        const std::optional<at::Tensor>& ln_weight,
                        const std::optional<at::Tensor>& ln_bias, double ln_eps) {
  constexpr const char* op = "_csr_mlp_cpu";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (B, K), got shape ", x.sizes());
  TORCH_CHECK(row_ptr1.dim() == 1 && row_ptr1.numel() >= 1 && row_ptr2.dim() == 1 &&
                  row_ptr2.numel() >= 1,
              op, ": row_ptr1 and row_ptr2 must be 1-D and non-empty");
  const int64_t H = row_ptr1.numel() - 1, n_out = row_ptr2.numel() - 1;
  check_float(op, x, values1);
  check_float(op, x, values2);
  check_csr_tensors(op, &values1, col_idx1, row_ptr1, H);
  check_csr_tensors(op, &values2, col_idx2, row_ptr2, n_out);
  check_tiled_values(op, x, values1, tiling1, tiled_values1);
  check_tiled_values(op, x, values2, tiling2, tiled_values2);
  at::Tensor b1, b2, r2, none, lw, lb;
  linear_epilogue_operands(op, x, H, bias1, std::nullopt, act1, b1, none);
  linear_epilogue_operands(op, x, n_out, bias2, residual, act2, b2, r2);
  layer_norm_operands(op, x, ln, ln_weight, ln_bias, lw, lb);
  auto y = arena_empty({x.size(0), n_out}, x.options());
  const TeamFor team_for((values1.numel() + values2.numel()) * x.size(0));
  const CsrOperand l1{values1, col_idx1, row_ptr1, tiling1, tiled_values1};
  const CsrOperand l2{values2, col_idx2, row_ptr2, tiling2, tiled_values2};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    mlp_linear<scalar_t>(x, l1, l2, make_epilogue<scalar_t>(b1, none, act1),
                         make_epilogue<scalar_t>(b2, r2, act2), y,
                         make_layer_norm<scalar_t>(ln, lw, lb, ln_eps));
  });
  return y;
}

// dvalues[k] = sum_b dy[b, row(k)] * x[b, col_idx[k]]. dy: (B, N), x: (B, K). Returns (nnz,).
at::Tensor _csr_sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                         const at::Tensor& col_idx, const std::optional<at::Tensor>& tiling) {
  constexpr const char* op = "_csr_sddmm_cpu";
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0), op,
              ": dy (B, N) and x (B, K) must be 2-D with the same B, got ", dy.sizes(), " and ",
              x.sizes());
  check_float(op, dy, x);
  check_csr_tensors(op, nullptr, col_idx, row_ptr, dy.size(1));
  auto dv = at::zeros({col_idx.numel()}, x.options());
  const TeamFor team_for(col_idx.numel() * x.size(0));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    sddmm_linear<scalar_t>(dy, x, row_ptr, col_idx, tiling, dv);
  });
  return dv;
}

// values in the tiling's (tile-major) order.
at::Tensor _csr_tile_values_cpu(const at::Tensor& values, const at::Tensor& col_idx,
                               const at::Tensor& row_ptr, const at::Tensor& tiling,
                               int64_t n_cols) {
  constexpr const char* op = "_csr_tile_values_cpu";
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1, op, ": row_ptr must be 1-D, non-empty");
  const int64_t n_rows = row_ptr.numel() - 1;
  check_float(op, values, values);
  check_csr_tensors(op, &values, col_idx, row_ptr, n_rows);
  const TeamFor team_for(8 * values.numel());
  const Tiling w = view_tiling(op, tiling, col_idx, row_ptr, n_rows, n_cols);
  auto out = at::empty_like(values);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), op, [&] {
    retile_values<scalar_t, true>(w, values.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor _csr_tiling_cpu(const at::Tensor& col_idx, const at::Tensor& row_ptr, int64_t n_cols) {
  constexpr const char* op = "_csr_tiling_cpu";
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1, op, ": row_ptr must be 1-D, non-empty");
  const int64_t n_rows = row_ptr.numel() - 1;
  check_csr_tensors(op, nullptr, col_idx, row_ptr, n_rows);
  TORCH_CHECK(n_cols >= 0, op, ": n_cols must be non-negative");
  const TeamFor team_for(8 * col_idx.numel());
  return build_tiling(op, col_idx, row_ptr, n_rows, n_cols);
}

at::Tensor _csr_conv2d_cpu(const at::Tensor& x, const at::Tensor& values,
                          const at::Tensor& col_idx, const at::Tensor& row_ptr,
                          const std::optional<at::Tensor>& tiling, at::IntArrayRef weight_shape,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation) {
  constexpr const char* op = "_csr_conv2d_cpu";
  const ConvGeom g = conv_geometry(op, x.sizes(), weight_shape, stride, padding, dilation);
  check_float(op, x, values);
  check_csr_tensors(op, &values, col_idx, row_ptr, g.Cout);
  const TeamFor team_for(values.numel() * g.N * g.L());
  at::Tensor holder;
  const Tiling w = get_tiling(op, tiling, col_idx, row_ptr, g.Cout, g.K(), holder);
  const at::Tensor xc = x.contiguous();
  auto out = arena_empty({g.N, g.Cout, g.OH, g.OW}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    scalar_t* val = vec::vec_scratch<scalar_t>(0, w.nnz);
    retile_values<scalar_t, true>(w, values.data_ptr<scalar_t>(), val);
    conv_forward<scalar_t>(g, xc, w, val, out);
  });
  return out;
}

// dX of the conv; t_* is the transposed CSR (C_in*kh*kw, C_out) of the weight.
at::Tensor _csr_conv2d_dx_cpu(const at::Tensor& dy, const at::Tensor& t_values,
                                     const at::Tensor& t_col_idx, const at::Tensor& t_row_ptr,
                                     const std::optional<at::Tensor>& t_tiling,
                                     at::IntArrayRef weight_shape, at::IntArrayRef input_hw,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation) {
  constexpr const char* op = "_csr_conv2d_dx_cpu";
  TORCH_CHECK(dy.dim() == 4 && input_hw.size() == 2, op,
              ": dy must be 4-D and input_hw must be (H, W)");
  TORCH_CHECK(weight_shape.size() == 4, op, ": weight_shape must be (C_out, C_in, kh, kw)");
  const ConvGeom g =
      conv_geometry(op, {dy.size(0), weight_shape[1], input_hw[0], input_hw[1]}, weight_shape,
                    stride, padding, dilation);
  TORCH_CHECK(dy.size(1) == g.Cout && dy.size(2) == g.OH && dy.size(3) == g.OW, op,
              ": dy has shape ", dy.sizes(), ", expected (", g.N, ", ", g.Cout, ", ", g.OH, ", ",
              g.OW, ")");
  check_float(op, dy, t_values);
  check_csr_tensors(op, &t_values, t_col_idx, t_row_ptr, g.K());
  const TeamFor team_for(t_values.numel() * g.N * g.L());
  at::Tensor holder;
  const Tiling wt = get_tiling(op, t_tiling, t_col_idx, t_row_ptr, g.K(), g.Cout, holder);
  const at::Tensor dyc = dy.contiguous();
  auto dx = at::empty({g.N, g.C, g.H, g.W}, dy.options());
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), op, [&] {
    scalar_t* val = vec::vec_scratch<scalar_t>(0, wt.nnz);
    retile_values<scalar_t, true>(wt, t_values.data_ptr<scalar_t>(), val);
    conv_input_grad<scalar_t>(g, dyc, wt, val, dx);
  });
  return dx;
}

// dvalues of the conv weight at its kept positions (CSR order).
at::Tensor _csr_conv2d_dw_cpu(const at::Tensor& dy, const at::Tensor& x,
                                      const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                      const std::optional<at::Tensor>& tiling,
                                      at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "_csr_conv2d_dw_cpu";
  const ConvGeom g = conv_geometry(op, x.sizes(), weight_shape, stride, padding, dilation);
  TORCH_CHECK(dy.dim() == 4 && dy.size(0) == g.N && dy.size(1) == g.Cout && dy.size(2) == g.OH &&
                  dy.size(3) == g.OW,
              op, ": dy has shape ", dy.sizes(), ", expected (", g.N, ", ", g.Cout, ", ", g.OH,
              ", ", g.OW, ")");
  check_float(op, dy, x);
  check_csr_tensors(op, nullptr, col_idx, row_ptr, g.Cout);
  const TeamFor team_for(col_idx.numel() * g.N * g.L());
  at::Tensor holder;
  const Tiling w = get_tiling(op, tiling, col_idx, row_ptr, g.Cout, g.K(), holder);
  const at::Tensor dyc = dy.contiguous(), xc = x.contiguous();
  auto dv = at::empty({col_idx.numel()}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    conv_weight_grad<scalar_t>(g, dyc, xc, w, dv);
  });
  return dv;
}

// ---- the dense fallback (sparsecore/ops/csr.py runs it below the crossover sparsity) ------------
// Each helper checks the CSR rows as it walks them (no separate pass): a bad row is skipped
// and reported, never read or written out of bounds.
template <typename T>
bool scatter_rows(const T* values, const int32_t* col, const int32_t* rp, int64_t n_rows,
                  int64_t n_cols, int64_t nnz, T* w) {
  bool ok = rp[0] == 0 && rp[n_rows] == nnz;
#pragma omp parallel for num_threads(team()) schedule(static) reduction(&& : ok)
  for (int64_t o = 0; o < n_rows; ++o) {
    T* row = w + o * n_cols;
    std::fill(row, row + n_cols, T(0));
    const int64_t lo = rp[o], hi = rp[o + 1];
    if (lo < 0 || lo > hi || hi > nnz) {
      ok = false;
      continue;
    }
    for (int64_t k = lo; k < hi; ++k) {
      const bool in = uint32_t(col[k]) < uint32_t(n_cols);
      ok = ok && in;
      if (in) row[col[k]] = values[k];
    }
  }
  return ok;
}

template <typename T>
bool gather_rows(const T* full, int64_t ld, const int32_t* col, const int32_t* rp,
                 int64_t n_rows, int64_t n_cols, int64_t nnz, T* out) {
  bool ok = rp[0] == 0 && rp[n_rows] == nnz;
#pragma omp parallel for num_threads(team()) schedule(static) reduction(&& : ok)
  for (int64_t o = 0; o < n_rows; ++o) {
    const int64_t lo = rp[o], hi = rp[o + 1];
    if (lo < 0 || lo > hi || hi > nnz) {
      ok = false;
      continue;
    }
    for (int64_t k = lo; k < hi; ++k) {
      const bool in = uint32_t(col[k]) < uint32_t(n_cols);
      ok = ok && in;
      out[k] = in ? full[o * ld + col[k]] : T(0);
    }
  }
  return ok;
}

void check_walk(const char* op, bool ok, int64_t n_cols) {
  TORCH_CHECK(ok, op, ": invalid CSR structure (need row_ptr rising from 0 to nnz and 0 <= "
              "col_idx < ", n_cols, ")");
}

// The dense (n_rows, n_cols) matrix of a CSR.
at::Tensor _csr_to_dense_cpu(const at::Tensor& values, const at::Tensor& col_idx,
                            const at::Tensor& row_ptr, int64_t n_cols) {
  constexpr const char* op = "_csr_to_dense_cpu";
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1, op, ": row_ptr must be 1-D, non-empty");
  const int64_t n_rows = row_ptr.numel() - 1;
  check_float(op, values, values);
  check_csr_tensors(op, &values, col_idx, row_ptr, n_rows);
  const TeamFor team_for(n_rows * n_cols);
  auto w = at::empty({n_rows, n_cols}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), op, [&] {
    check_walk(op, scatter_rows(values.data_ptr<scalar_t>(), col_idx.data_ptr<int32_t>(),
                                row_ptr.data_ptr<int32_t>(), n_rows, n_cols, values.numel(),
                                w.data_ptr<scalar_t>()), n_cols);
  });
  return w;
}

// Y = X W^T through dense GEMM: W densified into a per-thread workspace (no allocation and no
// page faults per call: that halved the fallback's overhead on a 1024x1024 layer, batch 64).
at::Tensor _csr_dsd_dense_cpu(const at::Tensor& x, const at::Tensor& values,
                             const at::Tensor& col_idx, const at::Tensor& row_ptr, int64_t n_out) {
  constexpr const char* op = "_csr_dsd_dense_cpu";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (B, K), got shape ", x.sizes());
  check_float(op, x, values);
  check_csr_tensors(op, &values, col_idx, row_ptr, n_out);
  const int64_t K = x.size(1);
  const TeamFor team_for(n_out * K);
  at::Tensor w;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    scalar_t* buf = vec::vec_scratch<scalar_t>(3, n_out * K);
    check_walk(op, scatter_rows(values.data_ptr<scalar_t>(), col_idx.data_ptr<int32_t>(),
                                row_ptr.data_ptr<int32_t>(), n_out, K, values.numel(), buf), K);
    w = at::from_blob(buf, {n_out, K}, x.options());
  });
  return at::mm(x, w.t());
}

// out[k] = full[row(k), col_idx[k]]: a dense (n_rows, n_cols) matrix sampled at the kept
// positions of the CSR.
at::Tensor _csr_sample_cpu(const at::Tensor& full, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx) {
  constexpr const char* op = "_csr_sample_cpu";
  TORCH_CHECK(full.dim() == 2, op, ": full must be 2-D, got shape ", full.sizes());
  check_float(op, full, full);
  const int64_t n_rows = full.size(0), n_cols = full.size(1);
  check_csr_tensors(op, nullptr, col_idx, row_ptr, n_rows);
  const TeamFor team_for(4 * col_idx.numel());
  const at::Tensor fc = full.stride(1) == 1 ? full : full.contiguous();
  auto out = at::empty({col_idx.numel()}, full.options());
  AT_DISPATCH_FLOATING_TYPES(full.scalar_type(), op, [&] {
    check_walk(op, gather_rows(fc.data_ptr<scalar_t>(), fc.stride(0), col_idx.data_ptr<int32_t>(),
                               row_ptr.data_ptr<int32_t>(), n_rows, n_cols, col_idx.numel(),
                               out.data_ptr<scalar_t>()), n_cols);
  });
  return out;
}

// W^T's values in its CSR order (t_row_ptr: W^T's row pointers, i.e. per column of W): each
// thread owns a range of W's columns, walks W's rows in order and appends each kept value to
// its column's stream. The reads are sequential and the writes go to one sequential stream per
// column, where values[t_perm] reads one cache line per nonzero (a training step's input
// gradient at small batch spent most of its time there).
template <typename T>
bool transpose_values(const T* values, const int32_t* col, const int32_t* rp,
                      const int32_t* t_rp, int64_t n_rows, int64_t n_cols, int64_t nnz, T* out) {
  bool ok = rp[0] == 0 && rp[n_rows] == nnz && t_rp[0] == 0 && t_rp[n_cols] == nnz;
  if (!ok) return false;
  // Tiles of kRows rows x kCols columns keep the pages touched at once (the rows read, the
  // column streams written) within the TLB; untiled, a 4096-column layer wrote to 4096 pages
  // in turn and ran several times slower.
  constexpr int64_t kRows = 256, kCols = 256;
  const int threads = team();
#pragma omp parallel num_threads(threads) reduction(&& : ok)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int32_t c0 = int32_t(n_cols * t / nt), c1 = int32_t(n_cols * (t + 1) / nt);
    std::vector<int64_t> cursor(t_rp + c0, t_rp + c1);
    std::vector<int64_t> pos(kRows);
    for (int64_t r0 = 0; r0 < n_rows && ok; r0 += kRows) {
      const int64_t r1 = std::min(n_rows, r0 + kRows);
      for (int64_t o = r0; o < r1; ++o) {
        const int64_t lo = rp[o], hi = rp[o + 1];
        if (lo < 0 || lo > hi || hi > nnz) {
          ok = false;
          break;
        }
        // columns rise within a row: this thread's slice starts at the first col >= c0
        pos[o - r0] = std::lower_bound(col + lo, col + hi, c0) - col;
      }
      for (int64_t cb = c0; cb < c1 && ok; cb += kCols) {
        const int64_t ce = std::min<int64_t>(c1, cb + kCols);
        for (int64_t o = r0; o < r1 && ok; ++o) {
          int64_t k = pos[o - r0];
          const int64_t hi = rp[o + 1];
          for (; k < hi && col[k] < ce; ++k) {
            int64_t& at = cursor[col[k] - c0];
            if (col[k] < cb || at >= t_rp[col[k] + 1]) {  // unsorted row or count mismatch
              ok = false;
              break;
            }
            out[at++] = values[k];
          }
          pos[o - r0] = k;
        }
      }
    }
    for (int32_t c = c0; c < c1 && ok; ++c) ok = cursor[c - c0] == t_rp[c + 1];
  }
  return ok;
}

at::Tensor _csr_transpose_values_cpu(const at::Tensor& values, const at::Tensor& col_idx,
                                    const at::Tensor& row_ptr, const at::Tensor& t_row_ptr) {
  constexpr const char* op = "_csr_transpose_values_cpu";
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1 && t_row_ptr.dim() == 1 &&
                  t_row_ptr.numel() >= 1,
              op, ": row_ptr and t_row_ptr must be 1-D, non-empty");
  const int64_t n_rows = row_ptr.numel() - 1, n_cols = t_row_ptr.numel() - 1;
  check_float(op, values, values);
  check_csr_tensors(op, &values, col_idx, row_ptr, n_rows);
  check_index(op, "t_row_ptr", t_row_ptr, n_cols + 1);
  const TeamFor team_for(2 * values.numel());
  auto out = at::empty_like(values);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), op, [&] {
    TORCH_CHECK(transpose_values(values.data_ptr<scalar_t>(), col_idx.data_ptr<int32_t>(),
                                 row_ptr.data_ptr<int32_t>(), t_row_ptr.data_ptr<int32_t>(),
                                 n_rows, n_cols, values.numel(), out.data_ptr<scalar_t>()),
                op, ": the CSR and its transpose's row pointers do not match (need row_ptr "
                "rising from 0 to nnz, strictly rising col_idx in [0, n_cols) per row, and "
                "t_row_ptr counting each column's entries)");
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsecore, CPU, m) {
  m.impl("_csr_to_dense_cpu", &_csr_to_dense_cpu);
  m.impl("_csr_dsd_dense_cpu", &_csr_dsd_dense_cpu);
  m.impl("_csr_sample_cpu", &_csr_sample_cpu);
  m.impl("_csr_transpose_values_cpu", &_csr_transpose_values_cpu);
  m.impl("_csr_tiling_cpu", &_csr_tiling_cpu);
  m.impl("_csr_tile_values_cpu", &_csr_tile_values_cpu);
  m.impl("_csr_dsd_cpu", &_csr_dsd_cpu);
  m.impl("_csr_mlp_cpu", &_csr_mlp_cpu);
  m.impl("_csr_sddmm_cpu", &_csr_sddmm_cpu);
  m.impl("_csr_conv2d_cpu", &_csr_conv2d_cpu);
  m.impl("_csr_conv2d_dx_cpu", &_csr_conv2d_dx_cpu);
  m.impl("_csr_conv2d_dw_cpu", &_csr_conv2d_dw_cpu);
}

}  // namespace sparsecore
