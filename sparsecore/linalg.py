"""Batched SVD, singular values and symmetric eigendecomposition of many small matrices.

`svd(A)`, `svdvals(A)` and `eigh(S)` take batches (..., m, n) of float32 / float64 matrices
and follow torch.linalg's conventions: singular values descending, eigenvalues ascending,
`full_matrices=False` shapes U (..., m, k), S (..., k), Vh (..., k, n) with k = min(m, n).

Sign convention (deterministic, the same on every backend): each left singular vector (column
of U) and each eigenvector (column of Q) has its largest-magnitude entry positive (the first
such entry on ties); the matching row of Vh is flipped with its column of U.

Backends (sparsecore._dispatch, forced with `use_backend("cpp" | "triton" | "reference")`):

- "cpp": csrc/cpu/linalg.cpp, OpenMP across the batch, CPU, float32 / float64, m, n <= 512;
  chosen automatically up to CPP_AUTO_MAX_SIZE[op][dtype] (svd: 256 in float32, 128 in
  float64; svdvals: 512; eigh: 128). Two SVD kernels, picked by size
  (JACOBI_MAX_SIZE): small matrices (<= 20 in float32, <= 12 in float64) run one-sided
  Jacobi with SIMD across the batch (eight float32 matrices per AVX2 register); larger ones
  run Golub-Kahan-Reinsch:
  Householder bidiagonalisation, implicit-shift QR on the bidiagonal (in double, also for
  float32 input) with eight matrices' chases in SIMD lanes, and the rotations applied to the
  vectors in cache-resident waves (accumulated in double for float32 above 128 x 128).
  eigh shifts the symmetric matrix to a semi-definite one by its Gershgorin bound, whose SVD
  is its eigendecomposition (same two kernels, EIGH_JACOBI_MAX_SIZE; only left vectors are
  accumulated), and takes the eigenvalues as Rayleigh quotients with the unshifted matrix.
  Singular values come out accurate to ~ eps * ||A|| (float32, bidiagonal kernel: the QR in
  double puts them closer to the truth than LAPACK's float32 SVD); eigenvalues to
  ~ eps * ||S||. Orthogonality of the vectors is about LAPACK's in float32; above 128 the
  rotations are accumulated in double (in float the O(n) sequential rotations through every
  vector entry lost an order of magnitude of it at 256-512). Measured errors per shape: see
  bench/RESULTS.md (linalg).
  Non-convergence raises a RuntimeError naming the matrix (the QR kernel first retries that
  matrix with Jacobi).
- "triton": kernels/linalg.py, one-sided Jacobi with one matrix per program (round-robin
  rotations, the matrix in registers), CUDA float32 / float64, m, n <= 32; sorting, the QR
  giving U and the sign convention are batch-level torch ops. Tested under
  TRITON_INTERPRET=1; GPU timings: see bench/RESULTS.md (linalg).
- "reference": torch.linalg (LAPACK / cuSOLVER), with the sign convention applied. Used for
  what the kernels refuse: larger sizes, other devices, a missing extension.

`full_matrices=True` is computed by torch.linalg.svd directly (same sign convention on the
first k columns). NaN or Inf input raises ValueError.

Autograd: gradients of S, U, Vh, L and Q follow torch.linalg's formulas (values always; the
vector terms are gauge-dependent where values repeat, as in torch). They are registered on
the custom ops with `register_autograd`, since each is a formula of the op's input and
outputs alone; the sparse layers use `autograd.Function` instead, because their backward
needs the weight's structure object and a choice made in the forward (see the module
docstring of sparsecore.nn.functional).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sparsecore._dispatch import Backend, Dispatcher, cpp_reasons, forced_backend, triton_reasons

__all__ = ["svd", "svdvals", "eigh", "CPP_MAX_SIZE", "CPP_AUTO_MAX_SIZE"]

# Largest m, n the C++ kernel takes (the small matrices it is built for); larger matrices go
# to torch.linalg.
CPP_MAX_SIZE = 512
# Largest m, n it is chosen for automatically, per op: where `python -m bench linalg` on the
# 2-core Zen 3 (torch.linalg = MKL LAPACK) measured it faster than torch.linalg and within the
# float32 accuracy target (1e-5 of ||A|| for values, reconstruction and orthogonality):
# - svd (vectors): up to 256 in float32 (the rotations accumulated in double there), up to 128
#   in float64 (its lead at 256 was too small to tell from run-to-run noise).
# - svdvals: every size up to 512 (the QR iteration runs in double, float32 included).
# - eigh: up to 128; LAPACK is faster beyond.
# Ratios and errors per size: see bench/RESULTS.md (linalg). Forcing use_backend("cpp")
# still runs the kernel up to CPP_MAX_SIZE.
CPP_AUTO_MAX_SIZE = {
    "svd": {torch.float32: 256, torch.float64: 128},
    "svdvals": {torch.float32: 512, torch.float64: 512},
    "eigh": {torch.float32: 128, torch.float64: 128},
}
_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class _MatrixArgs:
    """The argument of one svd / svdvals call: a batch A (b, m, n)."""

    A: torch.Tensor


@dataclass(frozen=True)
class _EighArgs:
    """The arguments of one eigh call: a batch A (b, n, n), read from its lower triangle when
    `lower` (else the upper)."""

    A: torch.Tensor
    lower: bool


def _cpp_reasons(op: str, A: torch.Tensor) -> list[str]:
    why = cpp_reasons([A])
    size = tuple(A.shape[-2:])
    if A.dim() == 3 and max(size) > CPP_MAX_SIZE:
        why.append(f"matrix size {size} above {CPP_MAX_SIZE} (torch.linalg runs those)")
    elif (A.dim() == 3 and A.dtype in _DTYPES and forced_backend() != "cpp"
          and max(size) > CPP_AUTO_MAX_SIZE[op][A.dtype]):
        why.append(f"matrix size {size} above {CPP_AUTO_MAX_SIZE[op][A.dtype]}: LAPACK is "
                   "faster there (force with use_backend('cpp'))")
    return why


def _reference_reasons(a: _MatrixArgs | _EighArgs) -> list[str]:
    if a.A.dtype not in _DTYPES:
        return [f"dtype {str(a.A.dtype).replace('torch.', '')} not in [float32, float64]"]
    return []


def _sign_fix(V: torch.Tensor) -> torch.Tensor:
    """+1/-1 per column of V (..., n, k) so that each column's largest-|.| entry is positive."""
    if V.shape[-2] == 0 or V.shape[-1] == 0:
        return V.new_ones(V.shape[:-2] + V.shape[-1:])
    idx = V.abs().argmax(dim=-2, keepdim=True)
    top = V.gather(-2, idx).squeeze(-2)
    return torch.where(top < 0, -1.0, 1.0).to(V.dtype)


def _svd_reference(a: _MatrixArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(a.A, full_matrices=False)
    sg = _sign_fix(U)
    return U * sg.unsqueeze(-2), S, Vh * sg.unsqueeze(-1)


# Up to this size (max(m, n)) the C++ SVD runs one-sided Jacobi with SIMD across the batch;
# above it, Householder bidiagonalisation + implicit-shift QR (csrc/cpu/bidiag.h): the
# largest size where Jacobi was faster on one and on two threads (the timings: see
# bench/RESULTS.md (linalg)).
JACOBI_MAX_SIZE = {torch.float32: 20, torch.float64: 12}
# The same for eigh (Jacobi on the shifted matrix vs the bidiagonal kernel on it).
EIGH_JACOBI_MAX_SIZE = {torch.float32: 16, torch.float64: 8}


def cpp_kernel(op: str, shape: tuple[int, ...], dtype: torch.dtype) -> str:
    """Which C++ kernel ("jacobi" or "bidiag") runs `op` on matrices of `shape` (..., m, n)."""
    small = EIGH_JACOBI_MAX_SIZE if op == "eigh" else JACOBI_MAX_SIZE
    return "jacobi" if max(shape[-2:]) <= small[dtype] else "bidiag"


def _cpp_op(op: str, A: torch.Tensor):
    """The C++ op (torch.ops.sparsecore._{svd,eigh}_{jacobi,bidiag}_cpu) that runs `op` on A."""
    family = "eigh" if op == "eigh" else "svd"
    return getattr(torch.ops.sparsecore, f"_{family}_{cpp_kernel(op, A.shape, A.dtype)}_cpu")


def _svd_cpp(a: _MatrixArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cpp_op("svd", a.A)(a.A, True)


def _svdvals_cpp(a: _MatrixArgs) -> torch.Tensor:
    return _cpp_op("svdvals", a.A)(a.A, False)[1]


def _svdvals_reference(a: _MatrixArgs) -> torch.Tensor:
    return torch.linalg.svdvals(a.A)


def _eigh_reference(a: _EighArgs) -> tuple[torch.Tensor, torch.Tensor]:
    L, Q = torch.linalg.eigh(a.A, UPLO="L" if a.lower else "U")
    return L, Q * _sign_fix(Q).unsqueeze(-2)


def _eigh_cpp(a: _EighArgs) -> tuple[torch.Tensor, torch.Tensor]:
    return _cpp_op("eigh", a.A)(a.A, a.lower)


# --- Triton (GPU; CPU only under TRITON_INTERPRET=1 when forced) ---------------------------
# kernels/linalg.py: one-sided Jacobi, one matrix per program, round-robin rotations. Up to
# TRITON_MAX_SIZE; the sorting, the QR that gives U and the sign convention are batch-level
# torch ops here. GPU timings: see bench/RESULTS.md (linalg).
TRITON_MAX_SIZE = 32


def _triton_linalg_reasons(a: _MatrixArgs | _EighArgs) -> list[str]:
    why = triton_reasons([a.A], _DTYPES)
    if a.A.dim() == 3 and max(a.A.shape[-2:]) > TRITON_MAX_SIZE:
        why.append(f"matrix size {tuple(a.A.shape[-2:])} above {TRITON_MAX_SIZE} (one matrix "
                   "per Triton program in registers)")
    return why


def _jacobi_triton(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X, S, V) with M V = X, columns of X orthogonal with norms S, M = A or A^T (wide A);
    sorted by descending S."""
    from sparsecore.kernels import linalg as tk

    X, V, _ = tk.jacobi_svd(A)
    S, order = X.norm(dim=-2).sort(dim=-1, descending=True, stable=True)
    X = X.gather(-1, order.unsqueeze(-2).expand_as(X))
    V = V.gather(-1, order.unsqueeze(-2).expand_as(V))
    return X, S, V


def _svd_triton(a: _MatrixArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    A = a.A
    X, S, V = _jacobi_triton(A)
    # Orthonormal left vectors even where a singular value is zero: a QR of the orthogonal
    # columns, signs aligned with them.
    Q, R = torch.linalg.qr(X)
    d = torch.diagonal(R, dim1=-2, dim2=-1)
    Q = Q * torch.where(d < 0, -1.0, 1.0).to(Q.dtype).unsqueeze(-2)
    U, Vh = (Q, V.mT) if A.shape[-2] >= A.shape[-1] else (V, Q.mT)
    sg = _sign_fix(U)
    return U * sg.unsqueeze(-2), S, Vh * sg.unsqueeze(-1)


def _svdvals_triton(a: _MatrixArgs) -> torch.Tensor:
    return _jacobi_triton(a.A)[1]


def _eigh_triton(a: _EighArgs) -> tuple[torch.Tensor, torch.Tensor]:
    # B = S + c I (Gershgorin: positive semi-definite); its right singular vectors from the
    # Jacobi rotations are eigenvectors (orthogonal by construction); eigenvalues are their
    # Rayleigh quotients with S.
    A = a.A
    S = A.tril() + A.tril(-1).mT if a.lower else A.triu() + A.triu(1).mT
    diag = torch.diagonal(S, dim1=-2, dim2=-1)
    off = S.abs().sum(-1) - diag.abs()
    shift = (off - diag).amax(-1).clamp_min(0)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    V = _jacobi_triton(S + shift[:, None, None] * eye)[2]
    L = ((S @ V) * V).sum(-2)
    L, order = L.sort(dim=-1, stable=True)
    Q = V.gather(-1, order.unsqueeze(-2).expand_as(V))
    return L, Q * _sign_fix(Q).unsqueeze(-2)


_svd_dispatch = Dispatcher(
    "linalg.svd",
    _MatrixArgs,
    [
        Backend("cpp", lambda a: _cpp_reasons("svd", a.A), _svd_cpp),
        Backend("triton", _triton_linalg_reasons, _svd_triton),
        Backend("reference", _reference_reasons, _svd_reference),
    ],
)
_svdvals_dispatch = Dispatcher(
    "linalg.svdvals",
    _MatrixArgs,
    [
        Backend("cpp", lambda a: _cpp_reasons("svdvals", a.A), _svdvals_cpp),
        Backend("triton", _triton_linalg_reasons, _svdvals_triton),
        Backend("reference", _reference_reasons, _svdvals_reference),
    ],
)
_eigh_dispatch = Dispatcher(
    "linalg.eigh",
    _EighArgs,
    [
        Backend("cpp", lambda a: _cpp_reasons("eigh", a.A), _eigh_cpp),
        Backend("triton", _triton_linalg_reasons, _eigh_triton),
        Backend("reference", _reference_reasons, _eigh_reference),
    ],
)


# --- custom ops on flattened batches (b, m, n) -------------------------------------------


@torch.library.custom_op("sparsecore::svd", mutates_args=())
def _svd_op(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a (b, m, n) batch -> U (b, m, k), S (b, k), Vh (b, k, n)."""
    U, S, Vh = _svd_dispatch(A)
    return U.contiguous(), S.contiguous(), Vh.contiguous()


@_svd_op.register_fake
def _(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, m, n = A.shape
    k = min(m, n)
    return A.new_empty(b, m, k), A.new_empty(b, k), A.new_empty(b, k, n)


@torch.library.custom_op("sparsecore::svdvals", mutates_args=())
def _svdvals_op(A: torch.Tensor) -> torch.Tensor:
    """Singular values (b, k) of a (b, m, n) batch, descending."""
    return _svdvals_dispatch(A).contiguous()


@_svdvals_op.register_fake
def _(A: torch.Tensor) -> torch.Tensor:
    b, m, n = A.shape
    return A.new_empty(b, min(m, n))


@torch.library.custom_op("sparsecore::eigh", mutates_args=())
def _eigh_op(A: torch.Tensor, lower: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (b, n) ascending and eigenvectors (b, n, n) of a symmetric (b, n, n) batch,
    read from its lower (or upper) triangle."""
    L, Q = _eigh_dispatch(A, lower)
    return L.contiguous(), Q.contiguous()


@_eigh_op.register_fake
def _(A: torch.Tensor, lower: bool) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, _ = A.shape
    return A.new_empty(b, n), A.new_empty(b, n, n)


# --- autograd (torch.linalg's formulas: FunctionsManual.cpp svd_backward / eigh) ---------


def _svd_backward_formula(
    U: torch.Tensor,
    S: torch.Tensor,
    Vh: torch.Tensor,
    gU: torch.Tensor | None,
    gS: torch.Tensor | None,
    gVh: torch.Tensor | None,
) -> torch.Tensor:
    m, n = U.shape[-2], Vh.shape[-1]
    k = S.shape[-1]
    if gU is None and gVh is None:
        assert gS is not None
        return (U * gS.unsqueeze(-2)) @ Vh
    V = Vh.mT
    gU = torch.zeros_like(U) if gU is None else gU
    gV = torch.zeros_like(V) if gVh is None else gVh.mT
    skew = lambda X: X - X.mT  # noqa: E731
    S2 = S * S
    E = S2.unsqueeze(-2) - S2.unsqueeze(-1)
    E.diagonal(dim1=-2, dim2=-1).fill_(1)
    UhgU = U.mT @ gU
    VhgV = V.mT @ gV
    gA = (skew(UhgU) * S.unsqueeze(-2) + S.unsqueeze(-1) * skew(VhgV)) / E
    if gS is not None:
        gA = gA + torch.diag_embed(gS)
    if m > k:
        gUSinv = gU / S.unsqueeze(-2)
        gA = U @ gA + gUSinv - U @ (U.mT @ gUSinv)
        return gA @ Vh
    if n > k:
        SinvgVh = gV.mT / S.unsqueeze(-1)
        gA = gA @ Vh + SinvgVh - (SinvgVh @ V) @ Vh
        return U @ gA
    return U @ gA @ Vh


def _svd_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    U, S, Vh = output
    ctx.save_for_backward(U, S, Vh)


def _svd_backward(ctx, gU, gS, gVh):  # noqa: ANN001, ANN202
    U, S, Vh = ctx.saved_tensors
    return _svd_backward_formula(U, S, Vh, gU, gS, gVh)


_svd_op.register_autograd(_svd_backward, setup_context=_svd_setup)


def _svdvals_setup(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor
) -> None:
    ctx.save_for_backward(inputs[0])


def _svdvals_backward(ctx, gS):  # noqa: ANN001, ANN202
    # The vectors are recomputed only when a gradient is asked for (the forward is values-only).
    (A,) = ctx.saved_tensors
    U, _, Vh = _svd_op(A)
    return (U * gS.unsqueeze(-2)) @ Vh


_svdvals_op.register_autograd(_svdvals_backward, setup_context=_svdvals_setup)


def _eigh_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    L, Q = output
    ctx.save_for_backward(L, Q)


def _eigh_backward(ctx, gL, gQ):  # noqa: ANN001, ANN202
    L, Q = ctx.saved_tensors
    if gQ is None:
        return (Q * gL.unsqueeze(-2)) @ Q.mT, None
    E = L.unsqueeze(-2) - L.unsqueeze(-1)
    E.diagonal(dim1=-2, dim2=-1).fill_(1)
    gA = (Q.mT @ gQ) / E
    gA.diagonal(dim1=-2, dim2=-1).copy_(gL if gL is not None else torch.zeros_like(L))
    return Q @ gA @ Q.mT, None


_eigh_op.register_autograd(_eigh_backward, setup_context=_eigh_setup)


# --- public API ------------------------------------------------------------------------


def _flatten(
    A: torch.Tensor, name: str, dispatcher: Dispatcher | None, *extra: object
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(b, m, n) view of A and its leading dims; rejects NaN / Inf here unless the C++
    kernel will run (it checks while loading each matrix, saving a pass over the batch)."""
    if A.dim() < 2:
        raise ValueError(
            f"sparsecore.linalg.{name}: expected (..., m, n), got shape {tuple(A.shape)}"
        )
    if A.dtype not in _DTYPES:
        raise TypeError(f"sparsecore.linalg.{name}: expected float32 or float64, got {A.dtype}")
    lead = tuple(A.shape[:-2])
    A3 = A.reshape(math.prod(lead), *A.shape[-2:])
    kernel_checks = dispatcher is not None and dispatcher.select(A3, *extra).name == "cpp"
    if not kernel_checks and not bool(torch.isfinite(A).all()):
        raise ValueError(f"sparsecore.linalg.{name}: input contains NaN or Inf")
    return A3, lead


@contextlib.contextmanager
def _nonfinite_as_value_error(name: str) -> Iterator[None]:
    """The C++ kernel's NaN / Inf report (a RuntimeError) as the ValueError raised here."""
    try:
        yield
    except RuntimeError as exc:
        if "NaN or Inf" in str(exc):
            raise ValueError(f"sparsecore.linalg.{name}: input contains NaN or Inf") from exc
        raise


def svd(
    A: torch.Tensor, full_matrices: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (..., m, n) -> U (..., m, k), S (..., k) descending, Vh (..., k, n); k = min(m, n).

    `full_matrices=True` (U (..., m, m), Vh (..., n, n)) is computed by torch.linalg.svd.
    """
    A3, lead = _flatten(A, "svd", None if full_matrices else _svd_dispatch)
    if full_matrices:
        U, S, Vh = torch.linalg.svd(A, full_matrices=True)
        k = S.shape[-1]
        sg = _sign_fix(U[..., :k])
        ones_u = sg.new_ones(sg.shape[:-1] + (U.shape[-1] - k,))
        ones_v = sg.new_ones(sg.shape[:-1] + (Vh.shape[-2] - k,))
        return (U * torch.cat([sg, ones_u], -1).unsqueeze(-2), S,
                Vh * torch.cat([sg, ones_v], -1).unsqueeze(-1))
    with _nonfinite_as_value_error("svd"):
        U, S, Vh = _svd_op(A3)
    m, n = A.shape[-2:]
    k = min(m, n)
    return U.reshape(*lead, m, k), S.reshape(*lead, k), Vh.reshape(*lead, k, n)


def svdvals(A: torch.Tensor) -> torch.Tensor:
    """Singular values (..., min(m, n)) of A (..., m, n), descending."""
    A3, lead = _flatten(A, "svdvals", _svdvals_dispatch)
    with _nonfinite_as_value_error("svdvals"):
        S = _svdvals_op(A3)
    return S.reshape(*lead, min(A.shape[-2:]))


def eigh(A: torch.Tensor, UPLO: str = "L") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric A (..., n, n) -> eigenvalues L (..., n) ascending, eigenvectors Q (..., n, n)
    (columns), reading only the UPLO ("L" or "U") triangle, like torch.linalg.eigh."""
    if UPLO not in ("L", "U"):
        raise ValueError(f"sparsecore.linalg.eigh: UPLO must be 'L' or 'U', got {UPLO!r}")
    if A.dim() >= 2 and A.shape[-1] != A.shape[-2]:
        raise ValueError(f"sparsecore.linalg.eigh: expected square matrices, got {tuple(A.shape)}")
    A3, lead = _flatten(A, "eigh", _eigh_dispatch, UPLO == "L")
    with _nonfinite_as_value_error("eigh"):
        L, Q = _eigh_op(A3, UPLO == "L")
    n = A.shape[-1]
    return L.reshape(*lead, n), Q.reshape(*lead, n, n)
