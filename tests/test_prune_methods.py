"""Pruning methods against direct computations: SNIP by finite differences, GraSP by an
explicit Hessian, SynFlow's conservation law, the SynFlow layer-collapse result, ERK's
allocation, IMP's rewinding and the study's presets."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsecore import models, prune
from sparsecore.prune.masks import get_tensor

pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()


def _batch(n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 4, (n,))


def test_snip_matches_finite_differences() -> None:
    """SNIP's score |dL/dc_j| (c the mask multiplier at c=1), by central differences."""
    model = smooth_mlp()
    x, y = _batch()
    scores = prune.get("snip").scores(model, data=(x, y))
    eps = 1e-6
    for name in prune.prunable(model):
        w = model.get_parameter(name)
        fd = torch.empty_like(w)
        with torch.no_grad():
            for i in range(w.numel()):
                orig = w.view(-1)[i].item()
                w.view(-1)[i] = orig * (1 + eps)
                up = F.cross_entropy(model(x), y)
                w.view(-1)[i] = orig * (1 - eps)
                down = F.cross_entropy(model(x), y)
                w.view(-1)[i] = orig
                fd.view(-1)[i] = (up - down) / (2 * eps)
        torch.testing.assert_close(scores[name], fd.abs(), rtol=1e-5, atol=1e-9)


def bn_net() -> nn.Module:
    """A conv net with BatchNorm whose running statistics are far from one batch's."""
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 5 * 5, 4)).double()
    with torch.no_grad():
        net[1].running_mean.normal_(0.0, 2.0)
        net[1].running_var.uniform_(0.2, 5.0)
    return net


def _snip_by_hand(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool
                  ) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(model).train(train)
    names = prune.prunable(ref)
    params = [ref.get_parameter(n) for n in names]
    grads = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    return {n: (g * p).abs().detach() for n, g, p in zip(names, grads, params)}


@pytest.mark.parametrize("was_training", [True, False])
@pytest.mark.parametrize("train_mode", [False, True])
def test_snip_scores_batchnorm_nets_in_eval_mode(train_mode: bool, was_training: bool) -> None:
    """SNIP scores in eval mode, BatchNorm using its running statistics, as the authors'
    code (and Synaptic-Flow's) does; `train_mode=True` scores with batch statistics. The
    model keeps its mode and its BatchNorm statistics."""
    model = bn_net().train(was_training)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    before = copy.deepcopy(model.state_dict())
    kw = {"train_mode": True} if train_mode else {}
    scores = prune.get("snip", **kw).scores(model, data=(x, y))
    expected = _snip_by_hand(model, x, y, train=train_mode)
    other = _snip_by_hand(model, x, y, train=not train_mode)
    for n in expected:
        torch.testing.assert_close(scores[n], expected[n], rtol=1e-10, atol=1e-14)
    assert not torch.allclose(scores["0.weight"], other["0.weight"])  # the mode matters
    assert model.training == was_training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    prune.prune(model, "snip", density=0.3, data=(x, y), **kw)
    assert model.training == was_training
    assert torch.equal(model[1].running_mean, before["1.running_mean"])


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_matches_explicit_hessian(temperature: float) -> None:
    """GraSP's theta * (H g) against the full Hessian of the loss in the prunable weights."""
    model = smooth_mlp()
    x, y = _batch()
    names = prune.prunable(model)
    scores = prune.get("grasp", temperature=temperature).scores(model, data=(x, y))
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].flatten() for n in names])

    def loss(v: torch.Tensor) -> torch.Tensor:
        p = dict(params)
        for n, chunk, shape in zip(names, v.split(sizes), shapes):
            p[n] = chunk.view(shape)
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)) / temperature, y)

    hess = torch.autograd.functional.hessian(loss, flat)
    grad = torch.func.grad(loss)(flat)
    expected = (flat * (hess @ grad)).split(sizes)
    for n, e, shape in zip(names, expected, shapes):
        torch.testing.assert_close(scores[n], e.view(shape), rtol=1e-6, atol=1e-12 * e.abs().max())


def relu_convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(8, 8, 1, bias=False), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(8 * 2 * 2, 9, bias=False), nn.ReLU(), nn.Linear(9, 4, bias=False))


def test_synflow_conservation_law() -> None:
    """With ReLU and no biases, every layer's synaptic-flow scores sum to the same R."""
    model = relu_convnet()
    for density in (None, 0.3):
        if density is not None:
            prune.prune(model, "synflow", density=density, input_shape=(3, 8, 8), steps=10)
        scores = prune.get("synflow", input_shape=(3, 8, 8)).scores(model)
        sums = torch.stack([s.sum() for s in scores.values()])
        assert sums.min() > 0
        torch.testing.assert_close(sums, sums[0].expand_as(sums), rtol=1e-10, atol=0)


def test_synflow_avoids_layer_collapse_where_magnitude_does_not() -> None:
    """SynFlow (Tanaka et al. 2020, fig. 1 and 3) on our VGG-16: at compression 10^3, global
    magnitude at initialisation prunes the wide late layers (the smallest Kaiming weights)
    away entirely, which disconnects the net; iterative SynFlow keeps every layer alive.
    (Width 1/8 and 4x4 inputs keep the 100 float64 SynFlow steps fast on a CPU.)"""
    dense = models.create("vgg16", num_classes=10, in_channels=3, input_size=4, width=0.125)
    model, twin, floor = (copy.deepcopy(dense) for _ in range(3))
    prune.prune(model, "magnitude", compression=3)
    report = prune.collapse_report(model, (3, 4, 4))
    assert not report.connected and len(report.collapsed) >= 3, str(report)

    prune.prune(twin, "synflow", compression=3, input_shape=(3, 4, 4))  # 100 steps
    report = prune.collapse_report(twin, (3, 4, 4))
    assert report.ok, str(report)
    rows = prune.summary(twin).rows
    assert sum(r.kept for r in rows) == round(1e-3 * sum(r.numel for r in rows))

    # A per-layer floor stops layers being pruned to zero; it does not make the kept weights
    # line up into paths, which is what the report's effective density shows.
    prune.prune(floor, "magnitude", compression=3, min_density=2e-4)
    report = prune.collapse_report(floor, (3, 4, 4))
    assert not report.collapsed
    assert all(h.kept >= math.ceil(2e-4 * h.numel) for h in report.layers)


def test_collapse_report_sees_dead_residual_branch() -> None:
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(6, 8)
            self.branch1 = nn.Linear(8, 8)
            self.branch2 = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.stem(x))
            return self.head(h + self.branch2(torch.relu(self.branch1(h))))

    model = Res()
    ms = {n: torch.ones_like(model.get_parameter(n), dtype=torch.bool)
          for n in prune.prunable(model)}
    ms["branch2.weight"][:] = False
    prune.apply(model, ms)
    report = prune.collapse_report(model, (6,))
    assert report.connected
    assert report.collapsed == ["branch2.weight"]
    assert report.dead_branches == ["branch1.weight", "branch2.weight"]  # branch1 now useless
    assert "dead branches" in str(report)


def test_erk_allocation() -> None:
    shapes = {"a": (4, 3, 3, 3), "b": (64, 4, 3, 3), "c": (64, 64, 3, 3), "d": (10, 64)}
    dens = prune.erk_densities(shapes, 0.1)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    assert sum(dens[n] * numel[n] for n in shapes) == pytest.approx(0.1 * sum(numel.values()))
    assert dens["a"] == 1.0  # would exceed 1: made dense, the rest rescaled
    raw = {n: sum(s) / numel[n] for n, s in shapes.items()}
    sparse = [n for n in shapes if dens[n] < 1.0]
    eps = dens[sparse[0]] / raw[sparse[0]]
    assert len(sparse) >= 2
    assert [dens[n] / raw[n] for n in sparse] == pytest.approx([eps] * len(sparse))
    assert all(eps * raw[n] >= 1.0 for n in shapes if n not in sparse)



def _rigl_erk_counts(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, int]:
    """Per-layer kept counts written out independently of the package: Erdos-Renyi-Kernel
    densities as RigL's `get_sparsities` computes them (the layers with the largest raw
    probability made dense, one group at a time, until eps * raw <= 1 everywhere), then
    largest-remainder rounding of density * numel to the exact total round(density * N)."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        rhs = sum(numel[n] * density for n in shapes if n not in dense)
        rhs -= sum(numel[n] * (1 - density) for n in dense)
        raw = {n: sum(s) / numel[n] for n, s in shapes.items() if n not in dense}
        eps = rhs / sum(raw[n] * numel[n] for n in raw)
        top = max(raw.values())
        if eps * top <= 1:
            break
        dense |= {n for n, r in raw.items() if r == top}
    quota = {n: numel[n] * (1.0 if n in dense else eps * raw[n]) for n in shapes}
    counts = {n: math.floor(q) for n, q in quota.items()}
    left = round(density * sum(numel.values())) - sum(counts.values())
    remainders = sorted(((q - math.floor(q), n) for n, q in quota.items()), reverse=True)
    assert len({r for r, _ in remainders}) == len(remainders)  # no tie to break
    for _, n in remainders[:left]:
        counts[n] += 1
    return counts


@pytest.mark.parametrize("density", [0.1, 0.03])
def test_erk_counts_exact(density: float) -> None:
    """ERK keeps exactly the per-layer counts of RigL's allocation rounded by largest
    remainders (reversing the rounding order moves a weight between layers)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 64, 3), nn.ReLU(),
                          nn.Conv2d(64, 64, 3), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(1, 3, 9, 9))
    ms = prune.prune(model, "erk", density=density, seed=0)
    want = _rigl_erk_counts({n: tuple(m.shape) for n, m in ms.items()}, density)
    assert {n: int(m.sum()) for n, m in ms.items()} == want


def _names(model: nn.Module) -> list[str]:
    return prune.prunable(model)


@pytest.mark.parametrize("rewind", ["init", "step", "lr"])
def test_imp_rewinding(rewind: str) -> None:
    """A deterministic stand-in for training (adds 0.01 per step to every weight) shows what
    each round starts from."""
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    names = _names(model)
    init = {n: model.get_parameter(n).detach().clone() for n in names}
    starts: list[dict[str, torch.Tensor]] = []

    def train_fn(m: nn.Module, start: int, end: int) -> None:
        starts.append({n: get_tensor(m, n).detach().clone() for n in names})
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * (end - start))

    result = prune.imp(model, train_fn, rounds=3, steps=5, fraction=0.2, rewind=rewind,
                       rewind_steps=2)
    assert result.densities == pytest.approx([0.8, 0.64, 0.512])
    total = sum(init[n].numel() for n in names)
    for d, ms in zip(result.densities, result.masks):
        assert sum(int(m.sum()) for m in ms.values()) == round(d * total)
    for prev, cur in zip(result.masks, result.masks[1:]):
        assert all(not (cur[n] & ~prev[n]).any() for n in names)  # nested

    rounds = starts[1:] if rewind != "step" else starts[2:]
    assert len(rounds) == 3
    step_anchor = {n: init[n] + 0.02 for n in names}
    for r, (start, ms) in enumerate(zip(rounds, result.masks)):
        for n in names:
            m = ms[n]
            if rewind == "init":
                expected = init[n] * m
            elif rewind == "step":
                expected = step_anchor[n] * m
            else:  # lr rewinding keeps the weights trained in the previous round
                trained = init[n] + 0.05 * (r + 1)
                expected = trained * m
            torch.testing.assert_close(start[n], expected, rtol=0, atol=1e-6)
    assert all(torch.equal(prune.masks(model)[n], result.masks[-1][n]) for n in names)


def _lr_at(step: int) -> float:
    """A step schedule: 0.1, halved every 3 steps."""
    return 0.1 * 0.5 ** (step // 3)


@pytest.mark.parametrize("rewind", ["init", "step", "lr"])
def test_imp_train_fn_resumes_the_schedule(rewind: str) -> None:
    """`train_fn(model, start, end)` trains steps start..end-1 of one T-step run with its
    schedule at `start`. Lottery-ticket rewinding (open_lth's runner with rewinding steps)
    trains the dense net from 0 to k, keeps that state, trains on from k to T with the
    schedule resumed at k, and retrains every round from the state at k over k..T; the other
    rewinds train 0..T each time. The learning rates each call sees are those of the one
    schedule at the steps it trains."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    names = _names(model)
    calls: list[tuple[int, int]] = []
    lrs: list[list[float]] = []
    after: list[dict[str, torch.Tensor]] = []
    begin: list[dict[str, torch.Tensor]] = []

    def train_fn(m: nn.Module, start: int, end: int) -> None:
        calls.append((start, end))
        begin.append({n: get_tensor(m, n).detach().clone() for n in names})
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_at(start + s) / 0.1)
        seen = []
        for _ in range(start, end):
            seen.append(opt.param_groups[0]["lr"])
            loss = F.mse_loss(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        lrs.append(seen)
        after.append({n: get_tensor(m, n).detach().clone() for n in names})

    k, steps = 2, 10
    result = prune.imp(model, train_fn, rounds=3, steps=steps, rewind=rewind, rewind_steps=k)
    schedule = [_lr_at(s) for s in range(steps)]
    if rewind == "step":
        assert calls == [(0, k), (k, steps)] + [(k, steps)] * 3
        assert lrs[0] + lrs[1] == pytest.approx(schedule)  # one dense run, one schedule
        assert all(seen == pytest.approx(schedule[k:]) for seen in lrs[2:])
        state_at_k = after[0]
        for start, ms in zip(begin[2:], result.masks):  # every round starts from step k
            for n in names:
                torch.testing.assert_close(start[n], state_at_k[n] * ms[n], rtol=0, atol=0)
    else:
        assert calls == [(0, steps)] * 4
        assert all(seen == pytest.approx(schedule) for seen in lrs)


def test_imp_with_real_training_keeps_masks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(64, 4)
    y = x.sum(dim=1, keepdim=True)

    def train_fn(m: nn.Module, start: int, end: int) -> None:
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        for _ in range(start, end):
            loss = F.mse_loss(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    losses = []
    result = prune.imp(model, train_fn, rounds=2, steps=30, fraction=0.5,
                       callback=lambda r, m: losses.append(F.mse_loss(m(x), y).item()))
    assert len(losses) == 3 and losses[-1] < F.mse_loss(torch.zeros_like(y), y).item()
    final = result.masks[-1]
    for n, m in final.items():
        assert torch.all(model.get_submodule(n[:-7]).weight[~m] == 0)


def test_presets() -> None:
    torch.manual_seed(0)

    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 6))

    trained = net()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    calls = []
    ms = prune.presets.magnitude(trained, sparsity=0.75,
                                 train_fn=lambda m, start, end: calls.append((start, end)),
                                 steps=3)
    assert calls == [(0, 3)]

    for scale in (False, True):
        model = copy.deepcopy(trained)
        out = prune.presets.reinit(model, ms, seed=11, scale=scale)
        torch.manual_seed(11)
        fresh = net()
        for n, m in ms.items():
            assert torch.equal(out[n], m)
            d = m.float().mean().item()
            expected = fresh.get_parameter(n).detach() * m * (d ** -0.5 if scale else 1.0)
            torch.testing.assert_close(get_tensor(model, n), expected)
        torch.testing.assert_close(model[0].bias, fresh[0].bias)  # biases re-initialised too

    a = prune.presets.random_sparse(copy.deepcopy(trained), ms, seed=5)
    b = prune.presets.random_sparse(copy.deepcopy(trained), ms, seed=5)
    for n in ms:
        assert int(a[n].sum()) == int(ms[n].sum())
        assert torch.equal(a[n], b[n])
        assert not torch.equal(a[n], ms[n])
