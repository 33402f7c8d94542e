"""Speed beside accuracy: every pruned net of a run as a point (measured inference speedup with
sparsecore.optimize(), held-out accuracy), each a mean over seeds; the Pareto front of those
points; its table and figure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparsecore.study import stats
from sparsecore.study._common import METHODS, _pct, save_figure

_COLORS = {"magnitude": "tab:red", "rewind": "tab:purple", "reinit": "tab:blue",
           "random": "tab:green"}
_MARKERS = {"global": "o", "layerwise": "s", "erk": "^", "block": "D"}


@dataclass
class Point:
    """One pruned net of one model: its regime (a study method, or "oneshot"), its sparsity
    pattern, its sparsity, and accuracy and speedup per seed."""

    name: str  # the network's name in results.json ("rewind-90", "oneshot-erk-90")
    regime: str
    pattern: str
    sparsity: float
    acc: list[float | None]
    speedup: list[float | None]

    @property
    def acc_mean(self) -> float:
        return stats.mean(self.acc)

    @property
    def speedup_mean(self) -> float:
        return stats.mean(self.speedup)


def points(results: dict[str, Any], label: str) -> list[Point]:
    """The pruned nets of model `label`: each method at each sparsity (global magnitude
    masks, or the same layer densities for random), then each one-shot pattern."""
    cfg = results["config"]
    m = results["models"][label]
    out = []

    def point(name: str, regime: str, pattern: str, p: float) -> Point:
        return Point(name, regime, pattern, p,
                     stats.seed_values(m, lambda a: a["accuracy"][name]),
                     stats.seed_values(m, lambda a: a["timing"][name].get("speedup")))

    for p in cfg["sparsities"]:  # random: random positions, magnitude's layer densities
        out += [point(f"{meth}-{_pct(p)}", meth, "random" if meth == "random" else cfg["scope"],
                      p) for meth in METHODS]
    p = cfg["pattern_sparsity"]
    out += [point(f"oneshot-{pat}-{_pct(p)}", "oneshot", pat, p) for pat in cfg["patterns"]]
    return out


def pareto(pts: list[tuple[float, float]]) -> list[int]:
    """Indices of the (speedup, accuracy) points no other point beats in both (at least as
    good in both and better in one); NaN points are never on the front."""
    ok = [i for i, (s, a) in enumerate(pts) if s == s and a == a]
    front = []
    for i in ok:
        si, ai = pts[i]
        if not any(pts[j][0] >= si and pts[j][1] >= ai and pts[j] != pts[i] for j in ok):
            front.append(i)
    return front


def table(results: dict[str, Any]) -> list[str]:
    """Markdown: per model, every pruned net with accuracy and speedup (mean ± std over
    seeds), the dense net's accuracy for reference, and whether it is on the Pareto front."""
    L = ["| model | network | pattern | sparsity | accuracy (%) | speedup | Pareto |",
         "|---|---|---|---|---|---|---|"]
    for label, m in results["models"].items():
        dense = stats.seed_values(m, lambda a: a["accuracy"]["dense"])
        pts = points(results, label)
        front = set(pareto([(1.0, stats.mean(dense))]
                           + [(p.speedup_mean, p.acc_mean) for p in pts]))
        L.append(f"| {label} | dense | - | 0% | {stats.mean_std(dense, 100, 2)} | 1x | "
                 f"{'yes' if 0 in front else ''} |")
        for i, p in enumerate(pts, 1):
            L.append(f"| {label} | {p.name} | {p.pattern} | {_pct(p.sparsity)}% | "
                     f"{stats.mean_std(p.acc, 100, 2)} | {stats.mean_std(p.speedup, 1, 2)}x | "
                     f"{'yes' if i in front else ''} |")
    return L


def write_figure(run: str, results: dict[str, Any]) -> tuple[str, str]:
    """accuracy_vs_speedup.png: per model, held-out accuracy against the measured speedup
    of every pruned net (error bars: standard deviation over seeds), the Pareto front
    dashed, each point labelled with its sparsity -> (title, file name)."""
    import matplotlib.pyplot as plt

    labels = list(results["models"])
    fig, axes = plt.subplots(1, len(labels), squeeze=False,
                             figsize=(max(6.5, 4.6 * len(labels)), 4.2))
    for c, label in enumerate(labels):
        ax, m = axes[0][c], results["models"][label]
        dense = stats.seed_values(m, lambda a: a["accuracy"]["dense"])
        pts = points(results, label)
        xy = [(1.0, 100 * stats.mean(dense))] + [(p.speedup_mean, 100 * p.acc_mean)
                                                  for p in pts]
        ax.errorbar([1.0], [xy[0][1]], yerr=[100 * std0(dense)], fmt="*", color="black",
                    ms=11, label="dense")
        for p, (x, y) in zip(pts, xy[1:]):
            regime = p.regime if p.regime != "oneshot" else "magnitude"
            ax.errorbar([x], [y], xerr=[std0(p.speedup)], yerr=[100 * std0(p.acc)],
                        fmt=_MARKERS.get(p.pattern, "o"), color=_COLORS[regime],
                        mfc="none" if p.regime == "oneshot" else _COLORS[regime],
                        ms=6, capsize=2, lw=0.8, alpha=0.85)
            ax.annotate(_pct(p.sparsity), (x, y), xytext=(3, 3), textcoords="offset points",
                        fontsize=6, color=_COLORS[regime])
        front = sorted((xy[i] for i in pareto(xy)), key=lambda t: t[0])
        if front:
            ax.plot(*zip(*front), color="gray", ls="--", lw=1, zorder=0)
        ax.axvline(1.0, color="gray", lw=0.6)
        ax.set_title(label)
        ax.set_xlabel("inference speedup with sparsecore.optimize() (x dense)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=col, marker="o", ls="", label=meth)
               for meth, col in _COLORS.items()]
    handles += [plt.Line2D([], [], color="tab:red", marker=_MARKERS[pat], mfc="none", ls="",
                           label=f"one-shot {pat}") for pat in results["config"]["patterns"]]
    fig.suptitle("Accuracy against measured inference speedup\nlabels: sparsity %; bars: std "
                 "over seeds; dashed: Pareto front", fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=len(handles) // 2 + 1)
    return save_figure(fig, run, "accuracy_vs_speedup.png",
                       "Accuracy against inference speedup (Pareto)", tight=False)


def std0(xs: list[float | None]) -> float:
    """The standard deviation, 0 where there is none (one seed)."""
    s = stats.std(xs)
    return 0.0 if s != s else s
