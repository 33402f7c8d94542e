"""Test helpers shared by the test suite (and usable by downstream projects).

The accuracy rule (flash-attention's): compute a float64 reference; the kernel's error
against it must be at most `factor` times the error of the same-dtype dense PyTorch
computation (plus a tiny absolute floor, so that exact float64 paths compare sanely).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def kernel_threads(n: int) -> Iterator[None]:
    """Run the C++ kernels on n OpenMP threads however small the work: sets torch's thread
    count and lowers the kernels' minimum work per thread (csrc/cpu/threads.h) to one
    multiply-add, so that small test shapes take every threaded path; both are restored on
    exit. Needs the C++ extension."""
    set_min_work = torch.ops.sparsecore._set_min_work_per_thread
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    previous = set_min_work(1)
    try:
        yield
    finally:
        set_min_work(previous)
        torch.set_num_threads(threads)


# --- sparsecore.linalg: results against float64 LAPACK ---------------------------------

# Accuracy levels relative to ||A|| (largest singular value / eigenvalue magnitude).
LINALG_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def linalg_tol(dtype: torch.dtype, n: int) -> float:
    """The bound for an n x n problem: LINALG_TOL, growing like eps * n beyond n = 64."""
    return LINALG_TOL[dtype] * max(1.0, n / 64)


def orth_err(V: torch.Tensor) -> float:
    """max |V^T V - I| over the batch, V (..., n, k)."""
    V = V.double()
    eye = torch.eye(V.shape[-1], dtype=torch.float64)
    return (V.mT @ V - eye).abs().max().item() if V.numel() else 0.0


def check_svd(A: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> None:
    """A thin SVD of A (..., m, n): U (..., m, k), S (..., k), Vh (..., k, n) against float64
    LAPACK: values, descending order, reconstruction, orthogonality, sign convention."""
    m, n = A.shape[-2:]
    k = min(m, n)
    assert U.shape == (*A.shape[:-2], m, k) and S.shape == (*A.shape[:-2], k)
    assert Vh.shape == (*A.shape[:-2], k, n)
    assert U.dtype == S.dtype == Vh.dtype == A.dtype
    A64 = A.double()
    S64 = torch.linalg.svdvals(A64)
    scale = S64[..., :1].clamp_min(1e-300) if k else S64
    tol = linalg_tol(A.dtype, max(m, n))
    assert ((S.double() - S64).abs() / scale).max().item() <= tol
    assert (S[..., :-1] >= S[..., 1:]).all(), "singular values not descending"
    rec = (U.double() * S.double().unsqueeze(-2)) @ Vh.double()
    nrm = A64.flatten(-2).norm(dim=-1).clamp_min(1e-300)
    assert ((rec - A64).flatten(-2).norm(dim=-1) / nrm).max().item() <= tol
    assert orth_err(U) <= tol
    assert orth_err(Vh.mT) <= tol
    if U.numel():  # sign convention: largest-|.| entry of each column of U positive
        top = U.gather(-2, U.abs().argmax(-2, keepdim=True))
        assert (top >= 0).all()


def with_singular_values(s: torch.Tensor, m: int, n: int, batch: int = 3) -> torch.Tensor:
    """(batch, m, n) float64 matrices with singular values s (random singular vectors)."""
    P, _ = torch.linalg.qr(torch.randn(batch, m, len(s), dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(batch, n, len(s), dtype=torch.float64))
    return (P * s) @ Q.mT


def random_symmetric(batch: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(batch, n, n) symmetric Gaussian matrices."""
    X = torch.randn(batch, n, n, dtype=torch.float64)
    return ((X + X.mT) / 2).to(dtype)


def check_eigh(A: torch.Tensor, L: torch.Tensor, Q: torch.Tensor, lower: bool = True) -> None:
    """eigh of the `lower` (or upper) triangle of A (..., n, n): L (..., n), Q (..., n, n)
    against float64 LAPACK: values, ascending order, residual, orthogonality, signs."""
    n = A.shape[-1]
    A64 = A.double()
    L64 = torch.linalg.eigvalsh(A64, UPLO="L" if lower else "U")
    scale = L64.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    tol = linalg_tol(A.dtype, n)
    assert ((L.double() - L64).abs() / scale).max().item() <= tol
    assert (L[..., :-1] <= L[..., 1:]).all(), "eigenvalues not ascending"
    sym = A64.tril() + A64.tril(-1).mT if lower else A64.triu() + A64.triu(1).mT
    res = sym @ Q.double() - Q.double() * L.double().unsqueeze(-2)
    assert (res.abs().amax((-2, -1)) / scale.squeeze(-1)).max().item() <= 4 * tol
    assert orth_err(Q) <= tol
    top = Q.gather(-2, Q.abs().argmax(-2, keepdim=True))
    assert (top >= 0).all()


def special_matrices(dtype: torch.dtype, n: int = 40) -> dict[str, torch.Tensor]:
    """Hard cases by name, each (batch, ~n, ~n): rank-deficient, repeated values, graded,
    identity, zero, zero rows / columns, bidiagonal with zero diagonal entries."""
    f64 = torch.float64
    out = {
        "low_rank": torch.randn(3, n + 7, 5, dtype=f64) @ torch.randn(3, 5, n, dtype=f64),
        "repeated": with_singular_values(
            torch.tensor([3.0] * (n // 4) + [1.0] * (n // 2) + [0.5] * (n - n // 4 - n // 2)),
            n, n),
        # A graded bidiagonal from 1 down to 1e-30: its tail deflates at once and its
        # (numerically) zero diagonal entries are chased out.
        "graded": (torch.diag_embed(torch.logspace(0, -30, n, dtype=f64))
                   + torch.diag_embed(0.5 * torch.logspace(0, -30, n - 1, dtype=f64), 1)
                   ).expand(4, n, n),
        "identity": torch.eye(n, dtype=f64).expand(2, n, n),
        "zeros": torch.zeros(2, n, n - 3, dtype=f64),
    }
    # Its transpose (lower bidiagonal): Householder vectors of squares below the range
    # (a reflector built from underflowed sums was not orthogonal before house() rescaled).
    out["graded_lower"] = out["graded"].mT
    rows = torch.randn(4, n, n, dtype=f64)
    rows[:, 3:6] = 0
    out["zero_rows"] = rows
    cols = torch.randn(4, n, n, dtype=f64)
    cols[:, :, -3:] = 0
    out["zero_cols"] = cols
    # Upper bidiagonal with zero diagonal entries inside and at the end: both ways of
    # chasing a zero diagonal out of the QR iteration.
    B = torch.diag_embed(torch.randn(2, n, dtype=f64)) + torch.diag_embed(
        torch.randn(2, n - 1, dtype=f64), 1)
    B[:, 0, 0] = B[:, n // 2, n // 2] = B[:, -1, -1] = 0
    out["bidiagonal_zero_diag"] = B
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


# --- Triton kernel tests: the same cases on the interpreter (CPU) and on a GPU ------------

NO_GPU = "needs a CUDA device and compiled (not interpreted) Triton kernels"


def triton_marks(interpreted: bool) -> dict[str, list]:
    """pytest marks per device: "cpu" runs only under TRITON_INTERPRET=1, "cuda" only with
    compiled kernels. `interpreted`: whether the kernel module was imported interpreted."""
    import pytest

    return {
        "cpu": [
            pytest.mark.interpreter,
            pytest.mark.skipif(not interpreted, reason="TRITON_INTERPRET is not set"),
        ],
        "cuda": [pytest.mark.gpu, pytest.mark.skipif(interpreted, reason=NO_GPU)],
    }


def device_dtype_params(
    interpreted: bool, dtypes: dict[str, tuple[torch.dtype, ...]]
) -> list:
    """pytest params (device, dtype) with triton_marks, ids like "cpu-float32"."""
    import pytest

    marks = triton_marks(interpreted)
    return [
        pytest.param(device, dtype, marks=marks[device], id=f"{device}-{str(dtype)[6:]}")
        for device, ds in dtypes.items()
        for dtype in ds
    ]


def run_uninterpreted(script: str):  # noqa: ANN201 - subprocess.CompletedProcess[str]
    """Run `python -c script` in a fresh process without TRITON_INTERPRET (the kernels compile
    for real there); returns the CompletedProcess with captured text output."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True)
