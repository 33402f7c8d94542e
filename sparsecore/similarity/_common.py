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
            f"(shapes {tuple(x.shape)} and {tuple(y.shape)}); rows must be the same inputs. "
            "Activations are (data points, channels) here; google/svcca's code takes "
            "(neurons, data points), which must be transposed."
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
    """Validate a pair of activations, bring both to one compute dtype and `rescale` each."""
    x = as_activations(x, "X", dtype)
    y = as_activations(y, "Y", x.dtype)
    if x.dtype != y.dtype:
        common = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(common), y.to(common)
    check_same_points(x, y)
    return rescale(x), rescale(y)


def pow2_scale(absmax: Tensor) -> Tensor:
    """The power of two s that brings s * absmax into [0.5, 1) (1 where absmax is 0).

    Multiplying data by a power of two is exact, so a scale-invariant metric is unchanged
    bit for bit; what changes is that its products (Gram matrices, their squared norms,
    squared distances) no longer overflow or underflow, whatever the input's scale.
    """
    _, e = torch.frexp(absmax)
    e = (-e).clamp_max(math.floor(math.log2(torch.finfo(absmax.dtype).max)))
    one = torch.ones_like(absmax)
    return torch.where(absmax > 0, torch.ldexp(one, e), one)


def rescale(x: Tensor) -> Tensor:
    """x (..., n, p) times the power of two that brings each matrix's largest |entry| into
    [0.5, 1) (see `pow2_scale`). Every metric here is invariant to scaling a side."""
    if x.numel() == 0:
        return x
    scale = pow2_scale(x.detach().abs().amax(dim=(-2, -1), keepdim=True))
    return x * scale.to(x.dtype)


def center(x: Tensor) -> Tensor:
    """Subtract each channel's mean over the data points (dim -2)."""
    return x - x.mean(dim=-2, keepdim=True)


def centered_live(x: Tensor, name: str, what: str) -> Tensor:
    """Centered x (..., n, p) with its dead channels (`dead_channels`) set to exactly 0.

    Centering a constant channel leaves rounding noise, which a metric would otherwise
    compare as if it were signal. A side with no live channel at all has no variance:
    every metric is then 0/0, returned as NaN, with a warning that says so.
    """
    xc = center(x)
    dead = dead_channels(
        torch.linalg.vector_norm(xc, dim=-2), x.abs().amax(dim=-2), x.shape[-2]
    )
    if bool(dead.any()):
        xc = xc.masked_fill(dead.unsqueeze(-2), 0)
        warn_no_variance(dead.all(-1), name, what)
    return xc


def warn_no_variance(no_live: Tensor, name: str, what: str, stacklevel: int = 4) -> None:
    """Warn when a side (or some batch elements of it, no_live (...,) bool) has every
    channel dead: its similarities are NaN."""
    if not bool(no_live.any()):
        return
    where = ""
    if no_live.ndim:
        where = f" in {int(no_live.sum())} of {no_live.numel()} batch elements"
    warnings.warn(
        f"{what}: {name} has no variance{where}: every channel is constant up to rounding "
        "(dead or pruned channels, or a constant input), so the similarity is 0/0 and is "
        "returned as NaN.",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def transposed_hint(n: int, p: int, q: int) -> str:
    """A hint for inputs that may be (channels, data points) instead of (data points,
    channels): google/svcca's code takes (neurons, data points)."""
    if n >= max(p, q):
        return ""
    return (
        f" Rows are data points here: with n = {n} rows and {p} and {q} columns, check the "
        "layout; activations laid out as (neurons, data points), as google/svcca's code "
        "takes them, must be transposed."
    )


def warn_wide(x: Tensor, y: Tensor, what: str) -> None:
    """Warn when both sides have fewer data points (rows) than channels: biased CKA is
    then inflated toward 1, and the inputs are likely (channels, data points)."""
    n, p, q = x.shape[-2], x.shape[-1], y.shape[-1]
    if n < p and n < q:
        warnings.warn(
            f"{what}: fewer data points (n = {n} rows) than channels ({p} and {q}) on both "
            "sides; similarity estimated from so few points is unreliable."
            + transposed_hint(n, p, q),
            RuntimeWarning,
            stacklevel=3,
        )


def dead_channels(col_norm: Tensor, col_absmax: Tensor, n: int) -> Tensor:
    """Channels (..., p) whose centered column is zero up to the rounding of centering.

    col_norm: ||x_c,j|| of the centered columns; col_absmax: max_i |x_ij| before centering.
    A channel counts as dead when col_norm <= 4 sqrt(n) eps col_absmax: constant (pruned or
    never-firing) channels, measured against their own magnitude, so a live channel of tiny
    scale is kept. Without centering this is exactly the all-zero columns.
    """
    eps = torch.finfo(col_norm.dtype).eps
    return col_norm <= 4 * math.sqrt(n) * eps * col_absmax


def warn_few_points(
    n: int, kx: int, ky: int, what: str, widths: tuple[int, int] | None = None
) -> None:
    """CCA with n <= p + q data points has max(0, p + q - (n - 1)) correlations equal to 1 by
    construction (two subspaces of R^(n-1) that big must intersect): say so. widths: the
    two sides' channel counts (for the hint on transposed inputs)."""
    if n <= kx + ky:
        trivial = max(0, kx + ky - (n - 1))
        warnings.warn(
            f"{what}: n = {n} data points <= p + q = {kx} + {ky} kept directions; at least "
            f"{trivial} canonical correlations are 1 whatever the data. Use more data points "
            "(or SVCCA's reduction) for a meaningful comparison."
            + transposed_hint(n, *(widths or (kx, ky))),
            RuntimeWarning,
            stacklevel=3,
        )
