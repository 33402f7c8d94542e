"""Whole-model training step of pruned nets: the masked dense model vs sparsify()'s layers.

Each row is one model magnitude-pruned to one sparsity (global: one threshold over all
layers; every-layer: each layer at that sparsity), one batch and one thread count ("all":
torch's default), built as `bench models` builds it (bench.models.cases). One training step
is a forward, the cross-entropy loss, the backward and one SGD step (momentum 0.9, weight
decay 5e-4), in train mode (BatchNorm on batch statistics), of:

- dense: the pruned model with the zeros baked in (prune.remove), plain nn.Conv2d / nn.Linear
  training as torch runs it (dense gradients, every weight stepped);
- sparse: the same weights after sparsecore.nn.sparsify (its default crossovers: a layer below
  them stays masked dense, and the note counts the layers that went sparse), whose layers
  compute the weight gradient at the kept positions only and step only those.

Both start from the same weights and train on the same batch of random images and labels; the
two steps are timed interleaved (sparsecore._timing.time_interleaved: rounds of one step of
each, the median per side after warm-up), so a change of load on the machine hits both alike.
Before timing, the first step of each is checked against the other: loss_diff is |loss_dense
- loss_sparse|, grad_diff the largest difference of a parameter gradient (a sparse layer's at
its kept positions, a masked layer's where its mask keeps; what the dense model computes at
pruned positions is not compared), grad_max_abs the largest dense gradient, for scale.

Rows of record: VGG-16 and ResNet-18 (CIFAR, 32x32, 10 classes), batch 64, every-layer and
global pruning at 90 %, torch's default thread count.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.common import format_table, save_results, speedup
from bench.models import Case, add_case_arguments, cases, fill_defaults, thread_counts
from sparsecore import prune
from sparsecore._timing import time_interleaved
from sparsecore.nn import sparsify
from sparsecore.nn.linear import module_mask

FULL = {"models": "vgg16,resnet18", "sparsities": "0.9", "pruning": "every-layer,global",
        "batches": "64", "threads": "all"}
QUICK = {"models": "resnet8", "sparsities": "0.9", "pruning": "global", "batches": "8",
         "threads": "1", "reps": 3, "warmup": 1, "tag": "quick"}
# The optimizer of every step, dense and sparse alike.
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
# Where a masked layer (prune's parametrization) keeps the weight it trains.
ORIGINAL = ".parametrizations.weight.original"

COLUMNS = ["model", "pruning", "sparsity", "batch", "threads", "dense_ms", "sparse_ms",
           "speedup", "loss_diff", "grad_diff", "note"]


def loss_of(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of model(x) (..., classes) against target (...) class indices."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, target: Tensor
               ) -> Tensor:
    """One step: gradients cleared, forward, loss, backward, optimizer step; the loss."""
    opt.zero_grad(set_to_none=True)
    loss = loss_of(model, x, target)
    loss.backward()
    opt.step()
    return loss.detach()


def compared_grads(dense: nn.Module, sparse: nn.Module) -> Iterator[tuple[str, Tensor, Tensor]]:
    """(name, gradient in `sparse`, the gradient `dense` has at the same positions) for every
    parameter of `sparse` with a gradient: a sparse layer's `values` (nnz,) against the dense
    weight's gradient at the layer's kept positions (row-major, the CSR order); a masked
    layer's `original` against the dense weight's gradient times the mask; any other
    parameter against the dense one of its name. `dense` is `sparse`'s model before sparsify,
    its masks baked in."""
    dense_params = dict(dense.named_parameters())
    for name, p in sparse.named_parameters():
        if p.grad is None:
            continue
        owner, _, leaf = name.rpartition(".")
        if leaf == "values":
            ref = dense_params[f"{owner}.weight"].grad[sparse.get_submodule(owner).mask()]
        elif name.endswith(ORIGINAL):
            owner = name[: -len(ORIGINAL)]
            mask = module_mask(sparse.get_submodule(owner))
            ref = dense_params[f"{owner}.weight"].grad * mask
        else:
            ref = dense_params[name].grad
        yield name, p.grad, ref


def first_step_check(dense: nn.Module, sparse: nn.Module, x: Tensor, target: Tensor
                     ) -> dict[str, float]:
    """Forward and backward of both models from their current (identical) weights: the loss
    difference, the largest gradient difference (compared_grads) and the largest dense
    gradient. Leaves the gradients in place for an optimizer step."""
    for model in (dense, sparse):
        model.zero_grad(set_to_none=True)
    loss_d, loss_s = loss_of(dense, x, target), loss_of(sparse, x, target)
    loss_d.backward()
    loss_s.backward()
    diff = scale = 0.0
    for _, got, ref in compared_grads(dense, sparse):
        diff = max(diff, float((got.double() - ref.double()).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    return {"loss": loss_d.item(), "loss_diff": abs(loss_d.item() - loss_s.item()),
            "grad_diff": diff, "grad_max_abs": scale}


def _targets(model: nn.Module, x: Tensor) -> Tensor:
    """Random class indices shaped like model(x) without its class dimension."""
    was = model.training
    with torch.no_grad():
        logits = model.eval()(x)
    model.train(was)
    return torch.randint(logits.shape[-1], logits.shape[:-1], device=x.device)


def _row(case: Case, dense0: nn.Module, x: Tensor, target: Tensor, threads: int,
         achieved: float, args: argparse.Namespace) -> dict[str, Any]:
    """One row: both models fresh from the case's weights, the first step checked and taken,
    then the steps timed interleaved."""
    dense = copy.deepcopy(dense0).train()
    opt_d = torch.optim.SGD(dense.parameters(), **SGD)
    steps: dict[str, Callable[[], Tensor]] = {
        "dense": lambda: train_step(dense, opt_d, x, target)}
    row: dict[str, Any] = {"model": case.model, "pruning": case.pruning,
                           "sparsity": case.sparsity, "achieved_sparsity": round(achieved, 6),
                           "batch": x.shape[0], "threads": threads, "device": str(x.device)}
    try:
        sparse = copy.deepcopy(case.net)
        report = sparsify(sparse)
        sparse.train()
        opt_s = torch.optim.SGD(sparse.parameters(), **SGD)
        row.update(first_step_check(dense, sparse, x, target))
        opt_d.step()
        opt_s.step()
        steps["sparse"] = lambda: train_step(sparse, opt_s, x, target)
        n = len(report.swapped) + len(report.skipped)
        row["note"] = f"sparsify: {len(report.swapped)}/{n} layers sparse"
    except Exception as exc:  # reported in the row; the dense step is still timed
        row["note"] = f"sparse failed: {type(exc).__name__}: {exc}"
    times = time_interleaved(steps, str(x.device), warmup=args.warmup, rounds=args.reps,
                             min_time=0.2, max_rounds=max(args.reps, 50))
    row["dense_ms"] = 1e3 * times["dense"]
    row["sparse_ms"] = 1e3 * times["sparse"] if "sparse" in times else None
    row["speedup"] = speedup(row["dense_ms"], row["sparse_ms"])
    return row


def _rows(case: Case, threads: list[int], args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Rows of one pruned model: for each batch and thread count, both steps timed."""
    dense0 = copy.deepcopy(case.net)
    prune.remove(dense0)
    achieved = 1 - prune.summary(case.net).masked_density
    for batch in case.batches:
        torch.manual_seed(1)
        x = case.example(batch)
        target = _targets(dense0, x)
        for t in threads:
            torch.set_num_threads(t)
            yield _row(case, dense0, x, target, t, achieved, args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_case_arguments(p, FULL, FULL["batches"])
    p.add_argument("--reps", type=int, default=None,
                   help="timed rounds (one step of each), at least (default: 10)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps of each first, after the checked one (default: 3)")
    p.add_argument("--quick", action="store_true",
                   help="one small row (ResNet-8, 90%%, global, batch 8, 1 thread, 3 rounds) "
                        "to check the plumbing; results go to train-quick-*.json")
    p.add_argument("--tag", default=None, help="suffix of the results file name")


def _resolve(args: argparse.Namespace) -> None:
    """Fill the options left unset from --quick's or the full bench's defaults."""
    fill_defaults(args, {**FULL, "reps": 10, "warmup": 3, "tag": None}, QUICK)


def main(args: argparse.Namespace) -> int:
    _resolve(args)
    all_threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    try:
        for case in cases(argparse.Namespace(**vars(args), run=None)):
            for row in _rows(case, thread_counts(args.threads), args):
                rows.append(row)
                print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    finally:
        torch.set_num_threads(all_threads)
    print()
    print(format_table(rows, COLUMNS))
    extra = {"isa": torch.backends.cpu.get_cpu_capability(), "all_threads": all_threads,
             "optimizer": {"name": "SGD", **SGD}, "settings": {k: getattr(args, k) for k in (
                 "models", "sparsities", "pruning", "batches", "threads", "reps", "warmup")}}
    print(f"wrote {save_results('train', rows, extra=extra, tag=args.tag)}")
    return 0
