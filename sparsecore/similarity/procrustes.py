"""Orthogonal Procrustes distance (Ding, Denain & Steinhardt 2021; Williams et al. 2021).

With X, Y centered and scaled to unit Frobenius norm,

    d(X, Y) = min_{orthogonal Q} ||X Q - Y||_F^2 = 2 - 2 ||X^T Y||_*,

a distance in [0, 2] (0 for identical representations up to rotation, reflection and
isotropic scaling). Channels may differ in number (Q is then a partial isometry).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsecore.similarity import _linalg
from sparsecore.similarity._common import centered_live, prepare_pair, warn_wide


def procrustes_from_cross(c: Tensor, norm_x: Tensor, norm_y: Tensor) -> Tensor:
    """Distance from the cross product c = X_c^T Y_c (..., p, q) and the Frobenius norms of
    X_c and Y_c; NaN when a side has no variance."""
    nuclear = _linalg.svdvals(c).sum(-1)
    return (2 - 2 * nuclear / (norm_x * norm_y)).clamp(0, 2)


def procrustes(x: Tensor, y: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """Orthogonal Procrustes distance between x (..., n, p) and y (..., n, q) -> (...,).
    Dead (constant) channels count as exactly zero; NaN, with a warning, for a side without
    a live channel."""
    x, y = prepare_pair(x, y, dtype)
    warn_wide(x, y, "procrustes")
    xc, yc = centered_live(x, "X", "procrustes"), centered_live(y, "Y", "procrustes")
    return procrustes_from_cross(
        xc.mT @ yc,
        torch.linalg.vector_norm(xc, dim=(-2, -1)),
        torch.linalg.vector_norm(yc, dim=(-2, -1)),
    )
