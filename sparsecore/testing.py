"""Test helpers shared by the test suite (and usable by downstream projects).

The accuracy rule (flash-attention's): compute a float64 reference; the kernel's error
against it must be at most `factor` times the error of the same-dtype dense PyTorch
computation (plus a tiny absolute floor, so that exact float64 paths compare sanely).
"""

from __future__ import annotations

import torch


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| computed in float64 (0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - ref.detach().double()).abs().max().item()


def assert_error_within(
    out: torch.Tensor,
    ref64: torch.Tensor,
    dense_same_dtype: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float | None = None,
    what: str = "output",
) -> None:
    """Assert `out` is at most `factor` x as far from `ref64` as the dense computation is.

    out: the sparse kernel's result; ref64: float64 reference of the same shape;
    dense_same_dtype: the dense PyTorch computation in out's dtype.
    """
    if out.shape != ref64.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{what}: non-finite values in the kernel's result")
    if atol is None:
        eps = torch.finfo(out.dtype).eps if out.is_floating_point() else 0.0
        scale = ref64.abs().max().item() if ref64.numel() else 0.0
        atol = 8 * eps * max(scale, 1.0)
    err = max_err(out, ref64)
    dense_err = max_err(dense_same_dtype, ref64)
    bound = factor * dense_err + atol
    if err > bound:
        raise AssertionError(
            f"{what}: max error {err:.3e} exceeds {factor} x dense error {dense_err:.3e} "
            f"+ atol {atol:.1e} (dtype {out.dtype})"
        )
