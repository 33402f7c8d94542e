"""The study end to end on the tiny `test` preset: outputs, findings, and a kill followed by
the same command, which redoes nothing finished and ends with the same numbers; the run
directory's lock, other settings and --fresh."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

import sparsecore
from sparsecore import study
from sparsecore.nn.optimize import fused_layers
from sparsecore.study import cache, runner
from sparsecore.study.inference import KERNEL_CACHE
from sparsecore.study.stages import _load

pytestmark = pytest.mark.usefixtures("one_thread")


def _numbers(results: dict) -> dict:
    """Everything in results.json that must not depend on being interrupted."""
    out = {}
    for label, m in results["models"].items():
        for seed, a in m["seeds"].items():
            out[(label, seed, "acc")] = a["accuracy"]
            out[(label, seed, "sim")] = a["similarity"]
            out[(label, seed, "heat")] = a["heatmap"]["matrices"]
    return out


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == pytest.approx(b, abs=1e-9)


def test_study_end_to_end_and_resume_after_kill(tmp_path, monkeypatch) -> None:
    cfg = study.preset_config("test", device="cpu")
    full = study.run(cfg, str(tmp_path / "full"), progress=False)
    stages = [s.key for s in study.plan_stages(cfg)]
    assert full.executed == stages and not full.skipped
    for f in ("report.md", "results.json", "study.json", "similarity_layers.png",
              "accuracy_vs_sparsity.png", "heatmap.png", "speedup.png",
              "accuracy_vs_speedup.png"):
        assert (tmp_path / "full" / f).stat().st_size > 0, f
    report = (tmp_path / "full" / "report.md").read_text()
    verdicts = re.findall(r"\? (YES|NO|PARTLY|UNDECIDED)\.\*\*", report)
    # the three findings' nine checks, each with a verdict: undecided, with one seed
    assert verdicts == ["UNDECIDED"] * 9
    a = next(iter(full.results["models"].values()))["seeds"]["0"]
    n_layers = len(a["layers"])
    for name, sims in a["similarity"].items():
        for metric in cfg.metrics:
            assert len(sims[metric]) == n_layers
            assert all(0.0 <= v <= 1.0 + 1e-9 for v in sims[metric] if not math.isnan(v)), name
    assert set(a["heatmap"]["matrices"]) == {"dense2", "magnitude-80", "rewind-80", "reinit-80",
                                             "random-80"}
    # speed: every pruned net through sparsecore.optimize(), its layer timings cached in the
    # run directory (block masks: BSR among the candidates)
    net = _load(str(tmp_path / "full"), "conv2-w0.125/s0/magnitude-50", cfg)
    n_fused = len(fused_layers(sparsecore.optimize(net, torch.randn(4, 1, 8, 8),
                                                   choose="dense")))
    for name, row in a["timing"].items():
        if name != "dense":
            assert row["sparse_s"] > 0 and row["max_abs_diff"] < 1e-4, name
            assert sum(row["kernels"].values()) == n_fused, name
    assert "## Inference: dense kernels vs sparsecore.optimize()" in report
    kernels = json.loads((tmp_path / "full" / KERNEL_CACHE).read_text())
    keys = [k for layers in kernels["machines"].values() for k in layers]
    assert any("|block=8x8" in k for k in keys)

    # kill the run in its 5th stage, then resume it
    real = runner.run_stage
    calls = {"n": 0}

    def dying(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(runner, "run_stage", dying)
    run_dir = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        study.run(cfg, run_dir, progress=False)
    monkeypatch.setattr(runner, "run_stage", real)
    resumed = study.run(cfg, run_dir, progress=False)
    assert resumed.skipped == stages[:4] and resumed.executed == stages[4:]
    assert _same(_numbers(resumed.results), _numbers(full.results))

    again = study.run(cfg, run_dir, progress=False)
    assert again.executed == [] and again.skipped == stages
    assert _same(_numbers(again.results), _numbers(full.results))
    with open(tmp_path / "killed" / "results.json") as f:
        assert json.load(f)["config"]["preset"] == "test"


def test_other_settings_continue_and_fresh_starts_over(tmp_path, capsys) -> None:
    cfg = study.preset_config("test", device="cpu")
    out = str(tmp_path)
    with study.open_run_dir(cfg, out):
        finished = tmp_path / "stages" / cache.stage_keys(cfg)["conv2-w0.125/s0/dense"].path
    finished.mkdir(parents=True)
    (finished / "result.json").write_text("{}")
    with study.open_run_dir(study.preset_config("test", device="cpu", jobs=2), out):
        pass  # the device and the number of jobs change no fingerprint
    assert "settings changed" not in capsys.readouterr().out
    other = study.preset_config("test", device="cpu", sparsities=[0.3])
    with study.open_run_dir(other, out):
        pass  # other settings: the stages keep their directories, study.json follows
    assert "settings changed (sparsities)" in capsys.readouterr().out
    assert (finished / "result.json").exists()
    assert json.loads((tmp_path / "study.json").read_text())["sparsities"] == [0.3]
    (tmp_path / KERNEL_CACHE).write_text("{}")
    with study.open_run_dir(other, out, fresh=True):
        pass
    assert not (tmp_path / "stages").exists() and not (tmp_path / KERNEL_CACHE).exists()
    assert json.loads((tmp_path / "study.json").read_text())["sparsities"] == [0.3]
    assert "--fresh" in capsys.readouterr().out


def test_run_dir_lock_empty_dir_and_foreign_dir(tmp_path) -> None:
    cfg = study.preset_config("test", device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with study.open_run_dir(cfg, str(empty)):
        assert (empty / "study.json").exists()
        # a second study on the same directory stops at once, whatever its settings
        with pytest.raises(ValueError, match="in use by another study"):
            study.run(cfg, str(empty), progress=False)
        with pytest.raises(ValueError, match="in use by another study"):
            study.run(cfg, str(empty), fresh=True, progress=False)
    assert (empty / "study.json").exists()
    with study.open_run_dir(cfg, str(empty)):  # released with the first study
        pass
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for fresh in (False, True):
        with pytest.raises(ValueError, match="not a study run directory"):
            study.run(cfg, str(foreign), fresh=fresh, progress=False)
    assert os.listdir(foreign) == ["notes.txt"]


def test_config_checks_metrics_and_points() -> None:
    with pytest.raises(ValueError, match="unknown similarity metric 'foo'"):
        study.preset_config("test", metrics=["svcca", "foo"])
    with pytest.raises(ValueError, match="points must be >= 10"):
        study.preset_config("test", points=1)
    with pytest.raises(ValueError, match="epochs"):
        study.preset_config("test", epochs=0)
    with pytest.raises(ValueError, match="unknown similarity metric"):
        study.layer_similarity(None, None, None, ["nope"])


def test_presets_and_overrides() -> None:
    cfg = study.preset_config("default")
    assert [m.model for m in cfg.models] == ["conv2", "vgg11", "resnet20"]
    assert cfg.sparsities == [0.5, 0.75, 0.9] and cfg.data.dataset == "digits"
    w = study.preset_config("wacv2020", models=["resnet20:0.5"], epochs=3, seeds=[1, 2])
    assert w.models[0].width == 0.5 and w.models[0].train.epochs == 3 and w.seeds == [1, 2]
    assert study.StudyConfig.from_dict(w.to_dict()) == w
    with pytest.raises(ValueError, match="unknown model"):
        study.preset_config("default", models=["lenet"])
    with pytest.raises(ValueError, match="sparsities"):
        study.preset_config("default", sparsities=[1.0])


def test_study_on_sparse_kernels_matches_dense_kernels(tmp_path) -> None:
    """--kernels sparse: the pruned nets train on the sparse layers and end with the masked
    dense run's accuracies (float32 roundoff apart); the timing table has sparse columns."""
    dense = study.run(study.preset_config("test", device="cpu"), str(tmp_path / "d"),
                      progress=False)
    cfg = study.preset_config("test", device="cpu", kernels="sparse")
    sparse = study.run(cfg, str(tmp_path / "s"), progress=False)
    label = next(iter(dense.results["models"]))
    acc_d = dense.results["models"][label]["seeds"]["0"]["accuracy"]
    acc_s = sparse.results["models"][label]["seeds"]["0"]["accuracy"]
    assert acc_s.keys() == acc_d.keys()
    for name in acc_d:
        assert acc_s[name] == pytest.approx(acc_d[name], abs=0.03), name
    rows = sparse.results["models"][label]["seeds"]["0"]["timing"]
    assert all(r["sparse_s"] > 0 and r["max_abs_diff"] < 1e-4
               for name, r in rows.items() if name != "dense")
    assert json.loads((tmp_path / "s" / "study.json").read_text())["kernels"] == "sparse"
