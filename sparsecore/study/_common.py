"""What several modules of the study share: the compared methods, stage-name and number
formatting, JSON reads, means over layers, and the reports' machine line and figure files."""

from __future__ import annotations

import json
import math
import os
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


def save_figure(fig: Any, run: str, name: str, title: str, *, tight: bool = True,
                **savefig: Any) -> tuple[str, str]:
    """Write matplotlib figure `fig` as run/name (110 dpi; laid out tight first unless
    `tight` is False), close it, and return the report's (title, file name) entry."""
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    fig.savefig(os.path.join(run, name), dpi=110, **savefig)
    plt.close(fig)
    return title, name


def machine_line(results: dict[str, Any]) -> str:
    """The reports' "Machine:" line: CPU, cores, GPU, torch, wall time (and resumed stages),
    seconds of stages."""
    m = results["machine"]
    return (f"Machine: {m['cpu']} ({m['cores']} cores){', ' + m['gpu'] if 'gpu' in m else ''};"
            f" torch {m['torch']}. Wall time {results['wall_seconds']:.0f} s"
            + (f" (after resuming {results['stages_resumed']} finished stages)"
               if results["stages_resumed"] else "")
            + f"; {results['compute_seconds']:.0f} s of stages in all.\n")


def stages_section(stage_seconds: dict[str, float], what: str) -> list[str]:
    """The report's closing "Stages" section: seconds per stage; `what` says what a stage's
    time includes."""
    return ["## Stages\n", f"Seconds per stage ({what}):\n", "| stage | seconds |", "|---|---|",
            *(f"| {k} | {v:.1f} |" for k, v in stage_seconds.items())]


def write_report_md(run: str, lines: list[str]) -> str:
    """RUN/report.md from its lines, written atomically; returns its path."""
    from sparsecore._io import atomic_write_text

    path = os.path.join(run, "report.md")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
