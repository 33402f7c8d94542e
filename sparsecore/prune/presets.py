"""The three regimes of "Is Pruning Compression?" (Blakeney, Yan, Zong, WACV 2020).

- `magnitude`: prune a trained net by magnitude and fine-tune it;
- `reinit`: the same masks on a freshly initialised net, trained from scratch (optionally
  with kept weights scaled by 1/sqrt(layer density), which keeps the NTK of a randomly
  pruned net at its dense scale);
- `random_sparse`: random masks with the same per-layer kept counts, freshly initialised,
  trained from scratch.

Each takes an optional `train_fn(model, start, end)` (the IMP convention; called as
`train_fn(model, 0, steps)`, a full run from the start of its schedule) and returns the
masks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from sparsecore.prune.base import Selection
from sparsecore.prune.imp import TrainFn
from sparsecore.prune.masks import apply as apply_masks
from sparsecore.prune.masks import get_tensor
from sparsecore.prune.masks import masks as get_masks
from sparsecore.prune.masks import remove as remove_masks
from sparsecore.prune.methods import Magnitude


def reinitialize(model: nn.Module, seed: int | None = None,
                 init_fn: Callable[[nn.Module], None] | None = None) -> None:
    """Fresh initialisation of every module in place: `init_fn(module)` if given, else each
    module's own `reset_parameters()`, under `seed` without disturbing the global RNG. Masks
    are removed first (an in-place init of a parametrized weight would write into a
    temporary)."""
    remove_masks(model)
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        if seed is not None:
            torch.manual_seed(seed)
        for m in model.modules():
            if init_fn is not None:
                init_fn(m)
            elif hasattr(m, "reset_parameters"):
                m.reset_parameters()


def rescale(model: nn.Module) -> None:
    """Scale each masked tensor's kept weights by 1/sqrt(its density)."""
    for name, mask in get_masks(model).items():
        d = mask.float().mean().item()
        if d > 0:
            get_tensor(model, name).data.mul_(d ** -0.5)


def _train(model: nn.Module, train_fn: TrainFn | None, steps: int | None) -> None:
    if train_fn is not None:
        if steps is None:
            raise ValueError("train_fn needs steps=")
        train_fn(model, 0, steps)


def magnitude(
    model: nn.Module,
    *,
    sparsity: float | None = None,
    compression: float | None = None,
    density: float | None = None,
    scope: str = "global",
    selection: Selection | None = None,
    train_fn: TrainFn | None = None,
    steps: int | None = None,
) -> dict[str, Tensor]:
    """Prune a trained `model` by magnitude (one shot) and fine-tune it with `train_fn`."""
    masks = Magnitude(scope=scope, selection=selection).prune(
        model, sparsity=sparsity, compression=compression, density=density)
    _train(model, train_fn, steps)
    return masks


def reinit(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    *,
    seed: int | None = None,
    scale: bool = False,
    init_fn: Callable[[nn.Module], None] | None = None,
    train_fn: TrainFn | None = None,
    steps: int | None = None,
) -> dict[str, Tensor]:
    """Re-initialise `model`, apply `masks`, optionally rescale (scale=True), train."""
    reinitialize(model, seed, init_fn)
    apply_masks(model, masks)
    if scale:
        rescale(model)
    _train(model, train_fn, steps)
    return get_masks(model)


def random_like(masks: Mapping[str, Tensor], seed: int | None = None) -> dict[str, Tensor]:
    """Random masks with exactly the same kept count per tensor as `masks`."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    out = {}
    for n, m in masks.items():
        k = int(m.sum())
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=g)[:k]] = True
        out[n] = flat.view(m.shape).to(m.device)
    return out


def random_sparse(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    *,
    seed: int | None = None,
    scale: bool = False,
    init_fn: Callable[[nn.Module], None] | None = None,
    train_fn: TrainFn | None = None,
    steps: int | None = None,
) -> dict[str, Tensor]:
    """Random masks with `masks`' per-layer kept counts on a re-initialised `model`."""
    return reinit(model, random_like(masks, seed), seed=seed, scale=scale, init_fn=init_fn,
                  train_fn=train_fn, steps=steps)


PRESETS = {"magnitude": magnitude, "reinit": reinit, "random_sparse": random_sparse}
