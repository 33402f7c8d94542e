"""Similarity metrics: published values, identities, numerics, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from sparsecore import similarity as S
from sparsecore.similarity.cka import gram_cka

# Tiny matrices: OpenMP's second thread only slows them on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _kornblith_demo() -> tuple[np.ndarray, np.ndarray]:
    """The data of Kornblith et al.'s CKA notebook: np.random.seed(1337)."""
    rng = np.random.RandomState(1337)
    x = rng.randn(100, 10)
    y = rng.randn(100, 10) + x
    return x, y


def _correlated(n: int, p: int, q: int, g: torch.Generator, shared: int = 5) -> tuple:
    z = torch.randn(n, shared, generator=g, dtype=torch.float64)
    x = z @ torch.randn(shared, p, generator=g, dtype=torch.float64)
    x += 0.5 * torch.randn(n, p, generator=g, dtype=torch.float64)
    y = z @ torch.randn(shared, q, generator=g, dtype=torch.float64)
    y += 0.5 * torch.randn(n, q, generator=g, dtype=torch.float64)
    return x, y


# -- published values (Kornblith et al. 2019, the CKA demo notebook) ------------------------


def test_published_values() -> None:
    x, y = _kornblith_demo()
    assert S.linear_cka(x, y).item() == pytest.approx(0.55761, abs=5e-6)
    assert S.rbf_cka(x, y, threshold=0.5).item() == pytest.approx(0.65483, abs=5e-6)
    assert S.linear_cka(x, y, debiased=True).item() == pytest.approx(0.51346, abs=5e-6)
    # The notebook's "mean squared CCA" works on the raw (uncentered) data via QR.
    assert S.cca(x, y, center=False).mean_squared().item() == pytest.approx(0.54312, abs=5e-6)


def test_debiased_feature_space_equals_gram_space() -> None:
    """linear_cka's moment formula vs the U-centered Gram matrices, also for n < p."""
    x, y = _kornblith_demo()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    ref = gram_cka(xt @ xt.T, yt @ yt.T, debiased=True)
    assert S.linear_cka(x, y, debiased=True).item() == pytest.approx(ref.item(), abs=1e-12)
    wide_x, wide_y = xt[:8], yt[:8]  # n = 8 < p + q: the example-space route
    ref = gram_cka(wide_x @ wide_x.T, wide_y @ wide_y.T, debiased=True)
    with pytest.warns(RuntimeWarning, match="fewer data points"):
        got = S.linear_cka(wide_x, wide_y, debiased=True).item()
    assert got == pytest.approx(ref.item(), abs=1e-12)


# -- identities --------------------------------------------------------------------------


def test_self_similarity_is_one(gen: torch.Generator) -> None:
    x, _ = _correlated(80, 7, 3, gen)
    assert S.cca(x, x).mean().item() == pytest.approx(1, abs=1e-12)
    assert S.svcca(x, x).item() == pytest.approx(1, abs=1e-12)
    assert S.pwcca(x, x).item() == pytest.approx(1, abs=1e-12)
    assert S.linear_cka(x, x).item() == pytest.approx(1, abs=1e-12)
    assert S.linear_cka(x, x, debiased=True).item() == pytest.approx(1, abs=1e-12)
    assert S.rbf_cka(x, x, threshold=0.5).item() == pytest.approx(1, abs=1e-12)
    assert S.rbf_cka(x, x, debiased=True).item() == pytest.approx(1, abs=1e-12)
    assert S.procrustes(x, x).item() == pytest.approx(0, abs=1e-12)


def test_cca_invariant_to_invertible_maps(gen: torch.Generator) -> None:
    x, y = _correlated(120, 6, 4, gen)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64) + 3 * torch.eye(
        6, dtype=torch.float64
    )
    b = torch.randn(4, 4, generator=gen, dtype=torch.float64) + 3 * torch.eye(
        4, dtype=torch.float64
    )
    ref = S.cca(x, y).corrs
    moved = S.cca(x @ a + 5.0, y @ b - 2.0).corrs
    torch.testing.assert_close(moved, ref, atol=1e-10, rtol=0)


def test_cka_invariances(gen: torch.Generator) -> None:
    x, y = _correlated(90, 6, 5, gen)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    for fn in (S.linear_cka, S.rbf_cka, lambda a, b: S.linear_cka(a, b, debiased=True)):
        ref = fn(x, y).item()
        assert fn(3.7 * x @ q, y).item() == pytest.approx(ref, abs=1e-10)
    # ... but not to a general invertible map
    a = torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 0.1], dtype=torch.float64))
    assert abs(S.linear_cka(x @ a, y).item() - S.linear_cka(x, y).item()) > 1e-3


def test_procrustes_matches_scipy(gen: torch.Generator) -> None:
    x, y = _correlated(70, 5, 5, gen)
    xc, yc = x - x.mean(0), y - y.mean(0)
    xc, yc = (xc / xc.norm()).numpy(), (yc / yc.norm()).numpy()
    r, _ = scipy.linalg.orthogonal_procrustes(xc, yc)
    ref = np.linalg.norm(xc @ r - yc) ** 2
    assert S.procrustes(x, y).item() == pytest.approx(ref, abs=1e-10)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    assert S.procrustes(x, 2.5 * x @ q + 1).item() == pytest.approx(0, abs=1e-10)


def test_sum_of_squared_correlations_of_independent_gaussians() -> None:
    """E[sum rho_i^2] = p q / (n - 1) for independent Gaussian X (n, p), Y (n, q) after
    centering (the X subspace meets a uniformly random q-dim subspace of R^(n-1)). Monte
    Carlo over 2,000 trials as one batched call; fixed seed (statistical test)."""
    g = torch.Generator().manual_seed(20200301)
    trials, n, p, q = 2000, 40, 3, 5
    x = torch.randn(trials, n, p, generator=g, dtype=torch.float64)
    y = torch.randn(trials, n, q, generator=g, dtype=torch.float64)
    total = S.cca(x, y).corrs.square().sum(-1)
    expected = p * q / (n - 1)
    se = total.std().item() / trials**0.5
    assert abs(total.mean().item() - expected) < 4 * se, (total.mean().item(), expected, se)


# -- SVCCA / PWCCA definitions --------------------------------------------------------------


def _numpy_svd_reduce(x: np.ndarray, k: int) -> np.ndarray:
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    return u[:, :k] * s[:k]


def test_svcca_keep(gen: torch.Generator) -> None:
    x, y = _correlated(150, 12, 9, gen)
    xn, yn = x.numpy(), y.numpy()
    for k in (1, 4, 9):
        rx, ry = _numpy_svd_reduce(xn, k), _numpy_svd_reduce(yn, k)
        qx, _ = np.linalg.qr(rx)
        qy, _ = np.linalg.qr(ry)
        ref = np.linalg.svd(qx.T @ qy, compute_uv=False).mean()
        assert S.svcca(x, y, keep=k).item() == pytest.approx(ref, abs=1e-10)
    # Spread-out scales: the leading directions are ill-conditioned, so SVCCA takes the QR
    # route instead of the Gram matrix; same definition, same value.
    xs = x * torch.logspace(0, -5, 12, dtype=torch.float64)
    rx, ry = _numpy_svd_reduce(xs.numpy(), 12), _numpy_svd_reduce(yn, 9)
    qx, _ = np.linalg.qr(rx)
    qy, _ = np.linalg.qr(ry)
    ref = np.linalg.svd(qx.T @ qy, compute_uv=False).mean()
    with pytest.warns(RuntimeWarning, match="keep=12 directions asked, but Y has only 9"):
        assert S.cca(xs, y, keep=12).mean().item() == pytest.approx(ref, abs=1e-9)
    # A variance fraction keeps the fewest directions reaching it.
    s = np.linalg.svd(xn - xn.mean(0), compute_uv=False)
    frac = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(frac >= 0.9)) + 1
    res = S.cca(x, x, variance=0.9)
    assert int(res.kept_x) == k
    with pytest.raises(ValueError, match="keep"):
        S.svcca(x, y, keep=1.5)
    with pytest.raises(ValueError, match="keep"):
        S.svcca(x, y, keep=0)
    with pytest.raises(ValueError, match="variance"):
        S.svcca(x, y, variance=1.5)


def _pwcca_reference(x: torch.Tensor, y: torch.Tensor) -> tuple[float, np.ndarray]:
    """Morcos et al.'s PWCCA, weights from X's canonical variates: (value, weights)."""
    xc = (x - x.mean(0)).numpy()
    yc = (y - y.mean(0)).numpy()
    qx, _ = np.linalg.qr(xc)
    qy, _ = np.linalg.qr(yc)
    u, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
    h = qx @ u  # canonical variates of X: unit norm, orthogonal
    alpha = np.abs(h.T @ xc).sum(1)
    return (alpha * rho).sum() / alpha.sum(), alpha / alpha.sum()


def test_pwcca_against_definition(gen: torch.Generator) -> None:
    x, y = _correlated(200, 6, 8, gen)
    ref, weights = _pwcca_reference(x, y)
    assert S.pwcca(x, y).item() == pytest.approx(ref, abs=1e-10)
    assert S.pwcca(y, x).item() == pytest.approx(ref, abs=1e-10)  # weights from the smaller side
    details = S.pwcca(x, y, return_details=True)
    assert details.value.item() == pytest.approx(ref, abs=1e-10)
    np.testing.assert_allclose(details.weights.numpy(), weights, atol=1e-10)
    # Equal widths: the weights come from X, so swapping the sides changes the value, on data
    # where the two sides' values differ measurably (about one draw in a hundred does not:
    # another is drawn then).
    for _ in range(5):
        x, y = _correlated(200, 6, 6, gen)
        y = y * torch.tensor([3.0, 1, 0.3, 0.1, 1, 1], dtype=torch.float64)  # Y's own spread
        ref_x, _ = _pwcca_reference(x, y)
        ref_y, _ = _pwcca_reference(y, x)
        if abs(ref_x - ref_y) > 1e-3:
            break
    assert abs(ref_x - ref_y) > 1e-3
    assert S.pwcca(x, y).item() == pytest.approx(ref_x, abs=1e-10)
    assert S.pwcca(y, x).item() == pytest.approx(ref_y, abs=1e-10)


# -- edge cases ----------------------------------------------------------------------------


def test_dead_channels_dropped_and_reported(gen: torch.Generator) -> None:
    x, y = _correlated(100, 6, 5, gen)
    dead = torch.cat(
        [
            x[:, :2],
            torch.full((100, 1), 3.0, dtype=torch.float64),
            x[:, 2:],
            torch.zeros(100, 1, dtype=torch.float64),
        ],
        1,
    )
    res = S.cca(dead, y)
    assert res.dead_x.tolist() == [False, False, True, False, False, False, False, True]
    assert int(res.kept_x) == 6
    torch.testing.assert_close(res.corrs, S.cca(x, y).corrs, atol=1e-12, rtol=0)
    assert S.pwcca(dead, y).item() == pytest.approx(S.pwcca(x, y).item(), abs=1e-12)
    # A live channel of tiny scale is not dead (CCA does not care about scale).
    tiny = torch.cat([x[:, :5], 1e-9 * x[:, 5:]], 1)
    assert not S.cca(tiny, y).dead_x.any()
    torch.testing.assert_close(S.cca(tiny, y).corrs, S.cca(x, y).corrs, atol=1e-9, rtol=0)


def test_all_dead_is_nan(gen: torch.Generator) -> None:
    _, y = _correlated(30, 3, 4, gen)
    with pytest.warns(RuntimeWarning, match="X has no variance"):
        res = S.cca(torch.ones(30, 3, dtype=torch.float64), y)
    assert int(res.count) == 0 and torch.isnan(res.mean())
    with pytest.warns(RuntimeWarning, match="X has no variance"):
        assert torch.isnan(S.linear_cka(torch.ones(30, 3), y))


def test_nan_inf_raise(gen: torch.Generator) -> None:
    x, y = _correlated(30, 3, 4, gen)
    x[3, 1] = float("nan")
    for fn in (S.cca, S.svcca, S.pwcca, S.linear_cka, S.rbf_cka, S.procrustes):
        with pytest.raises(ValueError, match="NaN/Inf"):
            fn(x, y)
    x[3, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        S.cca(y, x)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="data points"):
        S.cca(torch.randn(10, 3), torch.randn(11, 3))
    with pytest.raises(ValueError, match="shape"):
        S.linear_cka(torch.randn(10), torch.randn(10))


def test_few_points_warns(gen: torch.Generator) -> None:
    x, y = _correlated(10, 6, 5, gen)
    with pytest.warns(RuntimeWarning, match="canonical correlations are 1"):
        res = S.cca(x, y)
    assert (res.corrs[:2] > 1 - 1e-9).all()  # 6 + 5 - 9 = 2 trivially 1


def test_results_in_range(gen: torch.Generator) -> None:
    x, y = _correlated(60, 4, 4, gen)
    assert 0 <= S.cca(x, y).corrs.min() and S.cca(x, y).corrs.max() <= 1
    for v in (S.svcca(x, y), S.pwcca(x, y), S.linear_cka(x, y), S.rbf_cka(x, y)):
        assert 0 <= v.item() <= 1
    assert -1 <= S.linear_cka(x, y, debiased=True).item() <= 1
    assert 0 <= S.procrustes(x, y).item() <= 2


def test_batched_equals_loop(gen: torch.Generator) -> None:
    x = torch.randn(3, 50, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 50, 6, generator=gen, dtype=torch.float64) + x
    x[1, :, 2] = 0.5  # a channel dead in one batch element only: 5 correlations there
    res = S.cca(x, y)
    assert res.count.tolist() == [6, 5, 6]
    for b in range(3):
        one = S.cca(x[b], y[b])
        torch.testing.assert_close(
            res.corrs[b, : one.corrs.shape[-1]], one.corrs, atol=1e-12, rtol=0
        )
        assert (res.corrs[b, one.corrs.shape[-1] :] == 0).all()
        assert S.pwcca(x, y)[b].item() == pytest.approx(S.pwcca(x[b], y[b]).item(), abs=1e-12)
        for fn in (S.linear_cka, S.rbf_cka, S.procrustes, S.svcca):
            assert fn(x, y)[b].item() == pytest.approx(fn(x[b], y[b]).item(), abs=1e-12)
    assert res.dead_x[1].tolist() == [False, False, True, False, False, False]


# -- numerics: the QR route in float32 --------------------------------------------------------


def _cov_route_float32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What the QR route avoids: inverse square roots of the covariances, in float32."""
    x, y = x - x.mean(0), y - y.mean(0)

    def inv_sqrt(m: torch.Tensor) -> torch.Tensor:
        w, v = torch.linalg.eigh(m)
        return (v * w.clamp_min(1e-30).rsqrt()) @ v.T

    return torch.linalg.svdvals(inv_sqrt(x.T @ x) @ (x.T @ y) @ inv_sqrt(y.T @ y)).clamp(0, 1)


def test_float32_qr_route_accurate_at_cond_1e6() -> None:
    """Channels on scales spread over 6 decades (cond(X) ~ 1e6, as with half-pruned
    channels): float32 through QR stays within 1e-5 of float64 while the float32
    covariance route is off by O(1)."""
    g = torch.Generator().manual_seed(7)
    n, p, q = 2000, 20, 15
    z = torch.randn(n, 10, generator=g, dtype=torch.float64)
    base = torch.cat([z, torch.randn(n, p - 10, generator=g, dtype=torch.float64)], 1)
    base = base @ torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))[0]
    scales = torch.logspace(0, -6, p, dtype=torch.float64)[torch.randperm(p, generator=g)]
    x = (base * scales).float()
    y = (z @ torch.randn(10, q, generator=g, dtype=torch.float64)).float()
    y += torch.randn(n, q, generator=g).float()
    assert torch.linalg.cond(x.double() - x.double().mean(0)) > 5e5
    ref = S.cca(x, y, dtype=torch.float64).corrs
    got = S.cca(x, y, dtype=torch.float32).corrs
    assert got.dtype == torch.float32
    assert (got.double() - ref).abs().max() < 1e-5
    assert (_cov_route_float32(x, y).double() - ref).abs().max() > 0.1


@pytest.mark.gpu
def test_gpu_agrees_with_cpu(gen: torch.Generator) -> None:
    x, y = _correlated(3000, 40, 30, gen)
    xg, yg = x.cuda(), y.cuda()
    for fn in (S.svcca, S.pwcca, S.linear_cka, S.procrustes, lambda a, b: S.cca(a, b).mean()):
        ref = fn(x, y).item()
        assert fn(xg.double(), yg.double()).item() == pytest.approx(ref, abs=1e-8)
        assert fn(xg.float(), yg.float()).item() == pytest.approx(ref, abs=1e-4)  # float32 default
    assert S.cca(xg.float(), yg.float()).corrs.device.type == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_product(dtype: torch.dtype, gen: torch.Generator) -> None:
    """The syrk-backed X^T X equals the GEMM, for C-ordered and transposed inputs."""
    from sparsecore.similarity import _linalg

    x = torch.randn(50, 7, generator=gen, dtype=dtype)
    for v in (x, x.mT.contiguous().mT, x[::2]):
        torch.testing.assert_close(_linalg.gram(v), v.mT @ v)
