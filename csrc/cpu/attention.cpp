// Multi-head scaled dot-product attention on the CPU, for the fused Transformer block's
// inference path: O = softmax(scale Q K^T [causal mask]) V per (sample, head).
//
// Q (B, Tq, H, D), K and V (B, Tk, H, D) are read in place (any strides but the last), so
// the block passes the views of its stacked q | k | v projection without copying them, and
// O (B, Tq, H, D) is what the next projection reads as (B, Tq, H*D): no transposes on
// either side. The causal mask is top-left aligned (query i sees keys j <= i), as
// torch.nn.functional.scaled_dot_product_attention's is_causal.
//
// One (sample, head) is one task. Its K is packed transposed (D x Tk, keys along the vector)
// and its V (Tk x D) contiguously; queries go in blocks of kRows rows: S = Q K^T for the
// keys the block's last row sees (kRows x 4 vectors of accumulators per pass over D), the
// softmax per row (a vector exp; the keys a row may not see are zeroed), then P V with
// kRows x 4 vectors of output accumulators, scaled by each row's 1 / sum at the end. A row
// of S is at most Tk long, so the whole row stays in a small buffer: no online softmax.
#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "arena.h"
#include "threads.h"
#include "vec.h"

namespace sparsecore {
namespace {

using vec::VecOf;
using vec::VF;
using vec::vec_scratch;

constexpr int kRows = 4;  // query rows per block
constexpr int kVecs = 4;  // vectors of keys (S) or of D (O) per pass
// About 0.5 M multiply-adds per thread before another one is woken.
constexpr int64_t kWorkPerThread = int64_t(1) << 19;

// ---- softmax of one row: s[j] <- exp(s[j] - max) for j < len, 0 for len <= j < padded;
// returns the sum -------------------------------------------------------------------------
// Scalar form (float64; float32 without AVX2).
template <typename T>
inline T softmax_row_scalar(T* s, int64_t len, int64_t padded) {
  T mx = s[0];
  for (int64_t j = 1; j < len; ++j) mx = std::max(mx, s[j]);
  T sum = 0;
  for (int64_t j = 0; j < len; ++j) sum += (s[j] = std::exp(s[j] - mx));
  for (int64_t j = len; j < padded; ++j) s[j] = 0;
  return sum;
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// e^r for |r| <= ln2 / 2 by the Cephes polynomial (about 1 ulp), in the build's vectors.
inline VF exp_poly(VF r) {
  constexpr float c[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  VF p = VF::bcast(c[0]);
  for (int i = 1; i < 6; ++i) {  // p = p r + c[i]
    VF t = VF::bcast(c[i]);
    t.fma(p, r);
    p = t;
  }
  VF r2 = VF::zero(), out = VF::bcast(1.0f);
  r2.fma(r, r);
  out.add(r);
  out.fma(p, r2);  // p r^2 + r + 1
  return out;
}
#endif

#if defined(__AVX512F__)
// The all-lanes masked forms: GCC 12 warns of the unmasked ones' undefined pass-through.
inline __m512 max16(__m512 a, __m512 b) { return _mm512_mask_max_ps(a, 0xFFFF, a, b); }

// exp(x) for x <= 0 (x - max): 2^n e^r with |r| <= ln2 / 2; below -87.3 the result is the
// smallest normal, which only the zeroed tail ever reaches.
inline __m512 exp_neg(__m512 x) {
  x = max16(x, _mm512_set1_ps(-87.3f));
  const __m512 xl = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_mask_roundscale_ps(xl, 0xFFFF, xl,
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  const __m512 p = exp_poly(VF{r}).v;
  return _mm512_mask_scalef_ps(p, 0xFFFF, p, n);
}

// Through memory: GCC 12's reduce intrinsics warn.
inline float hmax16(__m512 v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  float m = t[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, t[i]);
  return m;
}

inline float softmax_row(float* s, int64_t len, int64_t padded) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m = ninf;
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) m = max16(m, _mm512_loadu_ps(s + j));
  const __mmask16 tail = __mmask16((1u << (len - j)) - 1u);
  if (tail) m = max16(m, _mm512_mask_loadu_ps(ninf, tail, s + j));
  const __m512 mx = _mm512_set1_ps(hmax16(m));
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j + 16 <= len; j += 16) {
    const __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(s + j), mx));
    _mm512_storeu_ps(s + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (j < padded) {  // the partial vector (its masked lanes 0), then whole zero vectors
    const __m512 e = _mm512_maskz_mov_ps(tail, exp_neg(_mm512_sub_ps(
                                                   _mm512_mask_loadu_ps(mx, tail, s + j), mx)));
    _mm512_storeu_ps(s + j, e);
    sum = _mm512_add_ps(sum, e);
    for (j += 16; j < padded; j += 16) _mm512_storeu_ps(s + j, _mm512_setzero_ps());
  }
  return VF{sum}.sum();
}
#elif defined(__AVX2__) && defined(__FMA__)
inline __m256 exp_neg(__m256 x) {  // as the AVX-512 one; 2^n built in the exponent bits
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  const __m256 p = exp_poly(VF{r}).v;
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float softmax_row(float* s, int64_t len, int64_t padded) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
  alignas(32) float t[8];
  _mm256_store_ps(t, m);
  float mx = t[0];
  for (int i = 1; i < 8; ++i) mx = std::max(mx, t[i]);
  for (int64_t i = j; i < len; ++i) mx = std::max(mx, s[i]);
  const __m256 mv = _mm256_set1_ps(mx);
  __m256 sum = _mm256_setzero_ps();
  for (j = 0; j + 8 <= len; j += 8) {
    const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = VF{sum}.sum();
  if (j < padded) {
    alignas(32) float buf[8] = {};
    for (int64_t i = j; i < len; ++i) buf[i - j] = s[i];
    _mm256_store_ps(buf, exp_neg(_mm256_sub_ps(_mm256_load_ps(buf), mv)));
    for (int64_t i = j; i < j + 8; ++i) {
      s[i] = i < len ? buf[i - j] : 0.0f;
      total += i < len ? buf[i - j] : 0.0f;
    }
    for (j += 8; j < padded; ++j) s[j] = 0.0f;
  }
  return total;
}
#else
inline float softmax_row(float* s, int64_t len, int64_t padded) {
  return softmax_row_scalar(s, len, padded);
}
#endif

inline double softmax_row(double* s, int64_t len, int64_t padded) {
  return softmax_row_scalar(s, len, padded);
}

// ---- the two products of a block of kRows query rows -----------------------------------
// c[r][0, NV W) = sum_{i < n} a[r lda + i] b[i ldb + (0, NV W)] for r < kRows: one broadcast
// of a per row and step, NV vectors of b shared by the kRows rows. Scores: a = the block's
// scaled queries, b = K^T from the block's first key; outputs: a = the probabilities, b = V
// from a vector of head_dim.
template <typename T, int NV>
inline void block_product(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t n, T* c,
                          int64_t ldc) {
  using V = typename VecOf<T>::V;
  V acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  for (int64_t i = 0; i < n; ++i) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = V::load(b + i * ldb + v * V::W);
    for (int r = 0; r < kRows; ++r) {
      const V ab = V::bcast(a[r * lda + i]);
      for (int v = 0; v < NV; ++v) acc[r][v].fma(ab, bv[v]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v].store(c + r * ldc + v * V::W);
}

template <typename F>
inline void by_vectors(int64_t nv, F&& f) {  // f(first vector, count) in runs of <= kVecs
  static_assert(kVecs == 4);
  int64_t c = 0;
  for (; c + 4 <= nv; c += 4) f(c, std::integral_constant<int, 4>{});
  switch (nv - c) {
    case 3: f(c, std::integral_constant<int, 3>{}); break;
    case 2: f(c, std::integral_constant<int, 2>{}); break;
    case 1: f(c, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

struct Geom {
  int64_t B, Tq, Tk, H, D;
  int64_t qs[3], ks[3], vs[3];  // strides of b, t, h
  bool causal;
  double scale;
};

template <typename T>
void head(const Geom& g, const T* q, const T* k, const T* v, T* o) {
  using V = typename VecOf<T>::V;
  constexpr int64_t W = V::W;
  const int64_t D = g.D, tkp = (g.Tk + W - 1) / W * W, dp = (D + W - 1) / W * W;
  T* kt = vec_scratch<T>(0, D * tkp);
  T* vp = vec_scratch<T>(1, g.Tk * dp);
  T* work = vec_scratch<T>(2, kRows * (tkp + D + dp));
  T* s = work;
  T* qs = s + kRows * tkp;
  T* ob = qs + kRows * D;
  // Only the keys some query sees are packed.
  const int64_t tk_used = g.causal ? std::min(g.Tk, g.Tq) : g.Tk;
  for (int64_t j = 0; j < tk_used; ++j) {
    const T* kr = k + j * g.ks[1];
    for (int64_t d = 0; d < D; ++d) kt[d * tkp + j] = kr[d];
    const T* vr = v + j * g.vs[1];
    T* pr = vp + j * dp;
    std::copy(vr, vr + D, pr);
    std::fill(pr + D, pr + dp, T(0));
  }
  const int64_t used_p = (tk_used + W - 1) / W * W;
  for (int64_t d = 0; d < D; ++d) std::fill(kt + d * tkp + tk_used, kt + d * tkp + used_p, T(0));
  const T scale = T(g.scale);
  for (int64_t i0 = 0; i0 < g.Tq; i0 += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, g.Tq - i0);
    for (int64_t r = 0; r < kRows; ++r) {
      T* qr = qs + r * D;
      if (r < rows) {
        const T* src = q + (i0 + r) * g.qs[1];
        for (int64_t d = 0; d < D; ++d) qr[d] = src[d] * scale;
      } else {
        std::fill(qr, qr + D, T(0));
      }
    }
    const int64_t nk = g.causal ? std::min(g.Tk, i0 + rows) : g.Tk;  // keys the block sees
    const int64_t nkv = (nk + W - 1) / W;
    by_vectors(nkv, [&](int64_t c, auto n) {  // S = Q K^T
      block_product<T, decltype(n)::value>(qs, D, kt + c * W, tkp, D, s + c * W, tkp);
    });
    T inv[kRows];
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t len = r < rows ? (g.causal ? std::min(g.Tk, i0 + r + 1) : g.Tk) : 0;
      T* sr = s + r * tkp;
      if (len == 0) {
        std::fill(sr, sr + nkv * W, T(0));
        inv[r] = T(0);
      } else {
        inv[r] = T(1) / softmax_row(sr, len, nkv * W);
      }
    }
    by_vectors(dp / W, [&](int64_t c, auto n) {  // O = P V
      block_product<T, decltype(n)::value>(s, tkp, vp + c * W, dp, nk, ob + c * W, dp);
    });
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = o + (i0 + r) * g.H * D;
      const T* src = ob + r * dp;
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * inv[r];
    }
  }
}

template <typename T>
void attention(const Geom& g, const T* q, const T* k, const T* v, T* o, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t t = 0; t < g.B * g.H; ++t) {
    const vec::DenormalsAsZero daz;
    const int64_t b = t / g.H, h = t % g.H;
    head<T>(g, q + b * g.qs[0] + h * g.qs[2], k + b * g.ks[0] + h * g.ks[2],
            v + b * g.vs[0] + h * g.vs[2], o + (b * g.Tq * g.H + h) * g.D);
  }
}

at::Tensor _attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          bool causal, std::optional<double> scale) {
  constexpr const char* op = "_attention_cpu";
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k and v must be (B, T, heads, head_dim), got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op,
              ": tensors must be on the CPU");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              op, ": q, k and v must all be float32 or all float64, got ", q.scalar_type(),
              ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k ", k.sizes(), " and v ", v.sizes(),
              " differ in shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3), op,
              ": q ", q.sizes(), " and k ", k.sizes(),
              " differ in batch, heads or head_dim");
  TORCH_CHECK(k.size(1) > 0 || q.size(1) == 0, op, ": no keys for ", q.size(1), " queries");
  const auto last = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor qc = last(q), kc = last(k), vc = last(v);
  Geom g{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3), {}, {}, {}, causal,
         scale.has_value() ? *scale : 1.0 / std::sqrt(double(q.size(3)))};
  for (int i = 0; i < 3; ++i) {
    g.qs[i] = qc.stride(i);
    g.ks[i] = kc.stride(i);
    g.vs[i] = vc.stride(i);
  }
  auto out = arena_empty({g.B, g.Tq, g.H, g.D}, q.options());
  if (out.numel() == 0) return out;
  const int64_t tasks = g.B * g.H;
  const int64_t work = g.B * g.H * g.Tq * g.Tk * g.D * (causal ? 1 : 2);
  const int nthreads = int(std::clamp<int64_t>(
      std::min<int64_t>(work / min_work_per_thread(kWorkPerThread), tasks), 1,
      omp_get_max_threads()));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), op, [&] {
    attention<scalar_t>(g, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                        vc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), nthreads);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsecore, CPU, m) { m.impl("_attention_cpu", &_attention_cpu); }

}  // namespace sparsecore
