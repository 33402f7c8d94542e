"""The study's configuration: StudyConfig and ModelPlan, the presets, and the command-line
flags that build a StudyConfig."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sparsecore import data as data_lib
from sparsecore import prune
from sparsecore.hparams import POSITIVE, DataHparams, TrainHparams, arg_type, number, path_arg
from sparsecore.study._common import PATTERNS

# Where stages can run (study.executors).
EXECUTORS = ("local", "dask")

# Fewer held-out data points than this leave the centred activations of a layer with rank
# below it: every similarity metric is then NaN or trivially 1.
MIN_POINTS = 10


def check_metrics(metrics: list[str]) -> list[str]:
    """`metrics` if it is a non-empty list of sparsecore.similarity's metric names, else
    ValueError listing them."""
    from sparsecore.similarity import METRICS

    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        what = f"unknown similarity metric {', '.join(map(repr, unknown))}" if unknown \
            else "no similarity metric given"
        raise ValueError(f"{what}; choose from {', '.join(METRICS)}")
    return metrics


def check_points(points: int) -> int:
    """`points` if there are enough held-out data points per layer, else ValueError."""
    if points < MIN_POINTS:
        raise ValueError(f"points must be >= {MIN_POINTS} (held-out data points per layer; "
                         f"with fewer every similarity is NaN or trivially 1), got {points}")
    return points


def _argtype(parse: Any, name: str) -> Any:
    """An argparse `type` from a parser that raises ValueError with what is wrong."""
    def conv(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    conv.__name__ = name
    return conv


def _metric_list(text: str) -> list[str]:
    return check_metrics([m.strip() for m in text.split(",") if m.strip()])


def _fraction_list(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or not all(0 < v < 1 for v in vals):
        raise ValueError(f"sparsities must lie in (0, 1), got {text!r}")
    return vals


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise ValueError("expected at least one integer")
    return vals


METRIC_LIST = _argtype(_metric_list, "metric list")
POINTS = _argtype(lambda t: check_points(int(t)), "points")


@dataclass
class ModelPlan:
    """One model of the study and how it is trained."""

    model: str
    width: float
    train: TrainHparams  # the dense run, and the from-scratch runs of reinit / random
    finetune_epochs: int
    finetune_lr: float  # peak LR of each fine-tuning round after a pruning step
    rewind_epoch: int = 1  # lottery-ticket rewinding: retrain each round from this epoch

    def __post_init__(self) -> None:
        if POSITIVE(self.width):
            raise ValueError(f"model {self.model}: width must be > 0, got {self.width}")
        if self.finetune_epochs < 1:
            raise ValueError(f"finetune_epochs must be >= 1, got {self.finetune_epochs}")
        if POSITIVE(self.finetune_lr):
            raise ValueError(f"finetune_lr must be > 0, got {self.finetune_lr}")
        # One epoch leaves no epoch to rewind to: presets that rewind refuse it up front
        # (preset_config); the others (NO_REWINDING) never read it.
        if self.train.epochs >= 2 and not 0 < self.rewind_epoch < self.train.epochs:
            raise ValueError(f"model {self.model}: rewind_epoch must lie in 1..epochs-1 "
                             f"({self.train.epochs - 1}), got {self.rewind_epoch}")

    @property
    def label(self) -> str:
        return self.model if self.width == 1 else f"{self.model}-w{self.width:g}"


@dataclass
class StudyConfig:
    preset: str
    data: DataHparams
    models: list[ModelPlan]
    sparsities: list[float]
    seeds: list[int] = field(default_factory=lambda: [0])
    scope: str = "global"  # magnitude pruning: one threshold over all layers, or per layer
    metrics: list[str] = field(default_factory=lambda: ["svcca", "linear_cka"])
    points: int = 4000  # held-out data points per layer for the per-layer similarity
    spatial_samples: int = 8  # positions per image of a conv map (data points)
    significance: float = 2.0  # a difference counts beyond this many standard errors
    # one-shot pruning in each sparsity pattern (PATTERNS) at one sparsity,
    # for accuracy against speed; block: square blocks of this side
    patterns: list[str] = field(default_factory=lambda: ["global", "layerwise", "erk",
                                                         "block"])
    pattern_sparsity: float = 0.9
    block_size: int = 8
    device: str = "auto"
    jobs: int = 0  # parallel stage processes; 0 = auto
    kernels: str = "dense"  # what the pruned nets train on
    lm: dict[str, Any] | None = None  # the language-model study's settings (study.lm.LMHparams)

    def __post_init__(self) -> None:
        if self.lm is not None:  # fill in the defaults, so study.json records every setting
            from sparsecore.study.lm import LMHparams

            self.lm = dataclasses.asdict(LMHparams(**self.lm))
        check_metrics(self.metrics)
        check_points(self.points)
        if not self.sparsities or not all(0 < p < 1 for p in self.sparsities):
            raise ValueError(f"sparsities must lie in (0, 1), got {self.sparsities}")
        if not self.seeds:
            raise ValueError("seeds: give at least one")
        if self.scope not in prune.SCOPES:
            raise ValueError(f"scope must be one of {', '.join(prune.SCOPES)}, got "
                             f"{self.scope!r}")
        if self.kernels not in ("dense", "sparse"):
            raise ValueError(f"kernels must be dense or sparse, got {self.kernels!r}")
        unknown = [p for p in self.patterns if p not in PATTERNS]
        if unknown:
            raise ValueError(f"unknown sparsity pattern {', '.join(map(repr, unknown))}; "
                             f"choose from {', '.join(PATTERNS)}")
        if not 0 < self.pattern_sparsity < 1:
            raise ValueError(f"pattern_sparsity must lie in (0, 1), got {self.pattern_sparsity}")
        for name, v, lo in (("spatial_samples", self.spatial_samples, 1),
                            ("jobs", self.jobs, 0), ("significance", self.significance, 0),
                            ("block_size", self.block_size, 1)):
            if not v >= lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyConfig:
        d = dict(d)
        d["data"] = DataHparams(**d["data"])
        d["models"] = [ModelPlan(**{**m, "train": TrainHparams(**m["train"])})
                       for m in d["models"]]
        return cls(**d)

    def plan(self, label: str) -> ModelPlan:
        return next(m for m in self.models if m.label == label)


# Fields that do not change any result: no stage's fingerprint depends on them.
_RUNTIME_FIELDS = ("device", "jobs")


def _family(name: str) -> str:
    for fam in ("conv", "vgg", "resnet"):
        if name.startswith(fam):
            return fam
    raise ValueError(f"this preset runs image classifiers (conv*, vgg*, resnet*), not {name!r}"
                     " (the Transformer runs in --preset transformer)")


def _digits_plan(name: str, width: float | None = None) -> ModelPlan:
    # Fine-tuning after each pruning step repeats the training LR schedule over fewer
    # epochs (learning-rate rewinding, Renda et al. 2020), which recovered more accuracy at
    # 90% sparsity than a smaller LR in the same epochs; label smoothing 0.1 lifted the
    # dense Conv-2's accuracy over three seeds.
    fam = _family(name)
    if fam == "conv":  # no BatchNorm: Adam, as in the lottery-ticket papers
        hp = TrainHparams(epochs=15, batch_size=64, optimizer="adam", lr=2e-3,
                            weight_decay=0.0, label_smoothing=0.1)
        return ModelPlan(name, 0.5 if width is None else width, hp, 4, hp.lr)
    hp = TrainHparams(epochs=12, batch_size=64, optimizer="sgd", lr=0.05, momentum=0.9,
                        weight_decay=5e-4, label_smoothing=0.1)
    default_width = 0.25 if fam == "vgg" else 0.5
    return ModelPlan(name, default_width if width is None else width, hp, 4, hp.lr)


def _cifar_plan(name: str, width: float | None = None) -> ModelPlan:
    # Rewinding: ResNet-20 and VGG-16 become stable to SGD noise after a few thousand
    # iterations (Frankle et al. 2020, linear mode connectivity): epoch 5 is about 2000 at
    # batch 128. Conv-4 with Adam finds tickets from its initialisation: one epoch.
    fam = _family(name)
    if fam == "conv":  # Frankle & Carbin: Adam 3e-4
        hp = TrainHparams(epochs=60, batch_size=60, optimizer="adam", lr=3e-4,
                            weight_decay=0.0, eval_batch_size=1000)
        return ModelPlan(name, width or 1.0, hp, 20, 1e-4, rewind_epoch=1)
    wd = 1e-4 if fam == "resnet" else 5e-4
    hp = TrainHparams(epochs=160, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9,
                        weight_decay=wd, schedule="step", milestones="80,120",
                        eval_batch_size=1000)
    return ModelPlan(name, width or 1.0, hp, 40, 0.01, rewind_epoch=5)


def _test_plan(name: str, width: float | None = None) -> ModelPlan:
    fam = _family(name)
    opt, lr = ("adam", 1e-2) if fam == "conv" else ("sgd", 0.05)
    hp = TrainHparams(epochs=3, batch_size=50, optimizer=opt, lr=lr, weight_decay=0.0)
    return ModelPlan(name, width or 0.125, hp, 1, lr)


def _pai_plan(name: str, width: float | None = None) -> ModelPlan:
    # Pruned at initialisation and trained once from scratch: the digits schedule, shorter,
    # so that the 84 pruned nets fit the preset's time.
    plan = _digits_plan(name, width)
    return dataclasses.replace(plan, train=dataclasses.replace(plan.train, epochs=10),
                               finetune_epochs=1)


def _lm_plan(name: str, width: float | None = None) -> ModelPlan:
    # Fifteen training runs in minutes on 2 cores: a few hundred Adam steps each. At a fixed
    # budget of tokens, batches of 16 windows reached lower bits per character than 32 (more
    # steps), and a higher peak LR did worse. Fine-tuning repeats the schedule over one epoch.
    if name != "transformer":
        raise ValueError(f"the transformer preset runs the character-level Transformer, not "
                         f"{name!r}")
    hp = TrainHparams(epochs=2, batch_size=16, optimizer="adam", lr=2e-3, weight_decay=0.0,
                      warmup_epochs=0.2, eval_batch_size=256)
    return ModelPlan(name, 1.0 if width is None else width, hp, 1, hp.lr)


@dataclass
class Preset:
    data: DataHparams
    models: list[str]
    plan: Callable[..., ModelPlan]
    sparsities: list[float]
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "default": Preset(DataHparams(dataset="digits"), ["conv2", "vgg11",
                      "resnet20"], _digits_plan, [0.5, 0.75, 0.9], {"seeds": [0, 1, 2]}),
    "wacv2020": Preset(DataHparams(dataset="cifar10"), ["resnet20", "vgg16", "conv4"],
                       _cifar_plan, [0.5, 0.75, 0.9, 0.95], {"points": 10000}),
    "pai": Preset(DataHparams(dataset="digits"), ["vgg16", "resnet20"], _pai_plan,
                  [1 - 10 ** -(k / 2) for k in range(1, 7)]),  # compressions 10^0.5 .. 10^3
    # pruned per layer: the attention and MLP weights differ in scale, and one global
    # threshold over the block norms emptied whole layers (value and output projections)
    "transformer": Preset(DataHparams(dataset="text"), ["transformer"], _lm_plan,
                          [0.5, 0.75, 0.9], {"points": 2000, "scope": "layerwise", "lm": {}}),
    "test": Preset(DataHparams(dataset="synthetic", image_size=8, limit_train=400),
                   ["conv2"], _test_plan, [0.5, 0.8],
                   {"points": 300, "spatial_samples": 2, "jobs": 1}),
}


# Presets whose studies have no rewinding stages, so one training epoch is enough.
NO_REWINDING = ("pai", "transformer")


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
        try:
            width = float(w) if w else None
        except ValueError:
            raise ValueError(f"model {spec!r}: the width after ':' must be a number") from None
        plan = pre.plan(mname, width)
        if epochs is not None:
            if epochs < 2 and name not in NO_REWINDING:
                raise ValueError(f"epochs must be >= 2 (lottery-ticket rewinding retrains from "
                                 f"an epoch inside the run), got {epochs}")
            plan = dataclasses.replace(plan, train=dataclasses.replace(plan.train,
                                                                       epochs=epochs),
                                       rewind_epoch=min(plan.rewind_epoch, epochs - 1))
        if finetune_epochs is not None:
            plan = dataclasses.replace(plan, finetune_epochs=finetune_epochs)
        plans.append(plan)
    sp = sorted(sparsities or pre.sparsities)
    kw = {**pre.extra, **{k: v for k, v in overrides.items() if v is not None}}
    data = copy.deepcopy(pre.data)
    for k in ("dataset", "data", "image_size", "channels", "limit_train"):
        if k in kw:
            setattr(data, k, kw.pop(k))
    preset_seeds = kw.pop("seeds", [0])
    return StudyConfig(name, data, plans, sp, seeds or preset_seeds, **kw)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="which study (default: default)")
    p.add_argument("--out", default=None, type=path_arg,
                   help="run directory (default: runs/<preset>); the study in it is "
                        "continued: finished stages whose settings and inputs match are not "
                        "redone")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--fresh", action="store_true",
                       help="delete the study in --out (its stages, results and report) and "
                            "start over")
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out (what happens anyway; kept for older "
                            "scripts)")
    p.add_argument("--data", default=None,
                   help="dataset directory (wacv2020: the extracted CIFAR-10 python folder)")
    p.add_argument("--dataset", default=None, help="override the preset's dataset")
    p.add_argument("--limit-train", type=arg_type(int, number(1)), default=None,
                   help="use only the first N training examples (quick trials)")
    p.add_argument("--models", default=None,
                   help="comma-separated models, NAME or NAME:WIDTH (e.g. conv4,resnet20:0.5)")
    p.add_argument("--sparsities", default=None, type=_argtype(_fraction_list, "sparsities"),
                   help="comma-separated, each in (0, 1), e.g. 0.5,0.75,0.9")
    p.add_argument("--seeds", default=None, type=_argtype(_int_list, "seeds"),
                   help="comma-separated model seeds (default: the preset's; 0,1,2 for "
                        "default, 0 for the others)")
    p.add_argument("--epochs", type=arg_type(int, number(1)), default=None,
                   help="epochs of the dense and from-scratch runs, for every model")
    p.add_argument("--finetune-epochs", type=arg_type(int, number(1)), default=None,
                   help="fine-tuning epochs after each pruning step, for every model")
    p.add_argument("--scope", default=None, choices=prune.SCOPES,
                   help="magnitude pruning threshold: global (default) or per layer")
    p.add_argument("--metrics", default=None, type=METRIC_LIST,
                   help="comma-separated similarity metrics (default: svcca,linear_cka)")
    p.add_argument("--points", type=POINTS, default=None,
                   help=f"held-out data points per layer for similarity (at least {MIN_POINTS})")
    p.add_argument("--jobs", type=arg_type(int, number(0)), default=None,
                   help="stages run in parallel processes (default: CPU cores up to 4, 1 on "
                        "GPU)")
    p.add_argument("--kernels", default=None, choices=("dense", "sparse"),
                   help="train the pruned nets on dense kernels (default) or sparsecore's")
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="where the stages run: this machine (default), or a Dask distributed "
                        "cluster (pip install 'sparsecore[distributed]'; workers share --out)")
    p.add_argument("--address", default=None,
                   help="--executor dask: the scheduler, e.g. tcp://HOST:8786 (default: a "
                        "local cluster of --jobs worker processes)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the stages and an estimate of time and memory (from a few "
                        "training steps per model on --device), write nothing")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    cfg = preset_config(
        args.preset,
        models=[m.strip() for m in args.models.split(",")] if args.models else None,
        sparsities=args.sparsities, seeds=args.seeds, epochs=args.epochs,
        finetune_epochs=args.finetune_epochs, data=args.data, dataset=args.dataset,
        limit_train=args.limit_train, scope=args.scope, points=args.points, jobs=args.jobs,
        kernels=args.kernels, device=args.device, metrics=args.metrics,
    )
    if cfg.data.dataset == "cifar10":
        data_lib.cifar10_dir(cfg.data.data)  # fail now, with what to do, not in a worker
    if args.out is None:
        args.out = os.path.join("runs", args.preset)
    return cfg
