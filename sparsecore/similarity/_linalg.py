"""The dense factorizations the similarity metrics call, in one place.

Every QR, SVD and symmetric eigendecomposition in sparsecore.similarity goes through these
four functions, so a faster batched backend can replace them without touching the metrics.
All take and return tensors with optional leading batch dimensions, on the input's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsecore import linalg as _sc_linalg


def _batched_real(x: Tensor) -> bool:
    """sparsecore.linalg takes real float32/float64 (it picks its C++ Jacobi kernel or
    torch.linalg per shape and device); complex inputs (the DFT route) stay on torch.linalg."""
    return x.dtype in (torch.float32, torch.float64)


def qr(x: Tensor) -> tuple[Tensor, Tensor]:
    """Thin Householder QR: x (..., n, p), n >= p -> Q (..., n, p), R (..., p, p)."""
    return torch.linalg.qr(x, mode="reduced")


def svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD: x (..., m, k) -> U (..., m, r), S (..., r) descending, Vh (..., r, k)."""
    if _batched_real(x):
        return _sc_linalg.svd(x)
    return torch.linalg.svd(x, full_matrices=False)


def svdvals(x: Tensor) -> Tensor:
    """Singular values of x (..., m, k), descending: (..., min(m, k))."""
    if _batched_real(x):
        return _sc_linalg.svdvals(x)
    return torch.linalg.svdvals(x)


def eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric / Hermitian eigendecomposition: eigenvalues ascending (..., p), V (..., p, p)."""
    if _batched_real(x):
        return _sc_linalg.eigh(x)
    return torch.linalg.eigh(x)
