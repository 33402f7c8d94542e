"""Similarity metrics against independent float64 numpy formulas where rounding, scale and
API ambiguity used to bite: extreme scales, float32, directions below the Gram route's
resolution, PWCCA's near-1 correlations, inputs without variance, and the keep / variance
options."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from sparsecore import similarity as S

# Tiny matrices: OpenMP's second thread only slows them on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: one thread is faster on a loaded machine; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- independent references (float64 numpy, straight from the definitions) -----------------


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _ref_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _ref_rbf_cka(x: np.ndarray, y: np.ndarray, threshold: float = 1.0) -> float:
    """Kornblith et al.: K_ij = exp(-|x_i - x_j|^2 / (2 t^2 median)), then H K H."""

    def gram(a: np.ndarray) -> np.ndarray:
        d2 = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * threshold**2 * np.median(d2)))

    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    kx, ky = h @ gram(x) @ h, h @ gram(y) @ h
    return (kx * ky).sum() / np.sqrt((kx * kx).sum() * (ky * ky).sum())


def _ref_corrs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Canonical correlations of two full-column-rank data matrices (centered here)."""
    qx, _ = np.linalg.qr(x - x.mean(0))
    qy, _ = np.linalg.qr(y - y.mean(0))
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


def _ref_reduce(x: np.ndarray, k: int) -> np.ndarray:
    """The k leading singular directions of the centered data (SVCCA's reduction)."""
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    return u[:, :k] * s[:k]


def _correlated(n: int, p: int, q: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.randn(n, 5, generator=g, dtype=torch.float64)
    x = z @ torch.randn(5, p, generator=g, dtype=torch.float64)
    x += 0.5 * torch.randn(n, p, generator=g, dtype=torch.float64)
    y = z @ torch.randn(5, q, generator=g, dtype=torch.float64)
    y += 0.5 * torch.randn(n, q, generator=g, dtype=torch.float64)
    return x, y


METRICS = {
    "cca": lambda x, y: S.cca(x, y).mean(),
    "svcca": S.svcca,
    "pwcca": S.pwcca,
    "linear_cka": S.linear_cka,
    "debiased_cka": lambda x, y: S.linear_cka(x, y, debiased=True),
    "rbf_cka": S.rbf_cka,
    "procrustes": S.procrustes,
}


# -- scale -----------------------------------------------------------------------------------


def test_float32_linear_cka_of_large_activations() -> None:
    """||X^T X||^2 ||Y^T Y||^2 of activations ~1e3 is ~1e40, past float32's range."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    y = x + 0.1 * torch.randn(2000, 8, generator=g, dtype=torch.float64)
    x32, y32 = (1000 * x).float(), (1000 * y).float()
    ref = _ref_linear_cka(_np(x32), _np(y32))
    assert ref > 0.98
    assert S.linear_cka(x32, y32, dtype=torch.float32).item() == pytest.approx(ref, abs=1e-5)
    sim = S.compare({"x": x32}, {"y": y32}, "linear_cka", dtype=torch.float32)
    assert sim.values.dtype == torch.float32
    assert sim["x", "y"] == pytest.approx(ref, abs=1e-5)
    debiased = S.linear_cka(x32, y32, debiased=True, dtype=torch.float32).item()
    assert debiased == pytest.approx(S.linear_cka(x32, y32, debiased=True).item(), abs=1e-4)


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_float64_metrics_scale_invariant(scale: float, gen: torch.Generator) -> None:
    """Every metric is invariant to scaling a side; products of x ~1e+-200 leave float64."""
    x, y = _correlated(150, 6, 5, gen)
    for name, fn in METRICS.items():
        ref = fn(x, y).item()
        assert fn(scale * x, y).item() == pytest.approx(ref, abs=1e-10), name
        assert fn(scale * x, scale * y).item() == pytest.approx(ref, abs=1e-10), name
    a = {"a0": scale * x, "a1": scale * y[:, :3]}
    b = {"b0": y, "b1": scale * x[:, :4]}
    for metric in ("svcca", "pwcca", "linear_cka", "rbf_cka", "procrustes"):
        ref = S.compare({k: v / scale for k, v in a.items()}, b, metric, pairs="all").values
        got = S.compare(a, b, metric, pairs="all").values
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=0, msg=metric)
        if metric == "rbf_cka":
            continue
        acc = S.StreamingCompare(pairs="all")
        for lo in range(0, 150, 50):
            acc.update(
                {k: v[lo : lo + 50] for k, v in a.items()},
                {k: v[lo : lo + 50] for k, v in b.items()},
            )
        torch.testing.assert_close(acc.result(metric).values, ref, atol=1e-8, rtol=0, msg=metric)


def test_float32_rbf_cka_far_from_origin() -> None:
    """|x_i|^2 + |x_j|^2 - 2 x_i.x_j cancels in float32 when the data sit at 1000."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 10, generator=g)
    y = x @ torch.randn(10, 6, generator=g) + torch.randn(300, 6, generator=g)
    x, y = x + 1000, y + 1000
    for threshold in (1.0, 0.5):
        ref = _ref_rbf_cka(_np(x), _np(y), threshold)
        got = S.rbf_cka(x, y, threshold=threshold, dtype=torch.float32).item()
        assert got == pytest.approx(ref, abs=1e-5)


# -- SVCCA keeps what keep asks --------------------------------------------------------------


def test_svcca_keep_counts_directions_below_gram_resolution() -> None:
    """A rank-8 layer whose last two directions are 1e-9 of the first: keep=8 keeps all
    eight (the float64 Gram route resolves only ~1e-7, so it must hand over to QR)."""
    g = torch.Generator().manual_seed(2)
    n = 400
    strong = torch.randn(n, 6, generator=g, dtype=torch.float64)
    weak = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = strong @ torch.randn(6, 10, generator=g, dtype=torch.float64)
    x += 1e-9 * weak @ torch.randn(2, 10, generator=g, dtype=torch.float64)
    z = torch.cat([strong, weak], 1)
    y = z @ torch.randn(8, 9, generator=g, dtype=torch.float64)
    y += 2 * torch.randn(n, 9, generator=g, dtype=torch.float64)
    # x's column space is span(strong, weak) exactly, whatever the 1e-9.
    ref = _ref_corrs(_np(z), _ref_reduce(_np(y), 8)).mean()
    res = S.svcca(x, y, keep=8, return_details=True)
    assert int(res.kept_x) == 8 and int(res.kept_y) == 8
    assert res.value.item() == pytest.approx(ref, abs=1e-6)
    assert int(S.cca(x, y).kept_x) == 8  # plain CCA agrees on the rank


# -- PWCCA: correlations near 1 ----------------------------------------------------------------


def test_float32_pwcca_of_shared_low_rank_layers() -> None:
    """Two layers sharing a rank-4 signal, plus 1e-3 noise: four correlations within ~1e-7
    of 1, which float32 cosines cannot tell apart; PWCCA's weights depend on the basis
    among them. float32 must stay as close to float64 as CCA does."""
    g = torch.Generator().manual_seed(0)
    n, r = 2000, 4
    z = torch.randn(n, r, generator=g, dtype=torch.float64)
    x = z @ torch.randn(r, 32, generator=g, dtype=torch.float64)
    x += 1e-3 * torch.randn(n, 32, generator=g, dtype=torch.float64)
    y = z @ torch.randn(r, 24, generator=g, dtype=torch.float64)
    y += 1e-3 * torch.randn(n, 24, generator=g, dtype=torch.float64)
    x, y = x.float(), y.float()
    for a, b in ((x, y), (y, x)):  # weights from Y's side, then from X's
        ref = S.pwcca(a, b, dtype=torch.float64).item()
        assert S.pwcca(a, b, dtype=torch.float32).item() == pytest.approx(ref, abs=5e-6)
        cca_ref = S.cca(a, b, dtype=torch.float64).mean().item()
        assert S.cca(a, b, dtype=torch.float32).mean().item() == pytest.approx(cca_ref, abs=5e-6)
    sim = S.compare({"x": x}, {"y": y}, "pwcca", dtype=torch.float32)
    assert sim["x", "y"] == pytest.approx(S.pwcca(x, y, dtype=torch.float64).item(), abs=5e-6)


# -- no variance ---------------------------------------------------------------------------------


def test_no_variance_warns_and_is_nan(gen: torch.Generator) -> None:
    """Every channel constant: each metric is 0/0. Centering 0.7 leaves rounding noise,
    which must not be compared as if it were signal."""
    const = torch.full((40, 3), 0.7, dtype=torch.float64)
    _, y = _correlated(40, 3, 4, gen)
    for name, fn in METRICS.items():
        with pytest.warns(RuntimeWarning, match="no variance|median squared distance"):
            assert torch.isnan(fn(const, y)), name
    for metric in ("svcca", "pwcca", "linear_cka", "procrustes", "rbf_cka"):
        with pytest.warns(RuntimeWarning, match="no variance|median squared distance"):
            sim = S.compare({"c": const, "y": y}, {"c": y, "y": y}, metric)
        assert math.isnan(sim["c", "c"]) and not math.isnan(sim["y", "y"]), metric
    acc = S.StreamingCompare()
    acc.update({"c": const}, {"y": y})
    for metric in ("linear_cka", "cca", "procrustes"):
        with pytest.warns(RuntimeWarning, match=r"no variance.*\['c \(first set\)'\]"):
            assert math.isnan(acc.result(metric)["c", "y"])


def test_rbf_threshold_must_be_positive(gen: torch.Generator) -> None:
    x, y = _correlated(30, 3, 4, gen)
    for t in (0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            S.rbf_cka(x, y, threshold=t)
    with pytest.raises(ValueError, match="threshold"):
        S.compare({"x": x}, {"y": y}, "rbf_cka", threshold=0)


# -- keep / variance / spectrum ------------------------------------------------------------------


def test_keep_counts_and_variance_fractions(gen: torch.Generator) -> None:
    x, y = _correlated(150, 12, 9, gen)
    # An integer counts directions; a float is not silently a fraction.
    assert int(S.svcca(x, y, keep=1, return_details=True).kept_x) == 1
    with pytest.raises(ValueError, match="variance=1.0"):
        S.svcca(x, y, keep=1.0)
    with pytest.raises(ValueError, match="not both"):
        S.svcca(x, y, keep=3, variance=0.9)
    # More than a side holds: all of it, and a warning (not silence).
    with pytest.warns(RuntimeWarning, match="keep=99 directions asked") as caught:
        res = S.svcca(x, y, keep=99, return_details=True)
    said = " ".join(str(w.message) for w in caught)
    assert "X has only 12" in said and "Y has only 9" in said
    assert (int(res.kept_x), int(res.kept_y)) == (12, 9)
    # numpy and 0-d torch scalars are numbers too.
    ref = S.svcca(x, y, keep=3).item()
    assert S.svcca(x, y, keep=np.int64(3)).item() == ref
    assert S.svcca(x, y, keep=torch.tensor(3)).item() == ref
    ref = S.svcca(x, y, variance=0.9).item()
    assert S.svcca(x, y, variance=np.float32(0.9)).item() == pytest.approx(ref, abs=0)
    assert S.svcca(x, y, variance=np.float64(0.9)).item() == ref
    # The default is 99 % of the variance (squared singular values).
    assert S.svcca(x, y).item() == S.svcca(x, y, variance=0.99).item()


@pytest.mark.parametrize(("spectrum", "power"), [("variance", 2), ("singular_values", 1)])
def test_svcca_spectrum(spectrum: str, power: int, gen: torch.Generator) -> None:
    """The fraction is of squared singular values (variance) or, as google/svcca's tutorial
    computes it, of plain singular values: the fewest k with sum(s[:k]) >= f sum(s)."""
    x, y = _correlated(200, 16, 12, gen)
    xn, yn = _np(x), _np(y)

    def count(a: np.ndarray) -> int:
        w = np.linalg.svd(a - a.mean(0), compute_uv=False) ** power
        return int(np.argmax(np.cumsum(w) / w.sum() >= 0.9)) + 1

    kx, ky = count(xn), count(yn)
    ref = _ref_corrs(_ref_reduce(xn, kx), _ref_reduce(yn, ky)).mean()
    res = S.svcca(x, y, variance=0.9, spectrum=spectrum, return_details=True)
    assert (int(res.kept_x), int(res.kept_y)) == (kx, ky)
    assert res.value.item() == pytest.approx(ref, abs=1e-10)
    sim = S.compare({"x": x}, {"y": y}, "svcca", variance=0.9, spectrum=spectrum)
    assert sim["x", "y"] == pytest.approx(ref, abs=1e-10)
    with pytest.raises(ValueError, match="spectrum"):
        S.svcca(x, y, spectrum="energy")


def test_compare_options_and_defaults(gen: torch.Generator) -> None:
    x, y = _correlated(120, 8, 7, gen)
    x2, y2 = _correlated(120, 5, 6, gen)
    # "cca" takes the reduction options too.
    sim = S.compare({"x": x}, {"y": y}, "cca", keep=3)
    assert sim["x", "y"] == pytest.approx(S.cca(x, y, keep=3).mean().item(), abs=1e-12)
    acc = S.StreamingCompare()
    acc.update({"x": x}, {"y": y})
    assert acc.result("cca", keep=3)["x", "y"] == pytest.approx(sim["x", "y"], abs=1e-8)
    # Same names: "diagonal" pairs them silently; StreamingCompare defaults to "diagonal" too.
    a, b = {"l1": x, "l2": x2}, {"l1": y, "l2": y2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = S.compare(a, b, "linear_cka")
        acc = S.StreamingCompare()
        acc.update(a, b)
        got = acc.result("linear_cka")
    torch.testing.assert_close(got.values, ref.values, atol=1e-10, rtol=0, equal_nan=True)
    assert torch.isnan(got.values[0, 1]) and torch.isnan(got.values[1, 0])
    # Different names, paired by position: a warning says so.
    with pytest.warns(RuntimeWarning, match="by position"):
        S.compare({"l1": x, "l2": x2}, {"l2": y2, "l1": y}, "linear_cka")


def test_transposed_inputs_get_a_hint(gen: torch.Generator) -> None:
    """google/svcca's code takes (neurons, data points); here rows are data points."""
    x, y = _correlated(300, 6, 6, gen)
    with pytest.warns(RuntimeWarning, match="transposed"):
        S.svcca(x.T, y.T)
    with pytest.warns(RuntimeWarning, match="transposed"):
        S.linear_cka(x.T, y.T)
    with pytest.raises(ValueError, match="transposed"):
        S.cca(x.T, y)
