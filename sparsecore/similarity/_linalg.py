"""The dense factorizations the similarity metrics call, in one place.

Every QR, SVD, symmetric eigendecomposition and Gram product in sparsecore.similarity goes
through these functions, so a faster backend can replace them without touching the metrics.
All take and return tensors with optional leading batch dimensions, on the input's device.
"""

from __future__ import annotations

import torch
from scipy.linalg import blas
from torch import Tensor

from sparsecore import linalg as _sc_linalg


def _batched_real(x: Tensor) -> bool:
    """sparsecore.linalg takes real float32/float64 (it picks one of its C++ kernels or
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


def gram(x: Tensor) -> Tensor:
    """X^T X (..., p, p) of x (..., n, p).

    On CPU, for one float32/float64 matrix, BLAS syrk computes only one triangle: half a
    GEMM's flops, and measured faster than torch's x.mT @ x (see bench/RESULTS.md
    (similarity)); torch has no syrk. Elsewhere, a plain matmul.
    """
    syrk = {torch.float64: blas.dsyrk, torch.float32: blas.ssyrk}.get(x.dtype)
    if x.ndim != 2 or x.device.type != "cpu" or syrk is None or x.requires_grad:
        return x.mT @ x
    # A C-ordered x is a Fortran-ordered x^T: syrk(trans=0) reads it in place.
    upper = torch.from_numpy(syrk(1.0, x.detach().contiguous().numpy().T, trans=0))
    return upper.triu() + upper.triu(1).mT
