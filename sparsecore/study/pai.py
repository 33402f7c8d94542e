"""Pruning at initialisation: the `pai` preset.

Every model of the preset is pruned at its initialisation (the dense stage's, same seed) by
magnitude, random, random with the kept weights rescaled by 1/sqrt(density), ERK, SNIP,
GraSP and SynFlow, at each compression 10^c (density 10^-c), and trained once from
scratch. For each mask the study records whether a layer collapsed (kept no weight, or lies
on no input->output path any more) and the Ramanujan-graph metrics of its layers (IMDB and
NaRC, `sparsecore.prune.metrics`), and the report sets both against accuracy: the
accuracy-vs-compression figure of the SynFlow paper (Tanaka et al. 2020), and the IMDB / NaRC
scatter of Hoang et al. (ICLR 2023).

Stages: `<model>/s<seed>/dense` (the study's dense stage) and
`<model>/s<seed>/pai-<method>-<c>` (kind `pai-<method>`); results.json holds one row per
pruned net.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

from torch import Tensor, nn

from sparsecore import data as data_lib
from sparsecore import prune
from sparsecore import train as T
from sparsecore.hparams import ModelHparams
from sparsecore.prune import metrics as mask_metrics
from sparsecore.study._common import (
    _mean,
    _read_json,
    machine_line,
    save_figure,
    stages_section,
    write_report_md,
)
from sparsecore.study.config import StudyConfig
from sparsecore.study.stages import SEED_RANDOM, Stage, _splits, _stage_dir

PRESET = "pai"
KIND = "pai-"  # stage kinds: pai-<method>
METHODS = ("magnitude", "random", "random_rescale", "erk", "snip", "grasp", "synflow")
METHOD_TEXT = {
    "magnitude": "magnitude at init",
    "random": "random",
    "random_rescale": "random, x 1/sqrt(density)",
    "erk": "ERK",
    "snip": "SNIP",
    "grasp": "GraSP",
    "synflow": "SynFlow",
}
_COLORS = {"magnitude": "tab:red", "random": "tab:green", "random_rescale": "tab:olive",
           "erk": "tab:cyan", "snip": "tab:blue", "grasp": "tab:purple", "synflow": "tab:orange"}
# SNIP and GraSP score on this many training examples per class (Synaptic-Flow's default).
EXAMPLES_PER_CLASS = 10
# 1x1 residual convolutions stay dense, as in Synaptic-Flow's experiments.
SELECTION = prune.Selection(shortcut=False)


def compression(sparsity: float) -> float:
    """The compression exponent c of a sparsity: density = 1 - sparsity = 10**-c."""
    return -math.log10(1.0 - sparsity)


def _ctext(c: float) -> str:
    return f"{round(c, 2):g}"


def plan_stages(cfg: StudyConfig) -> list[Stage]:
    """The dense net of every model and seed, then one pruned net per compression and
    method (none depends on another: each prunes a fresh copy of the same init)."""
    out: list[Stage] = []
    for plan in cfg.models:
        for seed in cfg.seeds:
            base = f"{plan.label}/s{seed}"
            out.append(Stage(f"{base}/dense", plan.label, seed, "dense"))
            for p in cfg.sparsities:
                for m in METHODS:
                    out.append(Stage(f"{base}/{KIND}{m}-{_ctext(compression(p))}", plan.label,
                                     seed, KIND + m, p))
    return out


# ----------------------------------------------------------------------------- one mask


def prune_at_init(model: nn.Module, method: str, density: float, *, scope: str = "global",
                  seed: int = 0, data: tuple[Tensor, Tensor] | None = None,
                  input_shape: tuple[int, ...] | None = None) -> dict[str, Tensor]:
    """Prune a freshly initialised `model` in place with one of METHODS to `density`.

    scope: the threshold of the scored methods (magnitude, SNIP, GraSP, SynFlow): global
    (one over all layers, which can empty a layer) or layerwise; random keeps `density` in
    every layer, ERK its Erdos-Renyi-Kernel densities. data: one (x, y) batch for SNIP and
    GraSP; input_shape: (C, H, W) for SynFlow's all-ones input. Returns name -> mask."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method in ("random", "random_rescale", "erk"):
        masks = prune.prune(model, "erk" if method == "erk" else "random", density=density,
                            seed=seed, selection=SELECTION)
        if method == "random_rescale":
            # keeps each layer's output scale at its dense value (without a norm after it)
            prune.presets.rescale(model)
        return masks
    kw: dict[str, Any] = {"scope": scope, "selection": SELECTION}
    if method == "synflow":
        kw["input_shape"] = input_shape
    return prune.prune(model, method, density=density,
                       data=data if method in ("snip", "grasp") else None, **kw)


def mask_health(model: nn.Module, input_shape: tuple[int, ...], names: list[str]
                ) -> dict[str, Any]:
    """Layer collapse of a masked model: `collapsed`, the named layers that keep no weight;
    `dead`, those on no input->output path (the collapsed ones among them); `connected`,
    whether any input->output path survives (None when the flow overflowed float64)."""
    try:
        rep = prune.collapse_report(model, input_shape, names)
    except FloatingPointError:
        kept = prune.masks(model)
        empty = [n for n in names if n in kept and not bool(kept[n].any())]
        return {"collapsed": empty, "dead": empty, "connected": None}
    return {"collapsed": rep.collapsed, "dead": rep.dead, "connected": rep.connected}


def graph_metrics(masks: dict[str, Tensor]) -> dict[str, Any]:
    """The Ramanujan-graph metrics of a mask: IMDB and NaRC averaged over the layers where
    they are defined (a layer whose mean degree drops below 3 has neither; IMDB also needs
    three inputs of one degree), how many those are of all, and each layer's values."""
    stats = mask_metrics.ramanujan_layers(masks)
    imdb = [s.imdb for s in stats.values()]
    narc = [s.narc for s in stats.values()]
    return {"imdb": _mean(imdb), "narc": _mean(narc),
            "imdb_layers": sum(not math.isnan(v) for v in imdb),
            "narc_layers": sum(not math.isnan(v) for v in narc), "layers": len(stats),
            "per_layer": {n: {"imdb": s.imdb, "narc": s.narc} for n, s in stats.items()}}


def _score_batch(splits: data_lib.Splits, device: str) -> tuple[Tensor, Tensor]:
    n = min(len(splits.train), EXAMPLES_PER_CLASS * splits.num_classes)
    return next(iter(data_lib.Loader.for_split(splits, "train", n, device=device)))


def run_stage(cfg: StudyConfig, run: str, stage: Stage, device: str,
              progress: bool = False) -> dict[str, Any]:
    """Prune the model's initialisation with the stage's method, check the mask, train it
    from scratch with the model's schedule. A target the method cannot meet (ERK with fewer
    weights than layers) gives a result with `error` and no accuracy."""
    plan = cfg.plan(stage.label)
    splits = _splits(cfg)
    method = stage.kind[len(KIND):]
    assert stage.sparsity is not None
    c = compression(stage.sparsity)
    model_hp = ModelHparams(plan.model, plan.width)
    model = model_hp.build(splits, stage.seed).to(device)
    shape = (splits.in_channels, splits.input_size, splits.input_size)
    out: dict[str, Any] = {"method": method, "compression": c,
                           "target_density": 1.0 - stage.sparsity}
    t0 = time.perf_counter()
    try:
        masks = prune_at_init(model, method, 1.0 - stage.sparsity, scope=cfg.scope,
                              seed=stage.seed + SEED_RANDOM, data=_score_batch(splits, device),
                              input_shape=shape)
    except prune.DensityMismatchError as exc:
        return {**out, "error": str(exc)}
    out["prune_seconds"] = time.perf_counter() - t0
    summary = prune.summary(model)
    out["density"] = summary.masked_density
    out["layer_density"] = {row.name: row.density for row in summary.rows}
    out.update(mask_health(model, shape, list(masks)))
    out["graph"] = graph_metrics(masks)
    hp = dataclasses.replace(plan.train, seed=stage.seed, kernels=cfg.kernels)
    sdir = _stage_dir(run, stage.key)
    r = T.train(model, splits, hp, out_dir=sdir, device=device, progress=progress,
                desc=stage.key)
    # result.json holds all the report needs; the checkpoint only served resuming
    ckpt = os.path.join(sdir, "checkpoint.pt")
    if os.path.exists(ckpt):
        os.unlink(ckpt)
    out.update(acc=r.final["acc"], loss=r.final["loss"], epochs=hp.epochs,
               train_seconds=sum(m["seconds"] for m in r.metrics))
    return out


# ----------------------------------------------------------------------------- results


def aggregate(cfg: StudyConfig, run: str) -> dict[str, Any]:
    """results.json of a pai run (without the machine facts): per model the dense accuracy
    per seed and one row per pruned net."""
    models: dict[str, Any] = {}
    stage_seconds: dict[str, float] = {}
    for s in plan_stages(cfg):
        res = _read_json(os.path.join(_stage_dir(run, s.key), "result.json"))
        stage_seconds[s.key] = res["stage_seconds"]
        m = models.setdefault(s.label, {"dense": {}, "runs": []})
        if s.kind == "dense":
            m["dense"][str(s.seed)] = res["acc"]
        else:
            m["runs"].append({"stage": s.key, "seed": s.seed,
                              **{k: v for k, v in res.items() if k != "stage_seconds"}})
    return {"config": cfg.to_dict(), "models": models, "stage_seconds": stage_seconds,
            "compute_seconds": sum(stage_seconds.values())}


def _cells(runs: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    """(method, compression) -> means over seeds, and collapse in any seed."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["method"], round(r["compression"], 6)), []).append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        out[key] = {
            "acc": _mean([r["acc"] for r in ok]),
            "imdb": _mean([r["graph"]["imdb"] for r in ok]),
            "narc": _mean([r["graph"]["narc"] for r in ok]),
            **{k: min((r["graph"][k] for r in ok), default=0)
               for k in ("imdb_layers", "narc_layers", "layers")},
            "collapsed": max((len(r["collapsed"]) for r in ok), default=0),
            "dead": max((len(r["dead"]) for r in ok), default=0),
            "disconnected": any(r["connected"] is False for r in ok),
            "error": next((r["error"] for r in rs if "error" in r), None),
        }
    return out


def _mark(cell: dict[str, Any]) -> str:
    """X: no input->output path is left; x: a layer keeps no weight, but skip connections
    still carry the signal."""
    if cell["disconnected"]:
        return "X"
    return "x" if cell["collapsed"] else ""


def _fmt(v: float, pct: bool = False) -> str:
    if v is None or math.isnan(v):
        return "-"
    text = f"{100 * v:.2f}" if pct else f"{v:.3f}"
    return "0.000" if text == "-0.000" else text


def _spearman(xs: list[float], ys: list[float]) -> tuple[float, int]:
    pairs = [(x, y) for x, y in zip(xs, ys) if not (math.isnan(x) or math.isnan(y))]
    if len(pairs) < 3:
        return float("nan"), len(pairs)
    from scipy.stats import spearmanr

    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return float(rho), len(pairs)


def write_report(run: str, results: dict[str, Any]) -> str:
    """report.md and the figures of a pai run, from its results.json (already read)."""
    cfg = results["config"]
    comps = [compression(p) for p in cfg["sparsities"]]
    heads = [f"10^{_ctext(c)}" for c in comps]
    figs = write_figures(run, results)
    models = results["models"]
    L: list[str] = ["# Pruning at initialisation: accuracy, layer collapse and Ramanujan "
                    "graphs\n"]
    L.append(f"Preset `{cfg['preset']}`: dataset `{cfg['data']['dataset']}`, models "
             f"{', '.join(models)}, seeds {cfg['seeds']}. Each model's initialisation (the "
             "dense net's) is pruned by every method to density 10^-c at compressions "
             f"{', '.join(heads)}, then trained from scratch "
             + ", ".join(f"{m['train']['epochs']} epochs ({m['model']})"
                         for m in cfg["models"])
             + f". Scored methods (magnitude, SNIP, GraSP, SynFlow) use a {cfg['scope']} "
             "threshold; random keeps the same density in every layer; ERK its "
             "Erdos-Renyi-Kernel densities. SynFlow: 100 iterations of the exponential "
             "schedule. 1x1 shortcut convolutions stay dense. Accuracy on the held-out split; "
             "numbers are means over seeds.\n")
    L.append(machine_line(results))
    cells = {label: _cells(mm["runs"]) for label, mm in models.items()}

    L.append("## Accuracy (%, held-out) vs compression\n")
    L.append("x: a layer keeps no weight (residual branches pruned away; the skip "
             "connections still carry the signal). X: layer collapse, no input->output path "
             "is left (the net cannot learn). -: the method cannot meet the target.\n")
    for label, mm in models.items():
        L.append(f"**{label}** (dense: {_fmt(_mean(list(mm['dense'].values())), True)})\n")
        L.append("| method | " + " | ".join(heads) + " |")
        L.append("|---|" + "---|" * len(heads))
        for meth in METHODS:
            row = [METHOD_TEXT[meth]]
            for c in comps:
                cell = cells[label].get((meth, round(c, 6)))
                row.append("" if cell is None else
                           f"{_fmt(cell['acc'], True)} {_mark(cell)}".strip())
            L.append("| " + " | ".join(row) + " |")
        L.append("")

    L.append("## Layer collapse\n")
    L.append("The first compression at which each method empties a layer (x) or cuts every "
             "input->output path (X); dead layers: on no path any more, empty or not "
             "(most in any seed).\n")
    L.append("| model | method | first x | first X | dead layers at the highest compression |")
    L.append("|---|---|---|---|---|")
    for label in models:
        for meth in METHODS:
            row = [c for c in comps if (meth, round(c, 6)) in cells[label]]
            first_x = next((c for c in row if cells[label][(meth, round(c, 6))]["collapsed"]),
                           None)
            first_cut = next((c for c in row
                              if cells[label][(meth, round(c, 6))]["disconnected"]), None)
            top = cells[label][(meth, round(row[-1], 6))] if row else None
            dead = "-" if top is None or top["error"] else f"{top['dead']}"
            L.append(f"| {label} | {METHOD_TEXT[meth]} | "
                     f"{'none' if first_x is None else '10^' + _ctext(first_x)} | "
                     f"{'none' if first_cut is None else '10^' + _ctext(first_cut)} | {dead} |")
    L.append("")

    L.append("## Ramanujan-graph metrics of the masks\n")
    L.append("IMDB (the irregular Ramanujan gap over its bound, averaged over the "
             "degree-regular subgraphs) and NaRC (normalised Ramanujan characteristic) of "
             "Hoang et al. (ICLR 2023), each averaged over the layers where it is defined "
             "(mean degree at least 3, and for IMDB three inputs of one degree; in brackets: "
             "in how many layers each is, of all). Higher means a better expander, which the "
             "paper links to higher accuracy.\n")
    for label in models:
        L.append(f"**{label}**: IMDB / NaRC (layers with IMDB, with NaRC, of all)\n")
        L.append("| method | " + " | ".join(heads) + " |")
        L.append("|---|" + "---|" * len(heads))
        for meth in METHODS:
            row = [METHOD_TEXT[meth]]
            for c in comps:
                cell = cells[label].get((meth, round(c, 6)))
                row.append("-" if cell is None or cell["error"] else
                           f"{_fmt(cell['imdb'])} / {_fmt(cell['narc'])} "
                           f"({cell['imdb_layers']}, {cell['narc_layers']} of "
                           f"{cell['layers']})")
            L.append("| " + " | ".join(row) + " |")
        L.append("")
    L.append("Rank correlation (Spearman) of each metric with accuracy over the masks where it "
             "is defined:\n")
    L.append("| model | IMDB vs accuracy | NaRC vs accuracy |")
    L.append("|---|---|---|")
    for label in models:
        vals = list(cells[label].values())
        acc = [v["acc"] for v in vals]
        r_i, n_i = _spearman([v["imdb"] for v in vals], acc)
        r_n, n_n = _spearman([v["narc"] for v in vals], acc)
        L.append(f"| {label} | {_fmt(r_i)} (n={n_i}) | {_fmt(r_n)} (n={n_n}) |")
    L.append("")
    L.append("## Figures\n")
    for title, fname in figs:
        L.append(f"### {title}\n\n![{title}]({fname})\n")
    L += stages_section(results["stage_seconds"],
                        "pruning, mask checks and training with evaluation after each epoch")
    return write_report_md(run, L)


def write_figures(run: str, results: dict[str, Any]) -> list[tuple[str, str]]:
    """accuracy_vs_compression.png and ramanujan_vs_accuracy.png -> [(title, file name)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    labels = list(models)
    cells = {label: _cells(models[label]["runs"]) for label in labels}
    comps = [compression(p) for p in results["config"]["sparsities"]]
    out = []

    fig, axes = plt.subplots(1, len(labels), squeeze=False, figsize=(4.8 * len(labels), 3.8))
    for c_i, label in enumerate(labels):
        ax = axes[0][c_i]
        ax.axhline(100 * _mean(list(models[label]["dense"].values())), color="gray", lw=1,
                   label="dense")
        for meth in METHODS:
            pts = [(10 ** c, cells[label][(meth, round(c, 6))]) for c in comps
                   if (meth, round(c, 6)) in cells[label]]
            xs = [x for x, _ in pts]
            ys = [100 * cell["acc"] for _, cell in pts]
            ax.plot(xs, ys, "o-", color=_COLORS[meth], ms=4, label=METHOD_TEXT[meth])
            _collapse_points(ax, xs, ys, [cell for _, cell in pts], _COLORS[meth])
        ax.set_xscale("log")
        ax.set_title(label)
        ax.set_xlabel("compression ratio (dense / kept weights)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
    _collapse_legend(axes[0][-1], "center left", (1.02, 0.5))
    out.append(save_figure(fig, run, "accuracy_vs_compression.png",
                           "Accuracy vs compression (layer collapse marked)", bbox_inches="tight"))

    keys = (("imdb", "IMDB"), ("narc", "NaRC"))
    fig, axes = plt.subplots(len(labels), 2, squeeze=False,
                             figsize=(9.5, 3.4 * len(labels)))
    for r_i, label in enumerate(labels):
        for k_i, (key, name) in enumerate(keys):
            ax = axes[r_i][k_i]
            for meth in METHODS:
                pts = [(cell[key], 100 * cell["acc"], cell, c) for c in comps
                       if (cell := cells[label].get((meth, round(c, 6)))) is not None]
                pts = [p for p in pts if not (math.isnan(p[0]) or math.isnan(p[1]))]
                ax.scatter([p[0] for p in pts], [p[1] for p in pts],
                           s=[14 + 14 * p[3] for p in pts], color=_COLORS[meth], alpha=0.8,
                           label=METHOD_TEXT[meth])
                _collapse_points(ax, [p[0] for p in pts], [p[1] for p in pts],
                                 [p[2] for p in pts], "black")
            ax.set_title(f"{label}: {name} vs accuracy")
            ax.set_xlabel(f"{name} (mean over layers; marker size: compression)")
            ax.set_ylabel("held-out accuracy (%)")
            ax.grid(alpha=0.3)
    _collapse_legend(axes[0][-1], "upper left", (1.02, 1.0))
    out.append(save_figure(fig, run, "ramanujan_vs_accuracy.png",
                           "Ramanujan-graph metrics of each mask vs its accuracy",
                           bbox_inches="tight"))
    return out


def _collapse_legend(ax: Any, loc: str, anchor: tuple[float, float]) -> None:
    """The figure's legend, with the two collapse markers beside the methods."""
    ax.plot([], [], "x", color="black", ms=8, label="a layer empty")
    ax.plot([], [], "X", color="black", ms=9, label="collapse: no path left")
    ax.legend(fontsize=7, loc=loc, bbox_to_anchor=anchor)


def _collapse_points(ax: Any, xs: list[float], ys: list[float], cells: list[dict[str, Any]],
                     color: str) -> None:
    """Overlay x (a layer empty) / X (no path left) on the collapsed points."""
    for marker, cut in (("x", False), ("X", True)):
        pts = [(x, y) for x, y, c in zip(xs, ys, cells)
               if (c["disconnected"] if cut else c["collapsed"] and not c["disconnected"])]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, color=color, ms=9,
                    mec="black" if marker == "X" else color, ls="none", zorder=5)
