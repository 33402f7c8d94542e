"""Iterative magnitude pruning (Frankle & Carbin 2019; Frankle et al. 2020; Renda et al. 2020).

Train, prune a fraction of the remaining weights by magnitude, rewind, train again; repeat.
Rewinding: "init" (the lottery ticket: weights back to their values at initialisation),
"step" (back to their values after `rewind_steps` of training: lottery-ticket rewinding),
"lr" (keep the trained weights, retrain with the full learning-rate schedule from its start:
learning-rate rewinding).

Training is the caller's: `train_fn(model, start, end)` trains the model in place over steps
start..end-1 of one training run of `steps` units (steps or epochs, the caller's choice),
with its schedule (learning rate, data order) where that run has it at `start`: a fresh
optimizer, and the schedule advanced by `start`. Lottery-ticket rewinding follows open_lth's
runner: the dense net trains 0..k, that state is kept, then it trains on k..T; every round
retrains k..T from the state at k, with the schedule resumed at k, never restarted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from sparsecore.prune.base import Selection
from sparsecore.prune.masks import load_logical_state, logical_state
from sparsecore.prune.methods import Magnitude

TrainFn = Callable[[nn.Module, int, int], None]
"""train_fn(model, start, end): train steps start..end-1 of the run, its schedule at start."""
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

    rounds: pruning rounds after the dense run; steps: the length T of the training run;
    fraction: the share of the remaining prunable weights removed per round (density
    (1-fraction)**r after round r); rewind: "init", "step" (needs 0 < rewind_steps < steps)
    or "lr"; callback(round, model): called after each round's training (round 0 = dense).

    Calls: `train_fn(model, 0, steps)` for the dense net and every round, except with
    rewind="step" and k = rewind_steps: `(0, k)` then `(k, steps)` for the dense net, and
    `(k, steps)` per round.
    """
    if rewind not in REWINDS:
        raise ValueError(f"unknown rewind {rewind!r}; choose one of {REWINDS}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    if rewind == "step" and not 0 < rewind_steps < steps:
        raise ValueError(f"rewind='step' needs 0 < rewind_steps < steps, got {rewind_steps}")
    result = IMPResult()

    anchor = logical_state(model)
    start = rewind_steps if rewind == "step" else 0
    if start:
        train_fn(model, 0, start)
        anchor = logical_state(model)
    train_fn(model, start, steps)
    if callback is not None:
        callback(0, model)

    pruner = Magnitude(scope=scope, selection=selection)
    for r in range(1, rounds + 1):
        density = (1.0 - fraction) ** r
        masks = pruner.prune(model, density=density)
        if rewind != "lr":
            load_logical_state(model, anchor)
        train_fn(model, start, steps)
        result.densities.append(density)
        result.masks.append(masks)
        if callback is not None:
            callback(r, model)
    return result
