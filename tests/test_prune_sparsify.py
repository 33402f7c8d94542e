"""sparsify() of a model pruned with sparsecore.prune computes what the masked model does
(outputs, input gradients, a training step), in both layouts; densify() gives the masked
model back."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsecore import models, prune
from sparsecore.nn import (
    BlockSparseConv2d,
    BlockSparseLinear,
    SparseConv2d,
    SparseLinear,
    SparsifyConfig,
    densify,
    sparsify,
)
from sparsecore.prune import structured


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _check_same_function(masked: nn.Module, sparse: nn.Module, x: torch.Tensor) -> None:
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = masked(xa), sparse(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["magnitude", "random", "synflow"])
def test_sparsify_of_pruned_convnet_matches_masked_model(method: str) -> None:
    masked = models.create("conv2", in_channels=1, input_size=8).double().eval()
    options = {"input_shape": (1, 8, 8), "steps": 10} if method == "synflow" else {}
    prune.prune(masked, method, sparsity=0.9, scope="layerwise", seed=1, **options)
    sparse = copy.deepcopy(masked)
    report = sparsify(sparse, SparsifyConfig(min_sparsity=0.0))
    kinds = {kind for _, kind, _ in report.swapped}
    assert kinds == {"SparseConv2d", "SparseLinear"}
    assert len(report.swapped) == len(prune.masks(masked))
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    _check_same_function(masked, sparse, x)

    # training: the same SGD steps give the same function, and pruned weights stay zero
    y = torch.randint(0, 10, (6,))
    masked.train(), sparse.train()
    _train_step(masked, x, y)
    _train_step(sparse, x, y)
    masked.eval(), sparse.eval()
    _check_same_function(masked, sparse, x)

    # densify: the masked model again, with the same masks and state_dict keys
    before = prune.masks(masked)
    assert sorted(densify(sparse)) == sorted(name.rsplit(".", 1)[0] for name in before)
    after = prune.masks(sparse)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert sparse.state_dict().keys() == masked.state_dict().keys()
    _check_same_function(masked, sparse, x)


def test_sparsify_bsr_of_block_pruned_model() -> None:
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 16)).double().eval()
    masks = structured.block_masks(model, (8, 8), density=0.25, scope="layerwise")
    masks.pop("5.weight")  # leave the classifier dense: it must be reported, not swapped
    prune.apply(model, masks)
    sparse = copy.deepcopy(model)
    report = sparsify(sparse, SparsifyConfig(layout="bsr", block_size=8))
    assert [(n, k) for n, k, _ in report.swapped] == [("0", "BlockSparseConv2d"),
                                                      ("3", "BlockSparseLinear")]
    assert isinstance(sparse[0], BlockSparseConv2d) and isinstance(sparse[3], BlockSparseLinear)
    assert sparse[3].density == pytest.approx(0.25)
    assert "below" in dict(report.skipped)["5"]
    _check_same_function(model, sparse, torch.randn(3, 16, 4, 4, dtype=torch.float64))
    assert densify(sparse) == ["0", "3"]
    assert torch.equal(prune.masks(sparse)["3.weight"], prune.masks(model)["3.weight"])


def test_sparsify_bsr_refuses_unaligned_masks_and_undivided_layers() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    prune.prune(model, "magnitude", sparsity=0.9, scope="layerwise")
    report = sparsify(model, SparsifyConfig(layout="bsr", block_size=16))
    skipped = dict(report.skipped)
    assert not report.swapped
    assert "not aligned to 16x16 blocks" in skipped["0"]
    assert "does not divide" in skipped["2"]
    # with a sparsity the blocks are chosen by norm
    dense = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    ref = copy.deepcopy(dense)
    report = sparsify(dense, SparsifyConfig(layout="bsr", block_size=16, sparsity=0.75))
    assert len(report.swapped) == 2 and dense[0].density == pytest.approx(0.25)
    x = torch.randn(4, 64)
    densify(ref)  # no sparse layers: nothing happens
    kept = dense[0].to_dense().weight.detach()
    assert torch.equal(kept != 0, structured.block_mask(ref[0].weight, (16, 16), density=0.25))
    with torch.no_grad():
        ref[0].weight.mul_(kept != 0)
        ref[2].weight.mul_(dense[2].to_dense().weight != 0)
    torch.testing.assert_close(dense(x), ref(x))


def test_densify_round_trip_of_csr_layers_keeps_training_masked() -> None:
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    sparsify(model, SparsifyConfig(sparsity=0.8))
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseLinear)
    mask0 = model[0].mask().clone()
    densify(model)
    assert isinstance(model[0], nn.Linear) and not isinstance(model[0], SparseLinear)
    _train_step(model, torch.randn(8, 20), torch.randint(0, 5, (8,)))
    assert torch.equal(model[0].weight != 0, mask0)
    assert not isinstance(model[0], SparseConv2d)
