// Direct CSR convolution with the layer's epilogue fused (inference).
//
// W is (C_out, C_in*kh*kw) in CSR (column k = (ci*kh + i)*kw + j). Output (oh, ow) reads, for
// tap (i, j), input row oh*sh + i*dh - ph and column ow*sw + j*dw - pw. Each sample is copied
// once into kw column-shifted, column-strided, zero-padded copies whose rows are split by
// their phase modulo the row stride:
//   xs[j][c][a][r][q] = x[c][r*sh + a - ph][q*sw + j*dw - pw]   (0 outside the image),
// a < sh, r < Hq = ceil(Hp / sh), rows of Wr elements, Wr = OW rounded up to whole vectors (to
// 4 elements below a vector's width). Output position p = oh*Wr + ow then reads position
//   p + off(k),   off(k) = j*CS + ci*sh*Hq*Wr + ((i*dh) % sh * Hq + (i*dh) / sh) * Wr
// of the copies (CS: one copy's size): one nonzero of row co multiplies a contiguous, aligned
// vector of input into a contiguous vector of outputs, whatever the stride (a stride-2 conv
// becomes a stride-1 one over the row phases). No im2col matrix, no packing, no load split
// across cache lines where OW fills whole vectors (every offset is then a multiple of the
// vector width), and the copies of a CIFAR-sized sample stay in the thread's L2 cache. Row
// phases that no tap reads (a 1x1 stride-2 conv's odd rows) are not copied.
//
// Output shifts (float32 on AVX-512, column stride 1 or 2; see sample_product_oshift) make
// one copy per column phase instead of kw shifted ones and move each tap column's partial
// sums in registers instead: a third of the copies at stride 1.
//
// The output positions are cut into chunks of U vectors (U accumulators, U independent FMA
// chains; U is balanced so the last chunk is nearly full); chunk by chunk, every row co adds
// value * the input run at off(k) + chunk start. Each row then goes through the epilogue
// into the output: optional 2x2/stride-2 max-pool, + bias, + residual, ReLU, in that order
// (max commutes with adding a per-channel constant and with ReLU, so pooling first does the
// rest on a quarter of the elements).
//
// Samples run in parallel when the batch has at least as many samples as threads (each
// thread copies its own sample); a smaller batch copies each sample once and shares its rows.
#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <unistd.h>  // sysconf: the L1's size
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "arena.h"
#include "fingerprint.h"
#include "threads.h"
#include "vec.h"

namespace sparsecore {
namespace {

using vec::VecOf;
using vec::vec_scratch;

// At most this many accumulators per chunk (the register file holds them, the broadcast
// weight and the loads, with AVX2's 16 registers too).
constexpr int kMaxU = 8;
// Channel tiles (see channel_tile): a chunk's input runs within this share of L1 (read from L2,
// a dense-ish row's loads waited on its bandwidth) for chunks of at least kL1MinU vectors;
// chunks of fewer vectors load one to three per nonzero, wait on the nonzero's own work
// rather than on L2, and ran faster with tiles of kSmallChunkTileBytes; segments of at least
// about kSegWork vector FMAs (bench/RESULTS.md).
constexpr double kTileL1 = 0.75;
constexpr int kL1MinU = 4;
constexpr int64_t kSmallChunkTileBytes = int64_t(48) << 10;
constexpr double kSegWork = 320.0;
// Lane FMAs that pay for one more thread (a team's wake-up costs tens of microseconds).
constexpr int64_t kWorkPerThread = int64_t(1) << 18;

struct Geom {
  int64_t N, C, H, W, Cout, kh, kw, ph, pw, dh, dw, sh, sw, Hp, Hq, Wr, OH, OW;
  int64_t CS;  // elements of one shifted copy, with the slack its last chunk reads
  uint32_t phases;  // bit a: some tap reads row phase a
  // Output shifts (see sample_product_oshift): G = kw groups of taps, one per tap column,
  // over a single unshifted copy (ncopy = 1); otherwise G = 1 and ncopy = kw.
  int64_t G = 1, ncopy = 1;
  int64_t plane() const { return sh * Hq * Wr; }
  int64_t Lp() const { return OH * Wr; }  // computed positions of one output channel
};

// How a row's Lp positions are cut: nchunk chunks of U vectors.
struct Chunks {
  int U;
  int64_t n;
};

template <typename T>
Chunks chunks_for(int64_t Lp) {
  constexpr int W = VecOf<T>::V::W;
  const int64_t nvec = (Lp + W - 1) / W;
  const int64_t n = (nvec + kMaxU - 1) / kMaxU;
  return {int((nvec + n - 1) / n), n};
}

// shifted_copies for float32 rows of whole vectors at column stride S = 1 or 2 (every conv
// of the bench's models): each input row is read once and written into the kw copies, with
// each copy's per-vector lane masks (the image's columns; the lanes outside load nothing and
// come out 0) computed once per call; at stride 2 a vector of the copy is the even elements
// of two loaded vectors. The general path's per-row work, its pass over the input per copy
// and its scalar column gather at stride 2 were several times slower (bench/results,
// models notes). L: lanes per vector (AVX-512: 16, or 8 for rows of 8; AVX2: 8).
#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
template <int L>
using LaneMask = std::conditional_t<L == 16, __mmask16, __mmask8>;
#else
struct Mask8 {  // (a struct: vectors of a bare __m256i drop its alignment attribute)
  __m256i m;
};
template <int L>
using LaneMask = Mask8;
#endif

template <int L>
inline LaneMask<L> lane_mask(int64_t lo, int64_t hi) {  // lanes [lo, hi) of [0, L)
  lo = std::clamp<int64_t>(lo, 0, L);
  hi = std::clamp<int64_t>(hi, lo, L);
#if defined(__AVX512F__)
  return LaneMask<L>(((1u << hi) - 1) & ~((1u << lo) - 1));
#else
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return {_mm256_and_si256(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(int(lo) - 1)),
                           _mm256_cmpgt_epi32(_mm256_set1_epi32(int(hi)), lane))};
#endif
}

// row[0, L) = the masked lanes of S vectors from src, every S-th element.
template <int L, int S>
inline void copy_vec(float* row, const float* src, const LaneMask<L>* m) {
#if defined(__AVX512F__)
  if constexpr (L == 16 && S == 1) {
    _mm512_store_ps(row, _mm512_maskz_loadu_ps(m[0], src));
  } else if constexpr (L == 16) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    _mm512_store_ps(row, _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(m[0], src), even,
                                                _mm512_maskz_loadu_ps(m[1], src + 16)));
  } else if constexpr (S == 1) {
    _mm256_store_ps(row, _mm256_maskz_loadu_ps(m[0], src));
  } else {
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    _mm256_store_ps(row, _mm256_permutex2var_ps(_mm256_maskz_loadu_ps(m[0], src), even,
                                                _mm256_maskz_loadu_ps(m[1], src + 8)));
  }
#else
  if constexpr (S == 1) {
    _mm256_store_ps(row, _mm256_maskload_ps(src, m[0].m));
  } else {  // a0 a2 b0 b2 | a4 a6 b4 b6, then its 64-bit pairs reordered
    const __m256 t = _mm256_shuffle_ps(_mm256_maskload_ps(src, m[0].m),
                                       _mm256_maskload_ps(src + 8, m[1].m),
                                       _MM_SHUFFLE(2, 0, 2, 0));
    _mm256_store_ps(row, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(t),
                                                                _MM_SHUFFLE(3, 1, 2, 0))));
  }
#endif
}

template <int L, int S>
void copies_f32(const Geom& g, const float* x, float* xs, int64_t c0, int64_t c1) {
  const int64_t nv = g.Wr / L;
  std::vector<LaneMask<L>> masks(g.kw * nv * S);
  std::vector<int64_t> shift(g.kw);
  for (int64_t j = 0; j < g.kw; ++j) {
    shift[j] = j * g.dw - g.pw;
    // vector v of the copy reads image columns [v*L*S + shift, + L*S): lanes of its loaded
    // vectors that fall outside [0, W) stay 0 (and so do the copy's lanes that take them)
    for (int64_t v = 0; v < nv; ++v)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t first = (v * S + s) * L + shift[j];
        masks[(j * nv + v) * S + s] = lane_mask<L>(-first, g.W - first);
      }
  }
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t a = 0; a < g.sh; ++a) {
      if (!(g.phases >> a & 1)) continue;
      for (int64_t r = 0; r < g.Hq; ++r) {
        const int64_t at = ((c * g.sh + a) * g.Hq + r) * g.Wr;
        const int64_t h = r * g.sh + a - g.ph;
        if (h < 0 || h >= g.H) {
          for (int64_t j = 0; j < g.kw; ++j)
            std::fill(xs + j * g.CS + at, xs + j * g.CS + at + g.Wr, 0.0f);
          continue;
        }
        const float* src = x + (c * g.H + h) * g.W;
        for (int64_t j = 0; j < g.kw; ++j) {
          float* row = xs + j * g.CS + at;
          // masked-off lanes read no memory: the loads may start before or end past the row
          const float* sj = src + shift[j];
          const LaneMask<L>* m = masks.data() + j * nv * S;
          for (int64_t v = 0; v < nv; ++v) copy_vec<L, S>(row + v * L, sj + v * L * S, m + v * S);
        }
      }
    }
}
#endif

// Returns false where copies_f32 does not apply.
template <typename T>
bool shifted_copies_fast(const Geom& g, const T* x, T* xs, int64_t c0, int64_t c1) {
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    if (g.sw != 1 && g.sw != 2) return false;
    const bool s1 = g.sw == 1;
#if defined(__AVX512F__)
    if (g.Wr % 16 == 0) {
      s1 ? copies_f32<16, 1>(g, x, xs, c0, c1) : copies_f32<16, 2>(g, x, xs, c0, c1);
      return true;
    }
#endif
    if (g.Wr % 8 == 0) {
      s1 ? copies_f32<8, 1>(g, x, xs, c0, c1) : copies_f32<8, 2>(g, x, xs, c0, c1);
      return true;
    }
    return false;
  }
#endif
  (void)g, (void)x, (void)xs, (void)c0, (void)c1;
  return false;
}

// The kw shifted copies of sample x (C, H, W): xs[j*CS + ((c*sh + a)*Hq + r)*Wr + q] =
// x[c][r*sh + a - ph][q*sw + j*dw - pw], zero outside the image and in each copy's slack.
// Channels [c0, c1) of them; `slack`: the slack too.
template <typename T>
void shifted_copies(const Geom& g, const T* x, T* xs, int64_t c0, int64_t c1, bool slack) {
  if (shifted_copies_fast(g, x, xs, c0, c1)) {
    if (slack)
      for (int64_t j = 0; j < g.kw; ++j)
        std::fill(xs + j * g.CS + g.C * g.plane(), xs + (j + 1) * g.CS, T(0));
    return;
  }
  for (int64_t j = 0; j < g.kw; ++j) {
    T* copy = xs + j * g.CS;
    const int64_t shift = j * g.dw - g.pw;  // column q of the copy reads image column q*sw+shift
    // columns [q0, q1) of a row fall inside the image
    const int64_t q0 = std::clamp<int64_t>((-shift + g.sw - 1) / g.sw, 0, g.Wr);
    const int64_t q1 = std::clamp<int64_t>((g.W - shift + g.sw - 1) / g.sw, q0, g.Wr);
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t a = 0; a < g.sh; ++a) {
        if (!(g.phases >> a & 1)) continue;
        for (int64_t r = 0; r < g.Hq; ++r) {
          T* row = copy + ((c * g.sh + a) * g.Hq + r) * g.Wr;
          const int64_t h = r * g.sh + a - g.ph;
          if (h < 0 || h >= g.H) {
            std::fill(row, row + g.Wr, T(0));
            continue;
          }
          const T* src = x + (c * g.H + h) * g.W + shift;
          std::fill(row, row + q0, T(0));
          if (g.sw == 1)
            std::memcpy(row + q0, src + q0, (q1 - q0) * sizeof(T));
          else
            for (int64_t q = q0; q < q1; ++q) row[q] = src[q * g.sw];
          std::fill(row + q1, row + g.Wr, T(0));
        }
      }
    if (slack) std::fill(copy + g.C * g.plane(), copy + g.CS, T(0));
  }
}

// ys[co * ld + c*U*W, + U*W) = row co of W times chunk c of the shifted copies xs, for every
// row, chunk by chunk, and within a chunk channel tile by channel tile: a tile's input runs
// (kw copies x ct channels x about U*W + (kh-1)*dh*Wr elements) stay in L1 while every row
// passes over them (read from L2, each load would wait on L2's bandwidth). seg[co*(nt+1) + t]
// is where row co's nonzeros of tile t start (columns are channel-major). (Pairs of rows
// sharing the loads of the columns both keep were tried at 17-50 % density: no faster, and
// slower at 8x8.)
template <typename T, int U>
void sample_product(const T* xs, const int32_t* off, const T* val, const int32_t* seg,
                    int64_t nt, int64_t co0, int64_t co1, int64_t n, T* ys, int64_t ld) {
  using V = typename VecOf<T>::V;
  constexpr int64_t CH = int64_t(U) * V::W;
  for (int64_t c = 0; c < n; ++c) {
    const T* base = xs + c * CH;
    for (int64_t t = 0; t < nt; ++t) {
      for (int64_t co = co0; co < co1; ++co) {
        const int32_t* sg = seg + co * (nt + 1) + t;
        T* y = ys + co * ld + c * CH;
        V acc[U];
        for (int u = 0; u < U; ++u) acc[u] = t == 0 ? V::zero() : V::load(y + u * V::W);
        int64_t q = sg[0];
        if constexpr (U <= 2) {
          // Fewer chains than an FMA's latency in cycles: a second set of accumulators for
          // every other nonzero keeps the FMA unit busier (faster at 4x4 outputs, one vector
          // per row; four sets were no faster, nor two sets at U = 4: models notes).
          V acc2[U];
          for (int u = 0; u < U; ++u) acc2[u] = V::zero();
          for (; q + 1 < sg[1]; q += 2) {
            const V w0 = V::bcast(val[q]), w1 = V::bcast(val[q + 1]);
            const T* s0 = base + off[q];
            const T* s1 = base + off[q + 1];
            for (int u = 0; u < U; ++u) {
              acc[u].fma(w0, V::load(s0 + u * V::W));
              acc2[u].fma(w1, V::load(s1 + u * V::W));
            }
          }
          for (int u = 0; u < U; ++u) acc[u].add(acc2[u]);
        }
        for (; q < sg[1]; ++q) {
          const V w = V::bcast(val[q]);
          const T* s = base + off[q];
          for (int u = 0; u < U; ++u) acc[u].fma(w, V::load(s + u * V::W));
        }
        for (int u = 0; u < U; ++u) acc[u].store(y + u * V::W);
      }
    }
  }
}

// Output shifts (float32, AVX-512, column stride sw = 1 or 2). Tap column j reads image
// column ow*sw + c_j, c_j = j*dw - pw, which is column ow + d_j of copy b_j, the copy of image
// columns q*sw + b_j (b_j = c_j mod sw, d_j = (c_j - b_j) / sw: at stride 1 one copy, the
// image itself, zero-padded). The taps of column j multiply their copy *unshifted* into
// their own accumulators a_j, and the chunk takes a_j moved d_j lanes in registers:
// y[p] += a_j[p + d_j], on the lanes whose image column lies in the image (the others read
// padding: 0). A chunk is whole rows (its size a multiple of Wr), so p + d_j stays in the
// chunk wherever the lane counts. sw copies instead of kw (a third of the copies' stores and
// of the input a channel tile holds, at stride 1), for one lane permutation and masked add
// per vector, group and segment. The plan groups a row's nonzeros of a tile by tap column
// (seg: G = kw entries per tile); perm[q] is nonzero q's index in val (the CSR order).
// mask[j*U + u]: the lanes of vector u that take group j; idx[j*16, +16): its permutation.
#if defined(__AVX512F__)
template <int U>
void sample_product_oshift(const float* xs, const int32_t* off, const float* val,
                           const int32_t* perm, const int32_t* seg, int64_t nt, int64_t G,
                           const int32_t* d, const int32_t* idx, const __mmask16* mask,
                           int64_t co0, int64_t co1, int64_t n, float* ys, int64_t ld) {
  constexpr int64_t CH = int64_t(U) * 16;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; ++c) {
    const float* base = xs + c * CH;
    for (int64_t t = 0; t < nt; ++t) {
      for (int64_t co = co0; co < co1; ++co) {
        const int32_t* sg = seg + co * (nt * G + 1) + t * G;
        float* y = ys + co * ld + c * CH;
        __m512 acc[U];
        for (int u = 0; u < U; ++u) acc[u] = t == 0 ? zero : _mm512_loadu_ps(y + u * 16);
        for (int64_t j = 0; j < G; ++j) {
          if (sg[j] == sg[j + 1]) continue;
          __m512 a[U];
          for (int u = 0; u < U; ++u) a[u] = zero;
          int64_t q = sg[j];
          if constexpr (U <= 2) {  // two sets of chains, as in sample_product
            __m512 b[U];
            for (int u = 0; u < U; ++u) b[u] = zero;
            for (; q + 1 < sg[j + 1]; q += 2) {
              const __m512 w0 = _mm512_set1_ps(val[perm[q]]);
              const __m512 w1 = _mm512_set1_ps(val[perm[q + 1]]);
              const float* s0 = base + off[q];
              const float* s1 = base + off[q + 1];
              for (int u = 0; u < U; ++u) {
                a[u] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(s0 + u * 16), a[u]);
                b[u] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(s1 + u * 16), b[u]);
              }
            }
            for (int u = 0; u < U; ++u) a[u] = _mm512_add_ps(a[u], b[u]);
          }
          for (; q < sg[j + 1]; ++q) {
            const __m512 w = _mm512_set1_ps(val[perm[q]]);
            const float* s = base + off[q];
            for (int u = 0; u < U; ++u)
              a[u] = _mm512_fmadd_ps(w, _mm512_loadu_ps(s + u * 16), a[u]);
          }
          const __mmask16* m = mask + j * U;
          const __m512i lanes = _mm512_loadu_si512(idx + j * 16);
          if (d[j] == 0) {
            for (int u = 0; u < U; ++u) acc[u] = _mm512_add_ps(acc[u], a[u]);
          } else if (d[j] > 0) {  // lane l of vector u takes element l + d of (a[u], a[u+1])
            for (int u = 0; u < U; ++u) {
              const __m512 s = _mm512_permutex2var_ps(a[u], lanes, u + 1 < U ? a[u + 1] : zero);
              acc[u] = _mm512_mask_add_ps(acc[u], m[u], acc[u], s);
            }
          } else {  // element 16 + l + d of (a[u-1], a[u])
            for (int u = 0; u < U; ++u) {
              const __m512 s = _mm512_permutex2var_ps(u > 0 ? a[u - 1] : zero, lanes, a[u]);
              acc[u] = _mm512_mask_add_ps(acc[u], m[u], acc[u], s);
            }
          }
        }
        for (int u = 0; u < U; ++u) _mm512_storeu_ps(y + u * 16, acc[u]);
      }
    }
  }
}
#endif

template <typename T>
using SampleFn = void (*)(const T*, const int32_t*, const T*, const int32_t*, int64_t, int64_t,
                          int64_t, int64_t, T*, int64_t);

template <typename T>
SampleFn<T> sample_fn(int U) {
  switch (U) {
    case 1: return &sample_product<T, 1>;
    case 2: return &sample_product<T, 2>;
    case 3: return &sample_product<T, 3>;
    case 4: return &sample_product<T, 4>;
    case 5: return &sample_product<T, 5>;
    case 6: return &sample_product<T, 6>;
    case 7: return &sample_product<T, 7>;
    default: return &sample_product<T, 8>;
  }
}

struct Epilogue {
  bool pool, relu;
  int64_t OHo, OWo;     // output (pooled) size
  bool stream = false;  // non-temporal stores (a big output)
};
// Outputs of at least this many bytes are written with non-temporal stores (measured on the
// bench's ResNet-18 and VGG-16 at batch 16 and 64: 1-4 % faster whole models; smaller
// outputs are left in cache for the next layer).
constexpr int64_t kStreamBytes = int64_t(4) << 20;

// Orders a thread's non-temporal stores (row_epilogue's) before what follows: once after a
// thread's rows of a call: a fence after each row made the convs with small outputs several
// per cent slower (models notes).
inline void stream_fence(const Epilogue& e) {
#if defined(__AVX512F__)
  if (e.stream) _mm_sfence();
#else
  (void)e;
#endif
}

// out (OHo, OWo) of one channel = epilogue(srow laid out (OH, Wr)), + b, + res (or null);
// stream_fence afterwards.
template <typename T>
void row_epilogue(const Geom& g, const Epilogue& e, const T* srow, T b, const T* res, T* out) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    // Rows without padding lanes: the channel's plane in one pass of whole vectors, stored
    // past the caches when the output is too big to stay there for the next layer (a plain
    // store first reads the line it writes).
    const int64_t len = e.OHo * e.OWo;
    if (!e.pool && g.Wr == e.OWo && len % 16 == 0 &&
        reinterpret_cast<uintptr_t>(out) % 64 == 0) {
      const __m512 bv = _mm512_set1_ps(b), zero = _mm512_setzero_ps();
      for (int64_t i = 0; i < len; i += 16) {
        __m512 v = _mm512_add_ps(_mm512_loadu_ps(srow + i), bv);
        if (res) v = _mm512_add_ps(v, _mm512_loadu_ps(res + i));
        if (e.relu) v = _mm512_mask_max_ps(v, 0xFFFF, v, zero);  // (GCC 12 warns on max_ps)
        if (e.stream)
          _mm512_stream_ps(out + i, v);
        else
          _mm512_store_ps(out + i, v);
      }
      return;
    }
  }
#endif
  for (int64_t oh = 0; oh < e.OHo; ++oh) {
    T* o = out + oh * e.OWo;
    const T* r = res ? res + oh * e.OWo : nullptr;
    if (e.pool) {
      const T* s0 = srow + 2 * oh * g.Wr;
      const T* s1 = s0 + g.Wr;
      for (int64_t ow = 0; ow < e.OWo; ++ow) {
        T v = std::max(std::max(s0[2 * ow], s0[2 * ow + 1]), std::max(s1[2 * ow], s1[2 * ow + 1]));
        o[ow] = v + b;
      }
    } else {
      const T* s = srow + oh * g.Wr;
      for (int64_t ow = 0; ow < e.OWo; ++ow) o[ow] = s[ow] + b;
    }
    if (r)
      for (int64_t ow = 0; ow < e.OWo; ++ow) o[ow] += r[ow];
    if (e.relu)
      for (int64_t ow = 0; ow < e.OWo; ++ow) o[ow] = std::max(o[ow], T(0));
  }
}

// With output shifts, tap column j (image column ow*sw + c, c = j*dw - pw) reads column
// ow + d of copy b, the copy of image columns q*sw + b: b = c mod sw, d = (c - b) / sw.
int64_t tap_phase(const Geom& g, int64_t j) {
  const int64_t c = j * g.dw - g.pw;
  return (c % g.sw + g.sw) % g.sw;
}
#if defined(__AVX512F__)
int64_t tap_shift(const Geom& g, int64_t j) {
  return (j * g.dw - g.pw - tap_phase(g, j)) / g.sw;
}
#endif

// The geometry of the copies: with output shifts, one copy per column phase b (shift b).
Geom copy_geom(const Geom& g) {
  Geom c = g;
  if (g.G > 1) c.kw = g.ncopy, c.dw = 1, c.pw = 0;
  return c;
}

#if defined(__AVX512F__)
// sample_product_oshift's lane permutations and masks for chunks of U vectors.
struct Shifts {
  std::vector<int32_t> d;
  std::vector<int32_t> idx;  // 16 lanes per group
  std::vector<__mmask16> mask;
  Shifts(const Geom& g, int U) {
    if (g.G == 1) return;  // (the shifted copies' path needs none)
    d.resize(g.G), idx.resize(g.G * 16), mask.resize(g.G * U);
    for (int64_t j = 0; j < g.G; ++j) {
      d[j] = int32_t(tap_shift(g, j));
      for (int l = 0; l < 16; ++l) idx[j * 16 + l] = l + (d[j] >= 0 ? d[j] : 16 + d[j]);
      for (int u = 0; u < U; ++u) {
        unsigned m = 0;
        for (int l = 0; l < 16; ++l) {
          const int64_t ow = (u * 16 + l) % g.Wr;  // (chunks start at a row)
          const int64_t col = ow * g.sw + j * g.dw - g.pw, q = ow + d[j];
          if (col >= 0 && col < g.W && q >= 0 && q < g.Wr) m |= 1u << l;
        }
        mask[j * U + u] = __mmask16(m);
      }
    }
  }
};

using OshiftFn = void (*)(const float*, const int32_t*, const float*, const int32_t*,
                          const int32_t*, int64_t, int64_t, const int32_t*, const int32_t*,
                          const __mmask16*, int64_t, int64_t, int64_t, float*, int64_t);

OshiftFn oshift_fn(int U) {
  switch (U) {
    case 1: return &sample_product_oshift<1>;
    case 2: return &sample_product_oshift<2>;
    case 3: return &sample_product_oshift<3>;
    case 4: return &sample_product_oshift<4>;
    case 5: return &sample_product_oshift<5>;
    case 6: return &sample_product_oshift<6>;
    case 7: return &sample_product_oshift<7>;
    default: return &sample_product_oshift<8>;
  }
}
#endif

template <typename T>
void conv_direct(const Geom& g, const Epilogue& e, const T* x, const int32_t* off, const T* val,
                 const int32_t* perm, const int32_t* seg, int64_t nt, const T* bias,
                 const T* res, T* out, int nthreads) {
  const Chunks ch = chunks_for<T>(g.Lp());
  const int64_t span = ch.n * ch.U * VecOf<T>::V::W;  // positions computed per row
  const int64_t xp_len = g.ncopy * g.CS;
  const Geom gc = copy_geom(g);
  const SampleFn<T> fn = sample_fn<T>(ch.U);
#if defined(__AVX512F__)
  const Shifts shifts(g, ch.U);
  const OshiftFn ofn = oshift_fn(ch.U);
#endif
  // rows [co0, co1) of the product of the copies xp into ys
  auto product = [&](const T* xp, int64_t co0, int64_t co1, T* ys) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
      if (g.G > 1) {
        ofn(xp, off, val, perm, seg, nt, g.G, shifts.d.data(), shifts.idx.data(),
            shifts.mask.data(), co0, co1, ch.n, ys, span);
        return;
      }
    }
#endif
    fn(xp, off, val, seg, nt, co0, co1, ch.n, ys, span);
  };
  const int64_t in_len = g.C * g.H * g.W, out_len = g.Cout * e.OHo * e.OWo;
  const int64_t oplane = e.OHo * e.OWo;
  auto finish = [&](int64_t n, int64_t co, const T* ys) {
    row_epilogue(g, e, ys + co * span, bias ? bias[co] : T(0),
                 res ? res + n * out_len + co * oplane : nullptr,
                 out + n * out_len + co * oplane);
  };
  if (g.N >= nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t n = 0; n < g.N; ++n) {
      const vec::DenormalsAsZero daz;
      T* xp = vec_scratch<T>(0, xp_len);
      T* ys = vec_scratch<T>(1, g.Cout * span);
      shifted_copies(gc, x + n * in_len, xp, 0, g.C, true);
      product(xp, 0, g.Cout, ys);
      for (int64_t co = 0; co < g.Cout; ++co) finish(n, co, ys);
      stream_fence(e);
    }
    return;
  }
  // the calling thread's buffers, shared by the team
  T* xp = vec_scratch<T>(0, xp_len);
  T* ys = vec_scratch<T>(1, g.Cout * span);
  constexpr int64_t kRows = 8;
  // Each thread takes the same contiguous rows in every call, balanced by nonzero count: its
  // share of the weight then stays in its own L2 from one call to the next where it fits (a
  // dynamic schedule of 8-row blocks moved rows between threads, and two threads at batch 1
  // were no faster than one: models notes). first_row(q): the first row starting at or
  // after nonzero q.
  const int64_t sl = nt * g.G + 1;  // seg entries per row
  const int64_t total = g.Cout ? seg[g.Cout * sl - 1] : 0;
  auto first_row = [&](int64_t q) {
    int64_t lo = 0, hi = g.Cout;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (seg[mid * sl] < q)
        lo = mid + 1;
      else
        hi = mid;
    }
    return lo;
  };
  for (int64_t n = 0; n < g.N; ++n) {
#pragma omp parallel num_threads(nthreads)
    {
      const vec::DenormalsAsZero daz;
      const int t = omp_get_thread_num(), nt_ = omp_get_num_threads();
      const int64_t c0 = g.C * t / nt_, c1 = g.C * (t + 1) / nt_;
      shifted_copies(gc, x + n * in_len, xp, c0, c1, t == 0);
#pragma omp barrier
      const int64_t r0 = t == 0 ? 0 : first_row(total * t / nt_);
      const int64_t r1 = t == nt_ - 1 ? g.Cout : first_row(total * (t + 1) / nt_);
      for (int64_t co0 = r0; co0 < r1; co0 += kRows) {
        const int64_t co1 = std::min(r1, co0 + kRows);
        product(xp, co0, co1, ys);
        for (int64_t co = co0; co < co1; ++co) finish(n, co, ys);
      }
      stream_fence(e);
    }
  }
}

// The geometry of the conv on an input (N, C, H, W), its copies laid out for vectors of
// `is_float`'s dtype.
Geom make_geom(const char* op, int64_t N, int64_t C, int64_t H, int64_t W,
               at::IntArrayRef weight_shape, at::IntArrayRef padding, at::IntArrayRef dilation,
               at::IntArrayRef stride, bool is_float) {
  TORCH_CHECK(weight_shape.size() == 4, op, ": weight_shape must be (C_out, C_in, kh, kw)");
  TORCH_CHECK(padding.size() == 2 && dilation.size() == 2 && stride.size() == 2, op,
              ": stride, padding and dilation must have 2 entries each");
  Geom g{N, C, H, W, weight_shape[0], weight_shape[2], weight_shape[3], padding[0], padding[1],
         dilation[0], dilation[1], stride[0], stride[1], 0, 0, 0, 0, 0, 0, 0};
  TORCH_CHECK(weight_shape[1] == g.C, op, ": input has ", g.C, " channels, the weight expects ",
              weight_shape[1]);
  TORCH_CHECK(g.ph >= 0 && g.pw >= 0 && g.dh > 0 && g.dw > 0 && g.kh > 0 && g.kw > 0 &&
                  g.sh > 0 && g.sw > 0,
              op, ": stride and dilation must be positive, padding non-negative");
  TORCH_CHECK(g.sh <= 16, op, ": row strides above 16 are not supported");
  g.Hp = g.H + 2 * g.ph;
  const int64_t span_h = g.Hp - g.dh * (g.kh - 1), span_w = g.W + 2 * g.pw - g.dw * (g.kw - 1);
  TORCH_CHECK(span_h >= 1 && span_w >= 1, op, ": the (padded) input is smaller than the kernel");
  g.OH = (span_h - 1) / g.sh + 1;
  g.OW = (span_w - 1) / g.sw + 1;
  g.Hq = (g.Hp + g.sh - 1) / g.sh;
  g.phases = 0;
  for (int64_t i = 0; i < g.kh; ++i) g.phases |= 1u << (i * g.dh % g.sh);
  const int64_t VW = is_float ? VecOf<float>::V::W : VecOf<double>::V::W;
  // Rows of whole vectors keep every load aligned; rows narrower than a vector are packed
  // (to a multiple of 4 elements), so that a vector spans several output rows instead of
  // wasting most of its lanes.
  const int64_t align = g.OW >= VW ? VW : std::min<int64_t>(4, VW);
  g.Wr = (g.OW + align - 1) / align * align;
  // a copy's slack: what the last chunk reads past the copy (whole vectors, so copies stay
  // aligned)
  const Chunks ch = is_float ? chunks_for<float>(g.Lp()) : chunks_for<double>(g.Lp());
  g.CS = (g.C * g.plane() + ch.n * ch.U * VW - g.Lp() + 2 * VW - 1) / VW * VW;
  // Output shifts (sample_product_oshift) for float32 on AVX-512 at column strides 1 and 2,
  // where chunks are whole rows, every shift stays within a vector and the copies' rows hold
  // every column a tap reads.
  bool oshift = false;
  int64_t phases = 1;
#if defined(__AVX512F__)
  oshift = is_float && (g.sw == 1 || g.sw == 2) && g.kw > 1 && (ch.U * VW) % g.Wr == 0;
  for (int64_t j = 0; j < g.kw && oshift; ++j) {
    const int64_t b = tap_phase(g, j), d = tap_shift(g, j);
    const int64_t q_hi = std::min(g.OW - 1 + d, (g.W - 1 - b) / g.sw);  // (W > b: W >= sw)
    oshift = std::abs(d) < 16 && q_hi < g.Wr;
    phases = std::max(phases, b + 1);
  }
#endif
  g.G = oshift ? g.kw : 1;
  g.ncopy = oshift ? phases : g.kw;
  TORCH_CHECK(g.ncopy * g.CS < (int64_t(1) << 31), op,
              ": a sample of more than 2^31 elements (shifted copies) is not supported");
  return g;
}

// A plan: what a call derives from the geometry and the sparsity pattern alone, built once
// by _csr_conv2d_fused_plan_cpu for a caller that keeps it (at batch 1 building it in every
// call, an O(nnz) pass with a table lookup per nonzero, took as long as the product). One
// int32 tensor: the header below, then off (nnz: each nonzero's offset in the shifted
// copies, in the kernel's order), with output shifts perm (nnz: the CSR index of each, the
// nonzeros of a row and tile being grouped by tap column), and seg (C_out * (nt*G + 1):
// where row o's nonzeros of channel tile t and group j start, at o*(nt*G + 1) + t*G + j).
enum : int64_t {
  kPMagic, kPC, kPH, kPW, kPCout, kPKh, kPKw, kPPh, kPPw, kPDh, kPDw, kPSh, kPSw, kPFloat,
  kPNnz, kPGroups, kPTiles, kPTileC, kPPrint, kPlanHeader
};
constexpr int32_t kPlanMagic = 0x43445043;

int64_t plan_size(const Geom& g, int64_t nnz, int64_t nt) {
  return kPlanHeader + nnz * (g.G > 1 ? 2 : 1) + g.Cout * (nt * g.G + 1);
}

// A nonzero's offset in the shifted copies: column k = (ci*kh + i)*kw + j reads copy j (with
// output shifts, the copy of its column phase), channel ci, from its row phase and shift of
// tap row i.
int64_t tap_offset(const Geom& g, int64_t ci, int64_t i, int64_t j) {
  return (g.G > 1 ? tap_phase(g, j) : j) * g.CS + ci * g.plane() +
         (i * g.dh % g.sh * g.Hq + i * g.dh / g.sh) * g.Wr;
}

// The largest offset of any column (a chunk read from there stays within the copies).
int64_t max_offset(const Geom& g) {
  int64_t m = 0;
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) m = std::max(m, tap_offset(g, g.C - 1, i, j));
  return m;
}

// The L1 data cache of a core in bytes (32 KiB where the system does not say).
int64_t l1_bytes() {
  static const int64_t bytes = [] {
#if defined(_SC_LEVEL1_DCACHE_SIZE)  // glibc
    const long s = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    if (s >= (16 << 10) && s <= (1 << 20)) return int64_t(s);
#endif
    return int64_t(32) << 10;
  }();
  return bytes;
}

// Channel tiles: as many channels as keep a chunk's input runs within kTileL1 of L1 (chunks of
// fewer than kL1MinU vectors: within kSmallChunkTileBytes), but no fewer than give a row's
// segment about kSegWork vector FMAs (nonzeros x U: a segment's accumulators go in and out
// of memory, and each tap column's sum is moved and added), in tiles of equal size (a last
// tile of a few channels made short segments).
int64_t channel_tile(const Geom& g, int64_t nnz, bool is_float) {
  const int64_t VW = is_float ? VecOf<float>::V::W : VecOf<double>::V::W;
  const int64_t esize = is_float ? 4 : 8;
  const Chunks chk = is_float ? chunks_for<float>(g.Lp()) : chunks_for<double>(g.Lp());
  const int64_t read_phases = __builtin_popcount(g.phases);
  const int64_t per_channel =
      g.ncopy * (read_phases * chk.U * VW + (g.kh - 1) * g.dh / g.sh * g.Wr) * esize;
  const double per_row_channel = double(nnz) / double(g.Cout * g.C);
  const int64_t ct_min = int64_t(std::ceil(kSegWork / std::max(per_row_channel * chk.U, 1e-9)));
  const int64_t budget =
      chk.U >= kL1MinU ? int64_t(kTileL1 * double(l1_bytes())) : kSmallChunkTileBytes;
  const int64_t ct = std::clamp<int64_t>(std::max(budget / per_channel, ct_min), 1, g.C);
  const int64_t nt = (g.C + ct - 1) / ct;
  return (g.C + nt - 1) / nt;
}

void check_row_ptr(const char* op, const Geom& g, const at::Tensor& col_idx,
                   const at::Tensor& row_ptr) {
  TORCH_CHECK(col_idx.scalar_type() == at::kInt && row_ptr.scalar_type() == at::kInt &&
                  col_idx.is_contiguous() && row_ptr.is_contiguous() && col_idx.is_cpu() &&
                  row_ptr.is_cpu(),
              op, ": col_idx and row_ptr must be contiguous int32 CPU tensors");
  TORCH_CHECK(row_ptr.numel() == g.Cout + 1, op, ": row_ptr must have C_out + 1 = ", g.Cout + 1,
              " entries, got ", row_ptr.numel());
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  TORCH_CHECK(rp[0] == 0 && rp[g.Cout] == col_idx.numel(), op,
              ": row_ptr must start at 0 and end at nnz");
  for (int64_t o = 0; o < g.Cout; ++o)
    TORCH_CHECK(rp[o] <= rp[o + 1], op, ": row_ptr must be non-decreasing (row ", o, ")");
}

// The plan of the conv (row_ptr checked); the CSR checks and the offsets in one O(nnz) pass.
// `print`: the pattern's fingerprint in the header (for a plan that is kept), else 0.
at::Tensor build_plan(const char* op, const Geom& g, const at::Tensor& col_idx,
                      const at::Tensor& row_ptr, bool is_float, int nthreads, bool print) {
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int32_t* col = col_idx.data_ptr<int32_t>();
  const int64_t K = g.C * g.kh * g.kw, nnz = col_idx.numel();
  const int64_t ct = channel_tile(g, nnz, is_float), nt = (g.C + ct - 1) / ct;
  auto plan = at::empty({plan_size(g, nnz, nt)}, col_idx.options());
  int32_t* h = plan.data_ptr<int32_t>();
  const int64_t fields[kPlanHeader] = {kPlanMagic, g.C,      g.H,  g.W,  g.Cout, g.kh, g.kw,
                                       g.ph,       g.pw,     g.dh, g.dw, g.sh,   g.sw, is_float,
                                       nnz,        g.G,      nt,   ct,   0};
  for (int64_t i = 0; i < kPlanHeader; ++i) h[i] = int32_t(fields[i]);
  h[kPPrint] = print ? fingerprint<64>(row_ptr, col_idx) : 0;
  int32_t* off = h + kPlanHeader;
  int32_t* perm = g.G > 1 ? off + nnz : nullptr;
  int32_t* seg = off + (g.G > 1 ? 2 : 1) * nnz;
  // Per column k = (ci*kh + i)*kw + j: its offset in the shifted copies and its group, then
  // per nonzero a table lookup (divisions by kh*kw and kw per nonzero were most of a small
  // batch's time).
  std::vector<int32_t> koff(K), kgroup(K);
  for (int64_t ci = 0, k = 0; ci < g.C; ++ci)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j, ++k) {
        koff[k] = int32_t(tap_offset(g, ci, i, j));
        kgroup[k] = int32_t(g.G > 1 ? j : 0);
      }
  const int64_t khw = g.kh * g.kw, sl = nt * g.G + 1;
  bool ok = true;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(&& : ok)
  for (int64_t o = 0; o < g.Cout; ++o) {
    int64_t prev = -1;
    for (int64_t q = rp[o]; q < rp[o + 1]; ++q) {
      const int64_t k = col[q];
      ok &= k > prev && k < K;
      prev = k;
    }
    if (!ok) continue;
    int64_t q = rp[o], pos = rp[o];
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t end = (t + 1) * ct * khw;  // first column of the next tile
      int64_t q1 = q;
      while (q1 < rp[o + 1] && col[q1] < end) ++q1;
      for (int64_t j = 0; j < g.G; ++j) {
        seg[o * sl + t * g.G + j] = int32_t(pos);
        for (int64_t r = q; r < q1; ++r) {
          if (kgroup[col[r]] != j) continue;
          off[pos] = koff[col[r]];
          if (perm) perm[pos] = int32_t(r);
          ++pos;
        }
      }
      q = q1;
    }
    seg[o * sl + nt * g.G] = rp[o + 1];
  }
  TORCH_CHECK(ok, op, ": col_idx out of range [0, ", K,
              ") or not strictly increasing within a row");
  return plan;
}

// A kept plan, checked against this call: built for this geometry, dtype and sparsity
// pattern (its fingerprint), and no offset or segment able to leave its array.
void check_plan(const char* op, const at::Tensor& plan, const Geom& g, bool is_float,
                const at::Tensor& col_idx, const at::Tensor& row_ptr) {
  TORCH_CHECK(plan.scalar_type() == at::kInt && plan.is_contiguous() && plan.is_cpu() &&
                  plan.dim() == 1 && plan.numel() >= kPlanHeader,
              op, ": plan must be a 1-D contiguous int32 CPU tensor from "
              "_csr_conv2d_fused_plan_cpu");
  const int32_t* h = plan.data_ptr<int32_t>();
  const int64_t nnz = col_idx.numel();
  const int64_t want[kPTiles] = {kPlanMagic, g.C,  g.H,  g.W,  g.Cout, g.kh,     g.kw,
                                 g.ph,       g.pw, g.dh, g.dw, g.sh,   g.sw,     is_float,
                                 nnz,        g.G};
  bool same = true;
  for (int64_t i = 0; i < kPTiles; ++i) same &= h[i] == want[i];
  TORCH_CHECK(same, op, ": the plan was built for another input size, conv geometry, dtype or "
              "number of nonzeros");
  const int64_t nt = h[kPTiles], ct = h[kPTileC];
  TORCH_CHECK(nt >= 1 && ct >= 1 && nt == (g.C + ct - 1) / ct &&
                  plan.numel() == plan_size(g, nnz, nt),
              op, ": the plan's channel tiles do not match its size");
  TORCH_CHECK(h[kPPrint] == fingerprint<64>(row_ptr, col_idx), op,
              ": the plan was built for another sparsity pattern (row_ptr / col_idx)");
  const int32_t* off = h + kPlanHeader;
  const int32_t* perm = g.G > 1 ? off + nnz : nullptr;
  const int32_t* seg = off + (g.G > 1 ? 2 : 1) * nnz;
  const int32_t hi = int32_t(max_offset(g));
  int32_t lo_seen = 0, hi_seen = 0;
  for (int64_t q = 0; q < nnz; ++q) {
    lo_seen = std::min(lo_seen, off[q]);
    hi_seen = std::max(hi_seen, off[q]);
  }
  TORCH_CHECK(lo_seen >= 0 && hi_seen <= hi, op, ": the plan's offsets leave the input");
  if (perm) {  // (a range check per row cost as much as a batch-1 call's product)
    lo_seen = 0, hi_seen = 0;
    for (int64_t q = 0; q < nnz; ++q) {
      lo_seen = std::min(lo_seen, perm[q]);
      hi_seen = std::max(hi_seen, perm[q]);
    }
    TORCH_CHECK(lo_seen >= 0 && hi_seen < nnz, op, ": the plan's order of nonzeros leaves "
                "the values");
  }
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int64_t sl = nt * g.G + 1;
  bool ok = true;
  for (int64_t o = 0; o < g.Cout; ++o) {
    const int32_t* s = seg + o * sl;
    ok &= s[0] == rp[o] && s[sl - 1] == rp[o + 1];
    for (int64_t t = 0; t + 1 < sl; ++t) ok &= s[t] <= s[t + 1];
  }
  TORCH_CHECK(ok, op, ": the plan's segments do not match row_ptr");
}

// x (N, C, H, W) -> (N, C_out, OH, OW), or (N, C_out, OH/2, OW/2) with `pool`.
at::Tensor _csr_conv2d_fused_cpu(const at::Tensor& x, const at::Tensor& values,
                                 const at::Tensor& col_idx, const at::Tensor& row_ptr,
                                 at::IntArrayRef weight_shape, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual, bool relu,
                                 bool pool, at::IntArrayRef stride,
                                 const std::optional<at::Tensor>& plan) {
  constexpr const char* op = "_csr_conv2d_fused_cpu";
  TORCH_CHECK(x.dim() == 4, op, ": input must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == values.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              op, ": x and values must both be float32 or both float64");
  TORCH_CHECK(values.is_contiguous(), op, ": values must be contiguous");
  const bool is_float = x.scalar_type() == at::kFloat;
  const Geom g = make_geom(op, x.size(0), x.size(1), x.size(2), x.size(3), weight_shape, padding,
                           dilation, stride, is_float);
  check_row_ptr(op, g, col_idx, row_ptr);
  const int64_t nnz = col_idx.numel();
  TORCH_CHECK(values.numel() == nnz, op, ": values and col_idx differ in length");
  Epilogue e{pool, relu, pool ? g.OH / 2 : g.OH, pool ? g.OW / 2 : g.OW};
  e.stream = g.N * g.Cout * e.OHo * e.OWo * int64_t(x.element_size()) >= kStreamBytes;
  TORCH_CHECK(e.OHo >= 1 && e.OWo >= 1, op, ": the output is too small to max-pool 2x2");
  const auto out_sizes = std::vector<int64_t>{g.N, g.Cout, e.OHo, e.OWo};
  at::Tensor b, r;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == x.scalar_type() && b.numel() == g.Cout && b.is_cpu(), op,
                ": bias must be (C_out,) of x's dtype");
  }
  if (residual.has_value()) {
    r = residual->contiguous();
    TORCH_CHECK(r.scalar_type() == x.scalar_type() && r.sizes() == at::IntArrayRef(out_sizes) &&
                    r.is_cpu(),
                op, ": residual must have the output's shape ", at::IntArrayRef(out_sizes),
                " and x's dtype, got ", r.sizes());
  }
  const int64_t work = nnz * g.N * g.Lp();
  const int nthreads = int(std::clamp<int64_t>(work / min_work_per_thread(kWorkPerThread), 1,
                                               omp_get_max_threads()));
  at::Tensor p;
  if (plan.has_value()) {
    p = *plan;
    check_plan(op, p, g, is_float, col_idx, row_ptr);
  } else {
    p = build_plan(op, g, col_idx, row_ptr, is_float, nthreads, false);
  }
  const int32_t* off = p.data_ptr<int32_t>() + kPlanHeader;
  const int64_t nt = p.data_ptr<int32_t>()[kPTiles];

  const int32_t* seg = off + (g.G > 1 ? 2 : 1) * nnz;

  const at::Tensor xc = x.contiguous();
  auto out = arena_empty(out_sizes, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    conv_direct<scalar_t>(g, e, xc.data_ptr<scalar_t>(), off, values.data_ptr<scalar_t>(),
                          g.G > 1 ? off + nnz : nullptr, seg, nt,
                          b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                          r.defined() ? r.data_ptr<scalar_t>() : nullptr,
                          out.data_ptr<scalar_t>(), nthreads);
  });
  return out;
}

// The plan of the conv for inputs (N, C, input_hw) of `dtype` (float32 / float64), for a
// caller that keeps it across calls (the pattern's fingerprint is in it).
at::Tensor _csr_conv2d_fused_plan_cpu(const at::Tensor& col_idx, const at::Tensor& row_ptr,
                                      at::IntArrayRef weight_shape, at::IntArrayRef input_hw,
                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                      at::IntArrayRef stride, at::ScalarType dtype) {
  constexpr const char* op = "_csr_conv2d_fused_plan_cpu";
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": dtype must be float32 or "
              "float64, got ", dtype);
  TORCH_CHECK(input_hw.size() == 2 && weight_shape.size() == 4, op,
              ": input_hw must be (H, W) and weight_shape (C_out, C_in, kh, kw)");
  const Geom g = make_geom(op, 1, weight_shape[1], input_hw[0], input_hw[1], weight_shape,
                           padding, dilation, stride, dtype == at::kFloat);
  check_row_ptr(op, g, col_idx, row_ptr);
  return build_plan(op, g, col_idx, row_ptr, dtype == at::kFloat, omp_get_max_threads(), true);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsecore, CPU, m) {
  m.impl("_csr_conv2d_fused_cpu", &_csr_conv2d_fused_cpu);
  m.impl("_csr_conv2d_fused_plan_cpu", &_csr_conv2d_fused_plan_cpu);
}

}  // namespace sparsecore
