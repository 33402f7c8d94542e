"""Analysis: per-layer similarity of every network to its dense original, and the paper's
findings checked against the numbers of a run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from sparsecore import data as data_lib
from sparsecore.study import stats
from sparsecore.study._common import METHODS, _mean, _pct, _read_json
from sparsecore.study.config import StudyConfig, check_metrics, check_points
from sparsecore.study.regimes import pattern_name
from sparsecore.study.stages import Stage, _load, _splits, _stage_dir


def _variants(cfg: StudyConfig, base: str) -> list[tuple[str, float | None, str]]:
    """(method, sparsity, stage key) of every network compared with the dense original."""
    out: list[tuple[str, float | None, str]] = [("dense2", None, f"{base}/dense2")]
    for p in cfg.sparsities:
        out += [(m, p, f"{base}/{m}-{_pct(p)}") for m in METHODS]
    p = cfg.pattern_sparsity
    out += [(f"oneshot-{pat}", p, f"{base}/{pattern_name(pat, p)}") for pat in cfg.patterns]
    return out


def layer_similarity(model_a: nn.Module, model_b: nn.Module, splits, metrics: list[str], *,
                     points: int = 4000, spatial_samples: int | None = 8, device: str = "cpu",
                     all_pairs: bool = False) -> dict[str, Any]:
    """Per-layer similarity of two models of the same architecture on held-out data:
    {metric: [value per feature layer]} (+ "all_pairs": the layer x layer matrix of
    metrics[0] on spatially pooled activations). Layers: model_a.feature_layers. Unknown
    metrics and fewer than MIN_POINTS points raise ValueError before any work."""
    from sparsecore import similarity

    check_metrics(metrics)
    check_points(points)

    loader = data_lib.Loader.for_split(splits, "heldout", 500, device=device)
    layers = list(model_a.feature_layers)
    acts = similarity.capture([model_a.to(device), model_b.to(device)], loader, layers,
                              max_points=points, spatial_samples=spatial_samples)
    out: dict[str, Any] = {}
    for metric in metrics:
        out[metric] = _diagonal(similarity, acts[0], acts[1], metric)
    if all_pairs:
        pooled = similarity.capture([model_a, model_b], loader, layers, conv="pool")
        out["all_pairs"] = _matrix(similarity, pooled[0], pooled[1], metrics[0])
    return out


def _diagonal(similarity, acts_a, acts_b, metric: str) -> list[float]:
    """Per-layer values; NaN where a layer cannot be compared (e.g. every channel dead)."""
    try:
        return [float(v) for v in similarity.compare(acts_a, acts_b, metric).diagonal()]
    except (ValueError, RuntimeError):
        out = []
        for name in acts_a:
            try:
                sm = similarity.compare({name: acts_a[name]}, {name: acts_b[name]}, metric)
                out.append(float(sm.values[0, 0]))
            except (ValueError, RuntimeError):
                out.append(float("nan"))
        return out


def _matrix(similarity, acts_a, acts_b, metric: str) -> list[list[float]]:
    try:
        return similarity.compare(acts_a, acts_b, metric, pairs="all").values.tolist()
    except (ValueError, RuntimeError):
        n = len(acts_a)
        return [[float("nan")] * n for _ in range(n)]


def analyse(cfg: StudyConfig, run: str, stage: Stage, device: str) -> dict[str, Any]:
    """Accuracy, per-layer similarity to the dense original, and the layer x layer matrices
    of one model and seed."""
    from sparsecore import similarity

    base = f"{stage.label}/s{stage.seed}"
    splits = _splits(cfg)
    loader = data_lib.Loader.for_split(splits, "heldout", 500, device=device)
    dense = _load(run, f"{base}/dense", cfg).to(device)
    layers = list(dense.feature_layers)
    kw = {"max_points": cfg.points, "spatial_samples": cfg.spatial_samples}
    ref = similarity.capture(dense, loader, layers, **kw)
    ref_pooled = similarity.capture(dense, loader, layers, conv="pool")
    top = max(cfg.sparsities)
    result: dict[str, Any] = {
        "layers": layers,
        "accuracy": {"dense": _read_json(os.path.join(_stage_dir(run, f"{base}/dense"),
                                                      "result.json"))["acc"]},
        "similarity": {},
        "heatmap": {"metric": cfg.metrics[0], "sparsity": top, "matrices": {}},
        "layer_density": {},
    }
    for method, p, key in _variants(cfg, base):
        name = method if p is None else f"{method}-{_pct(p)}"
        res = _read_json(os.path.join(_stage_dir(run, key), "result.json"))
        result["accuracy"][name] = res["acc"]
        if method == "magnitude":
            result["layer_density"][name] = res["layer_density"]
        model = _load(run, key, cfg).to(device)
        acts = similarity.capture(model, loader, layers, **kw)
        result["similarity"][name] = {m: _diagonal(similarity, ref, acts, m)
                                      for m in cfg.metrics}
        if (p is None or p == top) and method in ("dense2", *METHODS):
            pooled = similarity.capture(model, loader, layers, conv="pool")
            result["heatmap"]["matrices"][name] = _matrix(similarity, ref_pooled, pooled,
                                                          cfg.metrics[0])
    return result


@dataclass
class Check:
    question: str
    verdict: str  # "yes", "no", "partly", "undecided" (see stats.verdict)
    evidence: list[str]


@dataclass
class Finding:
    claim: str  # the paper's words
    checks: list[Check]


PROTOCOLS = {"magnitude": "fine-tuning", "rewind": "rewinding"}


def findings(results: dict[str, Any]) -> list[Finding]:
    """The paper's three observations, each checked against the numbers of this run; the
    first one under both pruning protocols (fine-tuning and lottery-ticket rewinding).

    Comparisons are paired by seed, and a difference counts by the rule of `study.stats`
    (beyond `significance` standard errors of the mean per-seed difference). "Similar
    accuracy" means no drop that counts; "lower similarity" a drop that counts.
    """
    cfg = results["config"]
    sps = cfg["sparsities"]
    metric = cfg["metrics"][0]
    models = results["models"]
    z = cfg["significance"]

    def acc(m: dict[str, Any], name: str) -> list[float | None]:
        return stats.seed_values(m, lambda a: a["accuracy"][name])

    def sim(m: dict[str, Any], name: str) -> list[float | None]:
        return stats.seed_values(m, lambda a: _mean(a["similarity"][name][metric]))

    def check(question: str, rows: list[tuple[bool | None, str]]) -> Check:
        return Check(question, stats.verdict([ok for ok, _ in rows]), [e for _, e in rows])

    def no_drop(d: stats.Diff) -> bool | None:
        low = d.lower(z)
        return None if low is None else not low

    grid = [(label, m, p) for label, m in models.items() for p in sps]

    def first_finding(meth: str) -> list[Check]:
        how = PROTOCOLS[meth]
        keep = check(f"{how.capitalize()}: similar accuracy to the dense net?", [
            (no_drop(d), f"{label} at {_pct(p)}%: {d.text(100, 2, ' pp')} vs dense")
            for label, m, p in grid
            for d in [stats.paired(acc(m, f"{meth}-{_pct(p)}"), acc(m, "dense"))]])
        lower = check(f"{how.capitalize()}: lower {metric} to the original than a second dense "
                      "network (another seed) has?", [
            (d.lower(z), f"{label} at {_pct(p)}%: {stats.mean_std(sim(m, f'{meth}-{_pct(p)}'))} vs "
                         f"{stats.mean_std(sim(m, 'dense2'))} for the second seed, difference "
                         f"{d.text()}")
            for label, m, p in grid
            for d in [stats.paired(sim(m, f"{meth}-{_pct(p)}"), sim(m, "dense2"))]])
        rows = []
        for label, m in models.items():
            v = [sim(m, f"{meth}-{_pct(p)}") for p in sps]
            steps = [stats.paired(b, a) for a, b in zip(v, v[1:])]
            overall = stats.paired(v[-1], v[0])
            oks = [d.higher(z) for d in steps] + [overall.lower(z)]
            ok = None if None in oks else not any(oks[:-1]) and oks[-1]
            rows.append((ok, f"{label}: " + ", ".join(f"{_pct(p)}% {stats.mean_std(x)}"
                                                      for p, x in zip(sps, v))
                         + f"; {_pct(sps[-1])}% minus {_pct(sps[0])}%: {overall.text()}"))
        falling = check(f"{how.capitalize()}: {metric} to the original falls as sparsity "
                        "grows (no step up that counts, and a fall from the least to the most "
                        "sparse that counts)?", rows)
        return [keep, lower, falling]

    further = check(f"Rewinding: lower {metric} to the original than fine-tuning at the same "
                    "sparsity?", [
        (d.lower(z), f"{label} at {_pct(p)}%: rewound minus fine-tuned {d.text()}")
        for label, m, p in grid
        for d in [stats.paired(sim(m, f"rewind-{_pct(p)}"), sim(m, f"magnitude-{_pct(p)}"))]])
    scratch = check("Re-initialised and random sparse nets, trained from scratch, reach the "
                    "accuracy of magnitude pruning (no drop that counts)?", [
        (no_drop(d), f"{label} at {_pct(p)}%: {meth} {d.text(100, 2, ' pp')} vs magnitude")
        for label, m, p in grid for meth in ("reinit", "random")
        for d in [stats.paired(acc(m, f"{meth}-{_pct(p)}"), acc(m, f"magnitude-{_pct(p)}"))]])
    structure = check("Re-init with the pruning masks no better than random masks of the same "
                      "layer densities (no accuracy gain that counts)?", [
        (None if d.higher(z) is None else not d.higher(z),
         f"{label} at {_pct(p)}%: re-init minus random {d.text(100, 2, ' pp')} accuracy, "
         f"{stats.paired(sim(m, f'reinit-{_pct(p)}'), sim(m, f'random-{_pct(p)}')).text()} "
         f"{metric}")
        for label, m, p in grid
        for d in [stats.paired(acc(m, f"reinit-{_pct(p)}"), acc(m, f"random-{_pct(p)}"))]])
    return [
        Finding("Pruned neural network models evolve to substantially different "
                "representations while still maintaining similar accuracy.",
                first_finding("magnitude") + first_finding("rewind") + [further]),
        Finding("Initialized sparse models can achieve reasonably good accuracy compared to "
                "well-engineered pruning methods.", [scratch]),
        Finding("Sparsity structures discovered by pruning models are not inherently "
                "important or useful.", [structure]),
    ]


def divergence(results: dict[str, Any]) -> str:
    """Which protocol (fine-tuning or rewinding) makes the pruned nets' representations
    diverge from the original more than a second dense seed does: a sentence with, for each,
    the (model, sparsity) points where its similarity is below the second seed's by a
    difference that counts."""
    cfg = results["config"]
    metric, z = cfg["metrics"][0], cfg["significance"]

    def sim(m: dict[str, Any], name: str) -> list[float | None]:
        return stats.seed_values(m, lambda a: _mean(a["similarity"][name][metric]))

    points = [(m, p) for m in results["models"].values() for p in cfg["sparsities"]]
    total = len(points)
    counts = {meth: sum(bool(stats.paired(sim(m, f"{meth}-{_pct(p)}"), sim(m, "dense2"))
                             .lower(z)) for m, p in points) for meth in PROTOCOLS}
    parts = [f"{PROTOCOLS[k]} at {v} of {total}" for k, v in counts.items()]
    ft, rw = counts["magnitude"], counts["rewind"]
    if len(results["models"]) and all(len(m["seeds"]) < 2 for m in results["models"].values()):
        answer = "Undecided: one seed gives no standard error."
    elif ft == rw == 0:
        answer = ("Neither protocol: under both, the pruned nets stay at least as close to the "
                  "original as a second dense seed is.")
    elif rw > ft:
        answer = "Rewinding makes the pruned representations diverge more."
    elif ft > rw:
        answer = "Fine-tuning makes the pruned representations diverge more."
    else:
        answer = "Both protocols, equally often."
    return (f"{metric} of the pruned nets to the original below the second dense seed's (a "
            f"difference that counts): {', '.join(parts)} (model, sparsity) points. {answer}")
