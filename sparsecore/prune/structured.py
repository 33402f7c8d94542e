"""Structured masks and the block regularisers of TPrune (Mao et al., ACM TCPS 2021).

Every weight is viewed as a matrix (out, in * kernel...) -- the layout the BSR layers use.
Blocks that do not divide the matrix are padded with zeros at the right/bottom edge.

- `block_mask(s)`: keep whole (br, bc) blocks ranked by their L2 norm or by the summed
  scores of any pruning method (for the BSR layers), by density (exact block count, global
  or per layer) or by a threshold;
- `nm_mask(s)`: N:M semi-structured sparsity (2:4 by default) along the input dimension;
- `channel_mask(s)`: keep whole output channels ranked by their L1 norm;
- `block_group_lasso`, `structured_hoyer_square`, `regularization`: differentiable loss
  terms (BSSL's block-wise group lasso sum_b ||W_b||_2 and DeepHoyer's structured Hoyer
  square (sum_b ||W_b||_2)^2 / sum_b ||W_b||_2^2) that drive whole blocks to zero; prune
  the result with `block_masks(..., threshold=...)` or `density=...`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecore.prune.base import Selection, prunable, select
from sparsecore.prune.masks import effective

Block = tuple[int, int]


def _matrix(weight: Tensor) -> Tensor:
    if weight.dim() < 2:
        raise ValueError(f"structured masks need 2+ dims, got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1)


def block_sums(x: Tensor, block: Block) -> Tensor:
    """Sum of each (br, bc) block of the matrix view of x: (ceil(rows/br), ceil(cols/bc));
    differentiable."""
    br, bc = block
    w = _matrix(x)
    r, c = w.shape
    w = F.pad(w, (0, -c % bc, 0, -r % br))
    nbr, nbc = w.shape[0] // br, w.shape[1] // bc
    return w.reshape(nbr, br, nbc, bc).sum(dim=(1, 3))


def block_norms(weight: Tensor, block: Block) -> Tensor:
    """L2 norm of each (br, bc) block of the matrix view; differentiable."""
    return block_sums(weight.pow(2), block).sqrt()


def expand_blocks(blocks: Tensor, block: Block, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Element mask of `shape` from a block mask (crops the padded edge)."""
    br, bc = block
    rows = shape[0]
    cols = math.prod(shape[1:])
    full = blocks.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    return full.reshape(shape)


def block_mask(weight: Tensor, block: Block, *, density: float | None = None,
               threshold: float | None = None) -> Tensor:
    """Keep the blocks of `weight` with the largest L2 norms (exact block count for
    `density`), or those with norm > `threshold`."""
    norms = block_norms(weight.detach(), block)
    if (density is None) == (threshold is None):
        raise ValueError("give exactly one of density=, threshold=")
    if threshold is not None:
        keep = norms > threshold
    else:
        keep = select({"w": norms}, density, scope="layerwise")["w"]
    return expand_blocks(keep, block, weight.shape)


def block_masks(model: nn.Module, block: Block, *, density: float | None = None,
                threshold: float | None = None, scope: str = "global",
                selection: Selection | None = None,
                scores: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Block masks for every prunable matrix of `model`: by density (global: one ranking of
    all blocks of all layers, exact block count; layerwise: per layer) or by threshold.

    Blocks are ranked by their L2 norm, or, given per-weight `scores` (name -> tensor of the
    weight's shape, e.g. `prune.get("snip").scores(model, data)`), by the sum of the scores
    in each block.
    """
    names = [n for n in prunable(model, selection) if effective(model, n).dim() >= 2]
    if scores is None:
        ranks = {n: block_norms(effective(model, n).detach(), block) for n in names}
    else:
        ranks = {n: block_sums(scores[n].detach().double(), block) for n in names}
    if (density is None) == (threshold is None):
        raise ValueError("give exactly one of density=, threshold=")
    keep = ({n: v > threshold for n, v in ranks.items()} if threshold is not None
            else select(ranks, density, scope=scope))
    return {n: expand_blocks(keep[n], block, effective(model, n).shape) for n in names}


def nm_mask(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """N:M mask: in every group of m consecutive inputs of each output row, keep the n
    entries of largest magnitude (ties by position)."""
    w = _matrix(weight.detach())
    if w.shape[1] % m:
        raise ValueError(f"N:M needs the input size ({w.shape[1]}) divisible by m={m}")
    groups = w.abs().reshape(-1, m)
    idx = groups.topk(n, dim=1, sorted=False).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True)
    return keep.reshape(weight.shape)


def nm_masks(model: nn.Module, n: int = 2, m: int = 4,
             selection: Selection | None = None) -> dict[str, Tensor]:
    """N:M masks for every prunable matrix whose input size m divides (others are left out,
    as semi-structured kernels cannot take them)."""
    out = {}
    for name in prunable(model, selection):
        w = effective(model, name)
        if w.dim() >= 2 and _matrix(w).shape[1] % m == 0:
            out[name] = nm_mask(w, n, m)
    return out


def channel_mask(weight: Tensor, density: float) -> Tensor:
    """Keep the round(density * out_channels) output channels of largest L1 norm."""
    norms = _matrix(weight.detach()).abs().sum(dim=1)
    keep = select({"w": norms}, density, scope="layerwise")["w"]
    return keep.view(-1, *([1] * (weight.dim() - 1))).expand(weight.shape).clone()


def channel_masks(model: nn.Module, density: float,
                  selection: Selection | None = None) -> dict[str, Tensor]:
    """Output-channel masks at `density` for every prunable matrix of `model`."""
    return {n: channel_mask(effective(model, n), density)
            for n in prunable(model, selection) if effective(model, n).dim() >= 2}


def block_group_lasso(weight: Tensor, block: Block) -> Tensor:
    """BSSL's block-wise group lasso: sum of the blocks' L2 norms (a scalar)."""
    return block_norms(weight, block).sum()


def structured_hoyer_square(weight: Tensor, block: Block, eps: float = 1e-12) -> Tensor:
    """Structured (group) Hoyer square: (sum_b ||W_b||)^2 / sum_b ||W_b||^2, scale-invariant,
    between 1 (one block alive) and the number of blocks (all equal)."""
    g = block_norms(weight, block)
    return g.sum().pow(2) / (g.pow(2).sum() + eps)


REGULARIZERS = {"group_lasso": block_group_lasso, "hoyer_square": structured_hoyer_square}


def regularization(model: nn.Module, block: Block, kind: str = "hoyer_square",
                   selection: Selection | None = None) -> Tensor:
    """Sum of the regulariser over the prunable matrices of `model` (effective weights);
    add `strength * regularization(...)` to the training loss."""
    try:
        fn = REGULARIZERS[kind]
    except KeyError:
        raise ValueError(f"unknown regulariser {kind!r}; use one of {list(REGULARIZERS)}") from None
    terms = [fn(effective(model, n), block) for n in prunable(model, selection)
             if effective(model, n).dim() >= 2]
    return torch.stack(terms).sum()
