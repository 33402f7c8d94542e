"""Inference time of the pruned nets: dense kernels (masks baked into the weights) vs
sparsecore's sparse kernels. `sparse_model` is the one place that turns a pruned net into
its fast form."""

from __future__ import annotations

import copy
import functools
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
SPARSE_PATH = ("sparsify(): BSR layers for block masks, CSR otherwise; layers below the measured "
               "crossover sparsity stay dense")


def sparse_model(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """`model` (masked) on sparsecore's sparse kernels for inference on batches like `x`, in
    place: sparsify() with BSR layers when its masks are whole blocks (block_size_of), CSR
    otherwise. x: an example batch (N, C, H, W), for a path that prepares for its shape."""
    from sparsecore.nn import SparsifyConfig, sparsify

    block = block_size_of(model)
    sparsify(model, SparsifyConfig(layout="bsr", block_size=block) if block else None)
    return model


def sparse_twin(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module | None, str]:
    """A copy of a masked model on sparsecore's sparse kernels (sparse_model), or
    (None, why)."""
    twin = copy.deepcopy(model)
    try:
        return sparse_model(twin, x), ""
    except Exception as exc:  # report, do not lose the study over the speed column
        return None, f"sparsify failed: {type(exc).__name__}: {exc}"


def dense_twin(model: nn.Module) -> nn.Module:
    """A copy with the masks baked into plain dense weights (what dense kernels run)."""
    twin = copy.deepcopy(model)
    prune.remove(twin)
    return twin


@torch.no_grad()
def inference_times(model: nn.Module, x: torch.Tensor, device: str,
                    timer: Callable[[Callable[[], Any], str], float] = time_fn,
                    sparse: bool = True) -> dict[str, Any]:
    """Forward time of one batch on dense kernels and (if `sparse`) on sparse kernels, eval
    mode, in seconds, measured by timer(fn, device); plus the largest output difference."""
    dense = dense_twin(model).to(device).eval()
    x = x.to(device)
    out: dict[str, Any] = {"batch": x.shape[0], "dense_s": timer(lambda: dense(x), device)}
    if not sparse:
        return out
    sparse, why = sparse_twin(model.to(device), x)
    if sparse is None:
        out.update(sparse_s=None, speedup=None, note=why)
        return out
    sparse.eval()
    out["sparse_s"] = timer(lambda: sparse(x), device)
    out["speedup"] = out["dense_s"] / out["sparse_s"]
    out["max_abs_diff"] = float((sparse(x) - dense(x)).abs().max())
    return out


def timing(cfg: StudyConfig, run: str, label: str, device: str, batch: int = 256,
           threads: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """Dense vs sparse-kernel inference of every pruned net of one seed (None: the first),
    with `threads` torch CPU threads (None: as they are). With one thread on the CPU the
    calling thread's CPU time is measured: all the work runs in it, and other processes on
    a shared machine do not count."""
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
                rows[key.rsplit("/", 1)[1]] = inference_times(_load(run, key, cfg), x, device,
                                                              timer)
        return {"device": device, "threads": torch.get_num_threads(), "clock": clock,
                "rows": rows}
    finally:
        torch.set_num_threads(before)
