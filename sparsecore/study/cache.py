"""Stage cache keys: every stage of a study has a fingerprint, the short sha256 of a
canonical JSON of exactly the hyperparameters the stage depends on and of its inputs'
fingerprints (as open_lth names its runs).

A stage lives in RUN/stages/<label>/s<seed>/<name>-<fingerprint> (the readable stage name
with its fingerprint) and holds hparams.json (what was hashed) and, once finished,
result.json. Changing one setting gives new fingerprints to the stages that depend on it
and, through their fingerprints, to every stage downstream of them; the other finished
stages are reused as they are. A run directory's current study is its study.json: the
stage names of that study map to their directories here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sparsecore.study.config import _RUNTIME_FIELDS, StudyConfig
from sparsecore.study.stages import SEED_DENSE2, SEED_RANDOM, SEED_REINIT, Stage, plan_stages

FINGERPRINT_CHARS = 12  # hex digits of the sha256 kept in a stage's directory name

# The settings that stage_hparams gives to the stages that read them (some to none: the
# preset's name, the findings' tolerance). A setting not named here goes into every stage's
# hparams, so that a new setting reruns the whole study until it is assigned to the stages
# it affects, instead of letting them be reused with a stale result.
_ASSIGNED = frozenset({"preset", "data", "models", "sparsities", "seeds", "scope", "metrics",
                       "points", "spatial_samples", "significance", "kernels", "patterns",
                       "pattern_sparsity", "block_size", "lm", *_RUNTIME_FIELDS})
_ASSIGNED_PLAN = frozenset({"model", "width", "train", "finetune_epochs", "finetune_lr",
                            "rewind_epoch"})
# The kinds of training stage stage_hparams knows (study.stages and study.regimes).
_TRAINING = ("dense", "dense2", "magnitude", "reinit", "random", "anchor", "rewind")


def canonical(obj: Any) -> str:
    """The JSON text that is hashed: sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:FINGERPRINT_CHARS]


def _train_hparams(cfg: StudyConfig, stage: Stage) -> dict[str, Any]:
    """The training hyperparameters a training stage runs with (as stages._train_stage
    builds them)."""
    plan = cfg.plan(stage.label)
    hp = dataclasses.replace(plan.train, seed=stage.seed)
    if stage.kind == "dense2":
        hp.seed = stage.seed + SEED_DENSE2
    elif stage.kind == "magnitude":
        hp = dataclasses.replace(hp, epochs=plan.finetune_epochs, lr=plan.finetune_lr,
                                 warmup_epochs=0.0, kernels=cfg.kernels)
    elif stage.kind in ("reinit", "random"):
        offset = SEED_REINIT if stage.kind == "reinit" else SEED_RANDOM
        hp = dataclasses.replace(hp, seed=stage.seed + offset, kernels=cfg.kernels)
    elif stage.kind == "rewind":  # as study.regimes.train_stage
        hp = dataclasses.replace(hp, kernels=cfg.kernels)
    elif stage.kind.startswith("oneshot-"):
        hp = dataclasses.replace(hp, epochs=plan.finetune_epochs, lr=plan.finetune_lr,
                                 warmup_epochs=0.0, kernels=cfg.kernels)
    return dataclasses.asdict(hp)


def stage_hparams(cfg: StudyConfig, stage: Stage) -> dict[str, Any]:
    """Exactly the settings of `cfg` that `stage`'s result depends on, beside its inputs.
    A kind this function does not know depends on every setting but the runtime ones."""
    out: dict[str, Any] = {"kind": stage.kind, "label": stage.label, "seed": stage.seed}
    settings = cfg.to_dict()
    oneshot = stage.kind.startswith("oneshot-")
    if stage.kind not in (*_TRAINING, "analysis") and not oneshot:
        out["sparsity"] = stage.sparsity
        out["config"] = {k: v for k, v in settings.items() if k not in _RUNTIME_FIELDS}
        return out
    unassigned = {k: v for k, v in settings.items() if k not in _ASSIGNED}
    if unassigned:
        out["unassigned"] = unassigned
    data = dataclasses.asdict(cfg.data)
    if stage.kind in _TRAINING or oneshot:
        plan = cfg.plan(stage.label)
        out.update(data=data, model=plan.model, width=plan.width,
                   train=_train_hparams(cfg, stage))
        plan_extra = {k: v for k, v in dataclasses.asdict(plan).items()
                      if k not in _ASSIGNED_PLAN}
        if plan_extra:
            out["unassigned_plan"] = plan_extra
        if stage.kind not in ("dense", "dense2"):
            out["sparsity"] = stage.sparsity
        if stage.kind in ("magnitude", "rewind"):
            out["scope"] = cfg.scope
        if stage.kind in ("anchor", "rewind"):
            out["rewind_epoch"] = plan.rewind_epoch
        if oneshot and stage.kind == "oneshot-block":
            out["block_size"] = cfg.block_size
        if stage.kind == "random":
            out["mask_seed"] = out["train"]["seed"] + round(stage.sparsity * 1000)
    else:
        out.update(data=data, metrics=cfg.metrics, points=cfg.points,
                   spatial_samples=cfg.spatial_samples, sparsities=cfg.sparsities)
    return out


@dataclass(frozen=True)
class StageKey:
    fingerprint: str
    path: str  # the stage's directory under RUN/stages: "<stage name>-<fingerprint>"
    record: dict[str, Any]  # hparams.json: the stage, its hparams and its inputs' fingerprints


def make_key(name: str, hparams: dict[str, Any], inputs: dict[str, str]) -> StageKey:
    """The key of stage `name` with `hparams` whose inputs have fingerprints `inputs`
    ({input stage name: fingerprint})."""
    fp = digest({"hparams": hparams, "inputs": inputs})
    record = {"stage": name, "fingerprint": fp, "hparams": hparams, "inputs": inputs}
    return StageKey(fp, f"{name}-{fp}", record)


_KEYS: dict[str, dict[str, StageKey]] = {}


def stage_keys(cfg: StudyConfig) -> dict[str, StageKey]:
    """{stage name: key} of every stage of `cfg`'s study."""
    memo = canonical(cfg.to_dict())
    if memo not in _KEYS:
        keys: dict[str, StageKey] = {}
        for s in plan_stages(cfg):
            missing = [d for d in s.deps if d not in keys]
            if missing:
                raise ValueError(f"stage {s.key} is planned before its inputs {missing}")
            keys[s.key] = make_key(s.key, stage_hparams(cfg, s),
                                   {d: keys[d].fingerprint for d in s.deps})
        _KEYS[memo] = keys
    return _KEYS[memo]


def run_keys(run: str) -> dict[str, StageKey]:
    """The stage keys of the study that run directory `run` holds now (its study.json)."""
    path = os.path.join(run, "study.json")
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {run} holds no study") from None
    return stage_keys(StudyConfig.from_dict(json.loads(text)))


def stage_path(run: str, name: str) -> str:
    """The directory of stage `name` of the study in `run`."""
    keys = run_keys(run)
    if name not in keys:
        raise KeyError(f"{name!r} is not a stage of the study in {run}")
    return os.path.join(run, "stages", keys[name].path)


def timing_key(cfg: StudyConfig, label: str, device: str, threads: int, batch: int,
               seed: int | None = None, speed: str | None = None) -> StageKey:
    """The key of a model's inference timing for one seed (None: the first): the nets that
    inference.timing loads (every trained net of that seed), where and how it measures
    (speed: what runs the sparse side, hashed when given)."""
    keys = stage_keys(cfg)
    seed = cfg.seeds[0] if seed is None else seed
    base = f"{label}/s{seed}/"
    names = sorted(n for n in keys if n.startswith(base) and not n.endswith("/analysis"))
    hp = {"kind": "timing", "label": label, "seed": seed, "device": device,
          "threads": threads, "batch": batch}
    if speed is not None:
        hp["speed"] = speed
    return make_key(f"{label}/s{seed}/timing", hp, {n: keys[n].fingerprint for n in names})


def write_record(sdir: str, key: StageKey) -> None:
    """hparams.json of a stage directory: what its fingerprint hashes."""
    from sparsecore._io import atomic_write_text

    atomic_write_text(os.path.join(sdir, "hparams.json"), json.dumps(key.record, indent=1))


@contextlib.contextmanager
def claimed(sdir: str) -> Iterator[None]:
    """Hold a stage directory's lock: two workers given the same stage (a task retried while
    its first worker still runs) take turns, and the second finds the first's result. The
    kernel drops the lock of a killed worker."""
    os.makedirs(sdir, exist_ok=True)
    fd = os.open(os.path.join(sdir, ".stage.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
