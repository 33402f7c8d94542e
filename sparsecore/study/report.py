"""report.md of a run, from its results.json."""

from __future__ import annotations

import os

from sparsecore.study import speed, stats
from sparsecore.study._common import (
    METHOD_TEXT,
    METHODS,
    _mean,
    _pct,
    _read_json,
    machine_line,
    stages_section,
    write_report_md,
)
from sparsecore.study.analysis import divergence, findings
from sparsecore.study.figures import write_figures
from sparsecore.study.inference import SPARSE_PATH


def write_report(run: str) -> str:
    """report.md and the PNG figures of a run, from its results.json."""
    path = os.path.join(run, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `python -m sparsecore study --out {run}`"
                                " first (the same command finishes an interrupted run)")
    results = _read_json(path)
    if results["config"]["preset"] == "pai":
        from sparsecore.study import pai

        return pai.write_report(run, results)
    if results["config"].get("lm") is not None:
        from sparsecore.study import lm_report

        return lm_report.write_report(run, results)
    cfg = results["config"]
    sps, metrics = cfg["sparsities"], cfg["metrics"]
    figs = write_figures(run, results)
    models = results["models"]
    n_seeds = len(cfg["seeds"])
    L: list[str] = []
    L.append("# Is pruning compression? Layer similarity of pruned networks\n")
    L.append(f"Preset `{cfg['preset']}`: dataset `{cfg['data']['dataset']}`, models "
             f"{', '.join(models)}, sparsities {', '.join(_pct(p) + '%' for p in sps)}, "
             f"seeds {cfg['seeds']}, {cfg['scope']} magnitude pruning. Held-out data: the "
             f"test split. Every number is the mean ± sample standard deviation over the "
             f"{n_seeds} seed{'s' if n_seeds > 1 else ''} (the mean alone with one seed).\n")
    L.append(machine_line(results))
    L.append("Networks: " + "; ".join(f"`{k}`: {v}" for k, v in METHOD_TEXT.items())
             + f"; `oneshot-<pattern>-{_pct(cfg['pattern_sparsity'])}`: the dense net pruned "
             f"once to {_pct(cfg['pattern_sparsity'])}% in a sparsity pattern (global, every "
             f"layer alike, ERK layer densities, {cfg['block_size']}x{cfg['block_size']} "
             "blocks) and fine-tuned for one round.\n")
    L.append("## The paper's findings, checked against this run\n")
    L.append("Blakeney, Yan and Zong (WACV 2020) report three observations; each is checked "
             "below against the numbers of this run, the first under two pruning protocols: "
             "fine-tuning after each pruning step, and lottery-ticket rewinding. Comparisons "
             "are paired by seed. Rule: "
             f"{stats.rule_text(cfg['significance'])}.\n")
    for i, f in enumerate(findings(results), 1):
        L.append(f"{i}. *\"{f.claim}\"*")
        for c in f.checks:
            L.append(f"   - **{c.question} {c.verdict.upper()}.**")
            L.extend(f"     - {e}" for e in c.evidence)
        if i == 1:
            L.append(f"   - **Which protocol diverges from the original more than a second "
                     f"dense seed does?** {divergence(results)}")
        L.append("")

    def cell(mm: dict, get, scale: float = 1.0, digits: int = 3) -> str:
        return stats.mean_std(stats.seed_values(mm, get), scale, digits)

    L.append("## Accuracy (%, held-out)\n")
    head = ["model", "method", "dense", "dense seed 2"] + [f"{_pct(p)}%" for p in sps]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for label, mm in models.items():
        def acc(name, mm=mm):
            return cell(mm, lambda a: a["accuracy"][name], 100, 2)
        for meth in METHODS:
            row = [label, meth, acc("dense"), acc("dense2")]
            row += [acc(f"{meth}-{_pct(p)}") for p in sps]
            L.append("| " + " | ".join(row) + " |")
    L.append("")
    if cfg["patterns"]:
        pats = [f"oneshot-{pat}-{_pct(cfg['pattern_sparsity'])}" for pat in cfg["patterns"]]
        L.append(f"## One-shot pruning to {_pct(cfg['pattern_sparsity'])}% in each sparsity "
                 "pattern, fine-tuned\n")
        head = ["model", "measure", "dense"] + pats
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))
        for label, mm in models.items():
            L.append("| " + " | ".join([label, "accuracy (%)",
                                        cell(mm, lambda a: a["accuracy"]["dense"], 100, 2)]
                                       + [cell(mm, lambda a, n=n: a["accuracy"][n], 100, 2)
                                          for n in pats]) + " |")
            for metric in metrics:
                L.append("| " + " | ".join(
                    [label, f"mean {metric}", "1"]
                    + [cell(mm, lambda a, n=n, mt=metric: _mean(a["similarity"][n][mt]))
                       for n in pats]) + " |")
        L.append("")
    for metric in metrics:
        L.append(f"## Mean {metric} to the dense original, over layers\n")
        L.append("Baseline: a second dense network (another seed). 1 = same representation.\n")
        head = ["model", "method", "dense seed 2"] + [f"{_pct(p)}%" for p in sps]
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))
        for label, mm in models.items():
            def sim(name, mm=mm, metric=metric):
                return cell(mm, lambda a: _mean(a["similarity"][name][metric]))
            for meth in METHODS:
                row = [label, meth, sim("dense2")]
                row += [sim(f"{meth}-{_pct(p)}") for p in sps]
                L.append("| " + " | ".join(row) + " |")
        L.append("")
    top = _pct(max(sps))
    L.append(f"## Per layer at {top}% sparsity ({metrics[0]} to the dense original)\n")
    for label, mm in models.items():
        a = next(iter(mm["seeds"].values()))
        names = ["dense2"] + [f"{meth}-{top}" for meth in METHODS]
        L.append(f"**{label}**\n")
        L.append(f"| layer | density (magnitude-{top}) | " + " | ".join(names) + " |")
        L.append("|" + "---|" * (len(names) + 2))
        for i, layer in enumerate(a["layers"]):
            d = cell(mm, lambda a, layer=layer: _layer_density(
                a["layer_density"].get(f"magnitude-{top}", {}), layer), 1, 2)
            cells = [cell(mm, lambda a, n=n, i=i: a["similarity"][n][metrics[0]][i])
                     for n in names]
            L.append(f"| {layer} | {d} | " + " | ".join(cells) + " |")
        L.append("")
    L.append("## Inference: dense kernels vs sparsecore.optimize()\n")
    L.append("One forward pass of a held-out batch; median time, then mean ± std over seeds "
             f"(each seed's nets have their own masks). Sparse: {SPARSE_PATH}; kernels: its "
             "layers on each kernel (the first seed's nets); max diff: the largest output "
             "difference from dense over the seeds.\n")
    L.append("| model | network | batch | dense (ms) | sparse (ms) | speedup | kernels "
             "| max diff | note |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for label, mm in models.items():
        first = next(iter(mm["seeds"].values()))["timing"]
        for name, row in first.items():
            def ms(key, name=name, mm=mm):
                return cell(mm, lambda a: a["timing"][name].get(key), 1e3, 2)
            su = cell(mm, lambda a, name=name: a["timing"][name].get("speedup"), 1, 2)
            kernels = ", ".join(f"{n} {k}" for k, n in row.get("kernels", {}).items())
            diffs = [d for d in stats.seed_values(
                mm, lambda a, name=name: a["timing"][name].get("max_abs_diff")) if d is not None]
            diff = f"{max(diffs):.1e}" if diffs else ""
            L.append(f"| {label} | {name} | {row.get('batch', '')} | {ms('dense_s')} "
                     f"| {ms('sparse_s')} | {su if su == '-' else su + 'x'} | {kernels} "
                     f"| {diff} | {row.get('note', '')} |")
    tm = next(iter(models.values()))["timing"]
    clock = {"thread": "CPU time of the timing thread", "wall": "wall clock"}
    L.append(f"\n(device {tm['device']}, {tm['threads']} threads, "
             f"{clock[tm.get('clock', 'wall')]})\n")
    L.append("## Speed beside accuracy\n")
    L.append("Every pruned net: held-out accuracy against its measured inference speedup "
             "with sparsecore.optimize() (above). Pareto: no other net of the model, nor the "
             "dense one, is at least as fast and as accurate (on the means).\n")
    L.extend(speed.table(results))
    L.append("")
    L.append("## Figures\n")
    for title, fname in figs:
        L.append(f"### {title}\n\n![{title}]({fname})\n")
    L += stages_section(results["stage_seconds"], "training includes evaluation after each epoch")
    return write_report_md(run, L)


def _layer_density(dens: dict[str, float], layer: str) -> float | None:
    """Density of the weight that produces a feature layer's output (its conv/linear)."""
    for cand in _weight_names(layer):
        if cand in dens:
            return dens[cand]
    return None


def _weight_names(layer: str) -> list[str]:
    prefix, _, leaf = layer.rpartition(".")
    cands = [f"{layer}.weight"]
    for src, dst in (("relu", "conv"), ("relu", "fc")):
        if leaf.startswith(src):
            cands.append(f"{prefix}.{dst}{leaf[len(src):]}.weight")
    cands += [f"{layer}.conv2.weight", f"{layer}.0.weight"]  # resnet blocks, stem
    return cands
