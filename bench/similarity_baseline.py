"""The baseline for `python -m bench similarity`: the straightforward numpy way, one pair
of layers at a time, as the widely used SVCCA reference code (google/svcca, cca_core.py)
and Kornblith et al.'s CKA notebook do it.

- SVCCA: center and SVD-reduce each side (np.linalg.svd), then CCA through the covariance
  of the reduced data: np.cov, pinv and an eigh-based inverse square root, and an SVD.
- PWCCA: the same covariance CCA on the full data, then the projection weights.
- Linear CKA: Kornblith et al.'s feature-space formula.

Activations are (n, p) here (the reference code takes (p, n)). Where the reference code
has quirks that change the numbers (it adds the channel means back to the canonical
variates before weighting PWCCA), this follows the definitions, so the bench can check
that both implementations agree.
"""

from __future__ import annotations

import numpy as np


def _inv_sqrt_psd(m: np.ndarray) -> np.ndarray:
    """pinv, then the eigh-based square root: the reference's positivedef_matrix_sqrt(pinv)."""
    w, v = np.linalg.eigh(np.linalg.pinv(m))
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def cov_cca(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical correlations of x (n, p), y (n, q) through their covariance.

    Returns (rho (min(p, q),) descending, the whitening of x (p, p), the left singular
    vectors (p, k) of the whitened cross-covariance).
    """
    p = x.shape[1]
    sigma = np.cov(np.concatenate([x, y], axis=1), rowvar=False)
    sxx, sxy, syy = sigma[:p, :p], sigma[:p, p:], sigma[p:, p:]
    # The reference rescales each block by its largest entry before inverting.
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
    wx, wy = _inv_sqrt_psd(sxx), _inv_sqrt_psd(syy)
    u, s, _ = np.linalg.svd(wx @ sxy @ wy, full_matrices=False)
    return np.clip(s, 0, 1), wx, u


def _svd_reduce(x: np.ndarray, keep: float) -> np.ndarray:
    """Center, SVD, keep the fewest directions explaining `keep` of the variance: (n, k)."""
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    frac = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.searchsorted(frac, keep * (1 - 4 * np.finfo(float).eps)) + 1)
    return u[:, :k] * s[:k]


def svcca(x: np.ndarray, y: np.ndarray, keep: float = 0.99) -> float:
    """Mean canonical correlation of the SVD-reduced x (n, p), y (n, q)."""
    rx, ry = (
        _svd_reduce(np.asarray(x, np.float64), keep),
        _svd_reduce(np.asarray(y, np.float64), keep),
    )
    rho, _, _ = cov_cca(rx, ry)
    return float(np.mean(rho))


def pwcca(x: np.ndarray, y: np.ndarray) -> float:
    """Projection-weighted CCA (Morcos et al.): weights from the side with fewer channels."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape[1] > y.shape[1]:
        x, y = y, x
    xc = x - x.mean(0)
    rho, wx, u = cov_cca(x, y)
    h = xc @ (wx @ u)  # canonical variates of x, (n, k)
    q, _ = np.linalg.qr(h)
    alpha = np.abs(q.T @ xc).sum(1)
    return float(np.sum(alpha * rho) / np.sum(alpha))


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s feature_space_linear_cka."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    num = np.linalg.norm(x.T @ y) ** 2
    return float(num / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


METRICS = {"svcca": svcca, "pwcca": pwcca, "linear_cka": linear_cka}
