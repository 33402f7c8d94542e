"""All-pairs compare, streaming, the DFT route and activation capture."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsecore import similarity as S

# Tiny matrices: OpenMP's second thread only slows them on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")

PAIRWISE = {
    "svcca": lambda x, y, **kw: S.svcca(x, y, **kw),
    "cca": lambda x, y: S.cca(x, y).mean(),
    "pwcca": S.pwcca,
    "linear_cka": S.linear_cka,
    "rbf_cka": S.rbf_cka,
    "procrustes": S.procrustes,
}
CASES = [
    ("svcca", {}),
    ("svcca", {"keep": 3}),
    ("cca", {}),
    ("pwcca", {}),
    ("linear_cka", {}),
    ("linear_cka", {"debiased": True}),
    ("rbf_cka", {"threshold": 0.5}),
    ("rbf_cka", {"debiased": True}),
    ("procrustes", {}),
]


def _layer_sets(g: torch.Generator, n: int = 120, offset: float = 0.0) -> tuple[dict, dict]:
    """Two float32 sets sharing a latent; widths repeat so some small SVDs batch together;
    one dead channel in each set."""
    z = torch.randn(n, 8, generator=g)
    a, b = {}, {}
    for k, w in enumerate([4, 7, 7, 12]):
        a[f"a{k}"] = z @ torch.randn(8, w, generator=g) + 0.3 * torch.randn(n, w, generator=g)
    for k, w in enumerate([7, 4, 9]):
        b[f"b{k}"] = z @ torch.randn(8, w, generator=g) + 0.6 * torch.randn(n, w, generator=g)
    a["a1"][:, 2] = 1.5
    b["b2"][:, 0] = 0.0
    return ({k: v + offset for k, v in a.items()}, {k: v + offset for k, v in b.items()})


@pytest.mark.parametrize(("metric", "opts"), CASES)
def test_all_pairs_equals_pair_loop(metric: str, opts: dict, gen: torch.Generator) -> None:
    a, b = _layer_sets(gen)
    sim = S.compare(a, b, metric, pairs="all", **opts)
    assert sim.values.shape == (4, 3) and sim.rows == list(a) and sim.cols == list(b)
    for i, na in enumerate(a):
        for j, nb in enumerate(b):
            ref = PAIRWISE[metric](a[na], b[nb], **opts).item()
            assert sim.values[i, j].item() == pytest.approx(ref, abs=1e-10), (na, nb)
    assert sim.dead_rows["a1"] == 1 and sim.dead_cols["b2"] == 1


def test_diagonal_and_explicit_pairs(gen: torch.Generator) -> None:
    a, b = _layer_sets(gen)
    a3 = {k: a[k] for k in list(a)[:3]}
    with pytest.warns(RuntimeWarning, match="by position"):
        diag = S.compare(a3, b, "svcca")  # pairs="diagonal" by default
    full = S.compare(a3, b, "svcca", pairs="all")
    torch.testing.assert_close(diag.diagonal(), full.diagonal(), atol=1e-12, rtol=0)
    assert torch.isnan(diag.values[0, 1]) and diag["a2", "b2"] == pytest.approx(full["a2", "b2"])
    some = S.compare(a, b, "pwcca", pairs=[("a3", "b0"), ("a0", "b2")])
    assert some["a3", "b0"] == pytest.approx(S.pwcca(a["a3"], b["b0"]).item(), abs=1e-12)
    assert int(torch.isnan(some.values).sum()) == 10
    assert "a3" in str(some) and some.to_dict()["metric"] == "pwcca"
    with pytest.raises(ValueError, match="diagonal"):
        S.compare(a, b, "svcca")  # 4 vs 3 layers
    with pytest.raises(KeyError):
        S.compare(a, b, "svcca", pairs=[("a0", "nope")])
    with pytest.raises(ValueError, match="unknown metric"):
        S.compare(a, b, "cka", pairs="all")
    with pytest.raises(TypeError, match="options"):
        S.compare(a, b, "pwcca", pairs="all", keep=0.9)


def test_conv_layers(gen: torch.Generator) -> None:
    x = torch.randn(10, 3, 6, 6, generator=gen)
    y = torch.randn(10, 5, 6, 6, generator=gen) + x.repeat(1, 2, 1, 1)[:, :5]
    small = torch.randn(10, 4, 3, 3, generator=gen)
    sim = S.compare({"x": x}, {"y": y}, "linear_cka", conv="positions")
    ref = S.linear_cka(x.permute(0, 2, 3, 1).reshape(-1, 3), y.permute(0, 2, 3, 1).reshape(-1, 5))
    assert sim["x", "y"] == pytest.approx(ref.item(), abs=1e-12)
    pooled = S.compare({"x": x, "s": small}, {"y": y}, "svcca", pairs="all", conv="pool")
    assert pooled["s", "y"] == pytest.approx(S.svcca(small.mean((2, 3)), y.mean((2, 3))).item())
    with pytest.raises(ValueError, match='conv="pool"'):
        S.compare({"x": x, "s": small}, {"y": y}, "svcca", pairs="all")


def test_compare_warns_few_points(gen: torch.Generator) -> None:
    a = {"a": torch.randn(12, 8, generator=gen)}
    b = {"b": torch.randn(12, 6, generator=gen)}
    with pytest.warns(RuntimeWarning, match="1 layer pairs"):
        S.compare(a, b, "cca")


@pytest.mark.parametrize(("metric", "opts"), [c for c in CASES if c[0] != "rbf_cka"])
def test_streaming_equals_in_memory(metric: str, opts: dict, gen: torch.Generator) -> None:
    # A large common offset: the shifted accumulation must not lose the centering.
    a, b = _layer_sets(gen, n=300, offset=1e3)
    a = {k: v.double() for k, v in a.items()}
    b = {k: v.double() for k, v in b.items()}
    ref = S.compare(a, b, metric, pairs="all", **opts)
    acc = S.StreamingCompare(pairs="all")
    for lo, hi in [(0, 1), (1, 90), (90, 91), (91, 250), (250, 300)]:
        acc.update({k: v[lo:hi] for k, v in a.items()}, {k: v[lo:hi] for k, v in b.items()})
    got = acc.result(metric, **opts)
    torch.testing.assert_close(got.values, ref.values, atol=1e-8, rtol=0, equal_nan=True)
    assert got.dead_rows == ref.dead_rows and got.dead_cols == ref.dead_cols


def test_streaming_conv_chunks(gen: torch.Generator) -> None:
    x = torch.randn(20, 3, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(20, 4, 5, 5, generator=gen, dtype=torch.float64) + x[:, :1]
    acc = S.StreamingCompare(pairs="diagonal")
    for k in range(0, 20, 6):
        acc.update({"x": x[k : k + 6]}, {"y": y[k : k + 6]})
    ref = S.compare({"x": x}, {"y": y}, "linear_cka", debiased=True)
    assert acc.result("linear_cka", debiased=True)["x", "y"] == pytest.approx(
        ref["x", "y"], abs=1e-10
    )
    with pytest.raises(ValueError, match="layers changed"):
        acc.update({"z": x}, {"y": y})
    with pytest.raises(RuntimeError, match="before any update"):
        S.StreamingCompare().result()


def test_dft_cca_is_per_frequency_cca(gen: torch.Generator) -> None:
    x = torch.randn(30, 3, 4, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(30, 2, 4, 5, generator=gen, dtype=torch.float64) + x[:, :2].roll(1, dims=2)
    res = S.dft_cca(x, y)
    assert res.corrs.shape == (4, 5, 2) and res.corrs.dtype == torch.float64
    fx = torch.fft.fft2(x, norm="ortho")
    fy = torch.fft.fft2(y, norm="ortho")
    for u, v in [(0, 0), (1, 2), (3, 4)]:
        one = S.cca(fx[:, :, u, v], fy[:, :, u, v])
        torch.testing.assert_close(res.corrs[u, v], one.corrs, atol=1e-10, rtol=0)
    # Real inputs: frequency (u, v) and (-u, -v) give the same correlations.
    torch.testing.assert_close(res.corrs[1, 2], res.corrs[3, 3], atol=1e-10, rtol=0)
    # A circular shift is a phase per frequency: invisible to CCA of complex data.
    shifted = S.dft_cca(x, x.roll((1, 2), dims=(2, 3)))
    torch.testing.assert_close(shifted.mean(), torch.ones(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="spatial"):
        S.dft_cca(x, y[:, :, :3])


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


def test_capture_and_streaming_capture() -> None:
    torch.manual_seed(0)
    dense = _Net()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned.conv2.weight[:3] = 0  # three dead filters (bias only: constant channels)
    data = [(torch.randn(8, 3, 8, 8), torch.zeros(8)) for _ in range(4)]
    dense.train()
    acts_d, acts_p = S.capture(
        [dense, pruned], data, layers=["conv1", "conv2", "fc"], spatial_samples=5, max_points=150
    )
    assert dense.training and not dense.conv1._forward_hooks  # mode restored, hooks removed
    assert acts_d["conv1"].shape == (150, 6) and acts_d["fc"].shape == (32, 5)
    sim = S.compare(acts_d, acts_p, "svcca")
    assert sim["conv1", "conv1"] == pytest.approx(1, abs=1e-6)
    assert sim.dead_cols["conv2"] == 3
    # Same layers, all positions, streamed: equals the in-memory comparison.
    acc = S.StreamingCompare(pairs="diagonal")
    out = S.capture([dense, pruned], data, layers=["conv2", "fc"], stream=acc.update)
    assert out is None
    full_d, full_p = S.capture([dense, pruned], data, layers=["conv2", "fc"])
    assert full_d["conv2"].shape == (4 * 8 * 16, 8)
    ref = S.compare(full_d, full_p, "linear_cka")
    torch.testing.assert_close(
        acc.result("linear_cka").values, ref.values, atol=1e-10, rtol=0, equal_nan=True
    )
    one = S.capture(dense, data)  # every Linear / Conv by default
    assert list(one) == ["conv1", "conv2", "fc"]
    with pytest.raises(KeyError, match="no modules"):
        S.capture(dense, data, layers=["conv9"])
