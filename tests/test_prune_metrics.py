"""Mask metrics: density, Jaccard, and the Ramanujan-graph metrics against a direct dense
eigenvalue computation of each layer's bipartite adjacency."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sparsecore import prune
from sparsecore.prune import metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_mask(shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def _dense_spectrum(m: np.ndarray) -> np.ndarray:
    """|eigenvalues| of the bipartite adjacency of m (isolated nodes dropped), descending."""
    m = m[m.sum(axis=1) > 0][:, m.sum(axis=0) > 0]
    r, c = m.shape
    adj = np.zeros((r + c, r + c))
    adj[:r, r:] = m
    adj[r:, :r] = m.T
    return np.sort(np.abs(np.linalg.eigvalsh(adj)))[::-1]


def _direct(mask: torch.Tensor) -> dict[str, float]:
    """The metrics computed straight from their definitions with dense eigenvalues."""
    m = mask.reshape(mask.shape[0], -1).double().numpy()
    n_out, n_in = m.shape
    din, dout = m.sum(axis=0), m.sum(axis=1)
    d_l, d_r = din[din > 0].mean(), dout[dout > 0].mean()
    spec = _dense_spectrum(m)
    lam1, mu = spec[0], spec[2]
    irr = math.sqrt(d_l - 1) + math.sqrt(d_r - 1)
    n_l, n_r = int((din > 0).sum()), int((dout > 0).sum())
    narc = ((mu**2 / 4 + 1) * math.sqrt(n_l * n_r) - abs(m.sum() - d_l / n_out * n_l * n_r)) / (
        n_in * n_out)
    ratios = []
    for d in np.unique(din):
        cols = din == d
        if d == 0 or cols.sum() < 3:
            continue
        sub = m[:, cols]
        sub = sub[sub.sum(axis=1) > 0]
        sd_l, sd_r = sub.sum(axis=0).mean(), sub.sum(axis=1).mean()
        if sd_l < 3 or sd_r < 3:
            continue
        bound = math.sqrt(sd_l - 1) + math.sqrt(sd_r - 1)
        ratios.append((bound - _dense_spectrum(sub)[2]) / bound)
    return {"lambda1": lam1, "mu_hat": mu, "regular_gap": 2 * math.sqrt(lam1 - 1) - mu,
            "irregular_gap": irr - mu, "narc": narc,
            "imdb": float(np.mean(ratios)) if ratios else float("nan"), "subgraphs": len(ratios)}


@pytest.mark.parametrize("shape,density,imdb_defined", [
    ((12, 4, 3, 3), 0.3, True), ((20, 30), 0.4, True), ((40, 9), 0.6, False),
    ((16, 8, 1, 1), 0.8, False)])
@pytest.mark.parametrize("dense_limit", [metrics.DENSE_LIMIT, 0])  # 0: the eigsh path
def test_ramanujan_against_dense_eigenvalues(shape: tuple[int, ...], density: float,
                                             imdb_defined: bool, dense_limit: int) -> None:
    mask = _random_mask(shape, density, seed=sum(shape))
    mask.view(mask.shape[0], -1)[0] = False  # an isolated output node
    got = metrics.ramanujan(mask, dense_limit=dense_limit)
    want = _direct(mask)
    for key, value in want.items():
        assert getattr(got, key) == pytest.approx(value, rel=1e-7, abs=1e-9, nan_ok=True), key
    assert (got.subgraphs > 0) == imdb_defined  # small layers have no degree class of 3+


def test_ramanujan_complete_and_too_sparse() -> None:
    full = torch.ones(6, 9, dtype=torch.bool)  # K_{9,6}: spectrum +-sqrt(54) and zeros
    s = metrics.ramanujan(full)
    assert s.lambda1 == pytest.approx(math.sqrt(54))
    assert s.mu_hat == pytest.approx(0.0, abs=1e-6)
    assert s.degree_in == 6 and s.degree_out == 9
    sparse = torch.eye(8, dtype=torch.bool)  # degree 1 everywhere: metrics undefined
    t = metrics.ramanujan(sparse)
    assert math.isnan(t.lambda1) and math.isnan(t.imdb) and t.degree_in == 1.0


def test_density_and_jaccard() -> None:
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    prune.prune(model, "random", density=0.3, seed=1)
    dens = metrics.density(model)
    assert dens == pytest.approx({"0.weight": 0.3, "2.weight": 0.3})
    a = prune.masks(model)
    assert metrics.jaccard_layers(model, a) == {"0.weight": 1.0, "2.weight": 1.0, "total": 1.0}
    x = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    y = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    assert metrics.jaccard(x, y) == pytest.approx(1 / 3)
    b = {n: ~m for n, m in a.items()}
    assert metrics.jaccard_layers(a, b)["total"] == 0.0
    stats = metrics.ramanujan_layers(model)
    assert set(stats) == {"0.weight", "2.weight"}
