"""The `Pruner` base (scores -> masks), its registry, which tensors are prunable, targets
(sparsity or SynFlow's compression ratio) and schedules.

A pruner computes one score per prunable weight; `Pruner.prune` turns scores into masks
with an exact kept count (global: one threshold over all layers; layerwise: one per layer,
never zero for a target above zero), applies them as parametrizations
(`sparsecore.prune.masks`) and checks the achieved density against the target. Iterative
methods repeat score -> mask along a schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sparsecore.prune.masks import apply as apply_masks
from sparsecore.prune.masks import get_tensor, has_tensor, holders
from sparsecore.prune.masks import masks as get_masks
from sparsecore.prune.safety import DensityMismatchError, check_counts

SCOPES = ("global", "layerwise")
SCHEDULES = ("oneshot", "linear", "exponential")

_SHORTCUT_WORDS = ("shortcut", "downsample", "skip")
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ----------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """Which tensors are prunable.

    Default: the weights of every Conv1d/2d/3d and Linear (first and last layers and 1x1
    shortcut convs included). A shortcut is a conv with a 1x1 kernel whose qualified name has
    a part containing "shortcut", "downsample" or "skip"; the first and last layers are the
    first and last weighted layers in `named_modules()` order.
    """

    bias: bool = field(default=False, metadata={"help": "also prune the biases of those layers"})
    batchnorm: bool = field(default=False, metadata={"help": "also prune BatchNorm weights"})
    first: bool = field(default=True, metadata={"help": "prune the first weighted layer"})
    last: bool = field(default=True, metadata={"help": "prune the last weighted layer"})
    shortcut: bool = field(default=True, metadata={"help": "prune 1x1 shortcut convolutions"})
    filter_fn: Callable[[str, nn.Module], bool] | None = field(
        default=None, metadata={"help": "extra filter(module_name, module) -> keep?"}
    )


def _is_shortcut(name: str, module: nn.Module) -> bool:
    if not isinstance(module, nn.modules.conv._ConvNd):
        return False
    parts = name.split(".")
    return all(k == 1 for k in module.kernel_size) and any(
        w in p for p in parts for w in _SHORTCUT_WORDS
    )


def prunable(model: nn.Module, selection: Selection | None = None) -> list[str]:
    """Qualified names ("features.0.weight") of the tensors `selection` makes prunable,
    in `named_modules()` order. Works on masked and unmasked models alike.

    A tensor shared by several modules (tied weights) is listed once, under its first
    holder's name, when the selection takes any of its holders: it is one tensor with one
    mask, and counting it twice would miss the target.
    """
    sel = selection or Selection()
    weighted = [(n, m) for n, m in model.named_modules() if isinstance(m, _WEIGHTED)]
    first = weighted[0][0] if weighted else None
    last = weighted[-1][0] if weighted else None
    canonical = {key: group[0][0] for key, group in holders(model).items()}
    names: list[str] = []
    for mname, m in model.named_modules():
        if sel.filter_fn is not None and not sel.filter_fn(mname, m):
            continue
        attrs: list[str] = []
        if isinstance(m, _WEIGHTED):
            if (not sel.first and mname == first) or (not sel.last and mname == last):
                continue
            if not sel.shortcut and _is_shortcut(mname, m):
                continue
            attrs = ["weight"] + (["bias"] if sel.bias else [])
        elif isinstance(m, _NORMS) and sel.batchnorm and m.affine:
            attrs = ["weight"] + (["bias"] if sel.bias else [])
        for a in attrs:
            if has_tensor(m, a):
                name = canonical[id(get_tensor(m, a))]
                if name not in names:
                    names.append(name)
    return names


# ----------------------------------------------------------------------------- targets


def resolve_density(
    sparsity: float | None = None,
    compression: float | None = None,
    density: float | None = None,
) -> float:
    """The kept fraction from exactly one of: sparsity (pruned fraction), compression ratio
    c (density = 10**-c, as in SynFlow), or density."""
    given = [x is not None for x in (sparsity, compression, density)]
    if sum(given) != 1:
        raise ValueError("give exactly one of sparsity=, compression=, density=")
    if sparsity is not None:
        d = 1.0 - float(sparsity)
    elif compression is not None:
        if compression < 0:
            raise ValueError(f"compression must be >= 0, got {compression}")
        d = 10.0 ** (-float(compression))
    else:
        d = float(density)  # type: ignore[arg-type]
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"density must lie in [0, 1], got {d}")
    return d


def schedule(kind: str, density: float, steps: int) -> list[float]:
    """Densities after each of `steps` pruning steps that end at `density`.

    oneshot: [density]; linear: 1 - (1 - density) * k/n; exponential: density ** (k/n)
    (SynFlow's schedule; IMP's "prune a fraction p of what is left" is exponential too).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
    if kind == "oneshot":
        return [density]
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if kind == "linear":
        return [1.0 - (1.0 - density) * k / steps for k in range(1, steps + 1)]
    return [density ** (k / steps) for k in range(1, steps + 1)]


# ----------------------------------------------------------------------------- selection of masks


def _exact_top(flat: Tensor, k: int) -> Tensor:
    """Boolean mask of the k largest entries of a 1-D CPU tensor; ties at the threshold are
    broken by position, so the count is exact and the result deterministic."""
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    thr = torch.kthvalue(flat, n - k + 1).values  # O(n), unlike a sort
    keep = flat > thr
    need = k - int(keep.sum())
    if need > 0:
        keep[torch.nonzero(flat == thr).flatten()[:need]] = True
    return keep


def _top_within(flat: Tensor, alive: Tensor | None, k: int) -> Tensor:
    """`_exact_top` among the entries where `alive` is True (all when None)."""
    if alive is None:
        return _exact_top(flat, k)
    idx = torch.nonzero(alive).flatten()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[idx[_exact_top(flat[idx], k)]] = True
    return keep


def layer_count(density: float, numel: int, floor: int = 0) -> int:
    """Kept count of a tensor with a target of its own: round(density * numel), at least
    `floor`, and at least one weight whenever density > 0, so that no target above zero
    empties a layer (Synaptic-Flow's layerwise masks keep numel - int((1 - density) * numel),
    never zero, for the same reason)."""
    return max(round(density * numel), floor, 1 if density > 0 and numel > 0 else 0)


def apportion(densities: dict[str, float], numels: dict[str, int], total: int) -> dict[str, int]:
    """Per-layer kept counts close to density * numel whose sum is exactly `total`
    (largest-remainder rounding), each within [0, numel] and at least one where the density
    is above zero; raises DensityMismatchError when `total` cannot give every such layer a
    weight."""
    lo = {n: 1 if densities[n] > 0 and numels[n] > 0 else 0 for n in densities}
    if total < sum(lo.values()):
        raise DensityMismatchError(
            f"the target keeps {total} weights, fewer than one weight per layer for the "
            f"{sum(lo.values())} layers whose target density is above zero"
        )
    raw = {n: densities[n] * numels[n] for n in densities}
    counts = {n: min(numels[n], max(lo[n], math.floor(v))) for n, v in raw.items()}
    rest = total - sum(counts.values())
    by_remainder = sorted(raw, key=lambda n: raw[n] - math.floor(raw[n]), reverse=True)
    for n in by_remainder:  # largest remainders first get the weights left over
        if rest <= 0:
            break
        if counts[n] < numels[n]:
            counts[n] += 1
            rest -= 1
    for n in reversed(by_remainder):  # the floors overshot: smallest remainders give back
        if rest >= 0:
            break
        if counts[n] > lo[n]:
            counts[n] -= 1
            rest += 1
    return counts


def select(
    scores: dict[str, Tensor],
    density: float | dict[str, float],
    *,
    scope: str = "global",
    min_density: float = 0.0,
    alive: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Masks keeping the highest scores.

    scores: name -> score tensor (any shape); density: a float (the global or per-layer
    target) or name -> per-layer density (layerwise); min_density: each layer keeps at
    least ceil(min_density * numel) weights, taken from the global budget; alive: current
    masks -- entries already pruned are never chosen again (pruning does not regrow).
    Kept counts: `layer_count` of the target, per layer where each has its own target (so
    a target above zero never empties a layer), of the total in the global scope (whose one
    threshold may empty a layer: the layer collapse that SynFlow was designed to avoid).
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
    names = list(scores)
    flat = {n: scores[n].detach().reshape(-1).double().cpu() for n in names}
    live = {n: alive[n].reshape(-1).bool().cpu() if alive is not None and n in alive else None
            for n in names}
    numels = {n: flat[n].numel() for n in names}
    n_alive = {n: numels[n] if live[n] is None else int(live[n].sum()) for n in names}
    floor = {n: min(n_alive[n], math.ceil(min_density * numels[n])) for n in names}

    def out(keep: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n: keep[n].view(scores[n].shape).to(scores[n].device) for n in names}

    if isinstance(density, dict) or scope == "layerwise":
        dens = density if isinstance(density, dict) else {n: density for n in names}
        counts = {n: layer_count(dens[n], numels[n], floor[n]) for n in names}
        for n in names:
            if counts[n] > n_alive[n]:
                raise DensityMismatchError(
                    f"{n}: target keeps {counts[n]} weights but only {n_alive[n]} are left; "
                    "pruning never regrows weights"
                )
            if torch.isnan(flat[n]).any():
                raise ValueError(f"scores of {n} contain NaN")
        return out({n: _top_within(flat[n], live[n], counts[n]) for n in names})

    k = layer_count(density, sum(numels.values()))
    if k > sum(n_alive.values()):
        raise DensityMismatchError(
            f"target keeps {k} weights but only {sum(n_alive.values())} are left; "
            "pruning never regrows weights"
        )
    reserved = sum(floor.values())
    if reserved > k:
        raise DensityMismatchError(
            f"min_density={min_density} needs {reserved} weights, more than the {k} the "
            f"target density {density:.3g} keeps"
        )
    if reserved:
        # Reserve each layer's best `floor` weights by lifting them above every other score.
        flat = {n: flat[n].masked_fill(_top_within(flat[n], live[n], floor[n]), math.inf)
                for n in names}
    all_scores = torch.cat([flat[n] for n in names])
    if torch.isnan(all_scores).any():
        bad = [n for n in names if torch.isnan(flat[n]).any()]
        raise ValueError(f"scores of {bad} contain NaN")
    all_live = (None if all(v is None for v in live.values()) else
                torch.cat([torch.ones(numels[n], dtype=torch.bool) if live[n] is None else live[n]
                           for n in names]))
    keep = _top_within(all_scores, all_live, k).split([numels[n] for n in names])
    return out(dict(zip(names, keep)))


def shuffle(masks: dict[str, Tensor], generator: torch.Generator | None = None
            ) -> dict[str, Tensor]:
    """Within-layer shuffle ablation: each mask's entries randomly permuted, so every layer
    keeps its density but loses the positions the method chose."""
    out = {}
    for n, m in masks.items():
        perm = torch.randperm(m.numel(), generator=generator).to(m.device)
        out[n] = m.flatten()[perm].view_as(m)
    return out


# ----------------------------------------------------------------------------- data


def batches(data: Any, limit: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs, targets) pairs from one (x, y) tuple or an iterable of them, at most `limit`."""
    if data is None:
        raise ValueError("this pruner needs data: pass data=(x, y) or an iterable of batches")
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], Tensor):
        yield data[0], data[1]
        return
    for i, batch in enumerate(data):
        if limit is not None and i >= limit:
            return
        yield batch[0], batch[1]


# ----------------------------------------------------------------------------- registry


_REGISTRY: dict[str, type[Pruner]] = {}


def register(name: str) -> Callable[[type[Pruner]], type[Pruner]]:
    """Class decorator: make a Pruner subclass available as `get(name)`."""

    def deco(cls: type[Pruner]) -> type[Pruner]:
        if name in _REGISTRY:
            raise ValueError(f"pruner {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Registered pruner names."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs: Any) -> Pruner:
    """An instance of the pruner registered as `name`."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown pruner {name!r}; available: {available()}") from None
    return cls(**kwargs)


# ----------------------------------------------------------------------------- the base


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _dist_world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def broadcast_state(model: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of `model` from rank `src` to all ranks, so that
    global thresholds are computed on identical weights."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dtype == torch.bool:
            buf = t.data.to(torch.uint8)
            torch.distributed.broadcast(buf, src)
            t.data.copy_(buf.bool())
        else:
            torch.distributed.broadcast(t.data, src)


def _broadcast_masks(masks: dict[str, Tensor], src: int = 0) -> dict[str, Tensor]:
    out = {}
    for n, m in masks.items():  # the same order on every rank: prunable() order
        buf = m.to(torch.uint8).contiguous()
        torch.distributed.broadcast(buf, src)
        out[n] = buf.bool()
    return out


class Pruner:
    """Scores -> masks. Subclasses implement `score`; the base does targets, scope,
    schedules, min density, the inverted-score and shuffle ablations, DDP sync and checks.

    scope: "global" (one threshold over all layers) or "layerwise" (same density per layer);
    schedule / steps: how the target is approached (score is recomputed at every step);
    invert: keep the lowest scores instead (ablation); shuffle: permute each layer's mask
    after pruning (ablation; keeps per-layer density); seed: for random scores and shuffles;
    min_density: per-layer floor; selection: which tensors are prunable; sync: under
    torch.distributed, broadcast weights from rank 0 before scoring and masks after.
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    default_schedule: ClassVar[tuple[str, int]] = ("oneshot", 1)

    def __init__(
        self,
        *,
        scope: str = "global",
        schedule: str | None = None,
        steps: int | None = None,
        invert: bool = False,
        shuffle: bool = False,
        seed: int | None = None,
        min_density: float = 0.0,
        selection: Selection | None = None,
        sync: bool = True,
    ) -> None:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
        self.scope = scope
        self.schedule = schedule or self.default_schedule[0]
        self.steps = steps or self.default_schedule[1]
        self.invert = invert
        self.shuffle = shuffle
        self.seed = seed
        self.min_density = min_density
        self.selection = selection or Selection()
        self.sync = sync
        self._generator: torch.Generator | None = None

    # --- what subclasses implement

    def score(self, model: nn.Module, names: list[str], data: Any = None) -> dict[str, Tensor]:
        """One score per weight of each tensor in `names` (same shapes), for the model in its
        current masked state; higher means keep."""
        raise NotImplementedError

    def densities(self, model: nn.Module, names: list[str], density: float
                  ) -> dict[str, float] | None:
        """Per-layer target densities, or None to let `scope` decide (ERK overrides this)."""
        return None

    def begin(self, model: nn.Module, names: list[str], data: Any) -> None:
        """Called once before the first scoring step (SynFlow builds its float64 copy here)."""

    def end(self) -> None:
        """Called once after the last scoring step."""

    # --- the loop

    @property
    def generator(self) -> torch.Generator | None:
        """The seeded CPU generator of this run (None: torch's global RNG)."""
        return self._generator

    def scores(self, model: nn.Module, data: Any = None) -> dict[str, Tensor]:
        """Scores of the prunable tensors of `model` as it is now (no pruning)."""
        model = _unwrap(model)
        names = prunable(model, self.selection)
        self._generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        self.begin(model, names, data)
        try:
            return self.score(model, names, data)
        finally:
            self.end()

    def prune(
        self,
        model: nn.Module,
        *,
        sparsity: float | None = None,
        compression: float | None = None,
        density: float | None = None,
        data: Any = None,
    ) -> dict[str, Tensor]:
        """Prune `model` in place to the target and return the masks (name -> bool tensor)."""
        model = _unwrap(model)
        target = resolve_density(sparsity, compression, density)
        names = prunable(model, self.selection)
        if not names:
            raise ValueError("nothing to prune: the selection matches no tensor")
        if self.needs_data and data is None:
            raise ValueError(f"{self.name} needs data=(x, y) or an iterable of batches")
        distributed = self.sync and _dist_world() > 1
        if distributed:
            broadcast_state(model)
        self._generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        current = get_masks(model)
        alive = {n: current[n] for n in names if n in current}
        numels = {n: get_tensor(model, n).numel() for n in names}
        self.begin(model, names, data)
        try:
            for d in schedule(self.schedule, target, self.steps):
                scores = self.score(model, names, data)
                if self.invert:
                    scores = {n: -s for n, s in scores.items()}
                per_layer = self.densities(model, names, d)
                if per_layer is not None:
                    counts = apportion(per_layer, numels, round(d * sum(numels.values())))
                    per_layer = {n: counts[n] / numels[n] for n in names}
                new = select(scores, per_layer if per_layer is not None else d,
                             scope=self.scope, min_density=self.min_density, alive=alive or None)
                apply_masks(model, new)
                alive = new
        finally:
            self.end()
        if self.shuffle:
            alive = shuffle(alive, self._generator)
            apply_masks(model, alive)
        if distributed:
            alive = _broadcast_masks(alive)
            apply_masks(model, alive)
        self._check(alive, target, numels, per_layer)
        return alive

    def _check(
        self,
        masks: dict[str, Tensor],
        target: float,
        numels: dict[str, int],
        per_layer: dict[str, float] | None,
    ) -> None:
        kept = {n: int(m.sum()) for n, m in masks.items()}
        floor = {n: math.ceil(self.min_density * numels[n]) for n in numels}
        if per_layer is not None or self.scope == "layerwise":
            dens = per_layer or {n: target for n in numels}
            want = {n: layer_count(dens[n], numels[n], floor[n]) for n in numels}
            check_counts(kept, want, tolerance=0)
        else:
            want_total = layer_count(target, sum(numels.values()))
            check_counts({"total": sum(kept.values())}, {"total": want_total}, tolerance=0)

