"""The DFT route for convolutional layers (Raghu et al. 2017, section 3.1).

When activations are translation invariant in distribution, the covariance over spatial
positions is diagonalised by the 2-D discrete Fourier transform, so the CCA of the
(N * H * W, C) data splits into H * W independent CCAs of (N, C) complex data, one per
frequency: far smaller problems, all solved here as one batched factorization.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsecore.similarity._common import as_activations, compute_dtype
from sparsecore.similarity.cca import CCAResult, Spectrum, cca


def dft_cca(
    x: Tensor,
    y: Tensor,
    *,
    keep: int | None = None,
    variance: float | None = None,
    spectrum: Spectrum = "variance",
    dtype: torch.dtype | None = None,
) -> CCAResult:
    """Per-frequency CCA of conv activations x (N, C, H, W) and y (N, D, H, W).

    Returns a CCAResult with batch shape (H, W): result.corrs[u, v] are the canonical
    correlations at spatial frequency (u, v) (the unitary DFT; for real inputs frequency
    (u, v) and (-u, -v) agree). The overall mean correlation is
    result.corrs.sum() / result.count.sum(). Layers of different spatial size must be
    resized first (e.g. torch.nn.functional.interpolate), as Raghu et al. do. keep /
    variance / spectrum: SVCCA's reduction per frequency (see `svcca`); none by default.
    """
    if x.ndim != 4 or y.ndim != 4:
        raise ValueError(
            f"dft_cca needs (N, C, H, W) activations, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[2:] != y.shape[2:]:
        raise ValueError(
            f"dft_cca needs equal spatial sizes, got {tuple(x.shape[2:])} and "
            f"{tuple(y.shape[2:])}; resize one side first (torch.nn.functional.interpolate)"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X has {x.shape[0]} inputs but Y has {y.shape[0]}; they must match")
    dt = compute_dtype(x, dtype)
    # cca() validates the transformed data again; NaN/Inf would spread over every frequency.
    x, y = as_activations(x, "X", dt), as_activations(y, "Y", dt)
    fx = torch.fft.fft2(x, norm="ortho").permute(2, 3, 0, 1)  # (H, W, N, C)
    fy = torch.fft.fft2(y, norm="ortho").permute(2, 3, 0, 1)
    return cca(fx, fy, keep=keep, variance=variance, spectrum=spectrum)
