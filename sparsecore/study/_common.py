"""What several modules of the study share: the compared methods, stage-name and number
formatting, JSON reads and means over layers."""

from __future__ import annotations

import json
import math
from typing import Any

METHODS = ("magnitude", "rewind", "reinit", "random")
METHOD_TEXT = {
    "dense2": "dense, second seed",
    "magnitude": "magnitude pruning + fine-tuning",
    "rewind": "iterative magnitude pruning, rewound to an early epoch (lottery ticket)",
    "reinit": "post-pruning re-init (same masks, from scratch)",
    "random": "random sparse init (same layer densities, from scratch)",
}
# sparsity patterns of the one-shot stages (study.regimes)
PATTERNS = ("global", "layerwise", "erk", "block")


def _pct(p: float) -> str:
    return f"{round(p * 100):g}"


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")
