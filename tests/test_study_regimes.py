"""The study's regimes beside fine-tuning on the tiny `test` preset with two seeds:
lottery-ticket rewinding (each round starts from the anchor's weights under the new masks and
trains the rest of the dense run's schedule), one-shot pruning in each sparsity pattern, the
per-seed timing of every net on sparsecore's kernels, and the report's statistics."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from sparsecore import prune, study
from sparsecore import train as T
from sparsecore.prune.masks import get_tensor, logical_state
from sparsecore.study import regimes
from sparsecore.study.stages import _stage_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """One study of the `test` preset with seeds 0 and 1, run in this process, with every
    T.train call recorded: (stage, start_epoch, end_epoch, weights and masks it starts
    from)."""
    calls: list[dict] = []
    real = T.train

    def recording(model, splits, hp, **kw):
        calls.append({"stage": kw.get("desc"), "start": kw.get("start_epoch", 0),
                      "end": kw.get("end_epoch"), "epochs": hp.epochs,
                      "state": logical_state(model), "masks": prune.masks(model)})
        return real(model, splits, hp, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(T, "train", recording)
    torch.set_num_threads(1)
    try:
        cfg = study.preset_config("test", device="cpu", seeds=[0, 1])
        out = tmp_path_factory.mktemp("study")
        summary = study.run(cfg, str(out), progress=False)
    finally:
        mp.undo()
    return cfg, out, summary, {c["stage"]: c for c in calls}


def _metrics(out, key) -> list[dict]:
    path = os.path.join(_stage_dir(str(out), key), "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f.read().splitlines()]


def _model(out, key):
    model, *_ = T.load_model(os.path.join(_stage_dir(str(out), key), "model.pt"))
    return model


def test_rewinding_starts_each_round_from_the_anchor(two_seeds) -> None:
    cfg, out, summary, calls = two_seeds
    plan = cfg.models[0]
    k, epochs = plan.rewind_epoch, plan.train.epochs
    base = f"{plan.label}/s0"
    anchor = calls[f"{base}/anchor"]
    assert (anchor["start"], anchor["end"]) == (0, k) and anchor["masks"] == {}
    # the anchor is the dense run stopped at epoch k: same init, same first epoch
    dense_metrics = _metrics(out, f"{base}/dense")
    anchor_metrics = _metrics(out, f"{base}/anchor")
    assert [m["epoch"] for m in anchor_metrics] == list(range(1, k + 1))
    for a, d in zip(anchor_metrics, dense_metrics):
        assert a["train_loss"] == pytest.approx(d["train_loss"], rel=1e-5)
    anchor_state = logical_state(_model(out, f"{base}/anchor"))
    prev_masks = None
    for p in cfg.sparsities:
        key = f"{base}/rewind-{round(100 * p)}"
        call = calls[key]
        assert (call["start"], call["end"], call["epochs"]) == (k, None, epochs)
        masks = call["masks"]
        kept = sum(int(m.sum()) for m in masks.values())
        assert kept == round((1 - p) * sum(m.numel() for m in masks.values()))
        for name, mask in masks.items():  # the anchor's weights under the new masks
            torch.testing.assert_close(call["state"][name], anchor_state[name] * mask)
            if prev_masks is not None:
                assert not (mask & ~prev_masks[name]).any()  # iterative: nested masks
        for name in anchor_state:  # biases and BatchNorm statistics rewound too
            if name not in masks:
                torch.testing.assert_close(call["state"][name], anchor_state[name])
        prev_masks = masks
        rw = _metrics(out, key)
        assert [m["epoch"] for m in rw] == list(range(k + 1, epochs + 1))
        # the learning rate the dense run had at those epochs (the schedule resumed at k)
        assert [m["lr"] for m in rw] == pytest.approx([m["lr"] for m in dense_metrics[k:]])
    # the first round prunes the trained dense net
    p = cfg.sparsities[0]
    want = prune.prune(_model(out, f"{base}/dense"), "magnitude", sparsity=p, scope=cfg.scope)
    got = calls[f"{base}/rewind-{round(100 * p)}"]["masks"]
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)


def test_one_shot_patterns(two_seeds) -> None:
    cfg, out, summary, calls = two_seeds
    base = f"{cfg.models[0].label}/s1"
    p, b = cfg.pattern_sparsity, cfg.block_size
    numels = {}
    for pattern in regimes.PATTERNS:
        key = f"{base}/{regimes.pattern_name(pattern, p)}"
        call = calls[key]
        assert call["epochs"] == cfg.models[0].finetune_epochs and call["start"] == 0
        masks = call["masks"]
        numels = {n: m.numel() for n, m in masks.items()}
        kept = {n: int(m.sum()) for n, m in masks.items()}
        model = _model(out, key)
        if pattern == "global":
            assert sum(kept.values()) == round((1 - p) * sum(numels.values()))
            assert study.block_size_of(model) is None
        elif pattern == "layerwise":
            for n in masks:
                assert kept[n] == round((1 - p) * numels[n]), n
        elif pattern == "erk":
            want = prune.erk_densities({n: tuple(m.shape) for n, m in masks.items()}, 1 - p)
            for n in masks:
                assert kept[n] / numels[n] == pytest.approx(want[n], abs=2 / numels[n]), n
            assert len({round(kept[n] / numels[n], 2) for n in masks}) > 1
        else:  # whole b x b blocks, the same fraction in every layer but the first/last
            names = prune.prunable(model)
            assert set(masks) == set(names[1:-1])  # first and last layer dense
            total = {n: get_tensor(model, n).numel() for n in names}
            overall = (sum(kept.values()) + total[names[0]] + total[names[-1]]) \
                / sum(total.values())
            assert overall == pytest.approx(1 - p, abs=0.02)  # the same overall sparsity
            fractions = []
            for n, m in masks.items():
                view = m.reshape(m.shape[0], -1)
                r, c = view.shape
                assert kept[n] > 0, n  # no layer emptied
                assert r % b == 0 and c % b == 0, n
                tiles = view.reshape(r // b, b, c // b, b)
                assert torch.equal(tiles.any(dim=(1, 3)), tiles.all(dim=(1, 3)))
                fractions.append((kept[n] / (b * b), (r // b) * (c // b)))
            # the same fraction of blocks per layer, up to rounding to whole blocks
            share = [k / nb for k, nb in fractions]
            assert max(share) - min(share) <= max(1 / nb for _, nb in fractions) + 1e-9
            assert study.block_size_of(model) == b
    rows = summary.results["models"][cfg.models[0].label]["seeds"]["1"]["timing"]
    assert rows[regimes.pattern_name("block", p)]["sparse_s"] > 0


def test_every_net_timed_per_seed_and_report_statistics(two_seeds) -> None:
    cfg, out, summary, _ = two_seeds
    m = summary.results["models"][cfg.models[0].label]
    nets = {name for name in m["seeds"]["0"]["accuracy"] if name != "dense2"}
    assert len(nets) == 1 + 4 * len(cfg.sparsities) + len(cfg.patterns)
    for seed in ("0", "1"):
        assert set(m["seeds"][seed]["timing"]) == nets
    report = (out / "report.md").read_text()
    verdicts = re.findall(r"\? (YES|NO|PARTLY|UNDECIDED)\.\*\*", report)
    # finding 1: three checks under fine-tuning, three under rewinding, one between them
    assert len(verdicts) == 9 and "UNDECIDED" not in verdicts  # two seeds decide each
    assert "exceeds 2 standard errors" in report
    assert "Which protocol diverges from the original more than a second dense seed" in report
    assert re.search(r"\| conv2-w0\.125 \| rewind \| [\d.]+ ± [\d.]+ \|", report)
    assert "accuracy_vs_speedup.png" in report and (out / "accuracy_vs_speedup.png").exists()
    assert "| Pareto |" in report
    for name in ("rewind-80", "oneshot-erk-90", "oneshot-block-90"):
        assert f"| {name} |" in report
