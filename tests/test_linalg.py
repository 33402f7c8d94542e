"""sparsecore.linalg (batched svd / svdvals / eigh) against float64 LAPACK (torch.linalg)."""

from __future__ import annotations

import pytest
import torch

import sparsecore
from sparsecore import linalg
from sparsecore._dispatch import NotSupportedError, use_backend
from sparsecore.testing import LINALG_TOL as TOL
from sparsecore.testing import check_eigh as _check_eigh
from sparsecore.testing import check_svd as _check_svd
from sparsecore.testing import orth_err as _orth_err
from sparsecore.testing import random_symmetric as _random_symmetric
from sparsecore.testing import special_matrices as _special_matrices
from sparsecore.testing import with_singular_values as _with_singular_values

BACKENDS = ["cpp", "reference"]
DTYPES = [torch.float32, torch.float64]
def _backend(name: str):
    if name == "cpp" and not sparsecore.has_cpu_ext():
        pytest.skip("C++ extension not built")
    return use_backend(name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (16, 16), (20, 7), (7, 20), (45, 45)])
def test_svd_random(backend: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    A = torch.randn(2, 3, *shape, dtype=dtype)
    with _backend(backend):
        U, S, Vh = linalg.svd(A)
        S2 = linalg.svdvals(A)
    _check_svd(A, U, S, Vh)
    torch.testing.assert_close(S2, S, rtol=0, atol=10 * TOL[dtype] * S.max().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_matches_reference_vectors(dtype: torch.dtype) -> None:
    """Same sign convention on both backends: vectors agree where values are well separated."""
    torch.manual_seed(0)
    A = torch.randn(4, 12, 9, dtype=dtype)
    with _backend("cpp"):
        U, S, Vh = linalg.svd(A)
        L, Q = linalg.eigh(A.mT @ A)
    with _backend("reference"):
        Ur, Sr, Vhr = linalg.svd(A)
        Lr, Qr = linalg.eigh(A.mT @ A)
    atol = 1e3 * TOL[dtype]
    torch.testing.assert_close(U, Ur, rtol=0, atol=atol)
    torch.testing.assert_close(Vh, Vhr, rtol=0, atol=atol)
    torch.testing.assert_close(Q, Qr, rtol=0, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,cond", [(torch.float64, 1e6), (torch.float32, 1e3), (torch.float32, 1e4)]
)
def test_svd_ill_conditioned(backend: str, dtype: torch.dtype, cond: float) -> None:
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), 24, dtype=torch.float64)
    A = _with_singular_values(s, 30, 24).to(dtype)
    with _backend(backend):
        _check_svd(A, *linalg.svd(A))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_svd_rank_deficient_repeated_zero(backend: str, dtype: torch.dtype) -> None:
    f64 = torch.float64
    low_rank = torch.randn(3, 30, 5, dtype=f64) @ torch.randn(3, 5, 20, dtype=f64)
    repeated = _with_singular_values(torch.tensor([3.0] * 5 + [1.0] * 10 + [0.5] * 5), 20, 20)
    zeros = torch.zeros(2, 6, 4, dtype=dtype)
    # Exactly rank-deficient by a zero row: a roundoff-level column used to keep Jacobi
    # rotating forever (found through sparsecore.similarity); both the SIMD (n <= 32) and
    # the per-matrix paths.
    zero_rows = [torch.randn(4, 6, 6, dtype=dtype), torch.randn(2, 40, 40, dtype=dtype)]
    zero_rows[0][:, -1] = 0
    zero_rows[1][:, 3:6] = 0
    with _backend(backend):
        for A in (low_rank.to(dtype), repeated.to(dtype), zeros, *zero_rows):
            U, S, Vh = linalg.svd(A)
            _check_svd(A, U, S, Vh)
        assert (linalg.svdvals(zeros) == 0).all()
        S = linalg.svdvals(low_rank.to(dtype))
        assert (S[..., 5:] <= TOL[dtype] * S[..., :1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_by_one_and_empty(backend: str) -> None:
    A = torch.tensor([[[-2.5]], [[0.0]], [[4.0]]], dtype=torch.float64)
    with _backend(backend):
        U, S, Vh = linalg.svd(A)
        torch.testing.assert_close(S, torch.tensor([[2.5], [0.0], [4.0]], dtype=torch.float64))
        assert (U == 1).all()
        torch.testing.assert_close((U * S.unsqueeze(-2)) @ Vh, A)
        for shape in [(0, 4, 3), (2, 0, 3), (2, 3, 0)]:
            E = torch.randn(shape)
            U, S, Vh = linalg.svd(E)
            k = min(shape[1:])
            assert U.shape == (shape[0], shape[1], k) and S.shape == (shape[0], k)
            assert Vh.shape == (shape[0], k, shape[2])
        L, Q = linalg.eigh(torch.randn(0, 5, 5))
        assert L.shape == (0, 5) and Q.shape == (0, 5, 5)


@pytest.mark.parametrize("fn", ["svd", "svdvals", "eigh"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_raises(fn: str, bad: float) -> None:
    A = torch.randn(3, 5, 5)
    A[1, 3, 2] = bad  # in the triangle eigh reads
    with pytest.raises(ValueError, match="NaN or Inf"):
        getattr(linalg, fn)(A)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("n", [3, 4, 16])  # 9 entries: the scalar tail of the SIMD scan
def test_cpp_kernel_rejects_non_finite_itself(bad: float, n: int) -> None:
    if not sparsecore.has_cpu_ext():
        pytest.skip("C++ extension not built")
    for i, j in [(0, 0), (n - 1, n - 1)]:
        A = torch.randn(3, n, n)
        A[2, i, j] = bad
        with pytest.raises(RuntimeError, match="matrix 2 .* NaN or Inf"):
            torch.ops.sparsecore._svd_jacobi_cpu(A, False)


def test_dispatch_refusals() -> None:
    big = torch.randn(1, 513, 2)
    reasons = linalg._svd_dispatch.reasons(big)
    assert any("above 512" in r for r in reasons["cpp"]) and reasons["reference"] == []
    with use_backend("cpp"), pytest.raises(NotSupportedError, match="above 512"):
        linalg.svdvals(big)
    S = linalg.svdvals(big)  # falls back to torch.linalg
    torch.testing.assert_close(S, torch.linalg.svdvals(big))
    with pytest.raises(TypeError, match="float32 or float64"):
        linalg.svd(torch.ones(2, 3, 3, dtype=torch.int64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 9, 16, 50])
def test_eigh_random(backend: str, dtype: torch.dtype, n: int) -> None:
    S = _random_symmetric(6, n, dtype)
    X = torch.randn(2, 2 * n, n, dtype=dtype)
    gram = X.mT @ X + torch.eye(n, dtype=dtype)
    with _backend(backend):
        _check_eigh(S, *linalg.eigh(S))
        _check_eigh(-gram, *linalg.eigh(-gram))
        junk = S.clone()
        junk.triu(1).normal_()  # the ignored triangle must not matter
        _check_eigh(junk, *linalg.eigh(junk, UPLO="L"), lower=True)
        _check_eigh(junk, *linalg.eigh(junk, UPLO="U"), lower=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_eigh_repeated_and_zero(backend: str, dtype: torch.dtype) -> None:
    Q, _ = torch.linalg.qr(torch.randn(3, 12, 12, dtype=torch.float64))
    lam = torch.tensor([-2.0] * 4 + [0.0] * 3 + [2.0] * 5, dtype=torch.float64)
    A = ((Q * lam) @ Q.mT).to(dtype)
    with _backend(backend):
        _check_eigh(A, *linalg.eigh(A))
        L, Q0 = linalg.eigh(torch.zeros(2, 7, 7, dtype=dtype))
    assert (L == 0).all() and _orth_err(Q0) <= TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_values(backend: str) -> None:
    A = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    X = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    with _backend(backend):
        assert torch.autograd.gradcheck(linalg.svdvals, (A,))
        assert torch.autograd.gradcheck(lambda a: linalg.svd(a)[1], (A,))
        # eigh reads one triangle; symmetrise so that every entry has a derivative (as torch's
        # own eigh gradcheck does).
        assert torch.autograd.gradcheck(lambda x: linalg.eigh(x + x.mT)[0], (X,))


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_vector_gradients_match_torch(shape: tuple[int, int]) -> None:
    """Gauge-invariant losses through U, Vh and Q: same gradient as torch.linalg."""
    A = torch.randn(2, *shape, dtype=torch.float64, requires_grad=True)
    k = min(shape)
    w = torch.randn(k, dtype=torch.float64)

    def loss_svd(f):
        U, S, Vh = f(A)
        return ((U * w) @ Vh).pow(2).sum() + (U[..., :1, :] * Vh[..., :, :1].mT).sum() + S.sum()

    g = torch.autograd.grad(loss_svd(linalg.svd), A)[0]
    g_ref = torch.autograd.grad(loss_svd(lambda a: torch.linalg.svd(a, full_matrices=False)), A)[0]
    torch.testing.assert_close(g, g_ref)

    n = shape[0]
    B = torch.randn(2, n, n, dtype=torch.float64)
    B = (B + B.mT).requires_grad_()
    wn = torch.randn(n, dtype=torch.float64)

    def loss_eigh(f):
        L, Q = f(B)
        return ((Q * wn) @ Q.mT).pow(2).sum() + (L * wn).sum()

    g = torch.autograd.grad(loss_eigh(linalg.eigh), B)[0]
    g_ref = torch.autograd.grad(loss_eigh(torch.linalg.eigh), B)[0]
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype: torch.dtype) -> None:
    A = torch.randn(3, 5, 4, dtype=dtype)
    S = torch.randn(3, 4, 4, dtype=dtype)
    S = S + S.mT
    torch.library.opcheck(linalg._svd_op, (A,))
    torch.library.opcheck(linalg._svdvals_op, (A,))
    torch.library.opcheck(linalg._eigh_op, (S, True))
    if dtype == torch.float64:
        Ag = A.clone().requires_grad_()
        Sg = S.clone().requires_grad_()
        torch.library.opcheck(linalg._svd_op, (Ag,))
        torch.library.opcheck(linalg._svdvals_op, (Ag,))
        torch.library.opcheck(linalg._eigh_op, (Sg, False))


# --- the two C++ kernels directly, whatever the size routing picks -----------------------

KERNELS = ["jacobi", "bidiag"]


def _kernel_svd(kernel: str, A: torch.Tensor, uv: bool = True):
    if not sparsecore.has_cpu_ext():
        pytest.skip("C++ extension not built")
    return getattr(torch.ops.sparsecore, f"_svd_{kernel}_cpu")(A, uv)


def _kernel_eigh(kernel: str, A: torch.Tensor, lower: bool = True):
    if not sparsecore.has_cpu_ext():
        pytest.skip("C++ extension not built")
    return getattr(torch.ops.sparsecore, f"_eigh_{kernel}_cpu")(A, lower)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch,m,n",
    [(3, 1, 1), (5, 2, 5), (5, 5, 2), (8, 16, 16), (5, 33, 33), (9, 40, 17), (3, 17, 40),
     (6, 100, 100), (2, 130, 64), (2, 64, 130)],
)
def test_kernel_svd_random(kernel: str, dtype: torch.dtype, batch: int, m: int, n: int) -> None:
    """Both kernels on odd shapes and batch sizes that leave partial groups of four."""
    A = torch.randn(batch, m, n, dtype=dtype)
    U, S, Vh = _kernel_svd(kernel, A)
    _check_svd(A, U, S, Vh)
    S2 = _kernel_svd(kernel, A, False)[1]
    torch.testing.assert_close(S2, S, rtol=0, atol=10 * TOL[dtype] * S.max().item())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_svd_special(kernel: str, dtype: torch.dtype) -> None:
    for name, A in _special_matrices(dtype).items():
        U, S, Vh = _kernel_svd(kernel, A)
        try:
            _check_svd(A, U, S, Vh)
        except AssertionError as exc:
            raise AssertionError(f"{kernel} {name}: {exc}") from exc


def test_bidiag_float32_double_accumulation_special() -> None:
    """float32 above 128 accumulates the QR rotations in double (zero diagonals chased out
    through the double factors too): the hard cases at 130 and eigh with repeated values."""
    for name, A in _special_matrices(torch.float32, n=130).items():
        U, S, Vh = _kernel_svd("bidiag", A)
        try:
            _check_svd(A, U, S, Vh)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    Q, _ = torch.linalg.qr(torch.randn(2, 140, 140, dtype=torch.float64))
    lam = torch.tensor([-2.0] * 40 + [0.0] * 30 + [2.0] * 70, dtype=torch.float64)
    S = ((Q * lam) @ Q.mT).float()
    _check_eigh(S, *_kernel_eigh("bidiag", S))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n", [(16, 16), (9, 9), (12, 5), (5, 12)])
def test_small_simd_groups_mixed_cases(dtype: torch.dtype, m: int, n: int) -> None:
    """The SIMD-across-batch Jacobi (<= 32) finishes full-rank matrices for a whole group
    at once and the rank-deficient / zero ones per matrix: groups holding both."""
    special = _special_matrices(dtype, n=max(m, n)).values()
    hard = [A[..., :m, :n] for A in special if A.shape[-2] >= m and A.shape[-1] >= n]
    hard.append(torch.zeros(1, m, n, dtype=dtype))
    rnd = torch.randn(len(hard) * 2, m, n, dtype=dtype)
    pieces = []
    for i, A in enumerate(hard):
        pieces += [rnd[2 * i:2 * i + 1], A.reshape(-1, m, n)[:2], rnd[2 * i + 1:2 * i + 2]]
    A = torch.cat(pieces).contiguous()
    U, S, Vh = _kernel_svd("jacobi", A)
    for b in range(A.shape[0]):  # one at a time: a failure names the matrix
        try:
            _check_svd(A[b:b + 1], U[b:b + 1], S[b:b + 1], Vh[b:b + 1])
        except AssertionError as exc:
            raise AssertionError(f"matrix {b}: {exc}") from exc
    S2 = _kernel_svd("jacobi", A, False)[1]
    torch.testing.assert_close(S2, S, rtol=0, atol=10 * TOL[dtype] * S.max().item())


# Jacobi's eigh runs automatically only up to 16 x 16 in float32, 8 x 8 in float64
# (EIGH_JACOBI_MAX_SIZE); at 100 x 100 in
# float32 its orthogonality is ~1.5e-5 (measured), at the edge of the n / 64 * 1e-5 bound,
# so it is checked up to 50 here and the bidiagonal kernel up to 100.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kernel,batch,n",
    [(k, b, n) for k in KERNELS for b, n in [(3, 1), (5, 2), (7, 9), (5, 50)]]
    + [("bidiag", 4, 100)],
)
def test_kernel_eigh(kernel: str, dtype: torch.dtype, batch: int, n: int) -> None:
    S = _random_symmetric(batch, n, dtype)
    _check_eigh(S, *_kernel_eigh(kernel, S))
    X = torch.randn(batch, 2 * n, n, dtype=dtype)
    gram = X.mT @ X
    _check_eigh(-gram, *_kernel_eigh(kernel, -gram))
    junk = S.clone()
    junk.triu(1).normal_()
    _check_eigh(junk, *_kernel_eigh(kernel, junk, False), lower=False)
    Q, _ = torch.linalg.qr(torch.randn(3, 24, 24, dtype=torch.float64))
    lam = torch.tensor([-2.0] * 8 + [0.0] * 6 + [2.0] * 10, dtype=torch.float64)
    A = ((Q * lam) @ Q.mT).to(dtype)
    _check_eigh(A, *_kernel_eigh(kernel, A))
    L, Q0 = _kernel_eigh(kernel, torch.zeros(2, 30, 30, dtype=dtype))
    assert (L == 0).all() and _orth_err(Q0) <= TOL[dtype]


@pytest.mark.parametrize("op", ["_svd_bidiag_cpu", "_eigh_bidiag_cpu"])
def test_bidiag_kernel_rejects_non_finite(op: str) -> None:
    if not sparsecore.has_cpu_ext():
        pytest.skip("C++ extension not built")
    A = torch.randn(6, 20, 20)
    A[4, 3, 1] = float("inf")
    with pytest.raises(RuntimeError, match="matrix 4 .* NaN or Inf"):
        getattr(torch.ops.sparsecore, op)(A, True)


def test_float32_at_the_routing_limits() -> None:
    """float32 through the bidiagonal kernel where it is chosen automatically up to the
    largest sizes: svdvals at 512 (its QR iteration runs in double: values within ~1e-7 of
    ||A||, where a float iteration was at 1.4e-5), svd at 256 and eigh at 128, against
    float64 LAPACK."""
    if not sparsecore.has_cpu_ext():
        pytest.skip("C++ extension not built")
    assert linalg.CPP_AUTO_MAX_SIZE["svdvals"][torch.float32] == 512
    assert linalg.CPP_AUTO_MAX_SIZE["eigh"][torch.float32] == 128
    assert linalg.CPP_AUTO_MAX_SIZE["svd"][torch.float32] == 256
    A = torch.randn(2, 512, 500)
    ref = torch.linalg.svdvals(A.double())
    err = ((linalg.svdvals(A).double() - ref).abs().amax(-1) / ref[:, 0]).max().item()
    assert err <= 1e-6, err
    # Above 128 the rotations are accumulated in double: orthogonality ~1e-6 at 256, where
    # float accumulation reached 1.2e-5; held here to the level of n = 64 (1e-5).
    A = torch.randn(3, 256, 250)
    U, S, Vh = linalg.svd(A)
    _check_svd(A, U, S, Vh)
    assert max(_orth_err(U), _orth_err(Vh.mT)) <= 1e-5
    S = _random_symmetric(4, 128, torch.float32)
    _check_eigh(S, *linalg.eigh(S))
    L = linalg.eigh(S)[0].double()
    ref = torch.linalg.eigvalsh(S.double())
    assert ((L - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item() <= 1e-5


def test_size_routing_picks_each_kernel() -> None:
    """The automatic choice runs Jacobi at the small sizes and the bidiagonal kernel above,
    with the same results (values) either way."""
    if not sparsecore.has_cpu_ext():
        pytest.skip("C++ extension not built")
    for dtype in DTYPES:
        small = linalg.JACOBI_MAX_SIZE[dtype]
        for n in (small, small + 1):
            A = torch.randn(5, n, n, dtype=dtype)
            expect = "jacobi" if n <= small else "bidiag"
            S_auto = linalg.svdvals(A)
            S_kernel = _kernel_svd(expect, A, False)[1]
            torch.testing.assert_close(S_auto, S_kernel, rtol=0, atol=0)
        small = linalg.EIGH_JACOBI_MAX_SIZE[dtype]
        for n in (small, small + 1):
            S = _random_symmetric(5, n, dtype)
            expect = "jacobi" if n <= small else "bidiag"
            torch.testing.assert_close(linalg.eigh(S)[0], _kernel_eigh(expect, S)[0], rtol=0,
                                       atol=0)
