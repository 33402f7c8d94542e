"""What several modules of the study share: the compared methods, stage-name and number
formatting, JSON reads and means over seeds."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

METHODS = ("magnitude", "reinit", "random")
METHOD_TEXT = {
    "dense2": "dense, second seed",
    "magnitude": "magnitude pruning + fine-tuning",
    "reinit": "post-pruning re-init (same masks, from scratch)",
    "random": "random sparse init (same layer densities, from scratch)",
}


def _pct(p: float) -> str:
    return f"{round(p * 100):g}"


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _seed_mean(model: dict[str, Any], get: Callable[[dict[str, Any]], float]) -> float:
    return _mean([get(a) for a in model["seeds"].values()])
