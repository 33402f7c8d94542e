"""Analysis: per-layer similarity of every network to its dense original, and the paper's
findings checked against the numbers of a run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from sparsecore import data as data_lib
from sparsecore.study._common import METHODS, _mean, _pct, _read_json, _seed_mean
from sparsecore.study.config import StudyConfig, check_metrics, check_points
from sparsecore.study.stages import Stage, _load, _splits, _stage_dir


def _variants(cfg: StudyConfig, base: str) -> list[tuple[str, float | None, str]]:
    """(method, sparsity, stage key) of every network compared with the dense original."""
    out: list[tuple[str, float | None, str]] = [("dense2", None, f"{base}/dense2")]
    for p in cfg.sparsities:
        out += [(m, p, f"{base}/{m}-{_pct(p)}") for m in METHODS]
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
        if p is None or p == top:
            pooled = similarity.capture(model, loader, layers, conv="pool")
            result["heatmap"]["matrices"][name] = _matrix(similarity, ref_pooled, pooled,
                                                          cfg.metrics[0])
    return result


@dataclass
class Check:
    question: str
    verdict: str  # "yes", "no", "partly"
    evidence: list[str]


@dataclass
class Finding:
    claim: str  # the paper's words
    checks: list[Check]


def _verdict(oks: list[bool]) -> str:
    return "yes" if all(oks) else "no" if not any(oks) else "partly"


def findings(results: dict[str, Any]) -> list[Finding]:
    """The paper's three observations, each checked against the numbers of this run.

    "Similar accuracy" means within the tolerance max(accuracy_tolerance, |accuracy of the
    dense net - accuracy of the second dense seed|): the seed-to-seed noise of this setup.
    """
    cfg = results["config"]
    sps = cfg["sparsities"]
    metric = cfg["metrics"][0]
    models = results["models"]

    def acc(m: dict[str, Any], name: str) -> float:
        return _seed_mean(m, lambda a: a["accuracy"][name])

    def sim(m: dict[str, Any], name: str) -> float:
        return _seed_mean(m, lambda a: _mean(a["similarity"][name][metric]))

    def tol(m: dict[str, Any]) -> float:
        return max(cfg["accuracy_tolerance"], abs(acc(m, "dense") - acc(m, "dense2")))

    def check(question: str, rows: list[tuple[bool, str]]) -> Check:
        return Check(question, _verdict([ok for ok, _ in rows]), [e for _, e in rows])

    grid = [(label, m, p) for label, m in models.items() for p in sps]
    keep_acc = check("Similar accuracy after magnitude pruning and fine-tuning?", [
        (acc(m, f"magnitude-{_pct(p)}") - acc(m, "dense") >= -tol(m),
         f"{label} at {_pct(p)}%: {100 * (acc(m, f'magnitude-{_pct(p)}') - acc(m, 'dense')):+.2f}"
         f" pp vs dense (tolerance {100 * tol(m):.2f} pp)") for label, m, p in grid])
    lower_sim = check(
        f"Lower {metric} to the original than a second dense network (another seed) has?", [
            (sim(m, f"magnitude-{_pct(p)}") < sim(m, "dense2"),
             f"{label} at {_pct(p)}%: {sim(m, f'magnitude-{_pct(p)}'):.3f} vs "
             f"{sim(m, 'dense2'):.3f} for the second seed") for label, m, p in grid])
    falling = check(f"{metric} to the original falls as sparsity grows?", [
        (all(b <= a + 1e-9 for a, b in zip(v, v[1:])), f"{label}: "
         + ", ".join(f"{_pct(p)}% {x:.3f}" for p, x in zip(sps, v)))
        for label, m in models.items()
        for v in [[sim(m, f"magnitude-{_pct(p)}") for p in sps]]])
    scratch = check("Re-initialised and random sparse nets, trained from scratch, reach the "
                    "accuracy of magnitude pruning?", [
        (acc(m, f"{meth}-{_pct(p)}") - acc(m, f"magnitude-{_pct(p)}") >= -tol(m),
         f"{label} at {_pct(p)}%: {meth} "
         f"{100 * (acc(m, f'{meth}-{_pct(p)}') - acc(m, f'magnitude-{_pct(p)}')):+.2f} pp vs "
         "magnitude") for label, m, p in grid for meth in ("reinit", "random")])
    structure = check("Re-init with the pruning masks no better than random masks of the same "
                      "layer densities?", [
        (acc(m, f"reinit-{_pct(p)}") - acc(m, f"random-{_pct(p)}") <= tol(m),
         f"{label} at {_pct(p)}%: re-init minus random "
         f"{100 * (acc(m, f'reinit-{_pct(p)}') - acc(m, f'random-{_pct(p)}')):+.2f} pp accuracy, "
         f"{sim(m, f'reinit-{_pct(p)}') - sim(m, f'random-{_pct(p)}'):+.3f} {metric}")
        for label, m, p in grid])
    return [
        Finding("Pruned neural network models evolve to substantially different "
                "representations while still maintaining similar accuracy.",
                [keep_acc, lower_sim, falling]),
        Finding("Initialized sparse models can achieve reasonably good accuracy compared to "
                "well-engineered pruning methods.", [scratch]),
        Finding("Sparsity structures discovered by pruning models are not inherently "
                "important or useful.", [structure]),
    ]
