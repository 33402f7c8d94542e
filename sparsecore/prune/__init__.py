"""Pruning: masks as parametrizations, every method of the study and its neighbours, and
mask metrics.

    from sparsecore import prune
    masks = prune.prune(model, "synflow", compression=2, input_shape=(3, 32, 32))
    print(prune.summary(model))

Masks live on ordinary modules (`weight = original * mask`, `mask` a buffer); they survive
deepcopy, state_dict (`prune.load` re-creates them in a fresh model), DDP and optimizer
steps. `prune.remove` bakes the zeros in; `sparsecore.nn.sparsify` turns a masked model
into kernel-backed sparse layers.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from sparsecore.prune import metrics, presets, structured
from sparsecore.prune.base import (
    SCHEDULES,
    SCOPES,
    Pruner,
    Selection,
    available,
    broadcast_state,
    get,
    prunable,
    register,
    resolve_density,
    schedule,
    select,
    shuffle,
)
from sparsecore.prune.imp import IMPResult, imp
from sparsecore.prune.masks import Mask, Summary, apply, load, masks, remove, summary
from sparsecore.prune.methods import ERK, SNIP, GraSP, Magnitude, Random, SynFlow, erk_densities
from sparsecore.prune.safety import CollapseReport, DensityMismatchError, check, collapse_report


def prune(
    model: nn.Module,
    method: str = "magnitude",
    *,
    sparsity: float | None = None,
    compression: float | None = None,
    density: float | None = None,
    data: Any = None,
    **options: Any,
) -> dict[str, Tensor]:
    """Prune `model` in place with the registered `method` to one target (sparsity,
    compression ratio c with density 10**-c, or density); `options` go to the pruner
    (scope, schedule, steps, seed, min_density, selection, invert, shuffle, and the method's
    own). Returns name -> bool mask."""
    return get(method, **options).prune(
        model, sparsity=sparsity, compression=compression, density=density, data=data)


__all__ = [
    "ERK", "SCHEDULES", "SCOPES", "SNIP", "CollapseReport", "DensityMismatchError", "GraSP",
    "IMPResult", "Magnitude", "Mask", "Pruner", "Random", "Selection", "Summary", "SynFlow",
    "apply", "available", "broadcast_state", "check", "collapse_report", "erk_densities",
    "get", "imp", "load", "masks", "metrics", "presets", "prunable", "prune", "register",
    "remove", "resolve_density", "schedule", "select", "shuffle", "structured", "summary",
]
