"""Triton batched one-sided Jacobi SVD for many small matrices (max(m, n) <= 32).

One program owns one matrix M (r x c, r >= c: A itself, or A^T for a wide A), held in
registers as an (R, C) tile (powers of two, zero-padded), with its accumulated right rotations
V (C x C). A sweep is C - 1 rounds of the round-robin ("circle") ordering: in round t, column
j is paired with partner(j) (C - 1 <-> t, and j <-> 2t - j mod C - 1 for the others), so the
C / 2 rotations of a round touch disjoint column pairs and run at once. Each round is
elementwise work on the tile plus one `tl.gather` of the partner columns: every column
computes its pair's dot, both norms and the same (cos, sin) (Rutishauser's formulas, as in
the CPU kernel), then x_j <- cos x_j -/+ sin x_partner. Pairs already orthogonal to
tol = eps * sqrt(max(r, 4)) (relative) rotate by the identity; sweeps stop when a whole sweep
rotates nothing (or after 30, then the launcher reports non-convergence). Columns below
tiny * max column are treated as zero (as on the CPU: a rank-deficient matrix converges).

The launcher returns the converged tile (columns = sigma_j u_j) and V; sparsecore.linalg sorts
the columns, takes U from a batched QR of the sorted tile (orthonormal even where sigma is
zero) and applies the sign convention, all as batch-level torch ops.

Tested for correctness under TRITON_INTERPRET=1; GPU timings: see bench/RESULTS.md (linalg).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_device, is_interpreted, next_pow2

MAX_SIZE = 32
MAX_SWEEPS = 30


@triton.jit
def _jacobi_svd_kernel(
    m_ptr,  # (batch, R, C) the matrices, zero-padded; overwritten by the converged tile
    v_ptr,  # (batch, C, C) out: accumulated right rotations
    status_ptr,  # (batch,) int32 out: sweeps used, or MAX_SWEEPS + 1 when not converged
    tol,
    tiny,
    R: tl.constexpr,
    C: tl.constexpr,
    MAX_SWEEPS_: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, R)
    cols = tl.arange(0, C)
    vrows = tl.arange(0, C)
    x = tl.load(m_ptr + b * R * C + rows[:, None] * C + cols[None, :])
    v = tl.where(vrows[:, None] == cols[None, :], 1.0, 0.0).to(x.dtype)
    zero_rc = tl.zeros([R, C], tl.int32)
    zero_cc = tl.zeros([C, C], tl.int32)
    sweep = 0
    rotated = 1
    while (rotated > 0) & (sweep < MAX_SWEEPS_):
        rotated = 0
        norms = tl.sum(x * x, 0)
        floor2 = tiny * tiny * tl.max(norms, 0)
        for t in range(C - 1):
            partner = (2 * t - cols + 2 * (C - 1)) % (C - 1)
            partner = tl.where(cols == C - 1, t, partner)
            partner = tl.where(cols == t, C - 1, partner)
            xp = tl.gather(x, partner[None, :] + zero_rc, 1)
            g = tl.sum(x * xp, 0)
            a_self = tl.sum(x * x, 0)
            a_other = tl.sum(xp * xp, 0)
            # The lower index of each pair plays p, the other q (zeta = (aq - ap) / 2g).
            role = tl.where(cols < partner, 1.0, -1.0).to(x.dtype)
            do = (g * g > tol * tol * a_self * a_other) & (a_self > floor2) & (a_other > floor2)
            g_safe = tl.where(do, g, 1.0)
            zeta = role * (a_other - a_self) / (2 * g_safe)
            az = tl.abs(zeta)
            tt = 1.0 / (az + tl.sqrt(1.0 + zeta * zeta))
            tt = tl.where(zeta < 0, -tt, tt)
            cs = 1.0 / tl.sqrt(1.0 + tt * tt)
            sn = cs * tt
            cs = tl.where(do, cs, 1.0)
            sn = tl.where(do, sn, 0.0)
            # p: x_p <- c x_p - s x_q;  q: x_q <- s x_p + c x_q.
            s_eff = -role * sn
            x = x * cs[None, :] + xp * s_eff[None, :]
            vp = tl.gather(v, partner[None, :] + zero_cc, 1)
            v = v * cs[None, :] + vp * s_eff[None, :]
            rotated += tl.sum(do.to(tl.int32), 0)
        sweep += 1
    tl.store(m_ptr + b * R * C + rows[:, None] * C + cols[None, :], x)
    tl.store(v_ptr + b * C * C + vrows[:, None] * C + cols[None, :], v)
    done = tl.where(rotated > 0, MAX_SWEEPS_ + 1, sweep)
    tl.store(status_ptr + b, done)


def jacobi_svd(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-sided Jacobi on the columns of M = A (or A^T when A is wide).

    A: (batch, m, n) float32 / float64, max(m, n) <= 32, CUDA (or CPU under TRITON_INTERPRET=1).
    Returns X (batch, r, c) with mutually orthogonal columns (sigma_j u_j of M), V (batch, c, c)
    with M V = X, and the sweeps used per matrix (batch,) int32, where r = max(m, n),
    c = min(m, n). Raises RuntimeError naming a matrix that did not converge.
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"A must be float32 or float64, got {A.dtype}")
    if A.dim() != 3:
        raise ValueError(f"A must be (batch, m, n), got shape {tuple(A.shape)}")
    batch, m, n = A.shape
    if max(m, n) > MAX_SIZE:
        raise ValueError(f"matrices up to {MAX_SIZE} x {MAX_SIZE}, got {m} x {n}")
    device = check_device(_jacobi_svd_kernel, A=A)
    M = A if m >= n else A.mT
    r, c = M.shape[1:]
    R, C = max(2, next_pow2(r)), max(2, next_pow2(c))
    X = torch.zeros(batch, R, C, dtype=A.dtype, device=A.device)
    V = torch.empty(batch, C, C, dtype=A.dtype, device=A.device)
    status = torch.empty(batch, dtype=torch.int32, device=A.device)
    if batch == 0 or c == 0:
        return X[:, :r, :c], V[:, :c, :c], status
    # Scaled to max |entry| = 1 per matrix (the norms are squares: no overflow / underflow).
    amax = M.abs().amax(dim=(1, 2), keepdim=True)
    X[:, :r, :c] = M / torch.where(amax > 0, amax, torch.ones_like(amax))
    eps = torch.finfo(A.dtype).eps
    tol = eps * max(r, 4) ** 0.5
    tiny = 2 * eps * max(c, 1) ** 0.5
    args = (X, V, status, tol, tiny)
    meta = {"R": R, "C": C, "MAX_SWEEPS_": MAX_SWEEPS}
    if is_interpreted(_jacobi_svd_kernel):
        _jacobi_svd_kernel[(batch,)](*args, **meta)
    else:  # pragma: no cover - needs a GPU
        with torch.cuda.device(device):
            _jacobi_svd_kernel[(batch,)](*args, **meta, num_warps=4 if R * C <= 256 else 8)
    bad = (status > MAX_SWEEPS).nonzero()
    if bad.numel():
        raise RuntimeError(f"Jacobi did not converge in {MAX_SWEEPS} sweeps for matrix "
                           f"{int(bad[0, 0])} of the (flattened) batch")
    X = X[:, :r, :c] * amax
    return X, V[:, :c, :c].contiguous(), status


__all__ = ["jacobi_svd", "MAX_SIZE", "is_interpreted"]
