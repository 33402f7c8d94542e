"""The study's stages: the plan (which network trains from which), each stage's directory
under RUN/stages (its result.json marks it done), the per-process data cache, and the
training stages."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from sparsecore import prune
from sparsecore import train as T
from sparsecore.hparams import ModelHparams
from sparsecore.study._common import _pct
from sparsecore.study.config import StudyConfig

# Seed offsets: the second dense net, the re-initialised nets and the random masks each get
# their own stream, so that no two runs share an initialisation by accident.
SEED_DENSE2, SEED_REINIT, SEED_RANDOM = 1000, 2000, 3000


@dataclass
class Stage:
    key: str  # "<label>/s<seed>/<kind>"; its directory: RUN/stages/<key>-<fingerprint>
    label: str
    seed: int
    kind: str  # dense, dense2, magnitude, reinit, random, analysis; study.regimes.KINDS;
    # lm-* (study.lm); pai-* (study.pai)
    sparsity: float | None = None
    deps: list[str] = field(default_factory=list)


def plan_stages(cfg: StudyConfig) -> list[Stage]:
    """Every stage of the study in an order that respects dependencies."""
    if cfg.lm is not None:  # the language-model study has stages of its own
        from sparsecore.study.lm import plan_lm

        return plan_lm(cfg)
    if cfg.preset == "pai":
        from sparsecore.study import pai

        return pai.plan_stages(cfg)
    from sparsecore.study import regimes  # it builds on this module

    out: list[Stage] = []
    for plan in cfg.models:
        for seed in cfg.seeds:
            base = f"{plan.label}/s{seed}"
            dense = Stage(f"{base}/dense", plan.label, seed, "dense")
            out += [dense, Stage(f"{base}/dense2", plan.label, seed, "dense2")]
            prev = dense.key
            for p in cfg.sparsities:
                mag = Stage(f"{base}/magnitude-{_pct(p)}", plan.label, seed, "magnitude", p,
                            [prev])
                out.append(mag)
                prev = mag.key
            out += regimes.plan(cfg, plan.label, seed)  # long chains first
            for p in cfg.sparsities:
                for kind in ("reinit", "random"):
                    out.append(Stage(f"{base}/{kind}-{_pct(p)}", plan.label, seed, kind, p,
                                     [f"{base}/magnitude-{_pct(p)}"]))
            deps = [s.key for s in out if s.key.startswith(base + "/")]
            out.append(Stage(f"{base}/analysis", plan.label, seed, "analysis", None, deps))
    return out


def _stage_dir(run: str, key: str) -> str:
    """Stage `key`'s directory: named by its fingerprint (see study.cache)."""
    from sparsecore.study.cache import stage_path  # it imports this module

    return stage_path(run, key)


def _done(run: str, key: str) -> bool:
    return os.path.exists(os.path.join(_stage_dir(run, key), "result.json"))


_SPLITS: dict[str, Any] = {}


def _splits(cfg: StudyConfig):
    """The study's data, loaded once per process."""
    key = json.dumps(dataclasses.asdict(cfg.data), sort_keys=True)
    if key not in _SPLITS:
        _SPLITS[key] = cfg.data.load()
    return _SPLITS[key]


def _load(run: str, key: str, cfg: StudyConfig) -> nn.Module:
    model, *_ = T.load_model(os.path.join(_stage_dir(run, key), "model.pt"), _splits(cfg))
    return model


def _train_stage(cfg: StudyConfig, run: str, stage: Stage, sdir: str, device: str,
                 progress: bool) -> dict[str, Any]:
    plan = cfg.plan(stage.label)
    splits = _splits(cfg)
    hp = dataclasses.replace(plan.train, seed=stage.seed)
    model_hp = ModelHparams(plan.model, plan.width)
    if stage.kind == "dense":
        model = model_hp.build(splits, hp.seed)
    elif stage.kind == "dense2":
        hp.seed = stage.seed + SEED_DENSE2
        model = model_hp.build(splits, hp.seed)
    elif stage.kind == "magnitude":
        model = _load(run, stage.deps[0], cfg)
        prune.prune(model, "magnitude", sparsity=stage.sparsity, scope=cfg.scope)
        hp = dataclasses.replace(hp, epochs=plan.finetune_epochs, lr=plan.finetune_lr,
                                 warmup_epochs=0.0, kernels=cfg.kernels)
    else:  # reinit / random: fresh init with the magnitude masks or random ones
        masks = prune.masks(_load(run, stage.deps[0], cfg))
        offset = SEED_REINIT if stage.kind == "reinit" else SEED_RANDOM
        hp = dataclasses.replace(hp, seed=stage.seed + offset, kernels=cfg.kernels)
        if stage.kind == "random":
            masks = prune.presets.random_like(masks, seed=hp.seed + round(stage.sparsity * 1000))
        model = model_hp.build(splits, hp.seed)
        prune.apply(model, masks)
    r = T.train(model, splits, hp, out_dir=sdir, device=device, progress=progress,
                desc=stage.key)
    trained = r.model
    T.save_model(os.path.join(sdir, "model.pt"), trained, cfg.data, model_hp)
    summary = prune.summary(trained)
    return {"acc": r.final["acc"], "loss": r.final["loss"], "epochs": hp.epochs,
            "train_seconds": sum(m["seconds"] for m in r.metrics),
            "density": summary.masked_density,
            "layer_density": {row.name: row.density for row in summary.rows}}
