"""Inference time of the pruned nets: dense kernels (masks baked into the weights) vs
sparsecore.optimize() (BatchNorm folded, epilogues fused, each layer on the fastest of its
dense and sparse kernels). `sparse_model` is the one place that turns a pruned net into its
fast form."""

from __future__ import annotations

import copy
import functools
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsecore import data as data_lib
from sparsecore import prune
from sparsecore._timing import time_fn
from sparsecore.study.analysis import _variants
from sparsecore.study.config import StudyConfig
from sparsecore.study.stages import _load, _splits

_BLOCKS = (64, 32, 16, 8, 4, 2)  # block sides that sparse_model recognises, largest first


def block_size_of(model: nn.Module) -> int | None:
    """The largest side b in _BLOCKS such that every pruning mask of `model` whose matrix
    view (out, in * kernel) b divides is constant inside its b x b blocks, and at least one
    of them prunes something; None for unstructured masks."""
    from sparsecore.formats import block_mask_from_mask

    views = [m.reshape(m.shape[0], -1) for m in prune.masks(model).values() if m.dim() >= 2]
    for b in _BLOCKS:
        fits = [v for v in views if v.shape[0] % b == 0 and v.shape[1] % b == 0]
        if not any(not bool(v.all()) for v in fits):
            continue
        try:
            for v in fits:
                block_mask_from_mask(v, b)
        except ValueError:
            continue
        return b
    return None


# what sparse_model does, for the report
SPARSE_PATH = ("sparsecore.optimize(): BatchNorm folded, bias / ReLU / pool / residual add fused, "
               "each layer on the fastest of dense, CSR and (block masks) BSR kernels, timed on "
               "the batch's activation at that layer")
# The file in the run directory that holds optimize()'s layer timings: the kernel choices of
# a run come from its own measurements, and nets of the same shapes share them.
KERNEL_CACHE = "kernels.json"
# optimize()'s timing of each layer's candidates: many small nets, keep the total short.
_ROUNDS, _MIN_TIME = 3, 0.02


def sparse_model(model: nn.Module, x: torch.Tensor,
                 cache_file: str | os.PathLike[str] | None = None) -> nn.Module:
    """An inference copy of `model` (masked; not changed) by sparsecore.optimize(), for
    batches like x (N, C, H, W): block-sparse (BSR) kernels are candidates when its masks
    are whole blocks (block_size_of), CSR and dense always. cache_file: optimize()'s timing
    cache (None: the user's, sparsecore.nn.optimize.cache_path())."""
    from sparsecore.nn.optimize import LAYOUTS, optimize

    layouts = LAYOUTS if block_size_of(model) else tuple(k for k in LAYOUTS if k != "bsr")
    return optimize(model, x, layouts=layouts, cache_file=cache_file, rounds=_ROUNDS,
                    min_time=_MIN_TIME)


def kernel_choice(model: nn.Module) -> dict[str, int]:
    """How many fused layers of an optimize() result run on each kernel."""
    from sparsecore.nn.optimize import fused_layers

    return dict(sorted(Counter(layer.kernel.name for _, layer in fused_layers(model)).items()))


def sparse_twin(model: nn.Module, x: torch.Tensor,
                cache_file: str | os.PathLike[str] | None = None
                ) -> tuple[nn.Module | None, str]:
    """sparse_model(model, x, cache_file), or (None, why)."""
    try:
        return sparse_model(model, x, cache_file), ""
    except Exception as exc:  # report, do not lose the study over the speed column
        return None, f"optimize failed: {type(exc).__name__}: {exc}"


def dense_twin(model: nn.Module) -> nn.Module:
    """A copy with the masks baked into plain dense weights (what dense kernels run)."""
    twin = copy.deepcopy(model)
    prune.remove(twin)
    return twin


@torch.no_grad()
def inference_times(model: nn.Module, x: torch.Tensor, device: str,
                    timer: Callable[[Callable[[], Any], str], float] = time_fn,
                    sparse: bool = True,
                    cache_file: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Forward time of one batch x (N, C, H, W) on dense kernels and (if `sparse`) of its
    sparse_model (optimize(), timing cache `cache_file`), eval mode, in seconds, measured by
    timer(fn, device); plus the largest output difference between the two and the number of
    layers on each kernel."""
    dense = dense_twin(model).to(device).eval()
    x = x.to(device)
    out: dict[str, Any] = {"batch": x.shape[0], "dense_s": timer(lambda: dense(x), device)}
    if not sparse:
        return out
    sparse, why = sparse_twin(model.to(device), x, cache_file)
    if sparse is None:
        out.update(sparse_s=None, speedup=None, note=why)
        return out
    out["kernels"] = kernel_choice(sparse)
    out["sparse_s"] = timer(lambda: sparse(x), device)
    out["speedup"] = out["dense_s"] / out["sparse_s"]
    out["max_abs_diff"] = float((sparse(x) - dense(x)).abs().max())
    return out


def timing(cfg: StudyConfig, run: str, label: str, device: str, batch: int = 256,
           threads: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """Dense vs optimize() inference of every pruned net of one seed (None: the first), with
    `threads` torch CPU threads (None: as they are); optimize()'s layer timings are cached
    in RUN/kernels.json. With one thread on the CPU the calling thread's CPU time is
    measured: all the work runs in it, and other processes on a shared machine do not
    count."""
    splits = _splits(cfg)
    x, _ = next(iter(data_lib.Loader.for_split(splits, "heldout", batch)))
    base = f"{label}/s{cfg.seeds[0] if seed is None else seed}"
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    clock = "thread" if device == "cpu" and torch.get_num_threads() == 1 else "wall"
    # many small nets: keep the total short
    timer = functools.partial(time_fn, min_time=0.1, clock=clock)
    try:
        rows = {"dense": inference_times(_load(run, f"{base}/dense", cfg), x, device, timer,
                                         sparse=False)}
        for method, _, key in _variants(cfg, base):
            if method != "dense2":
                rows[key.rsplit("/", 1)[1]] = inference_times(
                    _load(run, key, cfg), x, device, timer,
                    cache_file=os.path.join(run, KERNEL_CACHE))
        return {"device": device, "threads": torch.get_num_threads(), "clock": clock,
                "rows": rows}
    finally:
        torch.set_num_threads(before)
