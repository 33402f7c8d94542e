"""Stage cache keys: each stage's fingerprint hashes the settings it depends on and its
inputs' fingerprints, so that a changed setting reruns exactly the stages downstream of it
and every other finished stage is reused."""

from __future__ import annotations

import json
import os

import pytest

from sparsecore import study
from sparsecore.study import cache, runner

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = "conv2-w0.125/s0"
TRAINED = ["dense", "dense2", "magnitude-50", "magnitude-80", "reinit-50", "random-50",
           "reinit-80", "random-80", "anchor", "rewind-50", "rewind-80", "oneshot-global-90",
           "oneshot-layerwise-90", "oneshot-erk-90", "oneshot-block-90"]
ONESHOT = {"oneshot-global-90", "oneshot-layerwise-90", "oneshot-erk-90", "oneshot-block-90"}


def _fingerprints(**overrides) -> dict[str, str]:
    cfg = study.preset_config("test", **{"device": "cpu", **overrides})
    return {k.removeprefix(BASE + "/"): v.fingerprint for k, v in cache.stage_keys(cfg).items()}


def _changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def test_a_setting_changes_exactly_the_fingerprints_downstream_of_it() -> None:
    ref = _fingerprints()
    assert set(ref) == {*TRAINED, "analysis"}
    assert len(set(ref.values())) == len(ref)  # every stage its own key
    assert _fingerprints() == ref  # a pure function of the settings
    assert _changed(ref, _fingerprints(finetune_epochs=2)) == {
        "magnitude-50", "magnitude-80", "reinit-50", "random-50", "reinit-80", "random-80",
        *ONESHOT, "analysis"}
    assert _changed(ref, _fingerprints(metrics=["linear_cka"])) == {"analysis"}
    assert _changed(ref, _fingerprints(points=200)) == {"analysis"}
    # 80% -> 90%: the 50% chain is the same; 80% is replaced by 90%
    assert _changed(ref, _fingerprints(sparsities=[0.5, 0.9])) == {
        "magnitude-80", "reinit-80", "random-80", "magnitude-90", "reinit-90", "random-90",
        "rewind-80", "rewind-90", "analysis"}
    assert _changed(ref, _fingerprints(kernels="sparse")) == set(ref) - {"dense", "dense2",
                                                                          "anchor"}
    assert _changed(ref, _fingerprints(scope="layerwise")) == set(ref) - {
        "dense", "dense2", "anchor", *ONESHOT}
    assert _changed(ref, _fingerprints(block_size=4)) == {"oneshot-block-90", "analysis"}
    assert _changed(ref, _fingerprints(epochs=2)) == set(ref)
    assert _changed(ref, _fingerprints(limit_train=300)) == set(ref)
    # settings that change no stage's result
    assert _fingerprints(jobs=3, significance=3.0) == ref
    assert _fingerprints(device="cuda") == ref


def test_stage_record_and_unknown_kinds() -> None:
    cfg = study.preset_config("test", device="cpu")
    keys = cache.stage_keys(cfg)
    mag = keys[f"{BASE}/magnitude-80"]
    assert mag.path == f"{BASE}/magnitude-80-{mag.fingerprint}"
    assert len(mag.fingerprint) == cache.FINGERPRINT_CHARS
    rec = mag.record
    assert rec["inputs"] == {f"{BASE}/magnitude-50": keys[f"{BASE}/magnitude-50"].fingerprint}
    assert rec["hparams"]["sparsity"] == 0.8 and rec["hparams"]["scope"] == "global"
    assert rec["hparams"]["train"]["epochs"] == cfg.models[0].finetune_epochs
    assert mag.fingerprint == cache.digest({"hparams": rec["hparams"], "inputs": rec["inputs"]})
    # a stage kind the cache does not know depends on every setting but the runtime ones
    stage = study.Stage(f"{BASE}/other", "conv2-w0.125", 0, "other")
    hp = cache.stage_hparams(cfg, stage)
    assert hp["config"]["significance"] == cfg.significance
    assert "device" not in hp["config"] and "jobs" not in hp["config"]


def test_a_setting_the_cache_does_not_assign_goes_into_every_stage(monkeypatch) -> None:
    ref = _fingerprints()
    monkeypatch.setattr(cache, "_ASSIGNED", cache._ASSIGNED - {"scope"})
    cache._KEYS.clear()  # the keys of the settings as assigned before
    try:
        assert _changed(ref, _fingerprints()) == set(ref)
        assert _changed(_fingerprints(), _fingerprints(scope="layerwise")) == set(ref)
    finally:
        cache._KEYS.clear()


def _ran(summary: study.RunSummary) -> set[str]:
    return {k.removeprefix(BASE + "/") for k in summary.executed}


def test_rerun_with_one_setting_changed_reruns_exactly_its_dependents(tmp_path) -> None:
    out = str(tmp_path)
    cfg = study.preset_config("test", device="cpu")
    first = study.run(cfg, out, progress=False)
    assert _ran(first) == {*TRAINED, "analysis"}
    dense_dir = tmp_path / "stages" / cache.stage_keys(cfg)[f"{BASE}/dense"].path
    record = json.loads((dense_dir / "hparams.json").read_text())
    assert record["hparams"]["kind"] == "dense" and dense_dir.name.endswith(record["fingerprint"])
    mtime = os.stat(dense_dir / "result.json").st_mtime_ns

    assert _ran(study.run(cfg, out, progress=False)) == set()  # the same settings: nothing

    longer = study.preset_config("test", device="cpu", finetune_epochs=2)
    second = study.run(longer, out, progress=False)
    assert _ran(second) == {"magnitude-50", "magnitude-80", "reinit-50", "random-50",
                            "reinit-80", "random-80", *ONESHOT, "analysis"}
    assert {k.removeprefix(BASE + "/") for k in second.skipped} == {
        "dense", "dense2", "anchor", "rewind-50", "rewind-80"}
    assert os.stat(dense_dir / "result.json").st_mtime_ns == mtime
    assert second.results["config"]["models"][0]["finetune_epochs"] == 2
    assert second.results["models"]["conv2-w0.125"]["seeds"]["0"]["accuracy"]["dense"] == \
        first.results["models"]["conv2-w0.125"]["seeds"]["0"]["accuracy"]["dense"]

    cka = study.preset_config("test", device="cpu", finetune_epochs=2, metrics=["linear_cka"])
    third = study.run(cka, out, progress=False)
    assert _ran(third) == {"analysis"}
    sims = third.results["models"]["conv2-w0.125"]["seeds"]["0"]["similarity"]["dense2"]
    assert set(sims) == {"linear_cka"}
    assert "linear_cka" in (tmp_path / "report.md").read_text()

    # back to the first settings: every stage is still there, results.json follows them
    back = study.run(cfg, out, progress=False)
    assert _ran(back) == set()
    assert back.results["config"] == cfg.to_dict()
    assert back.results["models"]["conv2-w0.125"]["seeds"] == \
        first.results["models"]["conv2-w0.125"]["seeds"]
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["config"]["models"][0]["finetune_epochs"] == cfg.models[0].finetune_epochs


def test_finished_stage_is_read_not_rerun(tmp_path) -> None:
    cfg = study.preset_config("test", device="cpu")
    out = str(tmp_path)
    stage = study.plan_stages(cfg)[0]
    with study.open_run_dir(cfg, out):
        sdir = tmp_path / "stages" / cache.stage_keys(cfg)[stage.key].path
        sdir.mkdir(parents=True)
        (sdir / "result.json").write_text('{"acc": 0.5, "stage_seconds": 1.0}')
        mtime = os.stat(sdir / "result.json").st_mtime_ns
        assert runner.run_stage(cfg, out, stage, "cpu") == {"acc": 0.5, "stage_seconds": 1.0}
    assert os.stat(sdir / "result.json").st_mtime_ns == mtime
    assert not (sdir / "model.pt").exists()
