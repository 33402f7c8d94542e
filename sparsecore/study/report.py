"""report.md of a run, from its results.json."""

from __future__ import annotations

import math
import os

from sparsecore._io import atomic_write_text
from sparsecore.study._common import METHODS, _mean, _pct, _read_json, _seed_mean
from sparsecore.study.analysis import findings
from sparsecore.study.figures import write_figures


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.2f}" if pct else f"{v:.3f}"


def write_report(run: str) -> str:
    """report.md and the PNG figures of a run, from its results.json."""
    path = os.path.join(run, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `python -m sparsecore study --out {run}`"
                                " first (the same command finishes an interrupted run)")
    results = _read_json(path)
    if results["config"].get("lm") is not None:
        from sparsecore.study import lm

        return lm.write_report(run, results)
    cfg = results["config"]
    sps, metrics = cfg["sparsities"], cfg["metrics"]
    figs = write_figures(run, results)
    models = results["models"]
    L: list[str] = []
    L.append("# Is pruning compression? Layer similarity of pruned networks\n")
    L.append(f"Preset `{cfg['preset']}`: dataset `{cfg['data']['dataset']}`, models "
             f"{', '.join(models)}, sparsities {', '.join(_pct(p) + '%' for p in sps)}, "
             f"seeds {cfg['seeds']}, {cfg['scope']} magnitude pruning. Held-out data: the "
             "test split. Numbers are means over seeds.\n")
    m = results["machine"]
    L.append(f"Machine: {m['cpu']} ({m['cores']} cores){', ' + m['gpu'] if 'gpu' in m else ''};"
             f" torch {m['torch']}. Wall time {results['wall_seconds']:.0f} s"
             + (f" (after resuming {results['stages_resumed']} finished stages)"
                if results["stages_resumed"] else "")
             + f"; {results['compute_seconds']:.0f} s of stages in all.\n")
    L.append("## The paper's findings, checked against this run\n")
    L.append("Blakeney, Yan and Zong (WACV 2020) report three observations; each is checked "
             "below against the numbers of this run (accuracy tolerance: the larger of "
             f"{100 * cfg['accuracy_tolerance']:g} pp and the gap between the two dense "
             "seeds).\n")
    for i, f in enumerate(findings(results), 1):
        L.append(f"{i}. *\"{f.claim}\"*")
        for c in f.checks:
            L.append(f"   - **{c.question} {c.verdict.upper()}.**")
            L.extend(f"     - {e}" for e in c.evidence)
        L.append("")
    L.append("## Accuracy (%, held-out)\n")
    head = ["model", "dense", "dense seed 2"] + [f"{meth} {_pct(p)}%" for p in sps
                                                 for meth in METHODS]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for label, mm in models.items():
        def acc(name, mm=mm):
            return _seed_mean(mm, lambda a: a["accuracy"][name])
        row = [label, _fmt(acc("dense"), True), _fmt(acc("dense2"), True)]
        row += [_fmt(acc(f"{meth}-{_pct(p)}"), True) for p in sps for meth in METHODS]
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    for metric in metrics:
        L.append(f"## Mean {metric} to the dense original, over layers\n")
        L.append("Baseline: a second dense network (another seed). 1 = same representation.\n")
        head = ["model", "method", "dense seed 2"] + [f"{_pct(p)}%" for p in sps]
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))
        for label, mm in models.items():
            def sim(name, mm=mm, metric=metric):
                return _seed_mean(mm, lambda a: _mean(a["similarity"][name][metric]))
            for meth in METHODS:
                row = [label, meth, _fmt(sim("dense2"))]
                row += [_fmt(sim(f"{meth}-{_pct(p)}")) for p in sps]
                L.append("| " + " | ".join(row) + " |")
        L.append("")
    top = _pct(max(sps))
    L.append(f"## Per layer at {top}% sparsity ({metrics[0]} to the dense original, first "
             "seed)\n")
    for label, mm in models.items():
        a = next(iter(mm["seeds"].values()))
        names = ["dense2"] + [f"{meth}-{top}" for meth in METHODS]
        L.append(f"**{label}**\n")
        L.append("| layer | density | " + " | ".join(names) + " |")
        L.append("|" + "---|" * (len(names) + 2))
        dens = a["layer_density"].get(f"magnitude-{top}", {})
        for i, layer in enumerate(a["layers"]):
            d = _layer_density(dens, layer)
            cells = [_fmt(a["similarity"][n][metrics[0]][i]) for n in names]
            L.append(f"| {layer} | {d} | " + " | ".join(cells) + " |")
        L.append("")
    L.append("## Inference: dense kernels vs sparsecore's sparse kernels\n")
    L.append("One forward pass of a held-out batch; median time.\n")
    L.append("| model | network | batch | dense (ms) | sparse (ms) | speedup | note |")
    L.append("|---|---|---|---|---|---|---|")
    for label, mm in models.items():
        tm = mm["timing"]
        for name, row in tm["rows"].items():
            sp, su = row.get("sparse_s"), row.get("speedup")
            sparse_ms = "-" if sp is None else f"{1e3 * sp:.2f}"
            speedup = "-" if su is None else f"{su:.2f}x"
            L.append(f"| {label} | {name} | {row.get('batch', '')} | {1e3 * row['dense_s']:.2f} "
                     f"| {sparse_ms} | {speedup} | {row.get('note', '')} |")
    L.append(f"\n(device {tm['device']}, {tm['threads']} threads)\n")
    L.append("## Figures\n")
    for title, fname in figs:
        L.append(f"### {title}\n\n![{title}]({fname})\n")
    L.append("## Stages\n")
    L.append("Seconds per stage (training includes evaluation after each epoch):\n")
    L.append("| stage | seconds |")
    L.append("|---|---|")
    for k, v in results["stage_seconds"].items():
        L.append(f"| {k} | {v:.1f} |")
    out = os.path.join(run, "report.md")
    atomic_write_text(out, "\n".join(L) + "\n")
    return out


def _layer_density(dens: dict[str, float], layer: str) -> str:
    """Density of the weight that produces a feature layer's output (its conv/linear)."""
    for cand in _weight_names(layer):
        if cand in dens:
            return f"{dens[cand]:.2f}"
    return ""


def _weight_names(layer: str) -> list[str]:
    prefix, _, leaf = layer.rpartition(".")
    cands = [f"{layer}.weight"]
    for src, dst in (("relu", "conv"), ("relu", "fc")):
        if leaf.startswith(src):
            cands.append(f"{prefix}.{dst}{leaf[len(src):]}.weight")
    cands += [f"{layer}.conv2.weight", f"{layer}.0.weight"]  # resnet blocks, stem
    return cands
