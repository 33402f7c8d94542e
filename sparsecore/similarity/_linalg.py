"""The dense factorizations the similarity metrics call, in one place.

Every QR, SVD and symmetric eigendecomposition in sparsecore.similarity goes through these
four functions, so a faster batched backend can replace them without touching the metrics.
All take and return tensors with optional leading batch dimensions, on the input's device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def qr(x: Tensor) -> tuple[Tensor, Tensor]:
    """Thin Householder QR: x (..., n, p), n >= p -> Q (..., n, p), R (..., p, p)."""
    return torch.linalg.qr(x, mode="reduced")


def svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD: x (..., m, k) -> U (..., m, r), S (..., r) descending, Vh (..., r, k)."""
    return torch.linalg.svd(x, full_matrices=False)


def svdvals(x: Tensor) -> Tensor:
    """Singular values of x (..., m, k), descending: (..., min(m, k))."""
    return torch.linalg.svdvals(x)


def eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric / Hermitian eigendecomposition: eigenvalues ascending (..., p), V (..., p, p)."""
    return torch.linalg.eigh(x)
