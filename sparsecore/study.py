"""The study of "Is Pruning Compression? Investigating Pruning via Network Layer Similarity"
(Blakeney, Yan, Zong, WACV 2020), end to end.

For every model of the preset (and every seed):

1. train it dense, and a second time from another seed (dense-vs-dense is the baseline
   that says how similar two equally good networks are);
2. magnitude pruning with fine-tuning, iteratively: prune the dense net to the first
   sparsity, fine-tune, prune further to the next, fine-tune, ...;
3. post-pruning re-initialisation: the masks of step 2, a fresh random init, trained from
   scratch for the full schedule;
4. random sparse initialisation: random masks with the same per-layer densities, a fresh
   init, trained from scratch;
5. on held-out data, layer by layer: SVCCA and CKA of every network against the dense
   original, a layer x layer similarity matrix, accuracy, and the inference time of each
   pruned net on dense kernels vs sparsecore's sparse kernels.

The run directory gets report.md (tables, and the paper's findings checked against the
numbers measured here), results.json and PNG figures. Every stage is cached in
RUN/stages/...: `--resume` after a kill redoes nothing that finished, and an interrupted
training stage continues from its last finished epoch. Without --resume an existing run
directory is started over.

presets:
  default   sklearn digits (8x8), Conv-2, VGG-11 and ResNet-20 at reduced width,
            sparsities 50/75/90 %: a few minutes on a 2-core CPU
  wacv2020  CIFAR-10 (--data PATH), ResNet-20, VGG-16 and Conv-4 with full schedules:
            meant for a GPU (hours)
  test      a tiny synthetic run that takes seconds (the test suite's)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsecore import prune
from sparsecore import train as T

METHODS = ("magnitude", "reinit", "random")
METHOD_TEXT = {
    "dense2": "dense, second seed",
    "magnitude": "magnitude pruning + fine-tuning",
    "reinit": "post-pruning re-init (same masks, from scratch)",
    "random": "random sparse init (same layer densities, from scratch)",
}
# Seed offsets: the second dense net, the re-initialised nets and the random masks each get
# their own stream, so that no two runs share an initialisation by accident.
SEED_DENSE2, SEED_REINIT, SEED_RANDOM = 1000, 2000, 3000


# ---------------------------------------------------------------------------- configuration


@dataclass
class ModelPlan:
    """One model of the study and how it is trained."""

    model: str
    width: float
    train: T.TrainHparams  # the dense run, and the from-scratch runs of reinit / random
    finetune_epochs: int
    finetune_lr: float  # peak LR of each fine-tuning round after a pruning step

    @property
    def label(self) -> str:
        return self.model if self.width == 1 else f"{self.model}-w{self.width:g}"


@dataclass
class StudyConfig:
    preset: str
    data: T.DataHparams
    models: list[ModelPlan]
    sparsities: list[float]
    seeds: list[int] = field(default_factory=lambda: [0])
    scope: str = "global"  # magnitude pruning: one threshold over all layers, or per layer
    metrics: list[str] = field(default_factory=lambda: ["svcca", "linear_cka"])
    points: int = 4000  # held-out data points per layer for the per-layer similarity
    spatial_samples: int = 8  # positions per image of a conv map (data points)
    accuracy_tolerance: float = 0.01  # "similar accuracy": within this (or the seed gap)
    device: str = "auto"
    jobs: int = 0  # parallel stage processes; 0 = auto
    kernels: str = "dense"  # what the pruned nets train on

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyConfig:
        d = dict(d)
        d["data"] = T.DataHparams(**d["data"])
        d["models"] = [ModelPlan(**{**m, "train": T.TrainHparams(**m["train"])})
                       for m in d["models"]]
        return cls(**d)

    def plan(self, label: str) -> ModelPlan:
        return next(m for m in self.models if m.label == label)


# Fields that do not change any result: a resumed run may differ in these.
_RUNTIME_FIELDS = ("device", "jobs")


def _family(name: str) -> str:
    for fam in ("conv", "vgg", "resnet"):
        if name.startswith(fam):
            return fam
    raise ValueError(f"the study runs image classifiers (conv*, vgg*, resnet*), not {name!r}")


def _digits_plan(name: str, width: float | None = None) -> ModelPlan:
    # Fine-tuning after each pruning step repeats the training LR schedule over fewer
    # epochs (learning-rate rewinding, Renda et al. 2020): at 90% sparsity it recovers
    # 1-3 points more than a 5x smaller LR in the same epochs. Label smoothing 0.1 lifted
    # the dense Conv-2 from 97.2-98.1% to 98.3-98.9% over three seeds.
    fam = _family(name)
    if fam == "conv":  # no BatchNorm: Adam, as in the lottery-ticket papers
        hp = T.TrainHparams(epochs=15, batch_size=64, optimizer="adam", lr=2e-3,
                            weight_decay=0.0, label_smoothing=0.1)
        return ModelPlan(name, 0.5 if width is None else width, hp, 4, hp.lr)
    hp = T.TrainHparams(epochs=12, batch_size=64, optimizer="sgd", lr=0.05, momentum=0.9,
                        weight_decay=5e-4, label_smoothing=0.1)
    default_width = 0.25 if fam == "vgg" else 0.5
    return ModelPlan(name, default_width if width is None else width, hp, 4, hp.lr)


def _cifar_plan(name: str, width: float | None = None) -> ModelPlan:
    fam = _family(name)
    if fam == "conv":  # Frankle & Carbin: Adam 3e-4
        hp = T.TrainHparams(epochs=60, batch_size=60, optimizer="adam", lr=3e-4,
                            weight_decay=0.0, eval_batch_size=1000)
        return ModelPlan(name, width or 1.0, hp, 20, 1e-4)
    wd = 1e-4 if fam == "resnet" else 5e-4
    hp = T.TrainHparams(epochs=160, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9,
                        weight_decay=wd, schedule="step", milestones="80,120",
                        eval_batch_size=1000)
    return ModelPlan(name, width or 1.0, hp, 40, 0.01)


def _test_plan(name: str, width: float | None = None) -> ModelPlan:
    fam = _family(name)
    opt, lr = ("adam", 1e-2) if fam == "conv" else ("sgd", 0.05)
    hp = T.TrainHparams(epochs=3, batch_size=50, optimizer=opt, lr=lr, weight_decay=0.0)
    return ModelPlan(name, width or 0.125, hp, 1, lr)


@dataclass
class Preset:
    data: T.DataHparams
    models: list[str]
    plan: Callable[..., ModelPlan]
    sparsities: list[float]
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "default": Preset(T.DataHparams(dataset="digits"), ["conv2", "vgg11",
                      "resnet20"], _digits_plan, [0.5, 0.75, 0.9]),
    "wacv2020": Preset(T.DataHparams(dataset="cifar10"), ["resnet20", "vgg16", "conv4"],
                       _cifar_plan, [0.5, 0.75, 0.9, 0.95], {"points": 10000}),
    "test": Preset(T.DataHparams(dataset="synthetic", image_size=8, limit_train=400),
                   ["conv2"], _test_plan, [0.5, 0.8],
                   {"points": 300, "spatial_samples": 2, "jobs": 1}),
}


def preset_config(name: str, *, models: list[str] | None = None,
                  sparsities: list[float] | None = None, seeds: list[int] | None = None,
                  epochs: int | None = None, finetune_epochs: int | None = None,
                  **overrides: Any) -> StudyConfig:
    """The preset's StudyConfig with overrides. models: names, "name:width" to set the
    width; epochs / finetune_epochs: for every model."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    pre = PRESETS[name]
    plans = []
    for spec in models or pre.models:
        mname, _, w = spec.partition(":")
        from sparsecore import models as registry

        if mname not in registry.names():
            raise ValueError(f"unknown model {mname!r}; choose from {', '.join(registry.names())}")
        plan = pre.plan(mname, float(w) if w else None)
        if epochs is not None:
            plan.train.epochs = epochs
        if finetune_epochs is not None:
            plan.finetune_epochs = finetune_epochs
        plans.append(plan)
    sp = sorted(sparsities or pre.sparsities)
    if not sp or sp[0] <= 0 or sp[-1] >= 1:
        raise ValueError(f"sparsities must lie in (0, 1), got {sp}")
    kw = {**pre.extra, **{k: v for k, v in overrides.items() if v is not None}}
    data = copy.deepcopy(pre.data)
    for k in ("dataset", "data", "image_size", "channels", "limit_train"):
        if k in kw:
            setattr(data, k, kw.pop(k))
    return StudyConfig(name, data, plans, sp, seeds or [0], **kw)


# ---------------------------------------------------------------------------- stages


def _pct(p: float) -> str:
    return f"{round(p * 100):g}"


@dataclass
class Stage:
    key: str  # "<label>/s<seed>/<kind>"; also its directory under RUN/stages
    label: str
    seed: int
    kind: str  # dense, dense2, magnitude, reinit, random, analysis
    sparsity: float | None = None
    deps: list[str] = field(default_factory=list)


def plan_stages(cfg: StudyConfig) -> list[Stage]:
    """Every stage of the study in an order that respects dependencies."""
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
            for p in cfg.sparsities:
                for kind in ("reinit", "random"):
                    out.append(Stage(f"{base}/{kind}-{_pct(p)}", plan.label, seed, kind, p,
                                     [f"{base}/magnitude-{_pct(p)}"]))
            deps = [s.key for s in out if s.key.startswith(base + "/")]
            out.append(Stage(f"{base}/analysis", plan.label, seed, "analysis", None, deps))
    return out


def _stage_dir(run: str, key: str) -> str:
    return os.path.join(run, "stages", key)


def _done(run: str, key: str) -> bool:
    return os.path.exists(os.path.join(_stage_dir(run, key), "result.json"))


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


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


def run_stage(cfg: StudyConfig, run: str, stage: Stage, device: str,
              progress: bool = False) -> dict[str, Any]:
    """Run one stage (resuming its own checkpoint) and write its result.json."""
    t0 = time.perf_counter()
    sdir = _stage_dir(run, stage.key)
    if stage.kind == "analysis":
        result = analyse(cfg, run, stage, device)
    else:
        result = _train_stage(cfg, run, stage, sdir, device, progress)
    result["stage_seconds"] = time.perf_counter() - t0
    T.atomic_write_text(os.path.join(sdir, "result.json"), json.dumps(result, indent=1))
    return result


def _train_stage(cfg: StudyConfig, run: str, stage: Stage, sdir: str, device: str,
                 progress: bool) -> dict[str, Any]:
    plan = cfg.plan(stage.label)
    splits = _splits(cfg)
    hp = dataclasses.replace(plan.train, seed=stage.seed)
    model_hp = T.ModelHparams(plan.model, plan.width)
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


# ---------------------------------------------------------------------------- analysis


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
    metrics[0] on spatially pooled activations). Layers: model_a.feature_layers."""
    from sparsecore import similarity

    loader = T.data_lib.Loader.for_split(splits, "heldout", 500, device=device)
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
    loader = T.data_lib.Loader.for_split(splits, "heldout", 500, device=device)
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


# ---------------------------------------------------------------------------- timing


def time_call(fn: Callable[[], Any], device: str, *, warmup: int = 2, reps: int = 7,
              min_time: float = 0.1) -> float:
    """Median wall time of fn() in seconds (CUDA synchronised), after warm-up."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_time and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sparse_twin(model: nn.Module) -> tuple[nn.Module | None, str]:
    """A copy of a masked model on sparsecore's sparse kernels (sparsify), or (None, why)."""
    twin = copy.deepcopy(model)
    try:
        return T.sparsify_model(twin), ""
    except Exception as exc:  # report, do not lose the study over the speed column
        return None, f"sparsify failed: {type(exc).__name__}: {exc}"


def dense_twin(model: nn.Module) -> nn.Module:
    """A copy with the masks baked into plain dense weights (what dense kernels run)."""
    twin = copy.deepcopy(model)
    prune.remove(twin)
    return twin


@torch.no_grad()
def inference_times(model: nn.Module, x: torch.Tensor, device: str,
                    timer: Callable[[Callable[[], Any], str], float] = time_call,
                    sparse: bool = True) -> dict[str, Any]:
    """Forward time of one batch on dense kernels and (if `sparse`) on sparse kernels, eval
    mode, in seconds, measured by timer(fn, device); plus the largest output difference."""
    dense = dense_twin(model).to(device).eval()
    x = x.to(device)
    out: dict[str, Any] = {"batch": x.shape[0], "dense_s": timer(lambda: dense(x), device)}
    if not sparse:
        return out
    sparse, why = sparse_twin(model.to(device))
    if sparse is None:
        out.update(sparse_s=None, speedup=None, note=why)
        return out
    sparse.eval()
    out["sparse_s"] = timer(lambda: sparse(x), device)
    out["speedup"] = out["dense_s"] / out["sparse_s"]
    out["max_abs_diff"] = float((sparse(x) - dense(x)).abs().max())
    return out


def timing(cfg: StudyConfig, run: str, label: str, device: str, batch: int = 256,
           threads: int | None = None) -> dict[str, Any]:
    """Dense vs sparse-kernel inference of the magnitude-pruned nets of the first seed,
    with `threads` torch CPU threads (None: as they are)."""
    splits = _splits(cfg)
    x, _ = next(iter(T.data_lib.Loader.for_split(splits, "heldout", batch)))
    base = f"{label}/s{cfg.seeds[0]}"
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        rows = {"dense": inference_times(_load(run, f"{base}/dense", cfg), x, device,
                                         sparse=False)}
        for p in cfg.sparsities:
            rows[f"magnitude-{_pct(p)}"] = inference_times(
                _load(run, f"{base}/magnitude-{_pct(p)}", cfg), x, device)
        return {"device": device, "threads": torch.get_num_threads(), "rows": rows}
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- running


def _worker_init(threads: int) -> None:
    """Stage worker: its own thread count, and death with the parent (a killed study must
    not leave orphans writing into the run directory)."""
    torch.set_num_threads(threads)
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(cfg_dict: dict, run: str, stage: Stage, device: str) -> dict[str, Any]:
    return run_stage(StudyConfig.from_dict(cfg_dict), run, stage, device)


def _jobs(cfg: StudyConfig, device: str) -> int:
    if cfg.jobs > 0:
        return cfg.jobs
    if device.startswith("cuda"):
        return 1
    return max(1, min(os.cpu_count() or 1, 4))


def _prepare(cfg: StudyConfig, out: str, resume: bool) -> None:
    path = os.path.join(out, "study.json")
    if os.path.exists(path):
        old = _read_json(path)
        if resume:
            new = cfg.to_dict()
            diff = [k for k in new if k not in _RUNTIME_FIELDS and old.get(k) != new[k]]
            if diff:
                raise ValueError(f"{out} holds a study with different settings ({', '.join(diff)}"
                                 "); resume it with the same flags, or pick a new --out")
            return
        print(f"{out}: starting over (pass --resume to continue the run that is there)")
        for name in ("stages", "results.json", "report.md"):
            target = os.path.join(out, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.unlink(target)
    elif os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"{out} exists and is not a study run directory; pick a new --out")
    T.atomic_write_text(path, json.dumps(cfg.to_dict(), indent=1))


@dataclass
class RunSummary:
    run: str
    executed: list[str]  # stages run (or finished) by this call
    skipped: list[str]  # stages found finished
    seconds: float
    results: dict[str, Any]


def run(cfg: StudyConfig, out: str, *, resume: bool = False, progress: bool = True,
        timing_threads: int | None = 1) -> RunSummary:
    """Run (or resume) the study into directory `out`; returns what was done.

    timing_threads: torch CPU threads for the dense-vs-sparse inference timing (1 by
    default: on a shared machine, OpenMP threads that wait on each other distort the
    times of small models far more than the kernels differ)."""
    t0 = time.perf_counter()
    device = T.resolve_device(cfg.device)
    _prepare(cfg, out, resume)
    stages = plan_stages(cfg)
    skipped = [s.key for s in stages if _done(out, s.key)]
    todo = [s for s in stages if s.key not in skipped]
    jobs = min(_jobs(cfg, device), max(1, len(todo)))
    log = _Log(len(stages), len(skipped), progress)
    if skipped:
        log.write(f"resuming: {len(skipped)} of {len(stages)} stages already done")
    executed: list[str] = []
    try:
        if jobs == 1:
            for s in todo:
                res = run_stage(cfg, out, s, device, progress=progress)
                executed.append(s.key)
                log.done(s, res)
        else:
            executed = _run_parallel(cfg, out, todo, device, jobs, log)
    finally:
        log.close()
    path = os.path.join(out, "report.md")
    if executed or not os.path.exists(path):
        results = _aggregate(cfg, out, device, timing_threads)
        results["wall_seconds"] = time.perf_counter() - t0
        results["stages_resumed"] = len(skipped)
        T.atomic_write_text(os.path.join(out, "results.json"), json.dumps(results, indent=1))
        write_report(out)
    else:
        results = _read_json(os.path.join(out, "results.json"))
    log.write(f"{path} ({time.perf_counter() - t0:.0f} s)")
    return RunSummary(out, executed, skipped, time.perf_counter() - t0, results)


def _run_parallel(cfg: StudyConfig, out: str, todo: list[Stage], device: str, jobs: int,
                  log: _Log) -> list[str]:
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending = list(todo)
    running: dict[cf.Future, Stage] = {}
    executed: list[str] = []
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                initargs=(threads,)) as pool:
        try:
            while pending or running:
                for s in [s for s in pending if all(_done(out, d) for d in s.deps)]:
                    if len(running) >= jobs:
                        break
                    pending.remove(s)
                    running[pool.submit(_worker, cfg.to_dict(), out, s, device)] = s
                if not running:
                    raise RuntimeError(f"stages wait on unfinished dependencies: "
                                       f"{[s.key for s in pending]}")
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    s = running.pop(fut)
                    log.done(s, fut.result())
                    executed.append(s.key)
        except BaseException:
            for fut in running:
                fut.cancel()
            raise
    return executed


class _Log:
    """One line per finished stage (and a bar over all stages when progress is on)."""

    def __init__(self, total: int, done: int, progress: bool) -> None:
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc="study", unit="stage",
                            dynamic_ncols=True)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def done(self, stage: Stage, res: dict[str, Any]) -> None:
        acc = f"acc {res['acc']:.4f}, " if "acc" in res else ""
        self.write(f"{stage.key}: {acc}{res['stage_seconds']:.1f} s")
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _aggregate(cfg: StudyConfig, out: str, device: str,
               timing_threads: int | None) -> dict[str, Any]:
    """results.json: the analysis of every model and seed, timings, stage run times."""
    per_model: dict[str, Any] = {}
    stage_seconds: dict[str, float] = {}
    for s in plan_stages(cfg):
        res = _read_json(os.path.join(_stage_dir(out, s.key), "result.json"))
        stage_seconds[s.key] = res["stage_seconds"]
        if s.kind == "analysis":
            per_model.setdefault(s.label, {"seeds": {}})["seeds"][str(s.seed)] = {
                k: v for k, v in res.items() if k != "stage_seconds"}
    for plan in cfg.models:
        tpath = os.path.join(_stage_dir(out, f"{plan.label}/timing"), "result.json")
        if not os.path.exists(tpath):
            res = timing(cfg, out, plan.label, device, threads=timing_threads)
            T.atomic_write_text(tpath, json.dumps(res, indent=1))
        per_model[plan.label]["timing"] = _read_json(tpath)
    return {"config": cfg.to_dict(), "machine": _machine(), "models": per_model,
            "stage_seconds": stage_seconds,
            "compute_seconds": sum(stage_seconds.values())}


# ---------------------------------------------------------------------------- report


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _seed_mean(model: dict[str, Any], get: Callable[[dict[str, Any]], float]) -> float:
    return _mean([get(a) for a in model["seeds"].values()])


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


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.2f}" if pct else f"{v:.3f}"


def write_report(run: str) -> str:
    """report.md and the PNG figures of a run, from its results.json."""
    path = os.path.join(run, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `python -m sparsecore study --out {run}`"
                                " (with --resume to finish an interrupted run) first")
    results = _read_json(path)
    cfg = results["config"]
    sps, metrics = cfg["sparsities"], cfg["metrics"]
    figs = _figures(run, results)
    models = results["models"]
    L: list[str] = []
    L.append("# Is pruning compression? Layer similarity of pruned networks\n")
    L.append(f"Preset `{cfg['preset']}`: dataset `{cfg['data']['dataset']}`, models "
             f"{', '.join(models)}, sparsities {', '.join(_pct(p) + '%' for p in sps)}, "
             f"seeds {cfg['seeds']}, {cfg['scope']} magnitude pruning. Held-out data: the "
             "test split. Numbers are means over seeds.\n")
    m = results["machine"]
    L.append(f"Machine: {m['cpu']} ({m['cores']} cores){', ' + m['gpu'] if 'gpu' in m else ''};"
             f" torch {m['torch']}. Wall time {results['wall_seconds']:.0f} s"
             + (f" (after resuming {results['stages_resumed']} finished stages)"
                if results["stages_resumed"] else "")
             + f"; {results['compute_seconds']:.0f} s of stages in all.\n")
    L.append("## The paper's findings, checked against this run\n")
    L.append("Blakeney, Yan and Zong (WACV 2020) report three observations; each is checked "
             "below against the numbers of this run (accuracy tolerance: the larger of "
             f"{100 * cfg['accuracy_tolerance']:g} pp and the gap between the two dense "
             "seeds).\n")
    for i, f in enumerate(findings(results), 1):
        L.append(f"{i}. *\"{f.claim}\"*")
        for c in f.checks:
            L.append(f"   - **{c.question} {c.verdict.upper()}.**")
            L.extend(f"     - {e}" for e in c.evidence)
        L.append("")
    L.append("## Accuracy (%, held-out)\n")
    head = ["model", "dense", "dense seed 2"] + [f"{meth} {_pct(p)}%" for p in sps
                                                 for meth in METHODS]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for label, mm in models.items():
        def acc(name, mm=mm):
            return _seed_mean(mm, lambda a: a["accuracy"][name])
        row = [label, _fmt(acc("dense"), True), _fmt(acc("dense2"), True)]
        row += [_fmt(acc(f"{meth}-{_pct(p)}"), True) for p in sps for meth in METHODS]
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    for metric in metrics:
        L.append(f"## Mean {metric} to the dense original, over layers\n")
        L.append("Baseline: a second dense network (another seed). 1 = same representation.\n")
        head = ["model", "method", "dense seed 2"] + [f"{_pct(p)}%" for p in sps]
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))
        for label, mm in models.items():
            def sim(name, mm=mm, metric=metric):
                return _seed_mean(mm, lambda a: _mean(a["similarity"][name][metric]))
            for meth in METHODS:
                row = [label, meth, _fmt(sim("dense2"))]
                row += [_fmt(sim(f"{meth}-{_pct(p)}")) for p in sps]
                L.append("| " + " | ".join(row) + " |")
        L.append("")
    top = _pct(max(sps))
    L.append(f"## Per layer at {top}% sparsity ({metrics[0]} to the dense original, first "
             "seed)\n")
    for label, mm in models.items():
        a = next(iter(mm["seeds"].values()))
        names = ["dense2"] + [f"{meth}-{top}" for meth in METHODS]
        L.append(f"**{label}**\n")
        L.append("| layer | density | " + " | ".join(names) + " |")
        L.append("|" + "---|" * (len(names) + 2))
        dens = a["layer_density"].get(f"magnitude-{top}", {})
        for i, layer in enumerate(a["layers"]):
            d = _layer_density(dens, layer)
            cells = [_fmt(a["similarity"][n][metrics[0]][i]) for n in names]
            L.append(f"| {layer} | {d} | " + " | ".join(cells) + " |")
        L.append("")
    L.append("## Inference: dense kernels vs sparsecore's sparse kernels\n")
    L.append("One forward pass of a held-out batch; median time.\n")
    L.append("| model | network | batch | dense (ms) | sparse (ms) | speedup | note |")
    L.append("|---|---|---|---|---|---|---|")
    for label, mm in models.items():
        tm = mm["timing"]
        for name, row in tm["rows"].items():
            sp, su = row.get("sparse_s"), row.get("speedup")
            sparse_ms = "-" if sp is None else f"{1e3 * sp:.2f}"
            speedup = "-" if su is None else f"{su:.2f}x"
            L.append(f"| {label} | {name} | {row.get('batch', '')} | {1e3 * row['dense_s']:.2f} "
                     f"| {sparse_ms} | {speedup} | {row.get('note', '')} |")
    L.append(f"\n(device {tm['device']}, {tm['threads']} threads)\n")
    L.append("## Figures\n")
    for title, fname in figs:
        L.append(f"### {title}\n\n![{title}]({fname})\n")
    L.append("## Stages\n")
    L.append("Seconds per stage (training includes evaluation after each epoch):\n")
    L.append("| stage | seconds |")
    L.append("|---|---|")
    for k, v in results["stage_seconds"].items():
        L.append(f"| {k} | {v:.1f} |")
    out = os.path.join(run, "report.md")
    T.atomic_write_text(out, "\n".join(L) + "\n")
    return out


def _layer_density(dens: dict[str, float], layer: str) -> str:
    """Density of the weight that produces a feature layer's output (its conv/linear)."""
    for cand in _weight_names(layer):
        if cand in dens:
            return f"{dens[cand]:.2f}"
    return ""


def _weight_names(layer: str) -> list[str]:
    prefix, _, leaf = layer.rpartition(".")
    cands = [f"{layer}.weight"]
    for src, dst in (("relu", "conv"), ("relu", "fc")):
        if leaf.startswith(src):
            cands.append(f"{prefix}.{dst}{leaf[len(src):]}.weight")
    cands += [f"{layer}.conv2.weight", f"{layer}.0.weight"]  # resnet blocks, stem
    return cands


# ---------------------------------------------------------------------------- figures

_COLORS = {"magnitude": "tab:red", "reinit": "tab:blue", "random": "tab:green",
           "dense2": "black"}


def _figures(run: str, results: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    sps, metrics = cfg["sparsities"], cfg["metrics"]
    models = results["models"]
    labels = list(models)
    styles = ["-", "--", ":", "-."]
    out = []

    # similarity per layer per method
    fig, axes = plt.subplots(len(labels), len(metrics), squeeze=False,
                             figsize=(5.5 * len(metrics), 3.2 * len(labels)))
    for r, label in enumerate(labels):
        a = next(iter(models[label]["seeds"].values()))
        xs = range(len(a["layers"]))
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            ax.plot(xs, a["similarity"]["dense2"][metric], color="black", lw=2,
                    label="dense, seed 2")
            for k, p in enumerate(sorted(sps, reverse=True)):
                for meth in METHODS:
                    ax.plot(xs, a["similarity"][f"{meth}-{_pct(p)}"][metric],
                            color=_COLORS[meth], ls=styles[k % len(styles)],
                            label=f"{meth} {_pct(p)}%")
            ax.set_title(f"{label}: {metric} to the dense original")
            ax.set_xticks(list(xs))
            ax.set_xticklabels([_short(n) for n in a["layers"]], rotation=60, fontsize=7)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(run, "similarity_layers.png"), dpi=110)
    plt.close(fig)
    out.append(("Similarity to the dense original, per layer", "similarity_layers.png"))

    # accuracy vs sparsity
    fig, axes = plt.subplots(1, len(labels), squeeze=False, figsize=(4.2 * len(labels), 3.4))
    for c, label in enumerate(labels):
        mm, ax = models[label], axes[0][c]

        def acc(name, mm=mm):
            return 100 * _seed_mean(mm, lambda a: a["accuracy"][name])
        ax.axhline(acc("dense"), color="gray", lw=1, label="dense")
        ax.axhline(acc("dense2"), color="gray", lw=1, ls="--", label="dense, seed 2")
        for meth in METHODS:
            ax.plot([100 * p for p in sps], [acc(f"{meth}-{_pct(p)}") for p in sps], "o-",
                    color=_COLORS[meth], label=meth)
        ax.set_title(label)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(run, "accuracy_vs_sparsity.png"), dpi=110)
    plt.close(fig)
    out.append(("Accuracy vs sparsity", "accuracy_vs_sparsity.png"))

    # layer x layer heatmaps (first model)
    a = next(iter(models[labels[0]]["seeds"].values()))
    hm = a["heatmap"]
    mats = hm["matrices"]
    fig, axes = plt.subplots(1, len(mats), squeeze=False, figsize=(3.3 * len(mats) + 1, 4.3),
                             layout="constrained")
    names = [_short(n) for n in a["layers"]]
    for c, (name, mat) in enumerate(mats.items()):
        ax = axes[0][c]
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if c == 0 else [], fontsize=6)
        ax.set_xlabel(f"{name} layers", fontsize=8)
        if c == 0:
            ax.set_ylabel("dense original layers", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=hm["metric"])
    fig.suptitle(f"{labels[0]}: layer x layer {hm['metric']} to the dense original "
                 "(spatially pooled)", fontsize=10)
    fig.savefig(os.path.join(run, "heatmap.png"), dpi=110)
    plt.close(fig)
    out.append((f"Layer x layer {hm['metric']}, {labels[0]}", "heatmap.png"))

    # speedup
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(labels), 3.4))
    width = 0.8 / max(1, len(sps))
    have = False
    for k, p in enumerate(sps):
        vals = [models[lab]["timing"]["rows"][f"magnitude-{_pct(p)}"].get("speedup")
                for lab in labels]
        have |= any(v is not None for v in vals)
        ax.bar([i + k * width for i in range(len(labels))], [v or 0 for v in vals], width,
               label=f"{_pct(p)}%")
    ax.axhline(1.0, color="black", lw=1)
    ax.set_xticks([i + width * (len(sps) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("speedup, sparse vs dense kernels")
    if not have:
        ax.text(0.5, 0.5, "sparse kernels unavailable in this build", ha="center",
                transform=ax.transAxes)
    ax.legend(fontsize=8, title="sparsity")
    fig.tight_layout()
    fig.savefig(os.path.join(run, "speedup.png"), dpi=110)
    plt.close(fig)
    out.append(("Inference speedup of the pruned nets on sparse kernels", "speedup.png"))
    return out


def _short(layer: str) -> str:
    return layer.replace("features.", "").replace("classifier.", "c.").replace("blocks.", "b")


# ---------------------------------------------------------------------------- CLI


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="which study (default: default)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out: finished stages are not redone")
    p.add_argument("--data", default=None,
                   help="dataset directory (wacv2020: the extracted CIFAR-10 python folder)")
    p.add_argument("--dataset", default=None, help="override the preset's dataset")
    p.add_argument("--limit-train", type=int, default=None,
                   help="use only the first N training examples (quick trials)")
    p.add_argument("--models", default=None,
                   help="comma-separated models, NAME or NAME:WIDTH (e.g. conv4,resnet20:0.5)")
    p.add_argument("--sparsities", default=None, help="comma-separated, e.g. 0.5,0.75,0.9")
    p.add_argument("--seeds", default=None, help="comma-separated model seeds (default: 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of the dense and from-scratch runs, for every model")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="fine-tuning epochs after each pruning step, for every model")
    p.add_argument("--scope", default=None, choices=prune.SCOPES,
                   help="magnitude pruning threshold: global (default) or per layer")
    p.add_argument("--metrics", default=None,
                   help="comma-separated similarity metrics (default: svcca,linear_cka)")
    p.add_argument("--points", type=int, default=None,
                   help="held-out data points per layer for similarity")
    p.add_argument("--jobs", type=int, default=None,
                   help="stages run in parallel processes (default: CPU cores up to 4, 1 on "
                        "GPU)")
    p.add_argument("--kernels", default=None, choices=("dense", "sparse"),
                   help="train the pruned nets on dense kernels (default) or sparsecore's")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    cfg = preset_config(
        args.preset,
        models=[m.strip() for m in args.models.split(",")] if args.models else None,
        sparsities=_floats(args.sparsities) if args.sparsities else None,
        seeds=seeds, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
        data=args.data, dataset=args.dataset, limit_train=args.limit_train,
        scope=args.scope, points=args.points, jobs=args.jobs, kernels=args.kernels,
        device=args.device,
        metrics=[m.strip() for m in args.metrics.split(",")] if args.metrics else None,
    )
    if cfg.data.dataset == "cifar10":
        T.data_lib.cifar10_dir(cfg.data.data)  # fail now, with what to do, not in a worker
    if args.out is None:
        args.out = os.path.join("runs", args.preset)
    return cfg
