"""The `pai` preset (pruning at initialisation): its plan, each method's mask, layer-collapse
detection on constructed masks, and a tiny run end to end (report, results, figures)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsecore import models, prune, study
from sparsecore.study import pai

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**kw):
    return study.preset_config("pai", device="cpu", dataset="synthetic", image_size=8,
                               limit_train=200, models=["conv2:0.125"], sparsities=[0.9, 0.99],
                               epochs=1, jobs=1, **kw)


def test_plan_covers_every_method_and_compression() -> None:
    cfg = study.preset_config("pai")
    stages = study.plan_stages(cfg)
    assert [m.label for m in cfg.models] == ["vgg16-w0.25", "resnet20-w0.5"]
    assert [round(pai.compression(p), 6) for p in cfg.sparsities] == [0.5, 1, 1.5, 2, 2.5, 3]
    assert sum(s.kind == "dense" for s in stages) == 2
    pruned = [s for s in stages if s.kind.startswith(pai.KIND)]
    assert len(pruned) == 2 * 6 * len(pai.METHODS) == 84
    assert len({s.key for s in stages}) == len(stages)
    assert "resnet20-w0.5/s0/pai-synflow-3" in {s.key for s in pruned}
    assert all(not s.deps for s in stages)


@pytest.mark.parametrize("method", pai.METHODS)
def test_prune_at_init_meets_the_target(method: str) -> None:
    model = models.create("conv2", width=0.25, num_classes=10, in_channels=1, input_size=8)
    data = (torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,)))
    masks = pai.prune_at_init(model, method, 0.1, seed=1, data=data, input_shape=(1, 8, 8))
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert kept == pytest.approx(0.1 * total, abs=len(masks))
    assert set(masks) == set(prune.prunable(model))


def test_random_rescale_scales_kept_weights_by_inverse_sqrt_density() -> None:
    def build():
        torch.manual_seed(0)
        return models.create("conv2", width=0.25, num_classes=10, in_channels=1, input_size=8)

    plain, scaled = build(), build()
    pai.prune_at_init(plain, "random", 0.25, seed=3)
    masks = pai.prune_at_init(scaled, "random_rescale", 0.25, seed=3)
    for name, mask in masks.items():
        d = mask.float().mean().item()
        a = plain.get_parameter(name.replace("weight", "parametrizations.weight.original"))
        b = scaled.get_parameter(name.replace("weight", "parametrizations.weight.original"))
        torch.testing.assert_close(b, a / math.sqrt(d))
    with pytest.raises(ValueError, match="unknown method"):
        pai.prune_at_init(plain, "nope", 0.5)


def test_layer_collapse_is_detected_on_constructed_masks() -> None:
    vgg = models.create("vgg11", width=0.125, num_classes=10, in_channels=1, input_size=8)
    masks = pai.prune_at_init(vgg, "random", 0.5, seed=0)
    assert pai.mask_health(vgg, (1, 8, 8), list(masks)) == {
        "collapsed": [], "dead": [], "connected": True}
    masks["features.conv3.weight"] = torch.zeros_like(masks["features.conv3.weight"])
    prune.apply(vgg, masks)
    h = pai.mask_health(vgg, (1, 8, 8), list(masks))
    assert h["collapsed"] == ["features.conv3.weight"] and h["connected"] is False
    assert set(h["dead"]) == set(masks)  # no path left: every layer is dead

    # an emptied residual branch: a layer collapses but the skip connection carries on
    res = models.create("resnet8", width=0.25, num_classes=10, in_channels=1, input_size=8)
    masks = pai.prune_at_init(res, "random", 0.5, seed=0)
    masks["blocks.0.conv1.weight"] = torch.zeros_like(masks["blocks.0.conv1.weight"])
    prune.apply(res, masks)
    h = pai.mask_health(res, (1, 8, 8), list(masks))
    assert h["collapsed"] == ["blocks.0.conv1.weight"] and h["connected"] is True
    assert set(h["dead"]) == {"blocks.0.conv1.weight", "blocks.0.conv2.weight"}


def test_graph_metrics_average_the_defined_layers() -> None:
    model = models.create("vgg11", width=0.25, num_classes=10, in_channels=1, input_size=8)
    masks = pai.prune_at_init(model, "random", 0.5, seed=0)
    g = pai.graph_metrics(masks)
    per = g["per_layer"]
    assert g["layers"] == len(masks) == len(per)
    imdb = [v["imdb"] for v in per.values() if not math.isnan(v["imdb"])]
    assert g["imdb_layers"] == len(imdb) > 0
    assert g["imdb"] == pytest.approx(sum(imdb) / len(imdb))
    assert 0 < g["narc_layers"] <= len(masks) and not math.isnan(g["narc"])


def test_pai_end_to_end_and_collapse_marked(tmp_path) -> None:
    cfg = _tiny()
    run = tmp_path / "run"
    summary = study.run(cfg, str(run), progress=False)
    stages = [s.key for s in study.plan_stages(cfg)]
    assert summary.executed == stages and len(stages) == 1 + 2 * len(pai.METHODS)
    for f in ("report.md", "results.json", "study.json", "accuracy_vs_compression.png",
              "ramanujan_vs_accuracy.png"):
        assert (run / f).stat().st_size > 0, f
    results = json.loads((run / "results.json").read_text())
    (label, m), = results["models"].items()
    assert set(m["dense"]) == {"0"} and len(m["runs"]) == 2 * len(pai.METHODS)
    for r in m["runs"]:
        assert 0.0 <= r["acc"] <= 1.0
        assert r["density"] == pytest.approx(r["target_density"], rel=0.5)
        assert {"collapsed", "dead", "connected", "graph"} <= set(r)
    assert not list(run.glob("stages/**/pai-*/checkpoint.pt"))  # done: result.json suffices
    report = (run / "report.md").read_text()
    assert "## Layer collapse" in report and "Spearman" in report
    assert "![Accuracy vs compression" in report

    again = study.run(cfg, str(run), progress=False)
    assert again.executed == [] and again.skipped == stages

    # a collapsed mask (constructed) is marked in the tables and the figures still draw
    row = next(r for r in m["runs"] if r["method"] == "snip" and r["compression"] < 1.5)
    row.update(collapsed=["features.conv1.weight"], connected=False)
    (run / "results.json").write_text(json.dumps(results))
    study.write_report(str(run))
    report = (run / "report.md").read_text()
    assert f"| SNIP | {100 * row['acc']:.2f} X |" in report
    assert f"| {label} | SNIP | 10^1 | 10^1 |" in report
