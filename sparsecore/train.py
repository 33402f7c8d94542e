"""Training and evaluation: SGD/Adam, cosine/step schedules, label smoothing, tqdm progress,
metrics as JSON lines, atomic per-epoch checkpoints with resume, and DDP through torchrun.

A run directory holds `checkpoint.pt` (written atomically after every epoch: model,
optimizer, schedule, RNG state, the metrics so far and the settings of the run) and
`metrics.jsonl` (one line per epoch). Restarting a killed run with the same directory and
the same settings continues after the last finished epoch; a finished run returns at once;
other settings are refused (start over with `resume=False`, the CLI's --fresh).
Checkpoints and model files hold only tensors and plain data and load with
weights_only=True (sparsecore._io.load_checkpoint): loading one runs no code.
Under `torchrun`, each process trains on its shard of every batch (the batch size is the
global one), rank 0 writes the files, and the pruning masks (buffers) are broadcast from
rank 0 so they stay identical on all ranks.
The hyperparameters are the dataclasses of sparsecore.hparams.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sparsecore import data as data_lib
from sparsecore import prune
from sparsecore._io import (
    CheckpointError,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    remove_stale_tmp,
)
from sparsecore.hparams import DataHparams, ModelHparams, TrainHparams

# ---------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group that torchrun set up (WORLD_SIZE > 1): NCCL for CUDA devices,
    gloo for the CPU. A single process gets DistInfo() and no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def finish_distributed(info: DistInfo) -> None:
    """End a torchrun worker: wait for every rank, tear the process group down and leave
    without running the interpreter's and C++ libraries' exit-time destructors (every file
    is written atomically and flushed by then). On the 2-core CI machine under load, a rank
    aborted in those destructors in about 1 run of 4 ("terminate called without an active
    exception", a joinable std::thread destroyed at exit; seen with torch 2.13 CPU, which
    loads triton lazily for some ops), and torchrun reported the finished run as failed."""
    if info.world <= 1 or not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_device(device: str) -> str:
    """`device` if it names a device this machine has ('auto', 'cpu', 'cuda', 'cuda:N', ...),
    else ValueError saying what is there."""
    if device == "auto":
        return device
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device {device!r}: this machine has no CUDA device (torch "
                             f"{torch.__version__}, cuda {torch.version.cuda}); use cpu or auto")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {device!r}: this machine has {n} CUDA device(s), "
                             f"cuda:0 to cuda:{n - 1}")
    return device


def resolve_device(device: str, info: DistInfo | None = None) -> str:
    """'auto' -> cuda when available, else cpu; under DDP, cuda -> cuda:<local rank>.
    A device the machine does not have raises ValueError."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    if device == "cuda" and info is not None and info.world > 1:
        device = f"cuda:{info.local_rank}"
    return device


def _barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


# ---------------------------------------------------------------------------- loops


def make_optimizer(model: nn.Module, hp: TrainHparams) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum,
                               weight_decay=hp.weight_decay)
    if hp.optimizer == "adam":
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    raise ValueError(f"unknown optimizer {hp.optimizer!r}; use sgd or adam")


def lr_factor(hp: TrainHparams, step: int, steps_per_epoch: int) -> float:
    """Multiplier of hp.lr at optimizer step `step` (warm-up, then the schedule)."""
    total = max(1, hp.epochs * steps_per_epoch)
    warm = hp.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if hp.schedule == "cosine":
        t = (step - warm) / max(1.0, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    if hp.schedule == "step":
        epoch = step / steps_per_epoch
        drops = sum(epoch >= int(m) for m in hp.milestones.split(",") if m.strip())
        return hp.gamma**drops
    if hp.schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {hp.schedule!r}; use cosine, step or constant")


def _loss_and_correct(out: torch.Tensor, y: torch.Tensor,
                      loss_fn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean loss, number correct and number of targets; LM logits (B, T, V) are flattened."""
    out = out.reshape(-1, out.shape[-1])
    y = y.reshape(-1)
    return loss_fn(out, y), (out.argmax(-1) == y).sum(), y.numel()


@torch.no_grad()
def evaluate(model: nn.Module, loader: data_lib.Loader,
             info: DistInfo | None = None) -> dict[str, float]:
    """{"loss", "acc"} over the loader (summed over ranks under DDP)."""
    was_training = model.training
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    device = loader.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        loss, correct, n = _loss_and_correct(model(x), y, loss_fn)
        totals += torch.stack([loss.double(), correct.double(),
                               torch.tensor(n, dtype=torch.float64, device=device)])
    if info is not None and info.world > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    loss, correct, n = totals.tolist()
    return {"loss": loss / max(n, 1), "acc": correct / max(n, 1)}


def sparsify_model(model: nn.Module) -> nn.Module:
    """Swap masked Linear/Conv2d layers for sparsecore's kernel-backed ones, in place (layers
    below the measured crossover sparsity stay dense; see sparsecore.nn.sparsify)."""
    from sparsecore.nn import sparsify

    sparsify(model)
    return model


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of `model` in its masked dense form (sparse layers put back as masked
    nn.Linear / nn.Conv2d), so that checkpoints and model files load into a fresh model
    whatever kernels trained it."""
    from sparsecore.nn.sparsify import SPARSE_LAYERS, densify

    if any(isinstance(m, SPARSE_LAYERS) for m in model.modules()):
        model = copy.deepcopy(model)
        densify(model)
    return model.state_dict()


@dataclass
class TrainResult:
    model: nn.Module
    metrics: list[dict[str, Any]]
    final: dict[str, float]
    resumed_from: int = 0  # epochs that were already done when this call started
    seconds: float = 0.0


def train(
    model: nn.Module,
    splits: data_lib.Splits,
    hp: TrainHparams,
    *,
    out_dir: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "train",
    info: DistInfo | None = None,
    resume: bool = True,
    settings: dict[str, Any] | None = None,
    start_epoch: int = 0,
    end_epoch: int | None = None,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
) -> TrainResult:
    """Train `model` on `splits.train`, evaluating on the held-out split after each epoch.

    out_dir: where checkpoint.pt and metrics.jsonl go; with `resume`, a checkpoint there is
    continued (or returned at once when finished) when it was written with the same `hp`
    (eval_batch_size apart) and `settings` (what else made the run: data, model, where it
    started; plain data), and refused with ResumeError otherwise. info: the DDP process
    group facts (`init_distributed`); None means one process. penalty(model) -> scalar: a
    term added to every training batch's loss (e.g. a structured sparsity regulariser; the
    logged train_loss includes it, the held-out loss does not). Returns the trained
    (unwrapped) model.

    start_epoch / end_epoch: train only epochs start_epoch..end_epoch-1 (end_epoch None:
    hp.epochs) of the run `hp` describes, with a fresh optimizer and the learning rate and
    data order where that run has them at start_epoch: `prune.imp`'s train_fn(model, start,
    end) in epochs, which lottery-ticket rewinding needs.
    """
    end_epoch = hp.epochs if end_epoch is None else end_epoch
    if not 0 <= start_epoch < end_epoch <= hp.epochs:
        raise ValueError(f"need 0 <= start_epoch < end_epoch <= epochs ({hp.epochs}), got "
                         f"{start_epoch} and {end_epoch}")
    if (start_epoch, end_epoch) != (0, hp.epochs):
        settings = {**(settings or {}), "epoch_range": [start_epoch, end_epoch]}
    info = info or DistInfo()
    model = model.to(device)
    loader = data_lib.Loader.for_split(splits, "train", hp.batch_size, train=True, seed=hp.seed,
                                       device=device, rank=info.rank, world=info.world)
    eval_loader = data_lib.Loader.for_split(splits, "heldout", hp.eval_batch_size,
                                            device=device, rank=info.rank, world=info.world)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    state = None
    if out_dir and info.is_main:
        remove_stale_tmp(out_dir)
    if resume and ckpt_path and os.path.exists(ckpt_path):
        state = load_checkpoint(ckpt_path, keys=_CHECKPOINT_KEYS, map_location=device,
                                hint=_FRESH_HINT)
        _check_same_run(ckpt_path, state, hp, settings)
        # masks first: they change the parameter order the optimizer state refers to
        prune.load(model, state["model"])
    if hp.kernels == "sparse":
        # after the (dense, masked) checkpoint is loaded: the optimizer state refers to the
        # sparse layers' parameters, which are the same on every resume of the same masks
        sparsify_model(model)
    opt = make_optimizer(model, hp)
    steps = len(loader)
    offset = start_epoch * steps  # the schedule resumes where the whole run has it
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(hp, s + offset, steps))
    metrics: list[dict[str, Any]] = []
    start = start_epoch
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())  # mapped to `device` with the rest
        metrics, start = state["metrics"], state["epoch"]
    net: nn.Module = model
    if info.world > 1:
        # Parameters and buffers (the pruning masks among them) are broadcast from rank 0
        # here, and buffers again before every forward: masks stay identical on all ranks.
        net = DistributedDataParallel(model, device_ids=[info.local_rank]
                                      if device.startswith("cuda") else None)
    if state is None:
        torch.manual_seed(hp.seed + 1 + info.rank)  # dropout etc.; init was drawn already
    loss_fn = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    t_start = time.perf_counter()
    for epoch in range(start, end_epoch):
        net.train()
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64)
        bar = _progress(loader, progress and info.is_main, f"{desc} {epoch + 1}/{hp.epochs}")
        for i, (x, y) in enumerate(bar):
            loss, correct, n = _loss_and_correct(net(x), y, loss_fn)
            if penalty is not None:
                loss = loss + penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums += torch.tensor([loss.item() * n, correct.item(), n], dtype=torch.float64)
            if hasattr(bar, "set_postfix") and (i % 10 == 0 or i == steps - 1):
                bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{sums[1] / sums[2]:.3f}")
        if info.world > 1:
            dist.all_reduce(sums)
        ev = evaluate(model, eval_loader, info)
        metrics.append({
            "epoch": epoch + 1, "train_loss": sums[0].item() / sums[2].item(),
            "train_acc": sums[1].item() / sums[2].item(), "test_loss": ev["loss"],
            "test_acc": ev["acc"], "lr": opt.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        })
        if ckpt_path and info.is_main:
            atomic_save({"epoch": epoch + 1, "model": dense_state(model),
                         "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "rng": torch.get_rng_state(), "metrics": metrics,
                         "hparams": dataclasses.asdict(hp), "settings": settings or {}},
                        ckpt_path)
            atomic_write_text(os.path.join(out_dir, "metrics.jsonl"),
                              "".join(json.dumps(m) + "\n" for m in metrics))
        _barrier(info)
    final = ({"loss": metrics[-1]["test_loss"], "acc": metrics[-1]["test_acc"]} if metrics
             else evaluate(model, eval_loader, info))
    if hp.kernels == "sparse":
        # hand back the masked dense form (what callers save, compare and prune further)
        from sparsecore.nn import densify

        densify(model)
    final["mask_digest"] = mask_digest(model)
    if info.world > 1:
        digests: list[str] = [""] * info.world
        dist.all_gather_object(digests, final["mask_digest"])
        final["rank_mask_digests"] = digests
    return TrainResult(model, metrics, final, start, time.perf_counter() - t_start)


_CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng", "metrics", "hparams")
_FRESH_HINT = "; delete it, or pass --fresh to start over"
# Hyperparameters that do not change what is trained: a resumed run may differ in these.
_RESUMABLE = ("eval_batch_size",)


class ResumeError(ValueError):
    """A checkpoint belongs to a run with other settings than the one asked for."""


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"data": {"limit_train": 200}} -> {"data.limit_train": 200}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _check_same_run(path: str, state: dict[str, Any], hp: TrainHparams,
                    settings: dict[str, Any] | None) -> None:
    """Refuse to continue a checkpoint written with other hyperparameters or settings (it
    would go on with the old ones, or fail on another optimizer's state)."""
    old, new = dict(state["hparams"]), dataclasses.asdict(hp)
    if "settings" in state:  # checkpoints of earlier versions did not record them
        old.update(_flat(state["settings"]))
        new.update(_flat(settings or {}))
    diff = [f"{k} {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted({*old, *new})
            if k not in _RESUMABLE and old.get(k) != new.get(k)]
    if diff:
        raise ResumeError(f"{path} was written by a run with other settings ({'; '.join(diff)})"
                          ": rerun with the same flags to resume it, pass --fresh to start "
                          "over, or pick another --out")


def mask_digest(model: nn.Module) -> str:
    """SHA-1 of every pruning mask of `model` (names and bits); "" when it has none."""
    ms = prune.masks(model)
    if not ms:
        return ""
    h = hashlib.sha1()
    for name in sorted(ms):
        h.update(name.encode())
        h.update(ms[name].cpu().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- model files


def save_model(path: str, model: nn.Module, data_hp: DataHparams, model_hp: ModelHparams,
               **extra: Any) -> None:
    """Write a self-describing model file: what to build (model, width, data shape) and
    the state_dict (masks included), atomically."""
    atomic_save({"model_hparams": dataclasses.asdict(model_hp),
                 "data_hparams": dataclasses.asdict(data_hp),
                 "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 **extra}, path)


def load_model(path: str, splits: data_lib.Splits | None = None
               ) -> tuple[nn.Module, DataHparams, ModelHparams, dict[str, Any]]:
    """Rebuild the model saved by `save_model` (masks re-created) -> (model, data hparams,
    model hparams, the whole file). `splits`: the loaded data, when the caller has it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such model file (write one with "
                                "`python -m sparsecore train --out DIR`: DIR/model.pt)")
    hint = " (expected a model file written by `python -m sparsecore train` or `prune`)"
    blob = load_checkpoint(path, keys=("state_dict", "model_hparams", "data_hparams"),
                           hint=hint)
    try:
        data_hp = DataHparams(**blob["data_hparams"])
        model_hp = ModelHparams(**blob["model_hparams"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a sparsecore checkpoint ({exc}){hint}") from exc
    splits = splits or data_hp.load()
    model = model_hp.build(splits, seed=0)
    prune.load(model, blob["state_dict"])
    return model, data_hp, model_hp, blob


def _progress(loader: data_lib.Loader, enabled: bool, desc: str):
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
