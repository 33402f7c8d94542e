"""Centered kernel alignment (Kornblith et al. 2019): linear and RBF, biased and debiased.

Linear CKA needs only second moments of the centered data, which is what lets the
all-pairs and streaming paths compute it from cross-Gram matrices:

    CKA = ||X_c^T Y_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)        (biased, in [0, 1])

The debiased estimator replaces each HSIC by its U-statistic (Song et al. 2012, in the
Szekely-Rizzo form Kornblith et al. use), which needs besides the row norms
a_i = ||x_c,i||^2, b_i = ||y_c,i||^2 only sum(a), sum(b) and a.b. It is a cosine between
U-centered Gram matrices, so it lies in [-1, 1] (small negative values do occur).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from sparsecore.similarity import _linalg
from sparsecore.similarity._common import center, centered_live, prepare_pair, warn_wide


def _hsic_debiased(dot: Tensor, ab: Tensor, sa: Tensor, sb: Tensor, n: int) -> Tensor:
    """Unbiased HSIC numerator: <K~_x, K~_y> for U-centered linear Grams, from moments."""
    return dot - n / (n - 2) * ab + sa * sb / ((n - 1) * (n - 2))


def cka_from_moments(
    xty: Tensor,
    xx: Tensor,
    yy: Tensor,
    *,
    debiased: bool = False,
    n: int = 0,
    row_terms: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Linear CKA from xty = ||X_c^T Y_c||^2, xx = ||X_c^T X_c||^2, yy = ||Y_c^T Y_c||^2.

    For the debiased estimator pass n and row_terms = (a.b, a.a, b.b, sum a, sum b) with
    a_i, b_i the squared norms of the centered rows. NaN when a side has no variance. The
    two sides' norms are taken apart (xx and yy are fourth powers of the data: their
    product overflows where each alone does not).
    """
    if not debiased:
        return (xty / (xx.sqrt() * yy.sqrt())).clamp(0, 1)
    if n < 4:
        raise ValueError(f"debiased CKA needs at least 4 data points, got {n}")
    ab, aa, bb, sa, sb = row_terms
    num = _hsic_debiased(xty, ab, sa, sb, n)
    den_x = _hsic_debiased(xx, aa, sa, sa, n).clamp_min(0)
    den_y = _hsic_debiased(yy, bb, sb, sb, n).clamp_min(0)
    return (num / (den_x.sqrt() * den_y.sqrt())).clamp(-1, 1)


def row_terms(xc: Tensor, yc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(a.b, a.a, b.b, sum a, sum b) for centered xc (..., n, p), yc (..., n, q)."""
    a = xc.square().sum(-1)
    b = yc.square().sum(-1)
    return (a * b).sum(-1), a.square().sum(-1), b.square().sum(-1), a.sum(-1), b.sum(-1)


def linear_cka(
    x: Tensor, y: Tensor, *, debiased: bool = False, dtype: torch.dtype | None = None
) -> Tensor:
    """Linear CKA between x (..., n, p) and y (..., n, q) -> (...,).

    Computed in feature space (p x q products) or in example space (n x n Grams), whichever
    is cheaper; both give the same value. Dead (constant) channels count as exactly zero; a
    side without a live channel gives NaN, with a warning.
    """
    x, y = prepare_pair(x, y, dtype)
    warn_wide(x, y, "linear_cka")
    xc, yc = centered_live(x, "X", "linear_cka"), centered_live(y, "Y", "linear_cka")
    n, p = xc.shape[-2:]
    q = yc.shape[-1]
    if p * q + p * p + q * q <= n * (p + q):
        xty = (xc.mT @ yc).square().sum((-2, -1))
        xx = _linalg.gram(xc).square().sum((-2, -1))
        yy = _linalg.gram(yc).square().sum((-2, -1))
    else:
        kx, ky = xc @ xc.mT, yc @ yc.mT
        xty = (kx * ky).sum((-2, -1))
        xx = kx.square().sum((-2, -1))
        yy = ky.square().sum((-2, -1))
    terms = row_terms(xc, yc) if debiased else None
    return cka_from_moments(xty, xx, yy, debiased=debiased, n=n, row_terms=terms)


def _median_last(v: Tensor) -> Tensor:
    """numpy.median over the last dim (the mean of the two middle values for even sizes)."""
    m = v.shape[-1]
    lo = v.kthvalue((m + 1) // 2, dim=-1).values
    if m % 2:
        return lo
    return (lo + v.kthvalue(m // 2 + 1, dim=-1).values) / 2


def check_threshold(threshold: float) -> float:
    """The RBF width must be a positive fraction of the median distance: at 0 the kernel
    is 0/0 everywhere."""
    if not threshold > 0:  # also rejects NaN
        raise ValueError(
            f"rbf_cka: threshold is the kernel width as a fraction of the median distance "
            f"and must be > 0, got {threshold!r}"
        )
    return float(threshold)


def rbf_gram(x: Tensor, threshold: float = 1.0, name: str = "X", what: str = "rbf_cka") -> Tensor:
    """Gaussian kernel Gram (..., n, n) of x (..., n, p), bandwidth relative to the data:
    K_ij = exp(-d_ij^2 / (2 threshold^2 median(d^2))), the median over all n^2 entries
    (Kornblith et al.'s gram_rbf). The squared distances are expanded as
    |x_i|^2 + |x_j|^2 - 2 x_i.x_j on centered data (distances do not change), since on data
    far from the origin the expansion cancels catastrophically. Warns (and the kernel is
    NaN) when the median distance is 0; `name`, `what` say which input in that warning.
    """
    threshold = check_threshold(threshold)
    x = center(x)
    sq = x.square().sum(-1)
    d2 = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * (x @ x.mT)).clamp_min(0)
    med = _median_last(d2.flatten(-2))
    if bool((med == 0).any()):
        warnings.warn(
            f"{what}: the median squared distance between the data points of {name} is 0 "
            "(every channel constant, or most data points identical), so the RBF width is "
            "0 and the similarity is NaN.",
            RuntimeWarning,
            stacklevel=3,
        )
    return torch.exp(-d2 / (2 * threshold**2 * med)[..., None, None])


def center_gram(k: Tensor, *, debiased: bool = False) -> Tensor:
    """Double-center a Gram matrix (..., n, n): H K H, or for `debiased` the U-centering
    (zero diagonal) that makes <K~_x, K~_y> / (n (n - 3)) an unbiased HSIC."""
    n = k.shape[-1]
    if not debiased:
        means = k.mean(-2)
        means = means - means.mean(-1, keepdim=True) / 2
        return k - means.unsqueeze(-1) - means.unsqueeze(-2)
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    k = k.masked_fill(eye, 0)
    means = k.sum(-2) / (n - 2)
    means = means - means.sum(-1, keepdim=True) / (2 * (n - 1))
    return (k - means.unsqueeze(-1) - means.unsqueeze(-2)).masked_fill(eye, 0)


def gram_cka(kx: Tensor, ky: Tensor, *, debiased: bool = False) -> Tensor:
    """CKA between two (uncentered) Gram matrices (..., n, n)."""
    if debiased and kx.shape[-1] < 4:
        raise ValueError(f"debiased CKA needs at least 4 data points, got {kx.shape[-1]}")
    kx, ky = center_gram(kx, debiased=debiased), center_gram(ky, debiased=debiased)
    num = (kx * ky).sum((-2, -1))
    den = (kx.square().sum((-2, -1)) * ky.square().sum((-2, -1))).sqrt()
    return (num / den).clamp(-1 if debiased else 0, 1)


def rbf_cka(
    x: Tensor,
    y: Tensor,
    *,
    threshold: float = 1.0,
    debiased: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """RBF-kernel CKA between x (..., n, p) and y (..., n, q) -> (...,).

    threshold: the kernel width as a fraction of the median pairwise distance (Kornblith et
    al.'s parameter; they report 0.2 - 0.8), > 0. Memory O(n^2) per side.
    """
    x, y = prepare_pair(x, y, dtype)
    warn_wide(x, y, "rbf_cka")
    kx, ky = rbf_gram(x, threshold, "X"), rbf_gram(y, threshold, "Y")
    return gram_cka(kx, ky, debiased=debiased)
