"""The language-model study (`--preset transformer`) end to end on a tiny variant (one
block, d_model 32, 20 steps per training run): stages, outputs, bits per character,
per-layer similarity, block masks and the speed table; and its settings checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsecore import study
from sparsecore.prune import structured
from sparsecore.study import lm

pytestmark = pytest.mark.usefixtures("one_thread")

LABEL = "transformer-w0.25"


def _tiny(**lm_settings) -> study.StudyConfig:
    return study.preset_config(
        "transformer", device="cpu", models=["transformer:0.25"], epochs=1, limit_train=320,
        sparsities=[0.5, 0.8], points=300, jobs=1,
        lm={"depth": 1, "timing_batch": 4, "timing_min_time": 0.0, **lm_settings})


def test_transformer_study_tiny(tmp_path) -> None:
    cfg = _tiny()
    out = tmp_path / "run"
    full = study.run(cfg, str(out), progress=False)
    stages = study.plan_stages(cfg)
    assert full.executed == [s.key for s in stages]
    assert all(s.kind.startswith("lm-") for s in stages)
    for f in ("report.md", "results.json", "study.json", "bpc_vs_sparsity.png",
              "similarity_layers.png", "speed.png"):
        assert (out / f).stat().st_size > 0, f
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["lm"]["depth"] == 1 and results["config"]["lm"]["block"] == 16
    a = results["models"][LABEL]["seeds"]["0"]
    names = {"dense", "dense2"} | {f"{m}-{p}" for m in lm.METHODS for p in ("50", "80")}
    assert set(a["bits_per_char"]) == names
    assert all(math.isfinite(v) and 0 < v < 8 for v in a["bits_per_char"].values())
    assert a["layers"] == ["attn 0", "mlp 0", "residual 0"]
    assert a["points"] == 300
    for name, sims in a["similarity"].items():
        for metric in cfg.metrics:
            assert len(sims[metric]) == 3
            assert all(0.0 <= v <= 1.0 + 1e-6 for v in sims[metric] if not math.isnan(v)), name
    # every similarity of the magnitude-pruned nets is defined (no layer is cut off)
    assert not any(math.isnan(v) for v in a["similarity"]["magnitude-50"]["svcca"])
    for p in (0.5, 0.8):
        dens = a["layer_density"][f"magnitude-{round(100 * p)}"]
        assert set(dens) == {f"blocks.0.{n}.weight" for n in
                             ("attn.q", "attn.k", "attn.v", "attn.proj", "fc1", "fc2")}
    # block pruning keeps whole 16x16 blocks
    model = lm._load(cfg, str(out), LABEL, f"{LABEL}/s0/block-80")
    from sparsecore import prune

    for mask in prune.masks(model).values():
        sums = structured.block_sums(mask.float(), (16, 16))
        assert bool(((sums == 0) | (sums == 256)).all())
    rows = results["models"][LABEL]["timing"]["rows"]
    assert set(rows) == {"dense"} | {f"{m}-{p}" for m in lm.TIMED for p in ("50", "80")}
    for name, row in rows.items():
        if name == "dense":
            assert row["tokens_per_s"] > 0 and row["step_s"] > 0
            continue
        assert row["csr"]["max_abs_diff"] < 1e-4 and row["csr"]["step_s"] > 0, name
        if name.startswith("block"):
            assert row["bsr"]["max_abs_diff"] < 1e-4, name
        else:
            assert "infer_s" in row["bsr"] or "note" in row["bsr"], name
    report = (out / "report.md").read_text()
    for title in ("Bits per character", "Mean svcca", "Speed: dense vs", "What this run shows"):
        assert title in report, title
    again = study.run(cfg, str(out), progress=False)
    assert not again.executed and len(again.skipped) == len(stages)


def test_transformer_settings_checked() -> None:
    cfg = _tiny()
    assert cfg.lm["depth"] == 1 and cfg.lm["heads"] == 4  # the defaults filled in
    assert study.StudyConfig.from_dict(cfg.to_dict()).lm == cfg.lm
    with pytest.raises(ValueError, match="block"):
        _tiny(block=0)
    with pytest.raises(TypeError):
        _tiny(no_such_setting=1)
    with pytest.raises(ValueError, match="Transformer"):
        study.preset_config("transformer", models=["conv2"])
    with pytest.raises(ValueError, match="--preset transformer"):
        study.preset_config("default", models=["transformer"])
    assert study.preset_config("default").lm is None


def test_token_activations_flatten_positions() -> None:
    from sparsecore import models

    net = models.create("transformer", num_classes=20, input_size=8, width=0.25, depth=2)
    tokens = torch.randint(20, (30, 8))
    x, idx = lm.token_points(tokens, 50)
    assert x.shape == (25, 8) and idx.shape == (50,) and len(set(idx.tolist())) == 50
    mods = [m for m, _ in lm.layer_names(2)]
    acts = lm.token_activations(net, x, mods, idx, batch=7)
    assert set(acts) == set(mods)
    out = {}
    net.blocks[1].register_forward_hook(lambda m, a, o: out.setdefault("y", o))
    net.eval()
    with torch.no_grad():
        net(x)
    want = out["y"].reshape(-1, 32)[idx]
    torch.testing.assert_close(acts["blocks.1"], want)
