"""The pruning methods: magnitude, random (uniform per layer), ERK, SNIP, GraSP, SynFlow.

Scores that need gradients (SNIP, GraSP, SynFlow) are computed on a copy of the model with
the masks baked in, so the model's `.grad`, BatchNorm running statistics and RNG-free state
are left untouched. A weight already pruned has a zero effective value and is never chosen
again (see `base.select`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecore.prune import _flow
from sparsecore.prune.base import Pruner, batches, register
from sparsecore.prune.masks import effective, get_tensor
from sparsecore.prune.masks import masks as get_masks
from sparsecore.prune.masks import remove as remove_masks

LossFn = Callable[[Tensor, Tensor], Tensor]


@register("magnitude")
class Magnitude(Pruner):
    """|theta| (Han et al. 2015; the study's post-training pruning, and IMP's criterion)."""

    def score(self, model: nn.Module, names: list[str], data: Any = None) -> dict[str, Tensor]:
        return {n: effective(model, n).detach().abs() for n in names}


@register("random")
class Random(Pruner):
    """Uniform random scores: with scope="layerwise" (the default here) every layer keeps
    the same fraction; with scope="global" the per-layer fractions vary by chance."""

    def __init__(self, *, scope: str = "layerwise", **kw: Any) -> None:
        super().__init__(scope=scope, **kw)

    def score(self, model: nn.Module, names: list[str], data: Any = None) -> dict[str, Tensor]:
        out = {}
        for n in names:
            t = get_tensor(model, n)
            out[n] = torch.rand(t.shape, generator=self.generator, dtype=torch.float64).to(t.device)
        return out


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float,
                  power_scale: float = 1.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel per-layer densities (Evci et al. 2020, RigL): density_l is
    proportional to (sum of dims / product of dims) ** power_scale, scaled so that the
    total kept count is density * total; layers that would exceed 1 become dense and the
    rest are rescaled."""
    numel = {n: int(torch.Size(s).numel()) for n, s in shapes.items()}
    raw = {n: (sum(s) / numel[n]) ** power_scale for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(numel.values()) - sum(numel[n] for n in dense)
        divisor = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if divisor == 0:
            eps = 0.0
            break
        eps = budget / divisor
        over = [n for n in shapes if n not in dense and eps * raw[n] > 1.0]
        if not over:
            break
        top = max(raw[n] for n in over)
        dense.update(n for n in over if raw[n] == top)
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


@register("erk")
class ERK(Random):
    """Random masks with Erdos-Renyi-Kernel per-layer densities (exact total count)."""

    def __init__(self, *, power_scale: float = 1.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.power_scale = power_scale

    def densities(self, model: nn.Module, names: list[str], density: float) -> dict[str, float]:
        shapes = {n: tuple(get_tensor(model, n).shape) for n in names}
        return erk_densities(shapes, density, self.power_scale)


class _DataPruner(Pruner):
    """Shared set-up of the data-driven scores: loss, batches, device."""

    needs_data = True

    def __init__(self, *, loss_fn: LossFn | None = None, max_batches: int | None = 1,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.loss_fn = loss_fn or F.cross_entropy
        self.max_batches = max_batches

    def _batches(self, model: nn.Module, data: Any):
        dev = next(model.parameters()).device
        for x, y in batches(data, self.max_batches):
            yield x.to(dev), y.to(dev)


def _baked_copy(model: nn.Module) -> nn.Module:
    c = copy.deepcopy(model)
    remove_masks(c)
    c.zero_grad(set_to_none=True)
    return c


@register("snip")
class SNIP(_DataPruner):
    """Connection sensitivity |g * theta| (Lee et al. 2019): the first-order change of the
    loss when a weight is removed; g is the loss gradient summed over `max_batches` batches
    (one by default, as in the paper).

    The model is scored in eval mode (BatchNorm with its running statistics), as the
    authors' code and Synaptic-Flow's do; train_mode=True scores with batch statistics.
    Either way the model itself keeps its mode and statistics (a copy is scored).
    """

    def __init__(self, *, train_mode: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.train_mode = train_mode

    def score(self, model: nn.Module, names: list[str], data: Any = None) -> dict[str, Tensor]:
        c = _baked_copy(model)
        c.train(self.train_mode)
        params = [c.get_parameter(n) for n in names]
        grads = [torch.zeros_like(p) for p in params]
        for x, y in self._batches(c, data):
            g = torch.autograd.grad(self.loss_fn(c(x), y), params, allow_unused=True)
            grads = [a if b is None else a + b for a, b in zip(grads, g)]
        return {n: (g * p.detach()).abs() for n, p, g in zip(names, params, grads)}


@register("grasp")
class GraSP(_DataPruner):
    """Gradient signal preservation (Wang et al. 2020): score theta * (H g), keeping the
    largest (i.e. removing the largest -theta * Hg, as the paper does). g and H are of the
    loss on logits divided by `temperature` (200, as in the reference code); g is summed
    over the batches and held fixed, Hg = grad(g_fixed . grad L). Scored in train mode
    (BatchNorm with batch statistics), as the authors' code does."""

    def __init__(self, *, temperature: float = 200.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.temperature = temperature

    def score(self, model: nn.Module, names: list[str], data: Any = None) -> dict[str, Tensor]:
        c = _baked_copy(model)
        c.train()
        params = [c.get_parameter(n) for n in names]
        data = list(self._batches(c, data))
        fixed = [torch.zeros_like(p) for p in params]
        for x, y in data:
            g = torch.autograd.grad(self.loss_fn(c(x) / self.temperature, y), params,
                                    allow_unused=True)
            fixed = [a if b is None else a + b.detach() for a, b in zip(fixed, g)]
        hg = [torch.zeros_like(p) for p in params]
        for x, y in data:
            g = torch.autograd.grad(self.loss_fn(c(x) / self.temperature, y), params,
                                    create_graph=True, allow_unused=True)
            z = sum((a * b).sum() for a, b in zip(fixed, g) if b is not None)
            if not isinstance(z, Tensor) or not z.requires_grad:
                continue
            h = torch.autograd.grad(z, params, allow_unused=True)
            hg = [a if b is None else a + b for a, b in zip(hg, h)]
        return {n: p.detach() * h for n, p, h in zip(names, params, hg)}


@register("synflow")
class SynFlow(Pruner):
    """Iterative synaptic flow (Tanaka et al. 2020): score |theta * dR/dtheta| with
    R = 1^T (prod_l |W_l|) 1 on an all-ones input, float64, BatchNorm in eval mode, no data;
    100 steps of the exponential schedule by default, rescoring after each step.

    input_shape: one input's shape without the batch dimension; if omitted, it is taken
    from `data` (an example batch or (x, y)), which is used for nothing else.
    """

    default_schedule = ("exponential", 100)

    def __init__(self, *, input_shape: tuple[int, ...] | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.input_shape = input_shape
        self._lin: nn.Module | None = None
        self._x: Tensor | None = None

    def begin(self, model: nn.Module, names: list[str], data: Any) -> None:
        self._lin = _flow.linearized_copy(model)
        dev = next(self._lin.parameters()).device
        self._x = _flow.ones_input(self.input_shape or data, device=dev)

    def end(self) -> None:
        self._lin = self._x = None

    def score(self, model: nn.Module, names: list[str], data: Any = None) -> dict[str, Tensor]:
        assert self._lin is not None and self._x is not None
        current = get_masks(model)
        with torch.no_grad():  # follow the masks chosen at the previous step
            for n in names:
                if n in current:
                    self._lin.get_parameter(n).mul_(current[n])
        _, scores = _flow.flow(self._lin, names, self._x)
        return scores
