"""Triton batched Jacobi SVD / eigh (kernels/linalg.py through sparsecore.linalg's "triton"
backend) against float64 LAPACK.

`cpu` cases run on CPU tensors under TRITON_INTERPRET=1 (set by the conftest when there is no
GPU) with the backend forced; `cuda` cases run on a GPU and skip cleanly without one.
"""

from __future__ import annotations

import pytest
import torch

from sparsecore import linalg
from sparsecore._dispatch import NotSupportedError, use_backend
from sparsecore.testing import LINALG_TOL as TOL
from sparsecore.testing import assert_error_within, device_dtype_params, run_uninterpreted
from sparsecore.testing import check_eigh as _check_eigh
from sparsecore.testing import check_svd as _check_svd
from sparsecore.testing import orth_err as _orth_err
from sparsecore.testing import random_symmetric as _random_symmetric
from sparsecore.testing import special_matrices as _special_matrices
from sparsecore.testing import with_singular_values as _with_singular_values

tk = pytest.importorskip("sparsecore.kernels.linalg")
_launch = pytest.importorskip("sparsecore.kernels._launch")

INTERPRETED = _launch.is_interpreted(tk._jacobi_svd_kernel)
DEVICE_DTYPES = device_dtype_params(
    INTERPRETED,
    {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64)},
)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 5), (5, 3), (16, 16), (20, 7), (7, 20),
                                   (32, 32)])
def test_svd(device: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    A = torch.randn(3, *shape, dtype=dtype)
    with use_backend("triton"):
        U, S, Vh = linalg.svd(A.to(device))
        S2 = linalg.svdvals(A.to(device))
    _check_svd(A, U.cpu(), S.cpu(), Vh.cpu())
    torch.testing.assert_close(S2.cpu(), S.cpu(), rtol=0, atol=10 * TOL[dtype] * S.max().item())


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_svd_special(device: str, dtype: torch.dtype) -> None:
    """Rank-deficient, repeated, graded, identity, zero, zero rows / columns, bidiagonal with
    zero diagonal entries: U stays orthonormal where singular values vanish."""
    for name, A in _special_matrices(dtype, n=9).items():  # small: the interpreter is slow
        with use_backend("triton"):
            U, S, Vh = linalg.svd(A.to(device))
        try:
            _check_svd(A, U.cpu(), S.cpu(), Vh.cpu())
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("n", [1, 2, 9, 16])
def test_eigh(device: str, dtype: torch.dtype, n: int) -> None:
    S = _random_symmetric(3, n, dtype)
    X = torch.randn(2, 2 * n, n, dtype=dtype)
    gram = X.mT @ X
    junk = S.clone()
    junk.triu(1).normal_()
    with use_backend("triton"):
        _check_eigh(S, *[t.cpu() for t in linalg.eigh(S.to(device))])
        _check_eigh(-gram, *[t.cpu() for t in linalg.eigh(-gram.to(device))])
        _check_eigh(junk, *[t.cpu() for t in linalg.eigh(junk.to(device), UPLO="U")],
                    lower=False)
        L, Q = linalg.eigh(torch.zeros(2, n, n, dtype=dtype, device=device))
    assert (L == 0).all() and _orth_err(Q.cpu()) <= TOL[dtype]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_eigh_largest(device: str, dtype: torch.dtype) -> None:
    S = _random_symmetric(2, 32, dtype)
    with use_backend("triton"):
        _check_eigh(S, *[t.cpu() for t in linalg.eigh(S.to(device))])


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_eigh_repeated(device: str, dtype: torch.dtype) -> None:
    Q, _ = torch.linalg.qr(torch.randn(3, 12, 12, dtype=torch.float64))
    lam = torch.tensor([-2.0] * 4 + [0.0] * 3 + [2.0] * 5, dtype=torch.float64)
    A = ((Q * lam) @ Q.mT).to(dtype)
    with use_backend("triton"):
        _check_eigh(A, *[t.cpu() for t in linalg.eigh(A.to(device))])


def _svd_loss(svd, A: torch.Tensor) -> torch.Tensor:
    """Through U, S and Vh, invariant to the sign of each singular pair."""
    U, S, Vh = svd(A)
    w = torch.linspace(1.0, 2.0, S.shape[-1], dtype=A.dtype, device=A.device)
    return ((U * w) @ Vh).pow(2).sum() + (U[..., :1, :] * Vh[..., :, :1].mT).sum() + S.sum()


def _eigh_loss(eigh, A: torch.Tensor) -> torch.Tensor:
    """Through L and Q, invariant to the sign of each eigenvector."""
    L, Q = eigh(A)
    w = torch.linspace(-1.0, 1.0, L.shape[-1], dtype=A.dtype, device=A.device)
    return ((Q * w) @ Q.mT).pow(2).sum() + (L * w).sum()


def _svdvals_loss(svdvals, A: torch.Tensor) -> torch.Tensor:
    S = svdvals(A)
    return (S * torch.linspace(1.0, 2.0, S.shape[-1], dtype=A.dtype, device=A.device)).sum()


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_gradients(device: str, dtype: torch.dtype) -> None:
    """Backward of svd / svdvals / eigh on the Triton forward against torch.linalg's float64
    gradients (float32: within the bound set by torch.linalg's float32 gradients).
    Well-separated spectra: the vector gradients divide by the gaps."""
    s = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(2, 5, 5, dtype=torch.float64))
    sym = (Q * torch.tensor([-2.0, -0.5, 1.0, 2.5, 4.0], dtype=torch.float64)) @ Q.mT
    cases = [
        ("svd", _svd_loss, linalg.svd, lambda a: torch.linalg.svd(a, full_matrices=False),
         _with_singular_values(s, 6, 4, batch=2)),
        ("svd wide", _svd_loss, linalg.svd, lambda a: torch.linalg.svd(a, full_matrices=False),
         _with_singular_values(s, 4, 6, batch=2)),
        ("svdvals", _svdvals_loss, linalg.svdvals, torch.linalg.svdvals,
         _with_singular_values(s, 6, 4, batch=2)),
        ("eigh", _eigh_loss, linalg.eigh, torch.linalg.eigh, sym),
    ]

    def grad(loss, f, A: torch.Tensor) -> torch.Tensor:
        A = A.detach().requires_grad_(True)
        return torch.autograd.grad(loss(f, A), A)[0].cpu()

    for what, loss, ours, theirs, A64 in cases:
        A = A64.to(device, dtype)
        with use_backend("triton"):
            g = grad(loss, ours, A)
        g64 = grad(loss, theirs, A.double().cpu())
        if dtype == torch.float64:
            torch.testing.assert_close(g, g64, msg=what)
        else:
            assert_error_within(g, g64, grad(loss, theirs, A), what=f"{what} gradient")


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRETED, reason="TRITON_INTERPRET is not set")
def test_refusals_and_errors() -> None:
    big = torch.randn(2, 33, 4)
    reasons = linalg._svd_dispatch.reasons(big)["triton"]
    assert any("above 32" in r for r in reasons)
    with use_backend("triton"), pytest.raises(NotSupportedError, match="above 32"):
        linalg.svd(big)
    A = torch.randn(3, 4, 4)
    A[1, 2, 2] = float("nan")
    with use_backend("triton"), pytest.raises(ValueError, match="NaN or Inf"):
        linalg.svd(A)
    with pytest.raises(TypeError, match="float32 or float64"):
        tk.jacobi_svd(torch.ones(2, 3, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="batch, m, n"):
        tk.jacobi_svd(torch.ones(3, 3))
    with pytest.raises(ValueError, match="up to 32"):
        tk.jacobi_svd(torch.ones(1, 40, 3))


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRETED, reason="TRITON_INTERPRET is not set")
def test_kernel_rotations_and_sweeps() -> None:
    """The kernel's own output: M V = X with orthogonal V and mutually orthogonal columns
    of X, in a handful of sweeps."""
    A = torch.randn(4, 12, 12, dtype=torch.float64)
    X, V, sweeps = tk.jacobi_svd(A)
    torch.testing.assert_close(A @ V, X, rtol=0, atol=1e-12)
    assert _orth_err(V) <= 1e-13
    G = X.mT @ X
    off = G - torch.diag_embed(torch.diagonal(G, dim1=-2, dim2=-1))
    assert off.abs().max().item() <= 1e-12 * G.abs().max().item()
    assert ((sweeps >= 3) & (sweeps <= 12)).all()


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparsecore.kernels import linalg

fn = linalg._jacobi_svd_kernel
for dtype in ("fp32", "fp64"):
    for R, C in ((32, 32), (32, 8), (2, 2)):
        sig = {"m_ptr": "*" + dtype, "v_ptr": "*" + dtype, "status_ptr": "*i32",
               "tol": dtype, "tiny": dtype, "R": "constexpr", "C": "constexpr",
               "MAX_SWEEPS_": "constexpr"}
        src = ASTSource(fn, sig, constexprs={"R": R, "C": C, "MAX_SWEEPS_": linalg.MAX_SWEEPS})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 4 if R * C <= 256 else 8})
        assert kernel.metadata.shared <= 227 * 1024, (dtype, R, C, kernel.metadata.shared)
"""


@pytest.mark.slow
def test_kernel_compiles_for_sm90() -> None:
    """Without a GPU the interpreter cannot catch compile errors: compile the Jacobi kernel
    ahead of time for an H100 (sm_90), both dtypes, in a process without TRITON_INTERPRET."""
    import importlib.util

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend")
    run = run_uninterpreted(_COMPILE_SCRIPT)
    assert run.returncode == 0, run.stderr[-3000:]
