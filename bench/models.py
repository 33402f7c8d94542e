"""Inference time of pruned models: dense kernels vs sparsecore's sparse kernels.

Each row: a model magnitude-pruned (global) to a sparsity, one forward pass of a batch in
eval mode; "dense" runs the pruned weights (zeros baked in) on torch's dense kernels,
"sparse" the same weights after `sparsecore.nn.sparsify`. By default the models are
CIFAR-shaped (32x32x3, width 1) and freshly initialised (timing does not depend on
training); `--run DIR` times the magnitude-pruned nets of a study run instead.
"""

from __future__ import annotations

import argparse
import glob
import os

import torch

from bench.common import format_table, save_results, speedup
from sparsecore import models, prune, study
from sparsecore import train as T


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="conv4,vgg16,resnet20",
                   help="comma-separated model names (default: conv4,vgg16,resnet20)")
    p.add_argument("--sparsities", default="0.5,0.75,0.9,0.95",
                   help="comma-separated sparsities (default: 0.5,0.75,0.9,0.95)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--input-size", type=int, default=32, help="image side (default: 32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--run", default=None,
                   help="time the magnitude-pruned nets of this study run directory instead")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--tag", default=None, help="suffix of the results file name")


def _pruned(args: argparse.Namespace):
    """(model name, sparsity, masked model, example input) to time."""
    if args.run:
        paths = sorted(glob.glob(os.path.join(args.run, "stages", "*", "s*", "magnitude-*",
                                              "model.pt")))
        if not paths:
            raise SystemExit(f"no magnitude-pruned models under {args.run}/stages")
        for path in paths:
            model, data_hp, model_hp, _ = T.load_model(path)
            x, _ = next(iter(T.data_lib.Loader.for_split(data_hp.load(), "heldout", args.batch)))
            yield model_hp.model, 1 - prune.summary(model).masked_density, model, x
        return
    for name in args.models.split(","):
        for sp in [float(s) for s in args.sparsities.split(",")]:
            torch.manual_seed(0)
            model = models.create(name, num_classes=10, in_channels=3,
                                  input_size=args.input_size)
            prune.prune(model, "magnitude", sparsity=sp)
            yield name, sp, model, torch.randn(args.batch, 3, args.input_size, args.input_size)


COLUMNS = ["model", "sparsity", "batch", "device", "dense_ms", "sparse_ms", "speedup",
           "max_abs_diff", "note"]


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name, sp, model, x in _pruned(args):
        t = study.inference_times(model, x, args.device)
        row = {"model": name, "sparsity": round(sp, 4), "batch": t["batch"],
               "device": args.device, "dense_ms": 1e3 * t["dense_s"], "note": t.get("note")}
        if t["sparse_s"] is not None:
            row.update(sparse_ms=1e3 * t["sparse_s"], max_abs_diff=t["max_abs_diff"],
                       speedup=speedup(t["dense_s"], t["sparse_s"]))
        rows.append(row)
        print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    print()
    print(format_table(rows, COLUMNS))
    print(f"wrote {save_results('models', rows, tag=args.tag)}")
    return 0
