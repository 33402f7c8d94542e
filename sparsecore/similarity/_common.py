"""Input handling shared by every metric: validation, compute dtype, centering, dead channels.

Activations are (..., n, p): n data points (rows), p channels, optional leading batch dims.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def compute_dtype(x: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a metric computes in: float64 on CPU; float32 on GPU unless the input is
    already float64 (or `dtype` says otherwise). Complex inputs get the complex twin."""
    if dtype is None:
        on_cpu = x.device.type == "cpu"
        dtype = (
            torch.float64
            if on_cpu or x.dtype in (torch.float64, torch.complex128)
            else (torch.float32)
        )
    if x.is_complex() and not dtype.is_complex:
        dtype = _COMPLEX_OF[dtype]
    return dtype


def as_activations(
    x: Tensor | np.ndarray, name: str, dtype: torch.dtype | None = None, min_points: int = 2
) -> Tensor:
    """Validate activations (..., n, p) and cast them to the compute dtype.

    Raises ValueError for fewer than 2 dims, fewer than `min_points` data points, or
    NaN/Inf entries.
    """
    if not isinstance(x, Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.ndim < 2:
        raise ValueError(f"{name}: expected activations of shape (..., n, p), got {tuple(x.shape)}")
    if x.shape[-2] < min_points:
        raise ValueError(
            f"{name}: need at least {min_points} data points (rows), got shape {tuple(x.shape)}"
        )
    if not (x.is_floating_point() or x.is_complex()):
        x = x.double()
    bad = ~torch.isfinite(x)
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN/Inf entries out of {x.numel()} (shape "
            f"{tuple(x.shape)}); similarity is undefined for them. Check the model for "
            "divergence or float16 overflow before comparing."
        )
    return x.to(compute_dtype(x, dtype))


def check_same_points(x: Tensor, y: Tensor, names: tuple[str, str] = ("X", "Y")) -> None:
    """Both sides must hold the same n data points (and broadcastable batch dims)."""
    if x.shape[-2] != y.shape[-2]:
        raise ValueError(
            f"{names[0]} has {x.shape[-2]} data points but {names[1]} has {y.shape[-2]} "
            f"(shapes {tuple(x.shape)} and {tuple(y.shape)}); rows must be the same inputs"
        )
    try:
        torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    except RuntimeError as exc:
        raise ValueError(
            f"batch dims of {names[0]} {tuple(x.shape[:-2])} and {names[1]} "
            f"{tuple(y.shape[:-2])} do not broadcast"
        ) from exc


def prepare_pair(
    x: Tensor | np.ndarray, y: Tensor | np.ndarray, dtype: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """Validate a pair of activations and bring both to one compute dtype."""
    x = as_activations(x, "X", dtype)
    y = as_activations(y, "Y", x.dtype)
    if x.dtype != y.dtype:
        common = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(common), y.to(common)
    check_same_points(x, y)
    return x, y


def center(x: Tensor) -> Tensor:
    """Subtract each channel's mean over the data points (dim -2)."""
    return x - x.mean(dim=-2, keepdim=True)


def dead_channels(col_norm: Tensor, col_absmax: Tensor, n: int) -> Tensor:
    """Channels (..., p) whose centered column is zero up to the rounding of centering.

    col_norm: ||x_c,j|| of the centered columns; col_absmax: max_i |x_ij| before centering.
    A channel counts as dead when col_norm <= 4 sqrt(n) eps col_absmax: constant (pruned or
    never-firing) channels, measured against their own magnitude, so a live channel of tiny
    scale is kept. Without centering this is exactly the all-zero columns.
    """
    eps = torch.finfo(col_norm.dtype).eps
    return col_norm <= 4 * math.sqrt(n) * eps * col_absmax


def warn_few_points(n: int, kx: int, ky: int, what: str) -> None:
    """CCA with n <= p + q data points has max(0, p + q - (n - 1)) correlations equal to 1 by
    construction (two subspaces of R^(n-1) that big must intersect): say so."""
    if n <= kx + ky:
        trivial = max(0, kx + ky - (n - 1))
        warnings.warn(
            f"{what}: n = {n} data points <= p + q = {kx} + {ky} kept directions; at least "
            f"{trivial} canonical correlations are 1 whatever the data. Use more data points "
            "(or SVCCA's reduction) for a meaningful comparison.",
            RuntimeWarning,
            stacklevel=3,
        )
