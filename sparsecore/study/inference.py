"""Inference time of the pruned nets: dense kernels (masks baked into the weights) vs
sparsecore's sparse kernels."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsecore import data as data_lib
from sparsecore import prune
from sparsecore import train as T
from sparsecore._timing import time_fn
from sparsecore.study._common import _pct
from sparsecore.study.config import StudyConfig
from sparsecore.study.stages import _load, _splits


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
                    timer: Callable[[Callable[[], Any], str], float] = time_fn,
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
    x, _ = next(iter(data_lib.Loader.for_split(splits, "heldout", batch)))
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
