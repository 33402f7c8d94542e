"""Mask metrics: per-layer density, Jaccard overlap, and the Ramanujan-graph metrics of
"Revisiting Pruning at Initialization through the Lens of Ramanujan Graph" (Hoang, Liu,
Marculescu, Wang; ICLR 2023).

A layer's mask is a bipartite graph: input nodes c_in*kh*kw (left), output nodes c_out
(right), an edge per kept weight. Its adjacency [[0, M^T], [M, 0]] (M the c_out x
c_in*kh*kw mask) has eigenvalues +-sigma_i(M), so the largest |eigenvalue| is sigma_1 and
the third, mu_hat (the largest non-trivial one), is sigma_2; both come from the Gram matrix
of the smaller side (LAPACK up to DENSE_LIMIT nodes, ARPACK's eigsh beyond). Isolated nodes are
dropped first, and a graph with mean left or right degree below 3 gets NaN, as in the
authors' code.

- regular gap: 2 sqrt(lambda_1 - 1) - mu_hat (lambda_1 stands in for the degree d);
- irregular gap: sqrt(d_L - 1) + sqrt(d_R - 1) - mu_hat (mean degrees; Hoory's bound);
- IMDB: the irregular gap divided by its bound, averaged over the subgraphs made of the
  input nodes of one degree (classes of at least 3 nodes) and all outputs;
- NaRC: ((mu_hat^2/4 + 1) sqrt(n_L n_R) - | |E| - d_L n_L n_R / n_out |) / (n_in n_out),
  with n_L, n_R the non-isolated input/output counts and n_in, n_out all of them. (The
  authors' code passes the directed edge count 2|E| for |E|; the undirected count is used
  here, which makes the second term vanish when no output is isolated.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.linalg import eigh
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor, nn

from sparsecore.prune.masks import masks as get_masks

DENSE_LIMIT = 1024
MIN_DEGREE = 3


def _mask_dict(x: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    return get_masks(x) if isinstance(x, nn.Module) else dict(x)


def density(x: nn.Module | Mapping[str, Tensor]) -> dict[str, float]:
    """name -> kept fraction, for a masked model or a mask dict."""
    return {n: m.float().mean().item() for n, m in _mask_dict(x).items()}


def jaccard(a: Tensor, b: Tensor) -> float:
    """|a & b| / |a | b| of two masks of the same shape (1.0 when both are empty)."""
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def jaccard_layers(a: nn.Module | Mapping[str, Tensor], b: nn.Module | Mapping[str, Tensor]
                   ) -> dict[str, float]:
    """Per-layer Jaccard overlap of two masked models (or mask dicts), over shared names,
    plus "total": the overlap of all layers taken together."""
    ma, mb = _mask_dict(a), _mask_dict(b)
    names = [n for n in ma if n in mb]
    out = {n: jaccard(ma[n], mb[n]) for n in names}
    inter = sum(int((ma[n].bool() & mb[n].bool()).sum()) for n in names)
    union = sum(int((ma[n].bool() | mb[n].bool()).sum()) for n in names)
    out["total"] = inter / union if union else 1.0
    return out


def layer_graph(mask: Tensor) -> sp.csr_matrix:
    """The mask as a sparse (c_out, c_in*kh*kw) 0/1 matrix: rows outputs, columns inputs."""
    m = mask.detach().reshape(mask.shape[0], -1).bool().cpu().numpy()
    rows, cols = np.nonzero(m)
    return sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=m.shape)


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """Single-threaded BLAS for the many small eigenproblems: on a busy machine OpenBLAS's
    threads stall a 300x300 eigh for a second; one thread takes milliseconds."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl comes with scikit-learn; without it, just run
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def top_singular(m: sp.spmatrix, dense_limit: int = DENSE_LIMIT) -> tuple[float, float]:
    """(sigma_1, sigma_2) of a sparse matrix = (largest, third largest) |eigenvalue| of its
    bipartite adjacency, from the two largest eigenvalues of the Gram matrix of the smaller
    side: LAPACK (eigh, top two only) when that side has at most `dense_limit` nodes, ARPACK
    (eigsh) on the operator x -> M (M^T x) beyond."""
    small = (m if m.shape[0] <= m.shape[1] else m.T).tocsr()
    n = small.shape[0]
    if small.nnz == 0:
        return 0.0, 0.0
    if n <= max(dense_limit, 2):
        gram = (small @ small.T).toarray()
        w = eigh(gram, eigvals_only=True, subset_by_index=[max(n - 2, 0), n - 1])
    else:
        op = LinearOperator((n, n), matvec=lambda x: small @ (small.T @ x), dtype=np.float64)
        w = eigsh(op, k=2, which="LA", v0=np.ones(n), return_eigenvectors=False)
    s = np.sqrt(np.clip(np.sort(w)[::-1], 0.0, None))
    return float(s[0]), float(s[1]) if s.size > 1 else 0.0


@dataclass
class RamanujanStats:
    """One layer's graph metrics (NaN where the graph is too sparse to define them)."""

    lambda1: float
    mu_hat: float
    degree_in: float
    degree_out: float
    regular_bound: float
    regular_gap: float
    irregular_bound: float
    irregular_gap: float
    imdb: float
    narc: float
    subgraphs: int


def _strip(m: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Drop isolated nodes; return the matrix and the kept degrees (inputs, outputs)."""
    din = np.asarray(m.sum(axis=0)).ravel()
    dout = np.asarray(m.sum(axis=1)).ravel()
    keep_out, keep_in = dout > 0, din > 0
    return m[keep_out][:, keep_in], din[keep_in], dout[keep_out]


def _irregular(m: sp.csr_matrix, dense_limit: int) -> tuple[float, float, float] | None:
    """(bound, gap, mu_hat) of the irregular Ramanujan test, or None if too sparse."""
    s, din, dout = _strip(m)
    if din.size == 0 or din.mean() < MIN_DEGREE or dout.mean() < MIN_DEGREE:
        return None
    _, mu = top_singular(s, dense_limit)
    bound = math.sqrt(din.mean() - 1) + math.sqrt(dout.mean() - 1)
    return bound, bound - mu, mu


def ramanujan(mask: Tensor, dense_limit: int = DENSE_LIMIT) -> RamanujanStats:
    """The Ramanujan-graph metrics of one layer's mask (shape (c_out, ...))."""
    with _one_blas_thread():
        return _ramanujan(mask, dense_limit)


def _ramanujan(mask: Tensor, dense_limit: int) -> RamanujanStats:
    full = layer_graph(mask)
    n_out, n_in = full.shape
    nan = float("nan")
    s, din, dout = _strip(full)
    if din.size == 0 or din.mean() < MIN_DEGREE or dout.mean() < MIN_DEGREE:
        d_in = float(din.mean()) if din.size else 0.0
        d_out = float(dout.mean()) if dout.size else 0.0
        return RamanujanStats(nan, nan, d_in, d_out, nan, nan, nan, nan, nan, nan, 0)
    lam1, mu = top_singular(s, dense_limit)
    d_in, d_out = float(din.mean()), float(dout.mean())
    reg_bound = 2.0 * math.sqrt(max(lam1 - 1.0, 0.0))
    irr_bound = math.sqrt(d_in - 1) + math.sqrt(d_out - 1)
    n_l, n_r = din.size, dout.size
    edges = float(din.sum())
    narc = ((mu**2 / 4 + 1) * math.sqrt(n_l * n_r) - abs(edges - d_in / n_out * n_l * n_r)) / (
        n_in * n_out)

    # IMDB over the d-left-regular subgraphs: inputs of one degree, all outputs.
    csc = full.tocsc()
    all_din = np.asarray(full.sum(axis=0)).ravel()
    degrees, counts = np.unique(all_din, return_counts=True)
    ratios = []
    for d, count in zip(degrees, counts):
        if d == 0 or count < MIN_DEGREE:
            continue
        sub = _irregular(csc[:, np.flatnonzero(all_din == d)].tocsr(), dense_limit)
        if sub is not None:
            ratios.append(sub[1] / sub[0])
    imdb = float(np.mean(ratios)) if ratios else nan
    return RamanujanStats(lam1, mu, d_in, d_out, reg_bound, reg_bound - mu, irr_bound,
                          irr_bound - mu, imdb, narc, len(ratios))


def ramanujan_layers(x: nn.Module | Mapping[str, Tensor], dense_limit: int = DENSE_LIMIT
                     ) -> dict[str, RamanujanStats]:
    """`ramanujan` for every masked tensor of 2+ dims of a model (or mask dict)."""
    return {n: ramanujan(m, dense_limit) for n, m in _mask_dict(x).items() if m.dim() >= 2}
