"""The `transformer` preset's report: its sections of report.md and its figures, from
results.json alone (sparsecore.study.lm runs the stages)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sparsecore.study._common import (
    _mean,
    _pct,
    machine_line,
    save_figure,
    stages_section,
    write_report_md,
)
from sparsecore.study.lm import (
    METHOD_TEXT,
    METHODS,
    LMHparams,
    _seed_mean,
)

# ---------------------------------------------------------------------------- report


def _f(v: float | None, fmt: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def _density_of(dens: dict[str, float], module: str) -> str:
    """Density of the weight that produces a compared output (attention: its proj)."""
    for cand in (f"{module}.proj.weight", f"{module}.weight"):
        if cand in dens:
            return f"{dens[cand]:.2f}"
    return ""


def write_report(run: str, results: dict[str, Any]) -> str:
    """report.md and the PNG figures of a language-model study run."""
    cfg = results["config"]
    lm = LMHparams(**cfg["lm"])
    sps, metrics, models_ = cfg["sparsities"], cfg["metrics"], results["models"]
    figs = write_figures(run, results)
    plan = cfg["models"][0]
    first = next(iter(next(iter(models_.values()))["seeds"].values()))
    L: list[str] = ["# Pruning a character-level Transformer: bits per character, layer "
                    "similarity and speed\n"]
    tr = plan["train"]
    L.append(
        f"Preset `{cfg['preset']}`: CPython's help text (dataset `{cfg['data']['dataset']}`), "
        f"windows of {cfg['data']['block_size']} characters"
        + (f", the first {cfg['data']['limit_train']} training windows"
           if cfg["data"]["limit_train"] else "")
        + f"; decoder-only Transformer, d_model {first['d_model']}, {lm.depth} block(s), "
        f"{lm.heads} heads, {first['params']:,} parameters; dense training {tr['epochs']} "
        f"epoch(s) of {tr['optimizer']} at lr {tr['lr']:g}"
        f", batch {tr['batch_size']}; fine-tuning {plan['finetune_epochs']} epoch(s) per "
        f"pruning step. Sparsities {', '.join(_pct(p) + '%' for p in sps)} of the blocks' "
        f"Linear layers (attention q, k, v, proj; MLP fc1, fc2; {cfg['scope']} threshold); "
        f"embeddings and output head stay dense. Seeds {cfg['seeds']}; numbers are means over "
        "seeds. Held-out data: the test windows.\n")
    L.append("Methods: " + "; ".join(f"**{m}**: {METHOD_TEXT[m]}" for m in METHODS) + ".\n")
    L.append(machine_line(results))

    def bpc(mm: dict[str, Any], name: str) -> float:
        return _seed_mean(mm, lambda a: a["bits_per_char"][name])

    def sim(mm: dict[str, Any], name: str, metric: str) -> float:
        return _seed_mean(mm, lambda a: _mean(a["similarity"][name][metric]))

    L.append("## What this run shows\n")
    L += [f"- {line}" for label, mm in models_.items() for line in _observations(
        label, mm, cfg, bpc, sim)]
    L.append("")
    L.append("## Bits per character (held-out; lower is better)\n")
    rows = []
    for label, mm in models_.items():
        rows.append([label, "dense", _f(bpc(mm, "dense"))] + [""] * len(sps))
        rows.append([label, "dense, seed 2", _f(bpc(mm, "dense2"))] + [""] * len(sps))
        rows += [[label, meth, ""] + [_f(bpc(mm, f"{meth}-{_pct(p)}")) for p in sps]
                 for meth in METHODS]
    L += _table(["model", "network", "dense"] + [f"{_pct(p)}%" for p in sps], rows)
    for metric in metrics:
        L.append(f"## Mean {metric} to the dense original, over layers\n")
        L.append("Layers: every block's attention output, MLP output and residual stream, "
                 "token positions as data points. Baseline: a second dense network (another "
                 "seed). 1 = same representation.\n")
        rows = [[label, meth, _f(sim(mm, "dense2", metric))]
                + [_f(sim(mm, f"{meth}-{_pct(p)}", metric)) for p in sps]
                for label, mm in models_.items() for meth in METHODS]
        L += _table(["model", "method", "dense seed 2"] + [f"{_pct(p)}%" for p in sps], rows)
    top = _pct(max(sps))
    for label, mm in models_.items():
        a = next(iter(mm["seeds"].values()))
        names = ["dense2"] + [f"{meth}-{top}" for meth in METHODS]
        dens = a["layer_density"][f"magnitude-{top}"]
        for metric in metrics:
            L.append(f"## {label}: {metric} per layer at {top}% sparsity (first seed)\n")
            L.append(f"{a['points']} token positions per layer; density: of the layer's "
                     "weight after magnitude pruning (attention: its output projection); "
                     "-: the layer's output is constant on these tokens (e.g. every block of "
                     "a layer pruned).\n")
            rows = [[layer, _density_of(dens, mod)]
                    + [_f(a["similarity"][n][metric][i]) for n in names]
                    for i, (layer, mod) in enumerate(zip(a["layers"], a["modules"]))]
            L += _table(["layer", "density"] + names, rows)
        reg = _seed_mean(mm, lambda a: a["blockreg"]["bpc"])
        share = [_seed_mean(mm, lambda a, k=k: a["blockreg"][k])
                 for k in ("block_share_before", "block_share_after")]
        L.append(f"## {label}: block regularisation (TPrune)\n")
        L.append(f"The dense net trained {plan['finetune_epochs']} more epoch(s) with "
                 f"{lm.group_lasso:g} x block group lasso + {lm.hoyer_square:g} x structured "
                 f"Hoyer square over {lm.block}x{lm.block} blocks: {_f(reg)} bits per character "
                 f"(dense {_f(bpc(mm, 'dense'))}). Share of the pruned layers' squared weight "
                 f"norm in the {100 - float(top):g}% largest blocks: {_f(share[0])} before, "
                 f"{_f(share[1])} after (what a {top}% global block threshold keeps).\n")
    L += _speed_section(models_, lm)
    L.append("## Figures\n")
    for title, fname in figs:
        L.append(f"### {title}\n\n![{title}]({fname})\n")
    L += stages_section(results["stage_seconds"], "training includes evaluation after each epoch")
    return write_report_md(run, L)


def _observations(label: str, mm: dict[str, Any], cfg: dict[str, Any],
                  bpc: Callable[..., float], sim: Callable[..., float]) -> list[str]:
    """Plain statements read off the numbers of one model."""
    sps, metric = cfg["sparsities"], cfg["metrics"][0]
    plan = next(p for p in cfg["models"]
                if label == (p["model"] if p["width"] == 1 else f"{p['model']}-w{p['width']:g}"))
    e, ft = plan["train"]["epochs"], plan["finetune_epochs"]
    curve = next(iter(mm["seeds"].values()))["dense_curve"]
    out = [f"{label}: training epochs: dense, second seed, re-init and random {e}; magnitude "
           + ", ".join(f"{e + (i + 1) * ft} at {_pct(p)}%" for i, p in enumerate(sps))
           + f" (each pruning step fine-tunes {ft} more); block {e + 2 * ft} (regularised, "
           "then fine-tuned)."
           + (f" The dense net's held-out bits per character still fell by "
              f"{curve[-2] - curve[-1]:.3f} in its last epoch: it is not converged, so "
              "fine-tuning epochs alone lower bits per character, and nets trained longer "
              "can beat it." if len(curve) > 1 and curve[-1] < curve[-2] else "")]
    dense, seed_gap = bpc(mm, "dense"), abs(bpc(mm, "dense") - bpc(mm, "dense2"))
    for p in sps:
        vals = {meth: bpc(mm, f"{meth}-{_pct(p)}") for meth in METHODS}
        best = min(vals, key=lambda k: vals[k] if not math.isnan(vals[k]) else math.inf)
        out.append(f"{label} at {_pct(p)}%: lowest bits per character by {best} "
                   f"({_f(vals[best])}, dense {_f(dense)}, seed-to-seed gap {_f(seed_gap)}); "
                   + ", ".join(f"{k} {v - dense:+.3f}" for k, v in vals.items()) + " vs dense.")
    base = sim(mm, "dense2", metric)
    for meth in METHODS:
        v = [sim(mm, f"{meth}-{_pct(p)}", metric) for p in sps]
        below = [_pct(p) + "%" for p, x in zip(sps, v) if x < base]
        out.append(f"{label}, {meth}: mean {metric} to the original "
                   + ", ".join(f"{_f(x)} at {_pct(p)}%" for p, x in zip(sps, v))
                   + f" (second dense seed {_f(base)}): "
                   + (f"further from the original than another seed at {', '.join(below)}."
                      if below else "closer to the original than another seed is."))
    rows = mm["timing"]["rows"]
    for key, what in (("infer_speedup", "inference"), ("step_speedup", "training step")):
        got = [(r[lay][key], name, lay) for name, r in rows.items() if name != "dense"
               for lay in ("csr", "bsr") if key in r.get(lay, {})]
        if got:
            v, name, lay = max(got)
            out.append(f"{label}: fastest {what} on sparse kernels: {name} on {lay.upper()}, "
                       f"{v:.2f}x the dense net's speed.")
    return out


def _speed_section(models_: dict[str, Any], lm: LMHparams) -> list[str]:
    L = ["## Speed: dense vs sparsecore's CSR and BSR kernels\n"]
    for label, mm in models_.items():
        tm = mm["timing"]
        L.append(f"**{label}**: inference of {tm['infer_tokens']} tokens ({lm.timing_batch} "
                 f"sequences), one training step on {tm['step_tokens']} tokens (forward, "
                 f"backward, AdamW step); median times on {tm['device']} with "
                 f"{tm['threads']} thread(s). Every pruned Linear of the blocks runs on the "
                 "sparse kernel, whatever its sparsity; BSR runs each mask's "
                 f"{lm.block}x{lm.block} block cover (density: stored fraction of the pruned "
                 "layers' weights). Re-init nets have the magnitude masks: their speed is "
                 "magnitude's.\n")
        d = tm["rows"]["dense"]
        rows = [["dense", "dense", "1.00", f"{d['tokens_per_s']:.0f}", "1.00x",
                 f"{1e3 * d['step_s']:.1f}", "1.00x", ""]]
        for name, r in tm["rows"].items():
            if name == "dense":
                continue
            for lay in ("csr", "bsr"):
                t = r[lay]
                if "note" in t:
                    rows.append([name, lay.upper(), "", "-", "-", "-", "-", t["note"]])
                    continue
                rows.append([name, lay.upper(), f"{t['density']:.2f}",
                             f"{t['tokens_per_s']:.0f}", f"{t['infer_speedup']:.2f}x",
                             f"{1e3 * t['step_s']:.1f}", f"{t['step_speedup']:.2f}x", ""])
        L += _table(["network", "kernels", "density", "inference tokens/s", "speedup",
                     "train step (ms)", "speedup", "note"], rows)
    return L


_COLORS = {"magnitude": "tab:red", "reinit": "tab:blue", "random": "tab:green",
           "block": "tab:purple", "dense2": "black"}


def write_figures(run: str, results: dict[str, Any]) -> list[tuple[str, str]]:
    """The PNG figures of a language-model run -> [(title, file name)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    sps, metrics, models_ = cfg["sparsities"], cfg["metrics"], results["models"]
    labels = list(models_)
    out = []

    fig, axes = plt.subplots(1, len(labels), squeeze=False, figsize=(4.6 * len(labels), 3.6))
    for c, label in enumerate(labels):
        mm, ax = models_[label], axes[0][c]

        def bpc(name: str, mm: dict[str, Any] = mm) -> float:
            return _seed_mean(mm, lambda a: a["bits_per_char"][name])
        ax.axhline(bpc("dense"), color="gray", lw=1, label="dense")
        ax.axhline(bpc("dense2"), color="gray", lw=1, ls="--", label="dense, seed 2")
        for meth in METHODS:
            ax.plot([100 * p for p in sps], [bpc(f"{meth}-{_pct(p)}") for p in sps], "o-",
                    color=_COLORS[meth], label=meth)
        ax.set_title(label)
        ax.set_xlabel("sparsity of the blocks' Linear layers (%)")
        ax.set_ylabel("held-out bits per character")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    out.append(save_figure(fig, run, "bpc_vs_sparsity.png", "Bits per character vs sparsity"))

    nrows = len(labels) * len(metrics)
    fig, axes = plt.subplots(nrows, len(sps), squeeze=False, sharey=True,
                             figsize=(4.2 * len(sps), 3.0 * nrows))
    for r, (label, metric) in enumerate((lb, mt) for lb in labels for mt in metrics):
        a = next(iter(models_[label]["seeds"].values()))
        xs = range(len(a["layers"]))
        for c, p in enumerate(sps):
            ax = axes[r][c]
            ax.plot(xs, a["similarity"]["dense2"][metric], color="black", lw=2,
                    label="dense, seed 2")
            for meth in METHODS:
                ax.plot(xs, a["similarity"][f"{meth}-{_pct(p)}"][metric], "o-", ms=3,
                        color=_COLORS[meth], label=meth)
            ax.set_title(f"{label}, {_pct(p)}%: {metric}", fontsize=9)
            ax.set_xticks(list(xs))
            ax.set_xticklabels(a["layers"], rotation=60, fontsize=7)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    out.append(save_figure(fig, run, "similarity_layers.png",
                           "Similarity to the dense original, per layer"))

    fig, axes = plt.subplots(len(labels), 2, squeeze=False, figsize=(11, 3.6 * len(labels)))
    for r, label in enumerate(labels):
        rows = {k: v for k, v in models_[label]["timing"]["rows"].items() if k != "dense"}
        names = list(rows)
        for c, (key, what) in enumerate((("infer_speedup", "inference"),
                                         ("step_speedup", "training step"))):
            ax = axes[r][c]
            for k, lay in enumerate(("csr", "bsr")):
                vals = [rows[n][lay].get(key, 0.0) for n in names]
                ax.bar([i + 0.4 * k for i in range(len(names))], vals, 0.4,
                       label=lay.upper(), color=("tab:orange", "tab:cyan")[k])
            ax.axhline(1.0, color="black", lw=1)
            ax.set_xticks([i + 0.2 for i in range(len(names))])
            ax.set_xticklabels(names, rotation=45, fontsize=7)
            ax.set_ylabel(f"{what} speedup vs dense")
            ax.set_title(f"{label}: {what} (no bar: not run)", fontsize=9)
            ax.legend(fontsize=8)
    out.append(save_figure(fig, run, "speed.png",
                           "Speed of the pruned nets on CSR and BSR kernels vs dense"))
    return out
