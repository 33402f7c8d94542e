"""A study's plan and cost before it runs (`study --dry-run`): every stage with the epochs it
trains, and an estimate of the compute time and memory, extrapolated from a few training
steps and one evaluation batch per model, measured on the device the study would use.

The estimate covers training (with its evaluation after every epoch) and the forward passes
of the analysis; not the SVD/CKA arithmetic of the similarity metrics, nor the inference
timing at the end (both small next to training for the presets' schedules).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsecore import data as data_lib
from sparsecore import train as T
from sparsecore.hparams import ModelHparams
from sparsecore.study.config import ModelPlan, StudyConfig
from sparsecore.study.runner import _jobs
from sparsecore.study.stages import Stage, _splits, plan_stages


def stage_epochs(cfg: StudyConfig, stage: Stage) -> int:
    """The training epochs of one stage (0 for the analysis)."""
    plan = cfg.plan(stage.label)
    epochs = plan.train.epochs
    return {"dense": epochs, "dense2": epochs, "reinit": epochs, "random": epochs,
            "magnitude": plan.finetune_epochs, "anchor": plan.rewind_epoch,
            "rewind": epochs - plan.rewind_epoch, "analysis": 0,
            }.get(stage.kind, plan.finetune_epochs)  # oneshot-<pattern>: one fine-tuning round


@dataclass
class ModelCost:
    """What one model costs on a device: seconds per training step and per evaluation batch
    (wall clock, and the process's CPU time over all its threads), batches per epoch, and
    memory in bytes."""

    label: str
    params: int
    step_s: float
    step_cpu_s: float
    eval_s: float  # one evaluation batch of eval_batch_size
    eval_cpu_s: float
    steps_per_epoch: int
    eval_batches: int
    state_bytes: int  # weights, gradients and optimizer state
    activation_bytes: int  # tensors autograd saves for the backward pass of one step
    device_peak_bytes: int | None  # CUDA: the measured peak of one step; None on the CPU

    @property
    def epoch_s(self) -> float:
        """One training epoch with its evaluation, wall clock."""
        return self.steps_per_epoch * self.step_s + self.eval_batches * self.eval_s

    @property
    def epoch_cpu_s(self) -> float:
        """One training epoch with its evaluation, CPU time of all threads: about the wall
        time of a machine that runs nothing else, with one thread."""
        return self.steps_per_epoch * self.step_cpu_s + self.eval_batches * self.eval_cpu_s


def _saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 loss_fn: nn.Module) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of one step
    (parameters left out: they are counted with the state)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def measure(cfg: StudyConfig, plan: ModelPlan, device: str, steps: int = 2) -> ModelCost:
    """Time one warm-up and `steps` training steps of `plan`'s model at its batch size on the
    study's data, and one evaluation batch; count its memory."""
    splits = _splits(cfg)
    hp = plan.train
    model = ModelHparams(plan.model, plan.width).build(splits, hp.seed).to(device)
    loader = data_lib.Loader.for_split(splits, "train", hp.batch_size, train=True,
                                       device=device)
    eval_loader = data_lib.Loader.for_split(splits, "heldout", hp.eval_batch_size,
                                            device=device)
    opt = T.make_optimizer(model, hp)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    x, y = next(iter(loader))
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step() -> None:
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up; also creates the optimizer state
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync()
    step_s = (time.perf_counter() - wall) / steps
    step_cpu_s = (time.process_time() - cpu) / steps
    peak = torch.cuda.max_memory_allocated() if cuda else None
    state = sum(t.numel() * t.element_size() for t in model.parameters()) * 2
    state += sum(t.numel() * t.element_size() for s in opt.state.values()
                 for t in s.values() if torch.is_tensor(t))
    activations = _saved_bytes(model, x, y, loss_fn)
    model.eval()
    ex, _ = next(iter(eval_loader))
    with torch.no_grad():
        model(ex)
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        model(ex)
        sync()
        eval_s, eval_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    return ModelCost(plan.label, sum(p.numel() for p in model.parameters()), step_s,
                     step_cpu_s, eval_s, eval_cpu_s, len(loader), len(eval_loader), state,
                     activations, peak)


def estimate(cfg: StudyConfig, device: str, steps: int = 2) -> dict[str, Any]:
    """The plan of `cfg` with the measured cost of each model -> {"stages": [(stage, epochs,
    seconds)], "models": {label: ModelCost}, "train_s", "analysis_s", "total_s" (wall clock),
    "total_cpu_s" (from CPU time), "data_bytes", "process_peak_bytes"}."""
    costs = {plan.label: measure(cfg, plan, device, steps) for plan in cfg.models}
    rows = []
    analysis_s = cpu_s = 0.0
    for s in plan_stages(cfg):
        c = costs[s.label]
        if s.kind == "analysis":
            # each compared net (and the original) once per-layer and once pooled
            nets = 1 + sum(1 for d in s.deps if not d.endswith(("/dense", "/anchor")))
            sec = 2 * nets * c.eval_batches * c.eval_s
            analysis_s += sec
            cpu_s += 2 * nets * c.eval_batches * c.eval_cpu_s
        else:
            sec = stage_epochs(cfg, s) * c.epoch_s
            cpu_s += stage_epochs(cfg, s) * c.epoch_cpu_s
        rows.append((s, stage_epochs(cfg, s), sec))
    splits = _splits(cfg)
    data_bytes = sum(sp.x.numel() * sp.x.element_size() + sp.y.numel() * sp.y.element_size()
                     for sp in (splits.train, splits.test, splits.val) if sp is not None)
    total = sum(sec for _, _, sec in rows)
    return {"stages": rows, "models": costs, "train_s": total - analysis_s,
            "analysis_s": analysis_s, "total_s": total, "total_cpu_s": cpu_s,
            "data_bytes": data_bytes,
            "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def dry_run(cfg: StudyConfig, device: str, steps: int = 2) -> str:
    """The text `study --dry-run` prints: the stages and their epochs, then the measured
    cost per model and the estimate of compute time and memory."""
    est = estimate(cfg, device, steps)
    L = [f"study {cfg.preset}: {len(est['stages'])} stages, models "
         f"{', '.join(m.label for m in cfg.models)}, seeds {cfg.seeds}, sparsities "
         f"{', '.join(f'{p:g}' for p in cfg.sparsities)}; dataset {cfg.data.dataset} "
         f"({len(_splits(cfg).train)} training examples)", "",
         f"{'stage':<40} {'epochs':>7} {'estimate':>10}  after"]
    for s, epochs, sec in est["stages"]:
        deps = "all above" if s.kind == "analysis" else ", ".join(d.rsplit("/", 1)[1]
                                                                  for d in s.deps)
        L.append(f"{s.key:<40} {epochs:>7} {_dur(sec):>10}  {deps}")
    L += ["", f"measured on {device} ({torch.get_num_threads()} torch threads), "
              f"{steps} training steps per model after one warm-up:"]
    for c in est["models"].values():
        peak = (f", measured CUDA peak {_mib(c.device_peak_bytes)}"
                if c.device_peak_bytes is not None else "")
        L.append(f"  {c.label}: {c.params:,} parameters; {c.step_s * 1e3:.0f} ms per step "
                 f"({c.step_cpu_s * 1e3:.0f} ms CPU time), {c.steps_per_epoch} steps and "
                 f"{c.eval_batches} evaluation batches per epoch: {_dur(c.epoch_s)} per "
                 f"epoch; weights + gradients + optimizer {_mib(c.state_bytes)}, saved "
                 f"activations {_mib(c.activation_bytes)}{peak}")
    workers = _jobs(cfg, device)
    per_worker = max(c.state_bytes + c.activation_bytes for c in est["models"].values())
    L += ["", f"estimate: {_dur(est['total_s'])} of compute ({_dur(est['train_s'])} training "
              f"and evaluation, {_dur(est['analysis_s'])} analysis forward passes), one stage "
              "at a time on this device; parallel stage workers share its cores, so expect "
              "about this wall time" + ("" if device.startswith("cuda") else
              f". From CPU time instead of the wall clock: {_dur(est['total_cpu_s'])} (what a "
              "machine that runs nothing else takes with one thread; less with more)"),
          f"memory: the data {_mib(est['data_bytes'])} in every stage process (host), the "
          f"largest model's training state and activations {_mib(per_worker)} (on the "
          f"device), this process's peak resident size {_mib(est['process_peak_bytes'])}; "
          f"the study runs {workers} stage process(es) on this device by default",
          "plan only: nothing was written; run without --dry-run to start"]
    return "\n".join(L)
