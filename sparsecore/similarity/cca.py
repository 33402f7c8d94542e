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
sqrt(n) eps (s_max / s_k)^2 on U_k's orthonormality, is at most 1e-10; otherwise, and
always in float32, the QR route.

Directions kept per side: the numerical rank (singular values above 4 sqrt(p) eps s_max of
the channel-scaled data; the rounding noise of this factorization, measured on exactly
rank-deficient float32 and float64 data with n up to 50,000 and p up to 512, stays below
4 eps s_max), and for SVCCA the `keep` reduction. Dead channels (constant up
to rounding: pruned filters, ReLUs that never fire) are dropped and reported. Results with
batch dims keep a static shape: correlations past `count` are exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sparsecore.similarity import _linalg
from sparsecore.similarity._common import center, dead_channels, prepare_pair, warn_few_points

Keep = int | float | None

_EPS64 = torch.finfo(torch.float64).eps
_GRAM_LOSS = 1e-10  # largest orthonormality loss SVCCA's Gram route may cost (see above)


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
    """

    corrs: Tensor
    count: Tensor
    kept_x: Tensor
    kept_y: Tensor
    dead_x: Tensor
    dead_y: Tensor

    def mean(self) -> Tensor:
        """Mean canonical correlation (the SVCCA similarity); NaN where count is 0."""
        return self.corrs.sum(-1) / self.count.to(self.corrs.dtype)

    def mean_squared(self) -> Tensor:
        """Mean squared canonical correlation, R^2_CCA of Kornblith et al. (2019)."""
        return self.corrs.square().sum(-1) / self.count.to(self.corrs.dtype)


def check_keep(keep: Keep) -> None:
    """keep: None (all directions), an int >= 1, or a variance fraction in (0, 1]."""
    ok = keep is None or (
        not isinstance(keep, bool)
        and (
            (isinstance(keep, int | np.integer) and keep >= 1)
            or (isinstance(keep, float) and 0.0 < keep <= 1.0)
        )
    )
    if not ok:
        raise ValueError(
            f"keep must be None, a number of directions >= 1, or a variance fraction in "
            f"(0, 1]; got {keep!r}"
        )


def _kept_count(s: Tensor, keep: Keep, rank_tol: float) -> Tensor:
    """How many leading directions to keep, given descending singular values s (..., m).

    Numerical rank: s_i > rank_tol * s_max. SVCCA reduction: an int keeps that many; a
    float f keeps the fewest leading directions whose squared singular values (the
    variance they explain) sum to at least f of the total.
    """
    if s.shape[-1] == 0:
        return torch.zeros(s.shape[:-1], dtype=torch.long, device=s.device)
    rank = (s > rank_tol * s[..., :1]).sum(-1)
    if keep is None:
        return rank
    if isinstance(keep, float):
        var = s.square()
        frac = var.cumsum(-1) / var.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        # Rounding may leave the last cumulative fraction a hair below 1.
        need = (frac < keep * (1 - 4 * torch.finfo(s.dtype).eps)).sum(-1) + 1
        return torch.minimum(rank, need)
    return rank.clamp_max(int(keep))


def rank_tol(p: int, dtype: torch.dtype) -> float:
    """Relative singular-value threshold of the numerical rank of p channels."""
    return 4 * math.sqrt(p) * torch.finfo(dtype).eps


def _prefix_mask(count: Tensor, r: int) -> Tensor:
    """(..., r) bool: True for the first `count` entries."""
    return torch.arange(r, device=count.device) < count.unsqueeze(-1)


def _kept(s: Tensor, keep: Keep, tol: float) -> tuple[Tensor, Tensor]:
    """(count (...,), mask (..., r)) of the kept directions, r = the largest count."""
    count = _kept_count(s, keep, tol)
    return count, _prefix_mask(count, int(count.max()) if count.numel() else 0)


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


def factor(x: Tensor, *, center_data: bool = True, keep: Keep = None) -> Factor:
    """Factor validated activations x (..., n, p) (already in the compute dtype).

    keep=None (plain CCA / PWCCA) keeps the numerical rank of the channel-scaled data;
    otherwise SVCCA's reduction on the unscaled data (see `_kept_count`).
    """
    xc = center(x) if center_data else x
    n, p = xc.shape[-2:]
    absmax = x.abs().amax(dim=-2)
    if keep is not None and xc.dtype == torch.float64 and n >= p:
        f = _gram_factor(xc, absmax, keep)
        if f is not None:
            return f
    norm = torch.linalg.vector_norm(xc, dim=-2)
    dead = dead_channels(norm, absmax, n)
    xs, scale = _scale_and_mask(xc, norm, dead, keep is None, owned=center_data)
    if n >= p:
        q, rf = _linalg.qr(xs)
        ur, s, vh = _linalg.svd(rf)
    else:
        q, ur = None, None
        u_full, s, vh = _linalg.svd(xs)
    count, mask = _kept(s, keep, rank_tol(p, s.dtype))
    r = mask.shape[-1]
    # Forming only the r kept columns of U: SVCCA's reduction also cuts this GEMM.
    u = q @ ur[..., :r] if q is not None else u_full[..., :r]
    if count.numel() > 1:  # batched: zero the directions past each element's count
        u = u * mask.unsqueeze(-2)
    s = s[..., :r] * mask
    coords = s.unsqueeze(-1) * vh[..., :r, :] * scale.unsqueeze(-2)
    return Factor(s=s, coords=coords, count=count, dead=dead, n=n, u=u)


def _gram_factor(xc: Tensor, absmax: Tensor, keep: Keep) -> Factor | None:
    """SVCCA's leading directions of float64 data xc from its Gram matrix, U_k = X_c V_k / S_k,
    when the bound on the orthonormality this loses is at most _GRAM_LOSS; else None."""
    n = xc.shape[-2]
    gram = _linalg.gram(xc)
    dead = dead_channels(torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt(), absmax, n)
    f = factor_from_gram(gram, n, dead, keep=keep)
    if not f.s.shape[-1]:
        return None
    s_k = f.s.gather(-1, (f.count - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    loss = math.sqrt(n) * _EPS64 * (f.s[..., 0] / s_k).square()
    if not bool((loss <= _GRAM_LOSS).all()):
        return None
    f.u = xc @ f.whiten  # whiten's rows of dead channels are zero
    return f


def factor_from_gram(gram: Tensor, n: int, dead: Tensor, *, keep: Keep = None) -> Factor:
    """Factor from a centered Gram matrix X_c^T X_c (..., p, p) in float64 (streaming route).

    Same conventions as `factor`, through an eigendecomposition of the (channel-scaled) Gram
    matrix: accurate for singular values above sqrt(rank_tol) s_max (squaring the data
    squares its condition number), which is the rank threshold here; the in-memory QR route
    resolves down to rank_tol s_max.
    """
    p = gram.shape[-1]
    real = gram.real.dtype if gram.is_complex() else gram.dtype
    diag = torch.diagonal(gram, dim1=-2, dim2=-1).real.clamp_min(0)
    if keep is None:
        scale = torch.where(dead, torch.ones_like(diag), diag.sqrt())
    else:
        scale = torch.ones_like(diag)
    live = (~dead).to(real)
    gs = gram / (scale.unsqueeze(-1) * scale.unsqueeze(-2))
    gs = gs * (live.unsqueeze(-1) * live.unsqueeze(-2))
    evals, v = _linalg.eigh(gs)
    evals, v = evals.flip(-1), v.flip(-1)
    s = evals.clamp_min(0).sqrt()
    count, mask = _kept(s, keep, math.sqrt(rank_tol(p, real)))
    r = mask.shape[-1]
    s = s[..., :r] * mask
    v = v[..., :r]
    inv_s = torch.where(mask, 1 / torch.where(mask, s, torch.ones_like(s)), torch.zeros_like(s))
    whiten = v * inv_s.unsqueeze(-2) * (live / scale).unsqueeze(-1)
    coords = s.unsqueeze(-1) * v.mH * scale.unsqueeze(-2)
    return Factor(s=s, coords=coords, count=count, dead=dead, n=n, whiten=whiten)


def cca_from_cross(
    m: Tensor,
    count_x: Tensor,
    count_y: Tensor,
    coords: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Canonical correlations from the cross product m = U_x^H U_y (..., r_x, r_y).

    count_x, count_y (...,): directions each side kept. Returns (corrs (..., k), count
    (...,), PWCCA value (...,) or None); PWCCA when coords = (coords_x, coords_y) is given.
    PWCCA (Morcos et al.) weighs correlation i by alpha_i = sum_j |<h_i, x_j>|, h_i the
    unit-norm canonical variates and x_j the centered channels of the side with fewer kept
    directions (X on a tie, the reference code's convention); with m = A S B^H,
    <h_i, x_j> = (A^H coords_x)_ij.
    """
    count = torch.minimum(count_x, count_y)
    if coords is not None:
        a, corrs, bh = _linalg.svd(m)
    else:
        corrs = _linalg.svdvals(m)
    mask = _prefix_mask(count, corrs.shape[-1])
    corrs = corrs.clamp(0, 1) * mask
    if coords is None:
        return corrs, count, None
    alpha_x = (a.mH @ coords[0]).abs().sum(-1)
    alpha_y = (bh @ coords[1]).abs().sum(-1)
    alpha = torch.where((count_x <= count_y).unsqueeze(-1), alpha_x, alpha_y) * mask
    value = (alpha * corrs).sum(-1) / alpha.sum(-1)
    return corrs, count, value.clamp(0, 1)


def _cca_pair(
    x: Tensor,
    y: Tensor,
    *,
    center_data: bool,
    keep: Keep,
    dtype: torch.dtype | None,
    pwcca: bool,
    what: str,
) -> tuple[CCAResult, Tensor | None]:
    check_keep(keep)
    x, y = prepare_pair(x, y, dtype)
    fx = factor(x, center_data=center_data, keep=keep)
    fy = factor(y, center_data=center_data, keep=keep)
    warn_few_points(x.shape[-2], int(fx.count.max()), int(fy.count.max()), what)
    coords = (fx.coords, fy.coords) if pwcca else None
    corrs, count, value = cca_from_cross(fx.u.mH @ fy.u, fx.count, fy.count, coords)
    result = CCAResult(corrs, count, fx.count, fy.count, fx.dead, fy.dead)
    return result, value


def cca(
    x: Tensor,
    y: Tensor,
    *,
    center: bool = True,
    keep: Keep = None,
    dtype: torch.dtype | None = None,
) -> CCAResult:
    """All canonical correlations between x (..., n, p) and y (..., n, q).

    center: subtract channel means first (the definition; False reproduces Kornblith et
    al.'s uncentered QR demo). keep: None for plain CCA, or SVCCA's reduction (an int number
    of directions, or a variance fraction). dtype: float64 on CPU, float32 on GPU by default.
    Use `.mean()` / `.mean_squared()` of the result for a scalar summary.
    """
    return _cca_pair(x, y, center_data=center, keep=keep, dtype=dtype, pwcca=False, what="cca")[0]


def svcca(
    x: Tensor,
    y: Tensor,
    *,
    keep: int | float = 0.99,
    center: bool = True,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """SVCCA similarity (Raghu et al. 2017): mean canonical correlation after reducing each
    side to its leading singular directions. keep=0.99 keeps the fewest directions that
    explain 99 % of the variance (sum of squared singular values of the centered data); an
    int keeps that many. x (..., n, p), y (..., n, q) -> (...,)."""
    res, _ = _cca_pair(x, y, center_data=center, keep=keep, dtype=dtype, pwcca=False, what="svcca")
    return res.mean()


def pwcca(x: Tensor, y: Tensor, *, center: bool = True, dtype: torch.dtype | None = None) -> Tensor:
    """Projection-weighted CCA (Morcos et al. 2018): canonical correlations weighted by how
    much of the channels' activity each canonical variate accounts for (see
    `cca_from_cross`). x (..., n, p), y (..., n, q) -> (...,) in [0, 1]."""
    _, value = _cca_pair(x, y, center_data=center, keep=None, dtype=dtype, pwcca=True, what="pwcca")
    return value
