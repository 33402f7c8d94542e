"""Streaming second moments: similarity of activations too large to hold.

`StreamingCompare` accumulates, chunk by chunk of data points, each layer's Gram matrix
X^T X and each compared pair's cross product X^T Y (plus the sums that centering and the
debiased CKA need), then computes linear CKA, Procrustes, CCA, SVCCA or PWCCA from them.
Memory is O(sum of p q over pairs), independent of the number of data points.

Numerics: moments are accumulated in float64 around a shift (the first chunk's channel
means), so centering afterwards cancels little, and each layer is first scaled by the power
of two that brings the first chunk's largest |entry| into [0.5, 1) (exact, and invisible to
every metric), so the moments neither overflow nor underflow whatever the activations'
scale. CCA from a covariance resolves singular values down to sqrt(4 sqrt(p) eps) s_max
(about 1e-7 relative in float64); the in-memory `compare`, which factors the data by QR,
resolves far smaller ones. For the same reason PWCCA's canonical variates of correlations
near 1 come from the cosine matrix here, not from the sine matrix as in memory (which needs
the data).

Fused kernel, measured and not kept: the accumulation is one GEMM per chunk (all pairs'
layers concatenated, see `cross_blocks`) plus column sums. A hand-written C++ kernel that
fuses the shift into an AVX2-FMA, OpenMP accumulation of (X - a)^T (Y - b) was timed
against torch's (X - a).mT @ (Y - b) (MKL dgemm): it won only on tiny per-pair products
that cost milliseconds, lost where the time goes (wide layers, the all-pairs product) and
lost everywhere on two threads, so plain torch is kept (see bench/RESULTS.md (similarity)).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsecore.similarity import _linalg
from sparsecore.similarity._allpairs import (
    CCA_METRICS,
    REDUCTION_OPTIONS,
    Pair,
    Pairs,
    SimilarityMatrix,
    cca_values,
    check_options,
    check_points,
    cross_blocks,
    procrustes_values,
    reduction_of,
    resolve_pairs,
    to_matrix,
    warn_layers,
)
from sparsecore.similarity._common import as_activations, dead_channels, pow2_scale
from sparsecore.similarity.cca import factor_from_gram
from sparsecore.similarity.cka import cka_from_moments
from sparsecore.similarity.conv import ConvMode, to_points

STREAMING_METRICS: dict[str, tuple[str, ...]] = {
    "linear_cka": ("debiased",),
    "procrustes": (),
    "cca": REDUCTION_OPTIONS,
    "svcca": REDUCTION_OPTIONS,
    "pwcca": (),
}


@dataclass
class _Layer:
    """Moments of one layer's shifted data x' = scale x - shift over the rows seen so far."""

    scale: Tensor  # () power of two (see the module docstring)
    shift: Tensor  # (p,)
    n: int
    s: Tensor  # (p,) sum x'
    gram: Tensor  # (p, p) sum x' x'^T
    absmax: Tensor  # (p,) max |scale x| (dead-channel test)
    r_sum: Tensor  # () sum |x'_i|^2
    r2_sum: Tensor  # () sum |x'_i|^4
    u: Tensor  # (p,) sum |x'_i|^2 x'_i

    def centered_gram(self) -> Tensor:
        return self.gram - torch.outer(self.s, self.s) / self.n

    def dead(self, gc: Tensor) -> Tensor:
        """Dead channels (see `_common.dead_channels`), from the moments."""
        return dead_channels(torch.diagonal(gc).clamp_min(0).sqrt(), self.absmax, self.n)


@dataclass
class _Pair:
    """Cross moments of a compared pair (x', y')."""

    cross: Tensor  # (p, q) sum x'_i y'_i^T
    c: Tensor  # () sum |x'_i|^2 |y'_i|^2
    v: Tensor  # (q,) sum |x'_i|^2 y'_i
    w: Tensor  # (p,) sum |y'_i|^2 x'_i


def _row_dot(c: Tensor, v: Tensor, w: Tensor, cross: Tensor, la: _Layer, lb: _Layer) -> Tensor:
    """sum_i a_i b_i with a_i = |x'_i - d_x|^2, b_i = |y'_i - d_y|^2 (d = mean of x'): the
    centered row-norm products the debiased CKA needs, expanded into shifted moments."""
    n = la.n
    dx, dy = la.s / n, lb.s / n
    dxx, dyy = dx @ dx, dy @ dy
    return (
        c
        - 2 * (dy @ v)
        + dyy * la.r_sum
        - 2 * (dx @ w)
        + 4 * (dx @ cross @ dy)
        - 2 * dyy * (dx @ la.s)
        + dxx * lb.r_sum
        - 2 * dxx * (dy @ lb.s)
        + n * dxx * dyy
    )


class StreamingCompare:
    """Similarity between two sets of layers, accumulated over chunks of data points.

        acc = StreamingCompare(pairs="all")
        for batch in loader:
            acc.update(acts_a(batch), acts_b(batch))   # dicts: layer name -> (n_i, p) or conv
        sim = acc.result("linear_cka")                 # or "svcca", "cca", "pwcca", ...

    `capture([model_a, model_b], loader, stream=acc.update)` feeds it from two models.
    Every chunk must hold the same data points for both sets (row i of a compared pair is
    the same input). pairs: as in `compare`, "diagonal" by default. dtype: float64 unless
    told otherwise.
    """

    def __init__(
        self,
        pairs: Pairs = "diagonal",
        *,
        dtype: torch.dtype = torch.float64,
        conv: ConvMode = "positions",
    ) -> None:
        self.pairs_spec = pairs
        self.dtype = dtype
        self.conv = conv
        self.names: tuple[list[str], list[str]] | None = None
        self.pairs: list[Pair] = []
        self.layers: tuple[list[_Layer], list[_Layer]] = ([], [])
        self.cross: dict[Pair, _Pair] = {}

    def _prepare(self, acts: Mapping[str, Tensor], side: int) -> tuple[list[Tensor], list[Tensor]]:
        """Validate one side's chunk; update its layer moments; return (x', row norms^2)."""
        names = list(acts)
        if self.names is not None and names != self.names[side]:
            raise ValueError(f"layers changed between updates: {self.names[side]} -> {names}")
        xs, rs = [], []
        for k, name in enumerate(names):
            pts = to_points(torch.as_tensor(acts[name]), self.conv)
            x = as_activations(pts, name, self.dtype, min_points=0)
            layers = self.layers[side]
            if k == len(layers):
                p = x.shape[-1]
                z = x.new_zeros(())
                scale = pow2_scale(x.abs().amax()) if x.numel() else z + 1
                shift = (scale * x).mean(0) if x.shape[0] else x.new_zeros(p)
                layers.append(
                    _Layer(
                        scale,
                        shift,
                        0,
                        x.new_zeros(p),
                        x.new_zeros(p, p),
                        x.new_zeros(p),
                        z,
                        z.clone(),
                        x.new_zeros(p),
                    )
                )
            st = layers[k]
            if x.shape[-1] != st.shift.shape[0]:
                raise ValueError(f"{name}: width changed from {st.shift.shape[0]} to {x.shape[-1]}")
            x = st.scale * x
            xp = x - st.shift
            r = xp.square().sum(-1)
            st.n += x.shape[0]
            st.s += xp.sum(0)
            st.gram += _linalg.gram(xp)
            st.absmax = torch.maximum(st.absmax, x.abs().amax(0))
            st.r_sum += r.sum()
            st.r2_sum += r.square().sum()
            st.u += xp.mT @ r
            xs.append(xp)
            rs.append(r)
        return xs, rs

    def update(self, acts_a: Mapping[str, Tensor], acts_b: Mapping[str, Tensor]) -> None:
        """Add one chunk: dicts layer name -> activations of the same inputs."""
        if self.names is None:
            names = (list(acts_a), list(acts_b))
            self.pairs = resolve_pairs(*names, self.pairs_spec)
        xa, ra = self._prepare(acts_a, 0)
        xb, rb = self._prepare(acts_b, 1)
        if self.names is None:
            self.names = names
        check_points(*self.names, [x.shape[0] for x in xa], [x.shape[0] for x in xb], self.pairs)
        blocks = cross_blocks(xa, xb, self.pairs)
        v = _weighted_sums(xb, ra, [(j, i) for i, j in self.pairs])
        w = _weighted_sums(xa, rb, self.pairs)
        for i, j in self.pairs:
            pm = self.cross.get((i, j))
            if pm is None:
                q, p = xb[j].shape[-1], xa[i].shape[-1]
                pm = self.cross[(i, j)] = _Pair(
                    xa[i].new_zeros(p, q),
                    xa[i].new_zeros(()),
                    xa[i].new_zeros(q),
                    xa[i].new_zeros(p),
                )
            pm.cross += blocks[(i, j)]
            pm.c += ra[i] @ rb[j]
            pm.v += v[(j, i)]
            pm.w += w[(i, j)]

    def result(self, metric: str = "linear_cka", **options: bool | int | float) -> SimilarityMatrix:
        """The metric for every pair from the moments so far. Options: debiased (linear_cka);
        keep / variance / spectrum (svcca, default variance=0.99; cca), as in `svcca`. NaN,
        with a warning, for pairs with a layer that has no live channel."""
        check_options(metric, options, STREAMING_METRICS)
        if self.names is None:
            raise RuntimeError("StreamingCompare.result() before any update()")
        la, lb = self.layers
        gca = [st.centered_gram() for st in la]
        gcb = [st.centered_gram() for st in lb]
        dead_a = [st.dead(g) for st, g in zip(la, gca)]
        dead_b = [st.dead(g) for st, g in zip(lb, gcb)]
        cc = {
            (i, j): pm.cross - torch.outer(la[i].s, lb[j].s) / la[i].n
            for (i, j), pm in self.cross.items()
        }
        reduce, short = None, {}
        if metric == "linear_cka":
            values = self._cka(gca, gcb, cc, bool(options.get("debiased", False)))
        elif metric == "procrustes":
            norm_a = [torch.diagonal(g).sum().clamp_min(0).sqrt() for g in gca]
            norm_b = [torch.diagonal(g).sum().clamp_min(0).sqrt() for g in gcb]
            values = procrustes_values(self.pairs, cc, norm_a, norm_b)
        else:
            assert metric in CCA_METRICS
            reduce = reduction_of(metric, options)
            fa = [factor_from_gram(g, st.n, d, reduce=reduce) for g, st, d in zip(gca, la, dead_a)]
            fb = [factor_from_gram(g, st.n, d, reduce=reduce) for g, st, d in zip(gcb, lb, dead_b)]
            blocks = {(i, j): fa[i].whiten.mT @ c @ fb[j].whiten for (i, j), c in cc.items()}
            values = cca_values(metric, self.pairs, blocks, fa, fb)
            short = {
                self._label(side, k): int(f.count)
                for side, fs in enumerate((fa, fb))
                for k, f in enumerate(fs)
                if bool(f.rank_limited)
            }
        names_a, names_b = self.names
        # Centering a constant channel leaves rounding noise in the moments; a layer with no
        # live channel has no variance, and its similarities are 0/0.
        empty = {(0, i) for i, d in enumerate(dead_a) if bool(d.all())}
        empty |= {(1, j) for j, d in enumerate(dead_b) if bool(d.all())}
        nan = torch.tensor(float("nan"), dtype=la[0].gram.dtype, device=la[0].gram.device)
        for i, j in values:
            if (0, i) in empty or (1, j) in empty:
                values[(i, j)] = nan
        used = {(0, i) for i, _ in self.pairs} | {(1, j) for _, j in self.pairs}
        empty_names = [self._label(side, k) for side, k in sorted(empty & used)]
        warn_layers(empty_names, short, reduce, f"StreamingCompare ({metric})", level=3)
        return SimilarityMatrix(
            metric,
            names_a,
            names_b,
            to_matrix(values, len(names_a), len(names_b), la[0].gram),
            {nm: int(d.sum()) for nm, d in zip(names_a, dead_a)},
            {nm: int(d.sum()) for nm, d in zip(names_b, dead_b)},
        )

    def _label(self, side: int, k: int) -> str:
        """Layer k of the first (side 0) or second set, for messages."""
        return f"{self.names[side][k]} ({('first', 'second')[side]} set)"

    def _cka(
        self, gca: list[Tensor], gcb: list[Tensor], cc: dict[Pair, Tensor], debiased: bool
    ) -> dict[Pair, Tensor]:
        la, lb = self.layers
        xx = [g.square().sum() for g in gca]
        yy = [g.square().sum() for g in gcb]
        if debiased:
            aa, bb = [_self_row_dot(st) for st in la], [_self_row_dot(st) for st in lb]
            sa = [torch.diagonal(g).sum() for g in gca]
            sb = [torch.diagonal(g).sum() for g in gcb]
        out = {}
        for (i, j), c in cc.items():
            terms = None
            if debiased:
                pm = self.cross[(i, j)]
                ab = _row_dot(pm.c, pm.v, pm.w, pm.cross, la[i], lb[j])
                terms = (ab, aa[i], bb[j], sa[i], sb[j])
            out[(i, j)] = cka_from_moments(
                c.square().sum(), xx[i], yy[j], debiased=debiased, n=la[i].n, row_terms=terms
            )
        return out


def _weighted_sums(
    xs: list[Tensor], weights: list[Tensor], pairs: list[Pair]
) -> dict[Pair, Tensor]:
    """xs[i]^T weights[j] for every (i, j): one GEMM per i against all its partners'
    weight vectors (stacked), so each layer's chunk is read once rather than per pair."""
    partners: dict[int, list[int]] = {}
    for i, j in pairs:
        partners.setdefault(i, []).append(j)
    out = {}
    for i, js in partners.items():
        prod = xs[i].mT @ torch.stack([weights[j] for j in js], -1)
        for k, j in enumerate(js):
            out[(i, j)] = prod[:, k]
    return out


def _self_row_dot(st: _Layer) -> Tensor:
    """sum_i a_i^2: `_row_dot` of a layer with itself."""
    return _row_dot(st.r2_sum, st.u, st.u, st.gram, st, st)
