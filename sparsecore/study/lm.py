"""The `transformer` preset: pruning a character-level language model.

The decoder-only Transformer (sparsecore.models.transformer) learns CPython's help text
(dataset `text`, task "lm"). For every seed:

1. dense, and dense from a second seed (the baseline for how similar two equally good
   networks are);
2. magnitude pruning of the blocks' Linear layers (attention q, k, v, proj and MLP fc1,
   fc2; per layer or by one global threshold: StudyConfig.scope) with fine-tuning,
   iteratively to each sparsity; the embeddings and the output head stay dense, as in the
   pruning literature on Transformers;
3. re-initialisation (the magnitude masks, a fresh init, the full schedule) and random
   sparse init (random masks with the same layer densities, a fresh init);
4. TPrune-style block pruning (Mao et al. 2021): the dense net trained on with the block
   group lasso and the structured Hoyer square regularisers of prune.structured, then cut
   to each sparsity by a threshold on the block L2 norms (same scope), and fine-tuned;
5. held-out bits per character, and SVCCA / CKA of every block's attention output, MLP
   output and residual stream to the dense original (token positions are the data points);
6. the real speed of each pruned net on sparsecore's CSR and BSR kernels against the dense
   net: inference tokens/s and one training step (forward, backward, AdamW step).

Stages run through the study's runner (cache, resume, workers); the report has its own
sections and figures (sparsecore.study.lm_report).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sparsecore import models, prune
from sparsecore import train as T
from sparsecore._io import atomic_write_text, load_checkpoint
from sparsecore._timing import time_fn
from sparsecore.hparams import ModelHparams, number, validate
from sparsecore.prune import structured
from sparsecore.prune.masks import effective
from sparsecore.study._common import _mean, _pct, _read_json
from sparsecore.study.analysis import _diagonal
from sparsecore.study.config import StudyConfig
from sparsecore.study.stages import (
    SEED_DENSE2,
    SEED_RANDOM,
    SEED_REINIT,
    Stage,
    _splits,
    _stage_dir,
)

METHODS = ("magnitude", "reinit", "random", "block")
METHOD_TEXT = {
    "dense2": "dense, second seed",
    "magnitude": "magnitude pruning + fine-tuning (iterative)",
    "reinit": "post-pruning re-init (the magnitude masks, from scratch)",
    "random": "random sparse init (same layer densities, from scratch)",
    "block": "block pruning (TPrune: block regularisers, threshold on the block norms, "
             "fine-tuning)",
}
# Nets whose speed is measured: re-init has the magnitude masks, so the same speed.
TIMED = ("magnitude", "random", "block")


@dataclass
class LMHparams:
    """The language-model study's own settings (StudyConfig.lm holds them as a dict)."""

    depth: int = dataclasses.field(default=2, metadata={"check": number(1)})
    heads: int = dataclasses.field(default=4, metadata={"check": number(1)})
    block: int = dataclasses.field(default=16, metadata={"check": number(1)})
    # Regulariser strengths: of 3e-3, 1e-2 and 3e-2 each, 1e-2 gave the preset's dense net
    # the lowest mean bits per character after block pruning to 50% and 90% and fine-tuning
    # (weaker left more of the weight outside the blocks kept at 90%; stronger cost more
    # accuracy than it gave).
    group_lasso: float = dataclasses.field(default=1e-2, metadata={"check": number(0)})
    hoyer_square: float = dataclasses.field(default=1e-2, metadata={"check": number(0)})
    timing_batch: int = dataclasses.field(default=16, metadata={"check": number(1)})
    timing_min_time: float = dataclasses.field(default=0.2, metadata={"check": number(0)})

    def __post_init__(self) -> None:
        validate(self)


def _seed_mean(model: dict[str, Any], get: Callable[[dict[str, Any]], float]) -> float:
    """The mean over seeds of get(analysis of one seed), NaNs left out."""
    return _mean([get(a) for a in model["seeds"].values()])


def _lm(cfg: StudyConfig) -> LMHparams:
    return LMHparams(**(cfg.lm or {}))


def _in_blocks(name: str, module: nn.Module | None = None) -> bool:
    return name.startswith("blocks.")


# the pruned layers: every Linear inside the Transformer blocks
SELECTION = prune.Selection(filter_fn=_in_blocks)


def plan_lm(cfg: StudyConfig) -> list[Stage]:
    """Every stage of the language-model study, in an order that respects dependencies."""
    out: list[Stage] = []
    for plan in cfg.models:
        for seed in cfg.seeds:
            base = f"{plan.label}/s{seed}"

            def add(name: str, kind: str, p: float | None = None,
                    deps: tuple[str, ...] = (), base: str = base, seed: int = seed,
                    label: str = plan.label) -> str:
                out.append(Stage(f"{base}/{name}", label, seed, f"lm-{kind}", p,
                                 [f"{base}/{d}" for d in deps]))
                return name

            prev = add("dense", "dense")
            add("dense2", "dense2")
            for p in cfg.sparsities:
                prev = add(f"magnitude-{_pct(p)}", "magnitude", p, (prev,))
            for p in cfg.sparsities:
                for kind in ("reinit", "random"):
                    add(f"{kind}-{_pct(p)}", kind, p, (f"magnitude-{_pct(p)}",))
            add("blockreg", "blockreg", None, ("dense",))
            for p in cfg.sparsities:
                add(f"block-{_pct(p)}", "block", p, ("blockreg",))
            deps = [s.key for s in out if s.key.startswith(base + "/")]
            out.append(Stage(f"{base}/analysis", plan.label, seed, "lm-analysis", None, deps))
    return out


def _build(cfg: StudyConfig, label: str, seed: int) -> nn.Module:
    plan, lm = cfg.plan(label), _lm(cfg)
    torch.manual_seed(seed)
    return models.create(plan.model, width=plan.width, depth=lm.depth, heads=lm.heads,
                         **_splits(cfg).model_kwargs())


def _load(cfg: StudyConfig, run: str, label: str, key: str) -> nn.Module:
    blob = load_checkpoint(os.path.join(_stage_dir(run, key), "model.pt"), keys=("state_dict",))
    model = _build(cfg, label, 0)
    prune.load(model, blob["state_dict"])
    return model


def _block_penalty(lm: LMHparams) -> Callable[[nn.Module], Tensor]:
    """TPrune's training loss term: block group lasso + structured Hoyer square."""
    b = (lm.block, lm.block)

    def penalty(model: nn.Module) -> Tensor:
        return (lm.group_lasso * structured.regularization(model, b, "group_lasso", SELECTION)
                + lm.hoyer_square * structured.regularization(model, b, "hoyer_square",
                                                              SELECTION))
    return penalty


@torch.no_grad()
def _block_share(model: nn.Module, block: int, keep: float) -> float:
    """Share of the pruned layers' squared weight norm in the largest `keep` fraction of
    their (block x block) blocks: what one global block threshold at density `keep` keeps."""
    sq = torch.cat([structured.block_norms(effective(model, n), (block, block)).flatten()
                    for n in prune.prunable(model, SELECTION)]).pow(2)
    k = max(1, round(keep * sq.numel()))
    return float(sq.topk(k).values.sum() / sq.sum())


def _train(cfg: StudyConfig, run: str, stage: Stage, sdir: str, device: str,
           progress: bool) -> dict[str, Any]:
    plan, lm = cfg.plan(stage.label), _lm(cfg)
    kind = stage.kind.removeprefix("lm-")
    hp = dataclasses.replace(plan.train, seed=stage.seed)
    finetune = dataclasses.replace(hp, epochs=plan.finetune_epochs, lr=plan.finetune_lr,
                                   warmup_epochs=0.0, kernels=cfg.kernels)
    penalty = None
    extra: dict[str, Any] = {}
    if kind in ("dense", "dense2"):
        if kind == "dense2":
            hp = dataclasses.replace(hp, seed=stage.seed + SEED_DENSE2)
        model = _build(cfg, stage.label, hp.seed)
    elif kind == "magnitude":
        model = _load(cfg, run, stage.label, stage.deps[0])
        prune.prune(model, "magnitude", sparsity=stage.sparsity, scope=cfg.scope,
                    selection=SELECTION)
        hp = finetune
    elif kind in ("reinit", "random"):
        masks = prune.masks(_load(cfg, run, stage.label, stage.deps[0]))
        offset = SEED_REINIT if kind == "reinit" else SEED_RANDOM
        hp = dataclasses.replace(hp, seed=stage.seed + offset, kernels=cfg.kernels)
        if kind == "random":
            masks = prune.presets.random_like(masks, seed=hp.seed + round(stage.sparsity * 1000))
        model = _build(cfg, stage.label, hp.seed)
        prune.apply(model, masks)
    elif kind == "blockreg":
        model = _load(cfg, run, stage.label, stage.deps[0])
        hp = dataclasses.replace(finetune, kernels="dense")
        penalty = _block_penalty(lm)
        keep = 1.0 - max(cfg.sparsities)
        extra["block_share_before"] = _block_share(model, lm.block, keep)
    elif kind == "block":
        model = _load(cfg, run, stage.label, stage.deps[0])
        masks = structured.block_masks(model, (lm.block, lm.block), density=1 - stage.sparsity,
                                       scope=cfg.scope, selection=SELECTION)
        prune.apply(model, masks)
        hp = finetune
    else:
        raise ValueError(f"unknown language-model stage kind {stage.kind!r}")
    r = T.train(model, _splits(cfg), hp, out_dir=sdir, device=device, progress=progress,
                desc=stage.key, penalty=penalty)
    trained = r.model
    if kind == "blockreg":
        extra["block_share_after"] = _block_share(trained, lm.block, 1.0 - max(cfg.sparsities))
    T.save_model(os.path.join(sdir, "model.pt"), trained, cfg.data,
                 ModelHparams(cfg.plan(stage.label).model, cfg.plan(stage.label).width),
                 arch={"depth": lm.depth, "heads": lm.heads})
    summary = prune.summary(trained)
    return {"acc": r.final["acc"], "loss": r.final["loss"], "bpc": r.final["loss"] / math.log(2),
            "epochs": hp.epochs, "train_seconds": sum(m["seconds"] for m in r.metrics),
            "density": summary.masked_density,
            "layer_density": {row.name: row.density for row in summary.rows}, **extra}


def run_stage(cfg: StudyConfig, run: str, stage: Stage, sdir: str, device: str,
              progress: bool = False) -> dict[str, Any]:
    """One stage of the language-model study (a training run, or the analysis)."""
    if stage.kind == "lm-analysis":
        return analyse(cfg, run, stage, device)
    return _train(cfg, run, stage, sdir, device, progress)


# ---------------------------------------------------------------------------- analysis


def layer_names(depth: int) -> list[tuple[str, str]]:
    """(module, label) of what is compared in each block: attention output, MLP output,
    residual stream (the block's output)."""
    out = []
    for i in range(depth):
        out += [(f"blocks.{i}.attn", f"attn {i}"), (f"blocks.{i}.fc2", f"mlp {i}"),
                (f"blocks.{i}", f"residual {i}")]
    return out


def token_points(tokens: Tensor, points: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Held-out sequences tokens (N, T) -> (the first S sequences (S, T), `points` flat
    position indices into their S * T positions), S holding about 4x the points so that
    the points spread over positions and sequences."""
    n, t = tokens.shape
    s = min(n, math.ceil(4 * points / t))
    gen = torch.Generator().manual_seed(seed)
    return tokens[:s], torch.randperm(s * t, generator=gen)[:points]


@torch.no_grad()
def token_activations(model: nn.Module, x: Tensor, modules: list[str], idx: Tensor,
                      batch: int = 64) -> dict[str, Tensor]:
    """Outputs (B, T, d) of `modules` on token ids x (S, T), each flattened to token
    positions (S * T, d) and indexed by idx -> name: (len(idx), d)."""
    store: dict[str, list[Tensor]] = {m: [] for m in modules}
    handles = [model.get_submodule(m).register_forward_hook(
        lambda mod, args, out, m=m: store[m].append(out.detach().reshape(-1, out.shape[-1])))
        for m in modules]
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        for start in range(0, x.shape[0], batch):
            model(x[start:start + batch].to(dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {m: torch.cat(store[m])[idx.to(store[m][0].device)] for m in modules}


def _variants(cfg: StudyConfig, base: str) -> list[tuple[str, str]]:
    """(name, stage key) of every network compared with the dense original."""
    out = [("dense2", f"{base}/dense2")]
    for p in cfg.sparsities:
        out += [(f"{m}-{_pct(p)}", f"{base}/{m}-{_pct(p)}") for m in METHODS]
    return out


def _curve(run: str, key: str) -> list[float]:
    """Held-out bits per character after each epoch of a training stage."""
    with open(os.path.join(_stage_dir(run, key), "metrics.jsonl")) as f:
        return [json.loads(line)["test_loss"] / math.log(2) for line in f if line.strip()]


def analyse(cfg: StudyConfig, run: str, stage: Stage, device: str) -> dict[str, Any]:
    """Bits per character and per-layer similarity to the dense original of one model and
    seed."""
    from sparsecore import similarity

    base = f"{stage.label}/s{stage.seed}"
    lm = _lm(cfg)
    pairs = layer_names(lm.depth)
    modules = [m for m, _ in pairs]
    x, idx = token_points(_splits(cfg).heldout.x, cfg.points)

    def result_of(key: str) -> dict[str, Any]:
        return _read_json(os.path.join(_stage_dir(run, key), "result.json"))

    dense = _load(cfg, run, stage.label, f"{base}/dense").to(device)
    ref = token_activations(dense, x, modules, idx)
    res = result_of(f"{base}/dense")
    reg = result_of(f"{base}/blockreg")
    out: dict[str, Any] = {
        "layers": [label for _, label in pairs], "modules": modules, "points": len(idx),
        "d_model": dense.tok.embedding_dim, "params": models.count_parameters(dense),
        "bits_per_char": {"dense": res["bpc"]}, "accuracy": {"dense": res["acc"]},
        "dense_curve": _curve(run, f"{base}/dense"),
        "similarity": {}, "layer_density": {},
        "blockreg": {k: reg[k] for k in ("bpc", "block_share_before", "block_share_after")},
    }
    for name, key in _variants(cfg, base):
        res = result_of(key)
        out["bits_per_char"][name], out["accuracy"][name] = res["bpc"], res["acc"]
        out["layer_density"][name] = res["layer_density"]
        acts = token_activations(_load(cfg, run, stage.label, key).to(device), x, modules, idx)
        out["similarity"][name] = {m: _diagonal(similarity, ref, acts, m) for m in cfg.metrics}
    return out


# ---------------------------------------------------------------------------- speed


def sparse_twin(model: nn.Module, layout: str, block: int) -> tuple[nn.Module | None, str]:
    """A copy of a masked model whose pruned layers run on sparsecore's `layout` ("csr",
    "bsr") kernels, every one of them whatever its sparsity; or (None, why not). BSR
    takes each mask's block cover (the blocks that hold any kept weight), so an
    unstructured mask runs with the zeros inside its kept blocks."""
    from sparsecore.nn import SparsifyConfig, sparsify

    twin = copy.deepcopy(model)
    if layout == "bsr":
        b = (block, block)
        cover = {n: structured.expand_blocks(structured.block_sums(m.float(), b) > 0, b, m.shape)
                 for n, m in prune.masks(twin).items()}
        if all(bool(c.all()) for c in cover.values()):
            return None, f"no {block}x{block} block is empty: the block cover is dense"
        prune.remove(twin)
        prune.apply(twin, cover)
    try:
        report = sparsify(twin, SparsifyConfig(layout=layout, block_size=block, min_sparsity=0.0),
                          filter_fn=lambda module, name: _in_blocks(name))
    except Exception as exc:  # report, do not lose the study over the speed table
        return None, f"sparsify failed: {type(exc).__name__}: {exc}"
    skipped = [f"{n}: {why}" for n, why in report.skipped if _in_blocks(n)]
    if skipped:
        return None, "not every pruned layer was swapped (" + "; ".join(skipped) + ")"
    return twin, ""


def _speed(model: nn.Module, x: Tensor, xb: Tensor, yb: Tensor, device: str,
           timer: Callable[[Callable[[], Any], str], float]) -> dict[str, float]:
    """Inference time of x (B, T) and of one training step on (xb, yb) (B', T) each."""
    model = model.to(device).eval()
    with torch.no_grad():
        infer = timer(lambda: model(x), device)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        logits = model(xb)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step_s = timer(step, device)
    return {"infer_s": infer, "tokens_per_s": x.numel() / infer, "step_s": step_s,
            "step_tokens_per_s": xb.numel() / step_s}


def speed(cfg: StudyConfig, run: str, label: str, device: str,
          threads: int | None = None) -> dict[str, Any]:
    """Dense vs CSR vs BSR speed of the pruned nets of the first seed (inference tokens/s
    and one training step), with `threads` torch CPU threads (None: as they are)."""
    lm = _lm(cfg)
    splits = _splits(cfg)
    plan = cfg.plan(label)
    x = splits.heldout.x[:lm.timing_batch].to(device)
    xb = splits.train.x[:plan.train.batch_size].to(device)
    yb = splits.train.y[:plan.train.batch_size].to(device)
    timer = partial(time_fn, warmup=1, reps=5, min_time=lm.timing_min_time)
    base = f"{label}/s{cfg.seeds[0]}"
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        dense = _speed(_load(cfg, run, label, f"{base}/dense"), x, xb, yb, device, timer)
        rows: dict[str, Any] = {"dense": dense}
        for p in cfg.sparsities:
            for method in TIMED:
                model = _load(cfg, run, label, f"{base}/{method}-{_pct(p)}").to(device).eval()
                row: dict[str, Any] = {}
                for layout in ("csr", "bsr"):
                    twin, why = sparse_twin(model, layout, lm.block)
                    if twin is None:
                        row[layout] = {"note": why}
                        continue
                    with torch.no_grad():
                        diff = float((twin.eval()(x) - model(x)).abs().max())
                    t = _speed(twin, x, xb, yb, device, timer)
                    t.update(infer_speedup=dense["infer_s"] / t["infer_s"],
                             step_speedup=dense["step_s"] / t["step_s"], max_abs_diff=diff,
                             density=_kernel_density(twin))
                    row[layout] = t
                rows[f"{method}-{_pct(p)}"] = row
        return {"device": device, "threads": torch.get_num_threads(),
                "infer_tokens": x.numel(), "step_tokens": xb.numel(), "rows": rows}
    finally:
        torch.set_num_threads(before)


def _kernel_density(model: nn.Module) -> float:
    """Stored fraction of the pruned layers' weights (CSR: kept weights; BSR: kept blocks),
    weighted by layer size."""
    from sparsecore.nn.sparsify import SPARSE_LAYERS

    kept = total = 0.0
    for m in model.modules():
        if isinstance(m, SPARSE_LAYERS):
            n = m.in_features * m.out_features
            kept += m.density * n
            total += n
    return kept / total if total else 1.0


def aggregate(cfg: StudyConfig, out: str, device: str,
              timing_threads: int | None) -> dict[str, Any]:
    """results.json of the language-model study (but the machine): the analysis of every
    model and seed, the speed table, stage run times."""
    per_model: dict[str, Any] = {}
    stage_seconds: dict[str, float] = {}
    for s in plan_lm(cfg):
        res = _read_json(os.path.join(_stage_dir(out, s.key), "result.json"))
        stage_seconds[s.key] = res["stage_seconds"]
        if s.kind == "lm-analysis":
            per_model.setdefault(s.label, {"seeds": {}})["seeds"][str(s.seed)] = {
                k: v for k, v in res.items() if k != "stage_seconds"}
    from sparsecore.study import cache  # it plans this module's stages

    threads = timing_threads or torch.get_num_threads()
    for plan in cfg.models:
        # keyed by the timed nets' fingerprints and where and how they are timed
        key = cache.timing_key(cfg, plan.label, device, threads, _lm(cfg).timing_batch)
        tdir = os.path.join(out, "stages", key.path)
        tpath = os.path.join(tdir, "result.json")
        if not os.path.exists(tpath):
            res = speed(cfg, out, plan.label, device, threads=timing_threads)
            cache.write_record(tdir, key)
            atomic_write_text(tpath, json.dumps(res, indent=1))
        per_model[plan.label]["timing"] = _read_json(tpath)
    return {"config": cfg.to_dict(), "models": per_model, "stage_seconds": stage_seconds,
            "compute_seconds": sum(stage_seconds.values())}
