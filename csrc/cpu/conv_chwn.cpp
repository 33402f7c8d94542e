// CSR convolution with the batch as the vector dimension ("CHWN"), epilogue fused (inference).
//
// Activations are laid out (C, H, W, N): the N samples of one channel at one pixel are a
// contiguous vector. Output pixel (oh, ow) of row co is then
//   y[co, oh, ow, :] = sum over the row's nonzeros (tap i, j; channel ci) of
//                      w * x[ci, oh*sh + i*dh - ph, ow*sw + j*dw - pw, :]
// where taps that fall on the zero padding are skipped, not multiplied: the weight is kept
// sorted by (row, tap, channel) with a pointer per (row, tap), and each output pixel walks only
// the taps whose input pixel exists (a 2x2 output of a 3x3 conv reads 4 of its 9 taps). No
// padded copy and no im2col matrix are made; every load is a whole, aligned run of samples; a
// weight is loaded once for all samples of the batch (up to kMaxNV vectors) and two pixels of
// a row that share their taps.
//
// The epilogue runs on the accumulators: optional 2x2/stride-2 max-pool (the four pixels'
// maximum), + bias, + residual, ReLU, in that order; the result is stored (C_out, OH, OW, N).
// The output is an (N, C_out, OH, OW) tensor laid out so: strides (1, plane, OW*N, N), the
// channel planes one cache line apart (see plane_stride). An input in that layout whose batch
// fills whole vectors is read in place; others are transposed into a scratch copy first.
#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "arena.h"
#include "threads.h"
#include "vec.h"

namespace sparsecore {
namespace {

using vec::VecOf;
using vec::vec_scratch;

// Vectors of samples per accumulator group (x 2 pixels: 8 accumulators, plus the broadcast
// weight and the loads, fit AVX-512's 32 and AVX2's 16 registers).
constexpr int kMaxNV = 4;
// Accumulators per pass (pixels x vectors of samples): the rest of the register file holds
// the broadcast weight and the loads (AVX-512 has 32 vector registers, AVX2 16).
#if defined(__AVX512F__)
constexpr int kMaxAcc = 16;
#else
constexpr int kMaxAcc = 8;
#endif
constexpr int kMaxP = 4;
// Bytes of one work item's raw outputs (its rows x the output rows it covers): they stay in
// L2 while the item's channel tiles pass over them.
constexpr int64_t kItemBytes = int64_t(128) << 10;
constexpr int64_t kWorkPerThread = int64_t(1) << 18;

struct Geom {
  int64_t N, Np, C, H, W, Cout, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, OHo, OWo, ct, nct;
  int64_t cs, ocs;  // channel strides of x and y (elements)
  bool pool, relu;
};

// One tap of an output pixel: its index t = i*kw + j and the input pixel's element offset.
struct Tap {
  int32_t t;
  int64_t off;
};

// The taps of output pixel (oh, ow) whose input pixel is inside the image.
inline int taps_of(const Geom& g, int64_t oh, int64_t ow, Tap* taps) {
  int n = 0;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.sh + i * g.dh - g.ph;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t iw = ow * g.sw + j * g.dw - g.pw;
      if (iw < 0 || iw >= g.W) continue;
      taps[n++] = {int32_t(i * g.kw + j), (ih * g.W + iw) * g.Np};
    }
  }
  return n;
}

// How many pixels from ow on (at most `most`, before ow_end) read the same taps as ow: one
// pass over the row's nonzeros then serves them all.
inline int64_t run_of_same_taps(const Geom& g, int64_t ow, int64_t ow_end, int64_t most) {
  int64_t n = 1;
  for (; n < most && ow + n < ow_end; ++n)
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t a = ow * g.sw + j * g.dw - g.pw, b = a + n * g.sw;
      if ((a >= 0 && a < g.W) != (b >= 0 && b < g.W)) return n;
    }
  return n;
}

// buf[p*nl + v*W ...] (+)= one row's nonzeros of one channel tile (tp: its tap pointers) over
// the given taps, for P pixels (each ps elements after the previous in x) and NV vectors
// of samples starting at xb. `first`: start from zero instead of buf.
template <typename T, int NV, int P>
void pixel_product(const T* xb, int64_t cs, const T* val, const int32_t* ci, const int32_t* tp,
                   const Tap* taps, int ntaps, int64_t ps, T* buf, int64_t nl, bool first) {
  using V = typename VecOf<T>::V;
  V acc[P][NV];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) acc[p][v] = first ? V::zero() : V::load(buf + p * nl + v * V::W);
  for (int a = 0; a < ntaps; ++a) {
    const T* pb = xb + taps[a].off;
    const int32_t t = taps[a].t;
    for (int64_t q = tp[t]; q < tp[t + 1]; ++q) {
      const V w = V::bcast(val[q]);
      const T* s = pb + int64_t(ci[q]) * cs;
      for (int p = 0; p < P; ++p)
        for (int v = 0; v < NV; ++v) acc[p][v].fma(w, V::load(s + p * ps + v * V::W));
    }
  }
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) acc[p][v].store(buf + p * nl + v * V::W);
}

template <typename T>
using PixelFn = void (*)(const T*, int64_t, const T*, const int32_t*, const int32_t*,
                         const Tap*, int, int64_t, T*, int64_t, bool);

template <typename T, int P>
PixelFn<T> pixel_fn_p(int nv) {
  switch (nv) {
    case 1: return &pixel_product<T, 1, P>;
    case 2: return &pixel_product<T, 2, P>;
    case 3: return &pixel_product<T, 3, P>;
    default: return &pixel_product<T, 4, P>;
  }
}

// Pixels per pass: as many as keep P * NV accumulators within kMaxAcc.
template <typename T>
struct PixelFns {
  PixelFn<T> fn[kMaxP + 1];
  int most;
  explicit PixelFns(int nv) {
    most = std::max(1, std::min(kMaxP, kMaxAcc / nv));
    fn[0] = nullptr;
    fn[1] = pixel_fn_p<T, 1>(nv);
    fn[2] = pixel_fn_p<T, 2>(nv);
    fn[3] = pixel_fn_p<T, 3>(nv);
    fn[4] = pixel_fn_p<T, 4>(nv);
  }
};

struct Out {
  const void* res;   // residual (N, C_out, OHo, OWo), any strides, or null
  int64_t rs[4];     // its strides
  void* y;           // output (C_out, OHo, OWo, Np)
};

// Work item: one chunk of samples, one output row (the two conv rows under it with pool),
// R output channels. Its raw conv outputs S[R][rows][cols][nl] stay in cache while the
// channel tiles pass: per tile, every pixel pair of the rows, every channel of the item
// (a tile's input rows are then read R times from L2, not from memory). Then the epilogue.
template <typename T>
void conv_chwn(const Geom& g, const T* x, const T* val, const int32_t* ci, const int32_t* sptr,
               const T* bias, const Out& o, int nthreads) {
  using V = typename VecOf<T>::V;
  const int64_t cs = g.cs;
  const int64_t T_ = g.kh * g.kw;
  const int64_t chunk = int64_t(kMaxNV) * V::W;
  const int64_t nbch = (g.Np + chunk - 1) / chunk;
  const int64_t rows = g.pool ? 2 : 1, cols = g.pool ? 2 * g.OWo : g.OW;
  const int64_t per_co = rows * cols * std::min(chunk, g.Np) * int64_t(sizeof(T));
  const int64_t R = std::clamp<int64_t>(kItemBytes / per_co, 1, g.Cout);
  const int64_t nblk = (g.Cout + R - 1) / R;
  const int64_t items = nbch * g.OHo * nblk;
  const T* res = static_cast<const T*>(o.res);
  T* y = static_cast<T*>(o.y);
#pragma omp parallel num_threads(nthreads)
  {
    const vec::DenormalsAsZero daz;
    std::vector<Tap> taps(T_);
    T* S = vec_scratch<T>(0, R * rows * cols * chunk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t blk = it % nblk, rest = it / nblk;
      const int64_t ohq = rest % g.OHo, bc = rest / g.OHo;
      const int64_t b0 = bc * chunk, nl = std::min(chunk, g.Np - b0);
      const int nv = int(nl / V::W);
      const PixelFns<T> fns(nv);
      const int64_t co0 = blk * R, co1 = std::min(g.Cout, co0 + R);
      const int64_t ld_co = rows * cols * nl;  // S's stride per channel
      for (int64_t tile = 0; tile < g.nct; ++tile) {
        const bool first = tile == 0;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t oh = ohq * rows + r;
          for (int64_t ow = 0; ow < cols;) {
            const int64_t run = run_of_same_taps(g, ow, cols, fns.most);
            const int n = taps_of(g, oh, ow, taps.data());
            const PixelFn<T> f = fns.fn[run];
            T* sp = S + (r * cols + ow) * nl;
            for (int64_t co = co0; co < co1; ++co)
              f(x + b0, cs, val, ci, sptr + (co * g.nct + tile) * T_, taps.data(), n, g.sw * g.Np,
                sp + (co - co0) * ld_co, nl, first);
            ow += run;
          }
        }
      }
      // epilogue: [2x2 max] + bias [+ residual] [ReLU] -> y
      for (int64_t co = co0; co < co1; ++co) {
        const T bv = bias ? bias[co] : T(0);
        const T* sc = S + (co - co0) * ld_co;
        for (int64_t owq = 0; owq < g.OWo; ++owq) {
          T* dst = y + co * g.ocs + (ohq * g.OWo + owq) * g.Np + b0;
          if (g.pool) {
            const T *a = sc + 2 * owq * nl, *b = a + nl, *c = a + cols * nl, *d = c + nl;
            for (int64_t l = 0; l < nl; ++l)
              dst[l] = std::max(std::max(a[l], b[l]), std::max(c[l], d[l])) + bv;
          } else {
            const T* a = sc + owq * nl;
            for (int64_t l = 0; l < nl; ++l) dst[l] = a[l] + bv;
          }
          if (res) {
            const T* rp = res + co * o.rs[1] + ohq * o.rs[2] + owq * o.rs[3];
            const int64_t n_hi = std::min(nl, g.N - b0);
            if (o.rs[0] == 1)
              for (int64_t l = 0; l < n_hi; ++l) dst[l] += rp[b0 + l];
            else
              for (int64_t l = 0; l < n_hi; ++l) dst[l] += rp[(b0 + l) * o.rs[0]];
          }
          if (g.relu)
            for (int64_t l = 0; l < nl; ++l) dst[l] = std::max(dst[l], T(0));
        }
      }
    }
  }
}

// A channel's plane of HW pixels x Np samples, plus one cache line: planes whose size is a
// multiple of 4 KiB would put the same pixel of every channel in the same L1 set (and of
// 128 KiB, the same L2 set), and a nonzero's loads walk across channels.
template <typename T>
int64_t plane_stride(int64_t HW, int64_t Np) {
  return HW * Np + 64 / int64_t(sizeof(T));
}

// d[c*cs + p*Np + n] = s[n*sn + c*HW + p] (s: N samples of C*HW), lanes n >= N zeroed.
template <typename T>
void to_chwn(const T* s, int64_t N, int64_t C, int64_t HW, int64_t sn, T* d, int64_t Np,
             int64_t cs, int nthreads) {
  constexpr int64_t B = 32;
#pragma omp parallel for num_threads(nthreads) collapse(2) schedule(static)
  for (int64_t c = 0; c < C; ++c)
    for (int64_t p0 = 0; p0 < HW; p0 += B) {
      const int64_t p1 = std::min(HW, p0 + B);
      T* dc = d + c * cs;
      const T* sc = s + c * HW;
      for (int64_t n0 = 0; n0 < N; n0 += B) {
        const int64_t n1 = std::min(N, n0 + B);
        for (int64_t p = p0; p < p1; ++p)
          for (int64_t n = n0; n < n1; ++n) dc[p * Np + n] = sc[n * sn + p];
      }
      for (int64_t p = p0; p < p1; ++p) std::fill(dc + p * Np + N, dc + (p + 1) * Np, T(0));
    }
}

// d[c*cs + p*Np + n] = x[n, c, p] for x of any strides (p = h*W + w), lanes n >= N zeroed.
template <typename T>
void to_chwn_strided(const at::Tensor& x, T* d, int64_t Np, int64_t cs, int nthreads) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);
  const T* s = x.data_ptr<T>();
#pragma omp parallel for num_threads(nthreads) collapse(2) schedule(static)
  for (int64_t c = 0; c < C; ++c)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        T* dp = d + c * cs + (h * W + w) * Np;
        const T* sp = s + c * s1 + h * s2 + w * s3;
        for (int64_t n = 0; n < N; ++n) dp[n] = sp[n * s0];
        std::fill(dp + N, dp + Np, T(0));
      }
}

// d[c*dcs + p*N + n] = s[c*scs + p*Np + n] for n < N: the samples of a whole-vector layout
// into the output's.
template <typename T>
void narrow_lanes(const T* s, int64_t C, int64_t HW, int64_t Np, int64_t scs, int64_t N,
                  int64_t dcs, T* d, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t c = 0; c < C; ++c)
    for (int64_t p = 0; p < HW; ++p)
      std::memcpy(d + c * dcs + p * N, s + c * scs + p * Np, N * sizeof(T));
}

// Whether x (N, C, H, W) is laid out as this kernel's output: samples contiguous, then
// pixels, then channels at a stride of at least a plane.
bool is_chwn(const at::Tensor& x) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  return x.stride(0) == 1 && x.stride(3) == N && x.stride(2) == W * N &&
         x.stride(1) >= H * W * N;
}

// The geometry of a call and the checks of its weight structure (every index the kernels
// follow, O(nnz)): x (N, C, H, W), the tap-major weight (values / ci, tap_ptr), pool.
Geom parse_geometry(const char* op, const at::Tensor& x, const at::Tensor& values,
                    const at::Tensor& ci, const at::Tensor& tap_ptr, int64_t channel_tile,
                    at::IntArrayRef weight_shape, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, bool pool) {
  TORCH_CHECK(x.dim() == 4, op, ": input must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(weight_shape.size() == 4 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              op, ": weight_shape must have 4 entries, stride, padding and dilation 2");
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == values.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              op, ": x and values must both be float32 or both float64");
  TORCH_CHECK(ci.scalar_type() == at::kInt && tap_ptr.scalar_type() == at::kInt &&
                  ci.is_contiguous() && tap_ptr.is_contiguous() && values.is_contiguous(),
              op, ": ci and tap_ptr must be contiguous int32, values contiguous");
  const int64_t W_ = x.scalar_type() == at::kFloat ? VecOf<float>::V::W : VecOf<double>::V::W;
  Geom g{};
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.Np = (g.N + W_ - 1) / W_ * W_;
  g.Cout = weight_shape[0];
  g.kh = weight_shape[2];
  g.kw = weight_shape[3];
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  TORCH_CHECK(weight_shape[1] == g.C, op, ": input has ", g.C, " channels, the weight expects ",
              weight_shape[1]);
  TORCH_CHECK(g.ph >= 0 && g.pw >= 0 && g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 &&
                  g.kh > 0 && g.kw > 0 && g.Cout > 0,
              op, ": stride and dilation must be positive, padding non-negative");
  const int64_t span_h = g.H + 2 * g.ph - g.dh * (g.kh - 1);
  const int64_t span_w = g.W + 2 * g.pw - g.dw * (g.kw - 1);
  TORCH_CHECK(span_h >= 1 && span_w >= 1, op, ": the (padded) input is smaller than the kernel");
  g.OH = (span_h - 1) / g.sh + 1;
  g.OW = (span_w - 1) / g.sw + 1;
  g.pool = pool;
  g.OHo = pool ? g.OH / 2 : g.OH;
  g.OWo = pool ? g.OW / 2 : g.OW;
  TORCH_CHECK(g.OHo >= 1 && g.OWo >= 1, op, ": the output is too small to max-pool 2x2");
  TORCH_CHECK(channel_tile >= 1, op, ": channel_tile must be positive");
  g.ct = std::min(channel_tile, g.C);
  g.nct = (g.C + g.ct - 1) / g.ct;
  const int64_t T_ = g.kh * g.kw, nnz = values.numel(), nseg = g.Cout * g.nct * T_;
  TORCH_CHECK(tap_ptr.numel() == nseg + 1 && ci.numel() == nnz, op,
              ": tap_ptr must have C_out * ceil(C_in / channel_tile) * kh * kw + 1 = ", nseg + 1,
              " entries and ci one per value");
  const int32_t* tp = tap_ptr.data_ptr<int32_t>();
  const int32_t* cip = ci.data_ptr<int32_t>();
  bool ok = tp[0] == 0 && tp[nseg] == nnz;
  for (int64_t s = 0; ok && s < nseg; ++s) ok = tp[s] <= tp[s + 1];
  int32_t lo = 0, hi = 0;
  for (int64_t q = 0; q < nnz; ++q) {
    lo = std::min(lo, cip[q]);
    hi = std::max(hi, cip[q]);
  }
  TORCH_CHECK(ok && lo >= 0 && hi < g.C, op,
              ": invalid weight structure (tap_ptr must run 0..nnz, non-decreasing; ci in [0, ",
              g.C, "))");
  return g;
}

int team_for(int64_t work) {
  return int(std::clamp<int64_t>(work / min_work_per_thread(kWorkPerThread), 1,
                                 omp_get_max_threads()));
}

// t (N, C, H, W) batch-last with Np lanes: in place when it is laid out so (and N == Np), else
// transposed into scratch `slot`; *cs: its channel plane stride.
template <typename T>
const T* as_chwn(const at::Tensor& t, int64_t Np, int slot, int64_t* cs, int nthreads) {
  const int64_t N = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3);
  if (Np == N && is_chwn(t)) {
    *cs = t.stride(1);
    return t.data_ptr<T>();
  }
  *cs = plane_stride<T>(HW, Np);
  T* buf = vec_scratch<T>(slot, C * *cs);
  if (t.is_contiguous())
    to_chwn(t.data_ptr<T>(), N, C, HW, C * HW, buf, Np, *cs, nthreads);
  else
    to_chwn_strided<T>(t, buf, Np, *cs, nthreads);
  return buf;
}

// x (N, C, H, W) -> (N, C_out, OH, OW) ((OH/2, OW/2) with `pool`). values / ci: the
// nonzeros in (row, channel tile, tap, channel) order, ci their input channels; tap_ptr
// (C_out * n_tiles * kh*kw + 1): where each (row, tile, tap) starts; a tile is channel_tile
// input channels.
at::Tensor _csr_conv2d_chwn_cpu(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& ci, const at::Tensor& tap_ptr,
                                int64_t channel_tile, at::IntArrayRef weight_shape,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual, bool relu,
                                bool pool) {
  constexpr const char* op = "_csr_conv2d_chwn_cpu";
  Geom g = parse_geometry(op, x, values, ci, tap_ptr, channel_tile, weight_shape, stride,
                          padding, dilation, pool);
  g.relu = relu;
  const std::vector<int64_t> out_sizes{g.N, g.Cout, g.OHo, g.OWo};
  at::Tensor b, r;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == x.scalar_type() && b.numel() == g.Cout && b.is_cpu(), op,
                ": bias must be (C_out,) of x's dtype");
  }
  Out o{};
  if (residual.has_value()) {
    r = *residual;
    TORCH_CHECK(r.scalar_type() == x.scalar_type() && r.sizes() == at::IntArrayRef(out_sizes) &&
                    r.is_cpu(),
                op, ": residual must have the output's shape ", at::IntArrayRef(out_sizes),
                " and x's dtype, got ", r.sizes());
    o.res = r.data_ptr();
    for (int d = 0; d < 4; ++d) o.rs[d] = r.stride(d);
  }
  if (g.N == 0) return at::empty(out_sizes, x.options());
  const int nthreads = team_for(values.numel() * g.OH * g.OW * g.Np);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const int64_t OHW = g.OHo * g.OWo;
    const scalar_t* xd = as_chwn<scalar_t>(x, g.Np, 2, &g.cs, nthreads);
    // The output is batch-last whatever N is (the layout torch.compile's fake kernel states);
    // a batch that does not fill whole vectors is computed in scratch and narrowed.
    const int64_t ocs = plane_stride<scalar_t>(OHW, g.N);
    out = arena_empty({g.Cout * ocs}, x.options())
              .as_strided(out_sizes, {1, ocs, g.OWo * g.N, g.N});
    if (g.Np == g.N) {
      g.ocs = ocs;
      o.y = out.data_ptr();
    } else {
      g.ocs = plane_stride<scalar_t>(OHW, g.Np);
      o.y = vec_scratch<scalar_t>(3, g.Cout * g.ocs);
    }
    conv_chwn<scalar_t>(g, xd, values.data_ptr<scalar_t>(), ci.data_ptr<int32_t>(),
                        tap_ptr.data_ptr<int32_t>(),
                        b.defined() ? b.data_ptr<scalar_t>() : nullptr, o, nthreads);
    if (g.Np != g.N)
      narrow_lanes(static_cast<const scalar_t*>(o.y), g.Cout, OHW, g.Np, g.ocs, g.N, ocs,
                   out.data_ptr<scalar_t>(), nthreads);
  });
  return out;
}

// ---- weight gradient -----------------------------------------------------------------------
// dv[q] for G nonzeros of one tap (i, j) sharing a row: sum over the tap's valid output pixels
// and the samples of dy[row, pixel, :] * x[ci[q], input pixel, :]. dyb: the row's plane of dy
// at the chunk's first sample; xb: x at it; NV vectors of samples; acc'd into out[0..G).
template <typename T, int NV, int G>
void dw_group(const Geom& g, const T* dyb, int64_t dyp, const T* xb, const int32_t* ci,
              int64_t i, int64_t j, int64_t oh0, int64_t oh1, int64_t ow0, int64_t ow1, T* out) {
  using V = typename VecOf<T>::V;
  V acc[G][NV];
  for (int a = 0; a < G; ++a)
    for (int v = 0; v < NV; ++v) acc[a][v] = V::zero();
  const T* xs[G];
  for (int a = 0; a < G; ++a) xs[a] = xb + int64_t(ci[a]) * g.cs;
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const int64_t ih = oh * g.sh + i * g.dh - g.ph;
    for (int64_t ow = ow0; ow < ow1; ++ow) {
      const int64_t iw = ow * g.sw + j * g.dw - g.pw;
      const T* d = dyb + (oh * g.OW + ow) * dyp;
      const int64_t xo = (ih * g.W + iw) * g.Np;
      V dv[NV];
      for (int v = 0; v < NV; ++v) dv[v] = V::load(d + v * V::W);
      for (int a = 0; a < G; ++a)
        for (int v = 0; v < NV; ++v) acc[a][v].fma(dv[v], V::load(xs[a] + xo + v * V::W));
    }
  }
  for (int a = 0; a < G; ++a) {
    T s = 0;
    for (int v = 0; v < NV; ++v) s += acc[a][v].sum();
    out[a] += s;
  }
}

template <typename T, int G>
using DwFn = void (*)(const Geom&, const T*, int64_t, const T*, const int32_t*, int64_t,
                      int64_t, int64_t, int64_t, int64_t, int64_t, T*);

template <typename T, int G>
DwFn<T, G> dw_fn(int nv) {
  switch (nv) {
    case 1: return &dw_group<T, 1, G>;
    case 2: return &dw_group<T, 2, G>;
    case 3: return &dw_group<T, 3, G>;
    default: return &dw_group<T, 4, G>;
  }
}

// First and one-past-last output index whose input index o*s + t*d - p lies in [0, n).
inline void valid_range(int64_t t, int64_t s, int64_t d, int64_t p, int64_t n, int64_t out,
                        int64_t* lo, int64_t* hi) {
  const int64_t a = p - t * d;  // need o*s >= a and o*s <= n - 1 + a
  *lo = a <= 0 ? 0 : (a + s - 1) / s;
  const int64_t b = n - 1 + a;
  *hi = b < 0 ? 0 : std::min(out, b / s + 1);
  if (*hi < *lo) *hi = *lo;
}

// Every row's nonzeros, a group of G of one tap at a time (their dy loads shared), chunk of
// samples by chunk.
template <typename T>
void dw_all(const Geom& g, const T* dyd, int64_t dcs, const T* xd, const int32_t* cip,
            const int32_t* tp, T* out, int nthreads) {
  using V = typename VecOf<T>::V;
  const int64_t T_ = g.kh * g.kw, chunk = int64_t(kMaxNV) * V::W;
  constexpr int G = 4;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t co = 0; co < g.Cout; ++co)
    for (int64_t b0 = 0; b0 < g.Np; b0 += chunk) {
      const int nv = int(std::min(chunk, g.Np - b0) / V::W);
      const DwFn<T, G> fg = dw_fn<T, G>(nv);
      const DwFn<T, 1> f1 = dw_fn<T, 1>(nv);
      const T* dyb = dyd + co * dcs + b0;
      for (int64_t s = co * g.nct * T_; s < (co + 1) * g.nct * T_; ++s) {
        const int64_t t = s % T_, i = t / g.kw, j = t % g.kw;
        int64_t oh0, oh1, ow0, ow1;
        valid_range(i, g.sh, g.dh, g.ph, g.H, g.OH, &oh0, &oh1);
        valid_range(j, g.sw, g.dw, g.pw, g.W, g.OW, &ow0, &ow1);
        int64_t q = tp[s];
        for (; q + G <= tp[s + 1]; q += G)
          fg(g, dyb, g.Np, xd + b0, cip + q, i, j, oh0, oh1, ow0, ow1, out + q);
        for (; q < tp[s + 1]; ++q)
          f1(g, dyb, g.Np, xd + b0, cip + q, i, j, oh0, oh1, ow0, ow1, out + q);
      }
    }
}

// dv (nnz,) in the weight's tap-major order: dv[q] = sum over n and output pixels of
// dy[n, row(q), oh, ow] * x[n, ci[q], oh*sh + i*dh - ph, ow*sw + j*dw - pw].
at::Tensor _csr_conv2d_chwn_dw_cpu(const at::Tensor& dy, const at::Tensor& x,
                                   const at::Tensor& ci, const at::Tensor& tap_ptr,
                                   int64_t channel_tile, at::IntArrayRef weight_shape,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation) {
  constexpr const char* op = "_csr_conv2d_chwn_dw_cpu";
  const at::Tensor proto = at::empty({ci.numel()}, x.options());
  Geom g = parse_geometry(op, x, proto, ci, tap_ptr, channel_tile, weight_shape, stride,
                          padding, dilation, false);
  TORCH_CHECK(dy.dim() == 4 && dy.size(0) == g.N && dy.size(1) == g.Cout &&
                  dy.size(2) == g.OH && dy.size(3) == g.OW && dy.scalar_type() == x.scalar_type(),
              op, ": dy must be (", g.N, ", ", g.Cout, ", ", g.OH, ", ", g.OW,
              ") of x's dtype, got ", dy.sizes());
  const int64_t nnz = ci.numel();
  const int nthreads = team_for(nnz * g.OH * g.OW * g.Np);
  at::Tensor dv = at::zeros({nnz}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const scalar_t* xd = as_chwn<scalar_t>(x, g.Np, 2, &g.cs, nthreads);
    int64_t dcs = 0;
    const scalar_t* dyd = as_chwn<scalar_t>(dy, g.Np, 3, &dcs, nthreads);
    dw_all<scalar_t>(g, dyd, dcs, xd, ci.data_ptr<int32_t>(), tap_ptr.data_ptr<int32_t>(),
                     dv.data_ptr<scalar_t>(), nthreads);
  });
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsecore, CPU, m) {
  m.impl("_csr_conv2d_chwn_cpu", &_csr_conv2d_chwn_cpu);
  m.impl("_csr_conv2d_chwn_dw_cpu", &_csr_conv2d_chwn_dw_cpu);
}

}  // namespace sparsecore
