"""Structured masks (blocks, N:M, channels) and TPrune's block regularisers, against
straightforward loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsecore import prune
from sparsecore.prune import structured

pytestmark = pytest.mark.usefixtures("one_thread")


def _loop_block_norms(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    m = w.reshape(w.shape[0], -1)
    br, bc = block
    nr, nc = math.ceil(m.shape[0] / br), math.ceil(m.shape[1] / bc)
    out = torch.empty(nr, nc, dtype=w.dtype)
    for i in range(nr):
        for j in range(nc):
            out[i, j] = m[i * br:(i + 1) * br, j * bc:(j + 1) * bc].norm()
    return out


@pytest.mark.parametrize("shape", [(12, 20), (13, 22), (10, 3, 3, 3)])
@pytest.mark.parametrize("block", [(4, 4), (2, 8), (1, 4)])
def test_block_mask(shape: tuple[int, ...], block: tuple[int, int]) -> None:
    w = torch.randn(shape, dtype=torch.float64)
    norms = structured.block_norms(w, block)
    torch.testing.assert_close(norms, _loop_block_norms(w, block))
    mask = structured.block_mask(w, block, density=0.3)
    assert mask.shape == w.shape
    kept_blocks = _loop_block_norms(mask.double(), block) > 0
    assert int(kept_blocks.sum()) == round(0.3 * norms.numel())
    # every block is all-in or all-out (the padded edge aside) and the best ones are kept
    full = structured.expand_blocks(kept_blocks, block, w.shape)
    assert torch.equal(full, mask)
    assert norms[kept_blocks].min() >= norms[~kept_blocks].max()
    thr = structured.block_mask(w, block, threshold=norms.median().item())
    assert torch.equal(_loop_block_norms(thr.double(), block) > 0, norms > norms.median())


def test_block_masks_global_exact_count() -> None:
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    ms = structured.block_masks(model, (4, 4), density=0.25)
    nblocks = sum(math.ceil(m.shape[0] / 4) * math.ceil(m.shape[1] / 4) for m in ms.values())
    kept = sum(int((_loop_block_norms(m.double(), (4, 4)) > 0).sum()) for m in ms.values())
    assert kept == round(0.25 * nblocks)
    prune.apply(model, ms)
    assert prune.summary(model).masked_density == pytest.approx(0.25, abs=0.01)
    # ranked by a method's per-weight scores summed per block
    scores = {n: torch.rand(m.shape) for n, m in ms.items()}
    by_score = structured.block_masks(model, (4, 4), density=0.25, scores=scores)
    sums = {n: _loop_block_norms(scores[n].sqrt(), (4, 4)) ** 2 for n in scores}
    kept = {n: _loop_block_norms(m.double(), (4, 4)) > 0 for n, m in by_score.items()}
    # (over all layers at once: the global ranking may keep no block of a layer, or all)
    kept_sums = torch.cat([sums[n][kept[n]] for n in sums])
    dropped_sums = torch.cat([sums[n][~kept[n]] for n in sums])
    assert kept_sums.min() >= dropped_sums.max()


def test_nm_mask_two_four() -> None:
    w = torch.randn(6, 16)
    mask = structured.nm_mask(w, 2, 4)
    groups = mask.reshape(-1, 4)
    assert torch.all(groups.sum(dim=1) == 2)
    a = w.abs().reshape(-1, 4)
    kept, dropped = a[groups].view(-1, 2), a[~groups].view(-1, 2)
    assert torch.all(kept.min(dim=1).values >= dropped.max(dim=1).values)
    conv = torch.randn(8, 4, 3, 3)  # 36 inputs per row
    assert structured.nm_mask(conv, 2, 4).reshape(8, -1).reshape(-1, 4).sum(dim=1).eq(2).all()
    with pytest.raises(ValueError):
        structured.nm_mask(torch.randn(4, 6), 2, 4)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    assert list(structured.nm_masks(model)) == ["0.weight"]  # 6 inputs: not 2:4-able


def test_channel_mask() -> None:
    w = torch.randn(10, 3, 3, 3)
    mask = structured.channel_mask(w, 0.4)
    rows = mask.reshape(10, -1)
    assert torch.all(rows.all(dim=1) | (~rows).all(dim=1))
    kept = rows.all(dim=1)
    assert int(kept.sum()) == 4
    l1 = w.reshape(10, -1).abs().sum(dim=1)
    assert l1[kept].min() >= l1[~kept].max()


def test_regularisers_values_and_gradients() -> None:
    w = torch.randn(8, 12, dtype=torch.float64, requires_grad=True)
    g = _loop_block_norms(w.detach(), (4, 4))
    lasso = structured.block_group_lasso(w, (4, 4))
    hoyer = structured.structured_hoyer_square(w, (4, 4))
    torch.testing.assert_close(lasso, g.sum())
    torch.testing.assert_close(hoyer, g.sum() ** 2 / (g ** 2).sum())
    assert 1.0 <= hoyer.item() <= g.numel()
    (lasso + hoyer).backward()
    assert torch.isfinite(w.grad).all()
    one_block = torch.zeros(8, 12, dtype=torch.float64)
    one_block[:4, :4] = 1.0
    assert structured.structured_hoyer_square(one_block, (4, 4)).item() == pytest.approx(1.0)


def test_regularised_training_then_threshold_to_block_masks() -> None:
    """TPrune's flow: train with a block regulariser, threshold the block norms into a
    block mask, apply it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    x = torch.randn(64, 16)
    y = x[:, :4].sum(dim=1, keepdim=True).expand(-1, 16)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        loss = (model(x) - y).pow(2).mean() + 0.02 * structured.regularization(
            model, (4, 4), kind="group_lasso")
        opt.zero_grad()
        loss.backward()
        opt.step()
    norms = structured.block_norms(model[0].weight.detach(), (4, 4))
    ms = structured.block_masks(model, (4, 4), threshold=0.05)
    assert 0 < int((norms > 0.05).sum()) < norms.numel()  # the regulariser zeroed blocks
    prune.apply(model, ms)
    assert torch.equal(structured.block_norms(model[0].weight.detach(), (4, 4)) > 0, norms > 0.05)
    with pytest.raises(ValueError):
        structured.regularization(model, (4, 4), kind="l3")
