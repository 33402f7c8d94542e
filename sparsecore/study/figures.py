"""The PNG figures of a run's report."""

from __future__ import annotations

from typing import Any

from sparsecore.study import speed, stats
from sparsecore.study._common import METHODS, _pct, save_figure

_COLORS = {"magnitude": "tab:red", "rewind": "tab:purple", "reinit": "tab:blue",
           "random": "tab:green", "dense2": "black"}


def write_figures(run: str, results: dict[str, Any]) -> list[tuple[str, str]]:
    """The PNG figures of a run's results.json, written into `run` -> [(title, file name)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    sps, metrics = cfg["sparsities"], cfg["metrics"]
    models = results["models"]
    labels = list(models)
    styles = ["-", "--", ":", "-."]
    out = []

    # similarity per layer per method
    fig, axes = plt.subplots(len(labels), len(metrics), squeeze=False,
                             figsize=(5.5 * len(metrics), 3.2 * len(labels)))
    for r, label in enumerate(labels):
        a = next(iter(models[label]["seeds"].values()))
        xs = range(len(a["layers"]))
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            ax.plot(xs, _layer_means(models[label], "dense2", metric), color="black", lw=2,
                    label="dense, seed 2")
            for k, p in enumerate(sorted(sps, reverse=True)):
                for meth in METHODS:
                    ax.plot(xs, _layer_means(models[label], f"{meth}-{_pct(p)}", metric),
                            color=_COLORS[meth], ls=styles[k % len(styles)],
                            label=f"{meth} {_pct(p)}%")
            ax.set_title(f"{label}: {metric} to the dense original (mean over seeds)",
                         fontsize=9)
            ax.set_xticks(list(xs))
            ax.set_xticklabels([_short(n) for n in a["layers"]], rotation=60, fontsize=7)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2, loc="lower left")
    out.append(save_figure(fig, run, "similarity_layers.png",
                           "Similarity to the dense original, per layer"))

    # accuracy vs sparsity
    fig, axes = plt.subplots(1, len(labels), squeeze=False, figsize=(4.2 * len(labels), 3.4))
    for c, label in enumerate(labels):
        mm, ax = models[label], axes[0][c]

        def acc(name, mm=mm):
            return stats.seed_values(mm, lambda a: a["accuracy"][name])
        ax.axhline(100 * stats.mean(acc("dense")), color="gray", lw=1, label="dense")
        ax.axhline(100 * stats.mean(acc("dense2")), color="gray", lw=1, ls="--",
                   label="dense, seed 2")
        for meth in METHODS:
            vals = [acc(f"{meth}-{_pct(p)}") for p in sps]
            ax.errorbar([100 * p for p in sps], [100 * stats.mean(v) for v in vals],
                        yerr=[100 * speed.std0(v) for v in vals], fmt="o-", capsize=3,
                        color=_COLORS[meth], label=meth)
        ax.set_title(label)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("held-out accuracy (%, mean ± std over seeds)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    out.append(save_figure(fig, run, "accuracy_vs_sparsity.png", "Accuracy vs sparsity"))

    # layer x layer heatmaps (first model)
    a = next(iter(models[labels[0]]["seeds"].values()))
    hm = a["heatmap"]
    mats = hm["matrices"]
    fig, axes = plt.subplots(1, len(mats), squeeze=False, figsize=(3.3 * len(mats) + 1, 4.3),
                             layout="constrained")
    names = [_short(n) for n in a["layers"]]
    for c, (name, mat) in enumerate(mats.items()):
        ax = axes[0][c]
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if c == 0 else [], fontsize=6)
        ax.set_xlabel(f"{name} layers", fontsize=8)
        if c == 0:
            ax.set_ylabel("dense original layers", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=hm["metric"])
    fig.suptitle(f"{labels[0]}: layer x layer {hm['metric']} to the dense original "
                 "(spatially pooled)", fontsize=10)
    out.append(save_figure(fig, run, "heatmap.png",
                           f"Layer x layer {hm['metric']}, {labels[0]}", tight=False))

    # speedup
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(labels), 3.4))
    width = 0.8 / max(1, len(sps))
    have = False
    for k, p in enumerate(sps):
        vals = [stats.mean(_speedups(models[lab], f"magnitude-{_pct(p)}")) for lab in labels]
        vals = [None if v != v else v for v in vals]  # NaN: no sparse time
        have |= any(v is not None for v in vals)
        ax.bar([i + k * width for i in range(len(labels))], [v or 0 for v in vals], width,
               label=f"{_pct(p)}%")
    ax.axhline(1.0, color="black", lw=1)
    ax.set_xticks([i + width * (len(sps) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("speedup, optimize() vs dense kernels")
    if not have:
        ax.text(0.5, 0.5, "sparse kernels unavailable in this build", ha="center",
                transform=ax.transAxes)
    ax.legend(fontsize=8, title="sparsity")
    out.append(save_figure(fig, run, "speedup.png",
                           "Inference speedup of the magnitude-pruned nets with optimize() "
                           "(mean over seeds)"))
    out.append(speed.write_figure(run, results))
    return out


def _speedups(model: dict[str, Any], name: str) -> list[float | None]:
    return stats.seed_values(model, lambda a: a["timing"][name].get("speedup"))


def _layer_means(model: dict[str, Any], name: str, metric: str) -> list[float]:
    """Per-layer similarity of network `name`, the mean over seeds."""
    per_seed = [a["similarity"][name][metric] for a in model["seeds"].values()]
    return [stats.mean(vals) for vals in zip(*per_seed)]


def _short(layer: str) -> str:
    return layer.replace("features.", "").replace("classifier.", "c.").replace("blocks.", "b")
