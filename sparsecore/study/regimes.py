"""The study's regimes beside fine-tuning: lottery-ticket rewinding, and one-shot pruning in
each sparsity pattern.

- Rewinding (Frankle et al. 2020; `prune.imp` with rewind="step", one round per stage):
  an `anchor` stage trains the dense net of the seed over epochs 0..k-1 (k = the plan's
  rewind_epoch; the same run as the dense stage, stopped at k). Each `rewind-<p>` stage
  prunes the previous round's trained net (the dense one first) by magnitude to sparsity p,
  puts the anchor's weights (and BatchNorm statistics) back under the new masks and trains
  epochs k..T-1 with the learning rate and data order the dense run has there.
- Patterns (`oneshot-<pattern>-<p>`): the dense net pruned once to cfg.pattern_sparsity --
  one magnitude threshold over all layers (global), the same sparsity in every layer
  (layerwise), Erdos-Renyi-Kernel layer densities with magnitude inside each layer (erk), or
  whole square blocks by their L2 norm (block, for the BSR kernels) -- then fine-tuned as a
  magnitude round is. All four share that protocol and the overall sparsity, so they differ
  only in the pattern. Blocks: the first and last layers stay dense (a few input channels,
  and one row per class: too small for blocks, and a class whose row block is cut is lost),
  and every other layer keeps the same fraction of its blocks (one ranking over all layers
  empties the wide layers, whose blocks have the smallest norms), the fraction that gives
  the overall sparsity.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from torch import nn

from sparsecore import prune
from sparsecore import train as T
from sparsecore.hparams import ModelHparams
from sparsecore.prune.masks import get_tensor, load_logical_state, logical_state
from sparsecore.study._common import PATTERNS, _pct
from sparsecore.study.config import StudyConfig
from sparsecore.study.stages import Stage, _load, _splits


def plan(cfg: StudyConfig, label: str, seed: int) -> list[Stage]:
    """The anchor and rewinding stages of one model and seed, then the one-shot pattern
    stages (each after the dense stage)."""
    base = f"{label}/s{seed}"
    anchor = Stage(f"{base}/anchor", label, seed, "anchor")
    out = [anchor]
    prev = f"{base}/dense"
    for p in cfg.sparsities:
        out.append(Stage(f"{base}/rewind-{_pct(p)}", label, seed, "rewind", p,
                         [prev, anchor.key]))
        prev = out[-1].key
    out += [Stage(f"{base}/{pattern_name(pat, cfg.pattern_sparsity)}", label, seed,
                  f"oneshot-{pat}", cfg.pattern_sparsity, [f"{base}/dense"])
            for pat in cfg.patterns]
    return out


def pattern_name(pattern: str, sparsity: float) -> str:
    """The stage (and network) name of a one-shot pattern: "oneshot-erk-90"."""
    return f"oneshot-{pattern}-{_pct(sparsity)}"


KINDS = ("anchor", "rewind") + tuple(f"oneshot-{p}" for p in PATTERNS)


class _ERKMagnitude(prune.Magnitude):
    """Magnitude inside each layer, at Erdos-Renyi-Kernel layer densities."""

    def densities(self, model: nn.Module, names: list[str], density: float) -> dict[str, float]:
        shapes = {n: tuple(get_tensor(model, n).shape) for n in names}
        return prune.erk_densities(shapes, density)


def prune_pattern(model: nn.Module, pattern: str, sparsity: float, block: int) -> None:
    """Prune `model` in place to `sparsity` in one of PATTERNS (block: block x block)."""
    if pattern == "block":
        inner = prune.Selection(first=False, last=False)
        names = set(prune.prunable(model, inner))

        def numel(keep: bool) -> int:
            return sum(get_tensor(model, n).numel() for n in prune.prunable(model)
                       if (n in names) == keep)

        density = ((1.0 - sparsity) * (numel(True) + numel(False)) - numel(False)) / numel(True)
        if not 0 < density <= 1:
            raise ValueError(f"block pattern: the first and last layers alone hold more than "
                             f"{1 - sparsity:.0%} of the weights")
        prune.apply(model, prune.structured.block_masks(
            model, (block, block), density=density, scope="layerwise", selection=inner))
    elif pattern == "erk":
        _ERKMagnitude().prune(model, sparsity=sparsity)
    elif pattern in ("global", "layerwise"):
        prune.Magnitude(scope=pattern).prune(model, sparsity=sparsity)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; choose from {', '.join(PATTERNS)}")


def train_stage(cfg: StudyConfig, run: str, stage: Stage, sdir: str, device: str,
                progress: bool) -> dict[str, Any]:
    """Run an anchor, rewind or one-shot pattern stage (see the module docstring)."""
    plan_ = cfg.plan(stage.label)
    splits = _splits(cfg)
    hp = dataclasses.replace(plan_.train, seed=stage.seed)
    model_hp = ModelHparams(plan_.model, plan_.width)
    k = plan_.rewind_epoch
    epochs = {}
    if stage.kind == "anchor":
        model = model_hp.build(splits, hp.seed)
        epochs["end_epoch"] = k
    elif stage.kind == "rewind":
        model = _load(run, stage.deps[0], cfg)
        prune.prune(model, "magnitude", sparsity=stage.sparsity, scope=cfg.scope)
        load_logical_state(model, logical_state(_load(run, stage.deps[1], cfg)))
        hp = dataclasses.replace(hp, kernels=cfg.kernels)
        epochs["start_epoch"] = k
    elif stage.kind.startswith("oneshot-"):
        model = _load(run, stage.deps[0], cfg)
        prune_pattern(model, stage.kind.removeprefix("oneshot-"), stage.sparsity,
                      cfg.block_size)
        hp = dataclasses.replace(hp, epochs=plan_.finetune_epochs, lr=plan_.finetune_lr,
                                 warmup_epochs=0.0, kernels=cfg.kernels)
    else:
        raise ValueError(f"not a regime stage: {stage.kind!r}")
    r = T.train(model, splits, hp, out_dir=sdir, device=device, progress=progress,
                desc=stage.key, **epochs)
    T.save_model(os.path.join(sdir, "model.pt"), r.model, cfg.data, model_hp)
    summary = prune.summary(r.model)
    return {"acc": r.final["acc"], "loss": r.final["loss"], "epochs": len(r.metrics),
            "train_seconds": sum(m["seconds"] for m in r.metrics),
            "density": summary.masked_density,
            "layer_density": {row.name: row.density for row in summary.rows}}
