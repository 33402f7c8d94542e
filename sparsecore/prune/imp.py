"""Iterative magnitude pruning (Frankle & Carbin 2019; Frankle et al. 2020; Renda et al. 2020).

Train, prune a fraction of the remaining weights by magnitude, rewind, train again; repeat.
Rewinding: "init" (the lottery ticket: weights back to their values at initialisation),
"step" (back to their values after `rewind_steps` of training: lottery-ticket rewinding),
"lr" (keep the trained weights, retrain with the full learning-rate schedule from its start:
learning-rate rewinding). Training is the caller's: `train_fn(model, steps)` trains the
model in place for `steps` units (epochs or steps, the caller's choice) and restarts its
learning-rate schedule on every call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from sparsecore.prune.base import Selection
from sparsecore.prune.masks import load_logical_state, logical_state
from sparsecore.prune.methods import Magnitude

TrainFn = Callable[[nn.Module, int], None]
REWINDS = ("init", "step", "lr")


@dataclass
class IMPResult:
    """densities[r] and masks[r]: after pruning round r+1 (round 0 trains the dense net)."""

    densities: list[float] = field(default_factory=list)
    masks: list[dict[str, Tensor]] = field(default_factory=list)


def imp(
    model: nn.Module,
    train_fn: TrainFn,
    *,
    rounds: int,
    steps: int,
    fraction: float = 0.2,
    rewind: str = "init",
    rewind_steps: int = 0,
    scope: str = "global",
    selection: Selection | None = None,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> IMPResult:
    """Run IMP on `model` in place; return the masks of each round.

    rounds: pruning rounds after the dense run; steps: training per round; fraction: the
    share of the remaining prunable weights removed per round (density (1-fraction)**r after
    round r); rewind: "init", "step" (needs 0 < rewind_steps < steps) or "lr";
    callback(round, model): called after each round's training (round 0 = dense).
    """
    if rewind not in REWINDS:
        raise ValueError(f"unknown rewind {rewind!r}; choose one of {REWINDS}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    if rewind == "step" and not 0 < rewind_steps < steps:
        raise ValueError(f"rewind='step' needs 0 < rewind_steps < steps, got {rewind_steps}")
    result = IMPResult()

    anchor = logical_state(model)
    if rewind == "step":
        train_fn(model, rewind_steps)
        anchor = logical_state(model)
        train_fn(model, steps - rewind_steps)
    else:
        train_fn(model, steps)
    if callback is not None:
        callback(0, model)

    pruner = Magnitude(scope=scope, selection=selection)
    for r in range(1, rounds + 1):
        density = (1.0 - fraction) ** r
        masks = pruner.prune(model, density=density)
        if rewind != "lr":
            load_logical_state(model, anchor)
        train_fn(model, steps if rewind != "step" else steps - rewind_steps)
        result.densities.append(density)
        result.masks.append(masks)
        if callback is not None:
            callback(r, model)
    return result
