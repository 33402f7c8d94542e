"""Properties every registered pruner holds in every scope: exact achieved sparsity, at least
one weight per layer wherever a layer has its own target, determinism given a seed, and a
tensor shared by several modules pruned once."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
from torch import nn

from sparsecore import prune

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = prune.available()


class ConvNet(nn.Module):
    """A BatchNorm conv net whose first conv has 3 * 8 * 3 * 3 = 216 weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class Tied(nn.Module):
    """Two Linear modules that share one weight (and a third one of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 12)
        self.b = nn.Linear(12, 12)
        self.b.weight = self.a.weight
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def _options(method: str, input_shape: tuple[int, ...]) -> dict[str, Any]:
    return {"input_shape": input_shape, "steps": 4} if method == "synflow" else {}


def _data(input_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(6, *input_shape), torch.randint(0, 5, (6,))


def _prune(model: nn.Module, method: str, scope: str, input_shape: tuple[int, ...],
           **target: Any) -> dict[str, torch.Tensor]:
    return prune.prune(model, method, scope=scope, data=_data(input_shape),
                       **_options(method, input_shape), **target)


def _layer_target(density: float, numel: int) -> int:
    """Synaptic-Flow's rule for a layer with its own target: round, but never empty a layer
    whose target density is above zero."""
    return max(round(density * numel), 1 if density > 0 else 0)


@pytest.mark.parametrize("density", [0.3, 0.05, 1e-3])
@pytest.mark.parametrize("scope", prune.SCOPES)
@pytest.mark.parametrize("method", METHODS)
def test_exact_sparsity_every_method_and_scope(method: str, scope: str, density: float) -> None:
    """The achieved kept counts are exactly the target's: global, one total; layerwise, one
    count per layer that never reaches zero (at density 1e-3 the 216-weight conv's
    round(0.216) = 0 becomes 1); ERK, its per-layer counts summing to the exact total, each
    at least one."""
    model = ConvNet()
    ms = _prune(model, method, scope, (3, 16, 16), density=density)
    kept = {n: int(m.sum()) for n, m in ms.items()}
    numels = {n: m.numel() for n, m in ms.items()}
    total = sum(numels.values())
    if method == "erk":
        assert sum(kept.values()) == round(density * total)
        assert min(kept.values()) >= 1
    elif scope == "layerwise":
        assert kept == {n: _layer_target(density, k) for n, k in numels.items()}
    else:
        assert sum(kept.values()) == _layer_target(density, total)
    # what every module computes with is what the masks say
    for n, m in ms.items():
        assert not prune.masks(model)[n].logical_xor(m).any()
        assert torch.all(model.get_submodule(n.rpartition(".")[0]).weight[~m] == 0)


@pytest.mark.parametrize("scope", prune.SCOPES)
@pytest.mark.parametrize("method", METHODS)
def test_extreme_compression_never_empties_a_layer_with_its_own_target(method: str,
                                                                      scope: str) -> None:
    """`compression=3` on a net whose first conv has 216 weights: every layer keeps at least
    one weight wherever layers have their own targets (layerwise scope, ERK), by the rule
    Synaptic-Flow's layerwise masks follow; the global scope keeps one threshold over all
    layers and its exact total (layer collapse there is the phenomenon SynFlow measures)."""
    model = ConvNet()
    ms = _prune(model, method, scope, (3, 16, 16), compression=3)
    kept = {n: int(m.sum()) for n, m in ms.items()}
    total = sum(m.numel() for m in ms.values())
    if scope == "layerwise" or method == "erk":
        assert min(kept.values()) >= 1, kept
        assert kept["conv1.weight"] == 1
    if method == "erk" or scope == "global":
        assert sum(kept.values()) == max(round(1e-3 * total), 1)


def test_per_layer_targets_that_cannot_keep_one_weight_each_raise() -> None:
    """ERK at a total below one weight per layer cannot meet both its exact total and the
    one-weight floor: it raises instead of emptying a layer."""
    model = ConvNet()
    total = sum(model.get_parameter(n).numel() for n in prune.prunable(model))
    with pytest.raises(prune.DensityMismatchError, match="one weight per layer"):
        prune.prune(model, "erk", density=2.5 / total, seed=0)
    assert prune.masks(model) == {}  # nothing was applied


@pytest.mark.parametrize("scope", prune.SCOPES)
@pytest.mark.parametrize("method", METHODS)
def test_deterministic_given_a_seed(method: str, scope: str) -> None:
    """The same seed gives the same masks (the shuffle ablation included); another seed gives
    other masks where the method draws random numbers."""
    base = ConvNet()
    data = _data((3, 16, 16))

    def run(seed: int) -> dict[str, torch.Tensor]:
        return prune.prune(copy.deepcopy(base), method, scope=scope, density=0.2, data=data,
                           seed=seed, shuffle=True, **_options(method, (3, 16, 16)))

    a, b, c = run(7), run(7), run(8)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("scope", prune.SCOPES)
@pytest.mark.parametrize("method", METHODS)
def test_tied_weights_are_pruned_once(method: str, scope: str) -> None:
    """A weight shared by two modules is one prunable tensor: both modules compute with the
    same mask, the real density of what they compute with is the target, and `summary`
    reports that real density."""
    model = Tied()
    assert prune.prunable(model) == ["a.weight", "head.weight"]
    ms = _prune(model, method, scope, (12,), density=0.5)
    assert set(ms) == {"a.weight", "head.weight"}
    real_a, real_b = model.a.weight != 0, model.b.weight != 0
    assert torch.equal(real_a, real_b)  # one mask, seen by both modules
    assert torch.equal(real_a, ms["a.weight"])
    real_head = model.head.weight != 0
    kept = {"a.weight": int(real_a.sum()), "head.weight": int(real_head.sum())}
    numels = {"a.weight": real_a.numel(), "head.weight": real_head.numel()}
    if method == "erk" or scope == "global":
        assert sum(kept.values()) == round(0.5 * sum(numels.values()))
    else:
        assert kept == {n: round(0.5 * k) for n, k in numels.items()}
    s = prune.summary(model)
    assert [r.name for r in s.rows] == ["a.weight", "head.weight"]
    assert s.masked_density == sum(kept.values()) / sum(numels.values())
    params = sum(p.numel() for p in Tied().parameters())
    assert s.total_params == params
    assert s.kept_params == params - sum(numels[n] - kept[n] for n in numels)


def test_tied_weights_survive_round_trips() -> None:
    """Training, pruning again, state_dict save/load, deepcopy and remove keep one tensor and
    one mask for the two modules."""
    model = Tied()
    first = prune.prune(model, "magnitude", density=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        loss = model(torch.randn(4, 12)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(model.a.weight != 0, first["a.weight"])
    assert torch.equal(model.b.weight != 0, first["a.weight"])
    second = prune.prune(model, "magnitude", density=0.25)
    assert not (second["a.weight"] & ~first["a.weight"]).any()  # never regrows
    assert torch.equal(model.b.weight != 0, second["a.weight"])

    x = torch.randn(3, 12)
    out = model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = Tied()
    prune.load(fresh, torch.load(buf))
    assert torch.equal(fresh(x), out)
    assert fresh.a.parametrizations.weight.original is fresh.b.parametrizations.weight.original
    assert set(prune.masks(fresh)) == {"a.weight", "head.weight"}

    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), out)
    prune.remove(twin)
    assert twin.a.weight is twin.b.weight
    assert torch.allclose(twin(x), out)
    assert math.isclose(prune.summary(model).masked_density,
                        int(second["a.weight"].sum() + second["head.weight"].sum())
                        / (144 + 60))
