"""Canonical correlation analysis: CCA, SVCCA (Raghu et al. 2017), PWCCA (Morcos et al. 2018).

Numerics. Each side is factored once from its centered data: a thin Householder QR, then
the SVD of the small R factor, X_c = U S V^T. The canonical correlations are the singular
values of U_x^T U_y. Plain CCA and PWCCA never form an inverse square root of a
covariance, which squares the condition number (in float32 that fails beyond cond ~1e4).
Before the QR, they scale every channel to unit norm (CCA is invariant to it), so badly
scaled channels cost no accuracy; SVCCA does not, because its variance criterion depends
on the scale.

One exception, for speed: SVCCA in float64 keeps only the leading directions, and takes
them from the eigendecomposition of the Gram matrix (U_k = X_c V_k / S_k: one GEMM-speed
pass instead of a Householder QR) when the bound on what that loses,
sqrt(n) eps (s_max / s_k)^2 on U_k's orthonormality, is at most 1e-10, and when the
reduction, not the Gram matrix's coarser numerical rank, sets the count; otherwise, and
always in float32, the QR route.

Directions kept per side: the numerical rank (singular values above 4 sqrt(p) eps s_max of
the channel-scaled data; the rounding noise of this factorization, measured on exactly
rank-deficient float32 and float64 data with n up to 50,000 and p up to 512, stays below
4 eps s_max), and for SVCCA the reduction (`Reduction`: a number of directions, or a
fraction of the variance). Dead channels (constant up to rounding: pruned filters, ReLUs
that never fire) are dropped and reported. Results with batch dims keep a static shape:
correlations past `count` are exactly 0.

PWCCA needs the canonical variates, not only the correlations, and its weights (sums of
absolute values) depend on the basis chosen among nearly equal correlations. Two layers
that share a subspace have several correlations within rounding of 1; the cosine matrix
U_x^T U_y resolves them only to eps, which in float32 leaves their variates arbitrary and
the PWCCA value off by far more than the data's own sensitivity. Variates whose
correlation is above 1/sqrt(2) are therefore taken from the sine matrix
(I - U_y U_y^T) U_x, which resolves small angles to relative accuracy (Knyazev and
Argentati 2002).
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sparsecore.similarity import _linalg
from sparsecore.similarity._common import (
    center,
    dead_channels,
    prepare_pair,
    warn_few_points,
    warn_no_variance,
)

Spectrum = Literal["variance", "singular_values"]
SPECTRA = ("variance", "singular_values")

_EPS64 = torch.finfo(torch.float64).eps
_GRAM_LOSS = 1e-10  # largest orthonormality loss SVCCA's Gram route may cost (see above)
_SMALL_ANGLE_COS = 1 / math.sqrt(2)  # PWCCA: variates above this correlation from sines


@dataclass
class Factor:
    """One side's activations, factored once; every CCA-family comparison starts here.

    `s` (..., r), `coords` (..., r, p) and the basis hold r = max(count) directions, in
    descending order of s; directions past `count` are zeroed so batched shapes stay static.
    """

    s: Tensor  # (..., r) singular values of the (scaled) centered data; 0 past count
    coords: Tensor  # (..., r, p) U^T X_c: the centered data in the orthonormal basis
    count: Tensor  # (...,) int64: directions kept (numerical rank, SVCCA reduction)
    dead: Tensor  # (..., p) bool: dead channels, dropped
    n: int  # data points
    rank_limited: Tensor  # (...,) bool: the reduction asked for more than the rank holds
    u: Tensor | None = (
        None  # (..., n, r) orthonormal basis, from the data (zero columns past count)
    )
    whiten: Tensor | None = None  # (..., p, r) W with U = X_c W, from a covariance (streaming)


@dataclass
class CCAResult:
    """Canonical correlations of one pair (or a batch of pairs).

    corrs: (..., k) descending, in [0, 1]; entries past `count` are 0 (k = max count).
    count: (...,) number of meaningful correlations, min(kept_x, kept_y).
    kept_x, kept_y: (...,) directions each side kept. dead_x (..., p), dead_y (..., q): the
    dropped dead channels.
    value: (...,) the metric that made this result (`svcca` / `pwcca` with
    return_details=True); None from `cca`.
    weights: (..., k) PWCCA's weights of the correlations (summing to 1, 0 past `count`),
    from the side with fewer kept directions (X on a tie); None unless from `pwcca`.
    """

    corrs: Tensor
    count: Tensor
    kept_x: Tensor
    kept_y: Tensor
    dead_x: Tensor
    dead_y: Tensor
    value: Tensor | None = None
    weights: Tensor | None = None

    def mean(self) -> Tensor:
        """Mean canonical correlation (the SVCCA similarity); NaN where count is 0."""
        return self.corrs.sum(-1) / self.count.to(self.corrs.dtype)

    def mean_squared(self) -> Tensor:
        """Mean squared canonical correlation, R^2_CCA of Kornblith et al. (2019)."""
        return self.corrs.square().sum(-1) / self.count.to(self.corrs.dtype)


@dataclass(frozen=True)
class Reduction:
    """SVCCA's reduction of a side to its leading singular directions: `count` of them, or
    the fewest whose share of the spectrum reaches `fraction`. spectrum: the share of what,
    "variance" (squared singular values: the variance the directions explain) or
    "singular_values" (plain singular values, as google/svcca's tutorial measures it)."""

    count: int | None = None
    fraction: float | None = None
    spectrum: Spectrum = "variance"

    def asked(self, s: Tensor) -> Tensor:
        """Directions asked for (...,), from descending singular values s (..., m), before
        the numerical rank limits them."""
        if self.count is not None:
            return torch.full(s.shape[:-1], self.count, dtype=torch.long, device=s.device)
        w = s.square() if self.spectrum == "variance" else s
        frac = w.cumsum(-1) / w.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        # Rounding may leave the last cumulative fraction a hair below 1.
        return (frac < self.fraction * (1 - 4 * torch.finfo(s.dtype).eps)).sum(-1) + 1


def reduction(
    keep: object = None,
    variance: object = None,
    spectrum: str = "variance",
    *,
    default_variance: float | None = None,
) -> Reduction | None:
    """Validate SVCCA's reduction options; None for no reduction (plain CCA).

    keep: a number of directions (an integer >= 1: int, numpy or 0-d torch integer).
    variance: a fraction in (0, 1] of the spectrum (any real scalar). At most one of the
    two; with neither, `default_variance` (None: no reduction).
    """
    if spectrum not in SPECTRA:
        raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
    if keep is not None and variance is not None:
        raise ValueError(
            f"give keep (a number of directions) or variance (a fraction), not both; got "
            f"keep={keep!r}, variance={variance!r}"
        )
    if keep is not None:
        integral = not isinstance(keep, bool) and not (
            isinstance(keep, Tensor) and (keep.is_floating_point() or keep.dtype == torch.bool)
        )
        try:
            count = operator.index(keep) if integral else None
        except TypeError:
            count = None
        if count is None or count < 1:
            hint = (
                f"; for a fraction of the variance use variance={keep!r}"
                if isinstance(keep, numbers.Real) and 0 < float(keep) <= 1
                else ""
            )
            raise ValueError(
                f"keep is a number of directions, an integer >= 1; got {keep!r}{hint}"
            )
        return Reduction(count=count, spectrum=spectrum)
    if variance is None:
        if default_variance is None:
            return None
        variance = default_variance
    real = (isinstance(variance, numbers.Real) and not isinstance(variance, bool)) or (
        isinstance(variance, Tensor) and variance.numel() == 1 and variance.dtype != torch.bool
    )
    if not real or not 0.0 < float(variance) <= 1.0:
        raise ValueError(f"variance is a fraction in (0, 1]; got {variance!r}")
    return Reduction(fraction=float(variance), spectrum=spectrum)


def _kept_count(s: Tensor, reduce: Reduction | None, rank_tol: float) -> tuple[Tensor, Tensor]:
    """How many leading directions to keep (...,), given descending singular values
    s (..., m): the numerical rank (s_i > rank_tol * s_max), cut by the reduction; and
    whether the rank, not the reduction, set that count (...,) bool."""
    if s.shape[-1] == 0:
        zero = torch.zeros(s.shape[:-1], dtype=torch.long, device=s.device)
        return zero, torch.zeros_like(zero, dtype=torch.bool)
    rank = (s > rank_tol * s[..., :1]).sum(-1)
    if reduce is None:
        return rank, torch.zeros_like(rank, dtype=torch.bool)
    asked = reduce.asked(s)
    return torch.minimum(rank, asked), rank < asked


def rank_tol(p: int, dtype: torch.dtype) -> float:
    """Relative singular-value threshold of the numerical rank of p channels."""
    return 4 * math.sqrt(p) * torch.finfo(dtype).eps


def _prefix_mask(count: Tensor, r: int) -> Tensor:
    """(..., r) bool: True for the first `count` entries."""
    return torch.arange(r, device=count.device) < count.unsqueeze(-1)


def _kept(s: Tensor, reduce: Reduction | None, tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """(count (...,), mask (..., r), rank_limited (...,)) of the kept directions, r = the
    largest count."""
    count, limited = _kept_count(s, reduce, tol)
    return count, _prefix_mask(count, int(count.max()) if count.numel() else 0), limited


def _scale_and_mask(
    xc: Tensor, norm: Tensor, dead: Tensor, equilibrate: bool, owned: bool
) -> tuple[Tensor, Tensor]:
    """Zero dead channels and (for plain CCA) scale the others to unit norm; returns the
    scaled data and the per-channel scale (..., p) that undoes it. `owned`: xc is a fresh
    tensor this module made, so it may be scaled in place (one pass, no copy)."""
    scale = torch.where(dead, torch.ones_like(norm), norm) if equilibrate else torch.ones_like(norm)
    if not (equilibrate or bool(dead.any())):
        return xc, scale
    mult = torch.where(dead, torch.zeros_like(scale), 1 / scale).unsqueeze(-2).to(xc.dtype)
    return (xc.mul_(mult) if owned else xc * mult), scale


def factor(x: Tensor, *, center_data: bool = True, reduce: Reduction | None = None) -> Factor:
    """Factor validated activations x (..., n, p) (already in the compute dtype).

    reduce=None (plain CCA / PWCCA) keeps the numerical rank of the channel-scaled data;
    otherwise SVCCA's reduction on the unscaled data (see `_kept_count`).
    """
    xc = center(x) if center_data else x
    n, p = xc.shape[-2:]
    absmax = x.abs().amax(dim=-2)
    if reduce is not None and xc.dtype == torch.float64 and n >= p:
        f = _gram_factor(xc, absmax, reduce)
        if f is not None:
            return f
    norm = torch.linalg.vector_norm(xc, dim=-2)
    dead = dead_channels(norm, absmax, n)
    xs, scale = _scale_and_mask(xc, norm, dead, reduce is None, owned=center_data)
    if n >= p:
        q, rf = _linalg.qr(xs)
        ur, s, vh = _linalg.svd(rf)
    else:
        q, ur = None, None
        u_full, s, vh = _linalg.svd(xs)
    count, mask, limited = _kept(s, reduce, rank_tol(p, s.dtype))
    r = mask.shape[-1]
    # Forming only the r kept columns of U: SVCCA's reduction also cuts this GEMM.
    u = q @ ur[..., :r] if q is not None else u_full[..., :r]
    if count.numel() > 1:  # batched: zero the directions past each element's count
        u = u * mask.unsqueeze(-2)
    s = s[..., :r] * mask
    coords = s.unsqueeze(-1) * vh[..., :r, :] * scale.unsqueeze(-2)
    return Factor(s=s, coords=coords, count=count, dead=dead, n=n, rank_limited=limited, u=u)


def _gram_factor(xc: Tensor, absmax: Tensor, reduce: Reduction) -> Factor | None:
    """SVCCA's leading directions of float64 data xc from its Gram matrix, U_k = X_c V_k / S_k,
    when the bound on the orthonormality this loses is at most _GRAM_LOSS and the reduction
    (not the Gram matrix's numerical rank, coarser than the QR route's) sets the count;
    else None."""
    n = xc.shape[-2]
    gram = _linalg.gram(xc)
    dead = dead_channels(torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt(), absmax, n)
    f = factor_from_gram(gram, n, dead, reduce=reduce)
    if not f.s.shape[-1] or bool(f.rank_limited.any()):
        return None
    s_k = f.s.gather(-1, (f.count - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    loss = math.sqrt(n) * _EPS64 * (f.s[..., 0] / s_k).square()
    if not bool((loss <= _GRAM_LOSS).all()):
        return None
    f.u = xc @ f.whiten  # whiten's rows of dead channels are zero
    return f


def factor_from_gram(
    gram: Tensor, n: int, dead: Tensor, *, reduce: Reduction | None = None
) -> Factor:
    """Factor from a centered Gram matrix X_c^T X_c (..., p, p) in float64 (streaming route).

    Same conventions as `factor`, through an eigendecomposition of the (channel-scaled) Gram
    matrix: accurate for singular values above sqrt(rank_tol) s_max (squaring the data
    squares its condition number), which is the rank threshold here; the in-memory QR route
    resolves down to rank_tol s_max.
    """
    p = gram.shape[-1]
    real = gram.real.dtype if gram.is_complex() else gram.dtype
    diag = torch.diagonal(gram, dim1=-2, dim2=-1).real.clamp_min(0)
    if reduce is None:
        scale = torch.where(dead, torch.ones_like(diag), diag.sqrt())
    else:
        scale = torch.ones_like(diag)
    live = (~dead).to(real)
    gs = gram / (scale.unsqueeze(-1) * scale.unsqueeze(-2))
    gs = gs * (live.unsqueeze(-1) * live.unsqueeze(-2))
    evals, v = _linalg.eigh(gs)
    evals, v = evals.flip(-1), v.flip(-1)
    s = evals.clamp_min(0).sqrt()
    count, mask, limited = _kept(s, reduce, math.sqrt(rank_tol(p, real)))
    r = mask.shape[-1]
    s = s[..., :r] * mask
    v = v[..., :r]
    inv_s = torch.where(mask, 1 / torch.where(mask, s, torch.ones_like(s)), torch.zeros_like(s))
    whiten = v * inv_s.unsqueeze(-2) * (live / scale).unsqueeze(-1)
    coords = s.unsqueeze(-1) * v.mH * scale.unsqueeze(-2)
    return Factor(
        s=s, coords=coords, count=count, dead=dead, n=n, rank_limited=limited, whiten=whiten
    )


Bases = Callable[[tuple[int, ...]], tuple[Tensor, Tensor]]


def cca_from_cross(
    m: Tensor,
    count_x: Tensor,
    count_y: Tensor,
    coords: tuple[Tensor, Tensor] | None = None,
    bases: Bases | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Canonical correlations from the cross product m = U_x^H U_y (..., r_x, r_y).

    count_x, count_y (...,): directions each side kept. Returns (corrs (..., k), count
    (...,), PWCCA value (...,) or None, PWCCA weights (..., k) or None); PWCCA when
    coords = (coords_x, coords_y) is given.
    PWCCA (Morcos et al.) weighs correlation i by alpha_i = sum_j |<h_i, x_j>|, h_i the
    unit-norm canonical variates and x_j the centered channels of the side with fewer kept
    directions (X on a tie, the reference code's convention); with m = A S B^H,
    <h_i, x_j> = (A^H coords_x)_ij. bases(index) -> (U_x (n, r_x), U_y (n, r_y)) of one
    batch element (index into m's batch dims) lets the variates of correlations near 1
    come from sines (`_small_angle_vectors`); without it, from m alone.
    """
    count = torch.minimum(count_x, count_y)
    if coords is None:
        corrs = _linalg.svdvals(m)
        return corrs.clamp(0, 1) * _prefix_mask(count, corrs.shape[-1]), count, None, None
    a, corrs, bh = _linalg.svd(m)
    mask = _prefix_mask(count, corrs.shape[-1])
    corrs = corrs.clamp(0, 1) * mask
    from_x = count_x <= count_y
    alpha = torch.zeros_like(corrs)
    for side, (vecs, cross, take) in enumerate(((a, m, from_x), (bh.mH, m.mH, ~from_x))):
        if not bool(take.any()):
            continue
        if bases is not None:
            vecs = _small_angle_vectors(vecs, corrs, count, cross, bases, side, take)
        side_alpha = (vecs.mH @ coords[side]).abs().sum(-1)
        alpha = torch.where(take.unsqueeze(-1), side_alpha, alpha)
    alpha = alpha * mask
    total = alpha.sum(-1)
    value = (alpha * corrs).sum(-1) / total
    return corrs, count, value.clamp(0, 1), alpha / total.unsqueeze(-1)


def _small_angle_vectors(
    vecs: Tensor,
    corrs: Tensor,
    count: Tensor,
    cross: Tensor,
    bases: Bases,
    side: int,
    take: Tensor,
) -> Tensor:
    """The weighting side's canonical vectors, those of correlations >= 1/sqrt(2) from sines.

    vecs (..., r_w, k): left singular vectors of cross = U_w^H U_o (..., r_w, r_o) for the
    weighting side w (side 0: X, 1: Y), columns in the order of corrs (..., k). In each
    batch element of `take` with at least two such correlations, their block A_c of columns
    is rotated to the right singular vectors of the sine matrix E = (I - U_o U_o^H) U_w A_c,
    in ascending order of the sines (descending correlation). E has n rows, so this runs
    per batch element (as one more GEMM of that size would).
    """
    near = ((corrs >= _SMALL_ANGLE_COS) & _prefix_mask(count, corrs.shape[-1])).sum(-1)
    near = torch.where(take, near, torch.zeros_like(near))
    if near.ndim == 0:
        todo = [()] if int(near) >= 2 else []
    else:
        todo = [tuple(idx) for idx in (near >= 2).nonzero().tolist()]
    if not todo:
        return vecs
    vecs = vecs.clone()
    for idx in todo:
        c = int(near[idx])
        u = bases(idx)
        ac = vecs[idx][..., :c]
        e = u[side] @ ac - u[1 - side] @ (cross[idx].mH @ ac)
        _, _, vh = _linalg.svd(e)
        vecs[idx + (slice(None), slice(None, c))] = ac @ vh.mH.flip(-1)
    return vecs


def _element(t: Tensor, idx: tuple[int, ...]) -> Tensor:
    """The matrix of t (..., n, r) at index idx of a batch shape t's batch dims broadcast to."""
    lead = t.shape[:-2]
    idx = idx[len(idx) - len(lead) :]
    return t[tuple(i if size > 1 else 0 for i, size in zip(idx, lead))]


def warn_short(
    reduce: Reduction | None, limited: Tensor, have: Tensor, name: str, what: str, level: int = 4
) -> None:
    """Warn when keep asked for more directions than a side holds (its numerical rank):
    all of them are kept, which is not what keep=k promised."""
    if reduce is None or reduce.count is None or not bool(limited.any()):
        return
    warnings.warn(
        f"{what}: keep={reduce.count} directions asked, but {name} has only "
        f"{int(have[limited].min())} (the numerical rank of its live channels); keeping "
        "those.",
        RuntimeWarning,
        stacklevel=level,
    )


def _cca_pair(
    x: Tensor,
    y: Tensor,
    *,
    center_data: bool,
    reduce: Reduction | None,
    dtype: torch.dtype | None,
    pwcca: bool,
    what: str,
) -> CCAResult:
    x, y = prepare_pair(x, y, dtype)
    fx = factor(x, center_data=center_data, reduce=reduce)
    fy = factor(y, center_data=center_data, reduce=reduce)
    for f, name in ((fx, "X"), (fy, "Y")):
        warn_no_variance(f.dead.all(-1), name, what)
        warn_short(reduce, f.rank_limited, f.count, name, what)
    n, p, q = x.shape[-2], x.shape[-1], y.shape[-1]
    warn_few_points(n, int(fx.count.max()), int(fy.count.max()), what, widths=(p, q))
    coords, bases = None, None
    if pwcca:
        coords = (fx.coords, fy.coords)

        def bases(idx: tuple[int, ...]) -> tuple[Tensor, Tensor]:
            return _element(fx.u, idx), _element(fy.u, idx)

    corrs, count, value, weights = cca_from_cross(fx.u.mH @ fy.u, fx.count, fy.count, coords, bases)
    return CCAResult(corrs, count, fx.count, fy.count, fx.dead, fy.dead, value, weights)


def cca(
    x: Tensor,
    y: Tensor,
    *,
    center: bool = True,
    keep: int | None = None,
    variance: float | None = None,
    spectrum: Spectrum = "variance",
    dtype: torch.dtype | None = None,
) -> CCAResult:
    """All canonical correlations between x (..., n, p) and y (..., n, q).

    center: subtract channel means first (the definition; False reproduces Kornblith et
    al.'s uncentered QR demo). keep / variance / spectrum: SVCCA's reduction of each side
    first (see `svcca`); neither (the default) for plain CCA. dtype: float64 on CPU,
    float32 on GPU by default. Use `.mean()` / `.mean_squared()` of the result for a
    scalar summary.
    """
    reduce = reduction(keep, variance, spectrum)
    return _cca_pair(x, y, center_data=center, reduce=reduce, dtype=dtype, pwcca=False, what="cca")


def svcca(
    x: Tensor,
    y: Tensor,
    *,
    keep: int | None = None,
    variance: float | None = None,
    spectrum: Spectrum = "variance",
    center: bool = True,
    dtype: torch.dtype | None = None,
    return_details: bool = False,
) -> Tensor | CCAResult:
    """SVCCA similarity (Raghu et al. 2017): mean canonical correlation after reducing each
    side to its leading singular directions. x (..., n, p), y (..., n, q) -> (...,).

    keep: that many directions (an integer; a side with fewer, its numerical rank, keeps
    all it has, with a warning). variance: the fewest directions whose share of the
    spectrum reaches this fraction in (0, 1]. Give at most one; with neither, variance=0.99.
    spectrum: what the fraction is of: "variance" (squared singular values of the centered
    data, the variance each direction explains) or "singular_values" (plain singular
    values: google/svcca's tutorial measures the fraction that way, so use it to reproduce
    numbers computed with that code). return_details: return the `CCAResult` (value,
    directions kept per side, correlations) instead of the value alone.
    """
    reduce = reduction(keep, variance, spectrum, default_variance=0.99)
    res = _cca_pair(x, y, center_data=center, reduce=reduce, dtype=dtype, pwcca=False, what="svcca")
    res.value = res.mean()
    return res if return_details else res.value


def pwcca(
    x: Tensor,
    y: Tensor,
    *,
    center: bool = True,
    dtype: torch.dtype | None = None,
    return_details: bool = False,
) -> Tensor | CCAResult:
    """Projection-weighted CCA (Morcos et al. 2018): canonical correlations weighted by how
    much of the channels' activity each canonical variate accounts for (see
    `cca_from_cross`). x (..., n, p), y (..., n, q) -> (...,) in [0, 1]. return_details:
    return the `CCAResult` (value, correlations, their weights, directions kept).

    The weights are sums of absolute values, so they depend on the basis chosen among equal
    correlations: for exact ties (e.g. duplicated channels) the value is not unique, and
    any basis of the tied variates is as valid.
    """
    res = _cca_pair(x, y, center_data=center, reduce=None, dtype=dtype, pwcca=True, what="pwcca")
    return res if return_details else res.value
