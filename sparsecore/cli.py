"""`python -m sparsecore <command>`: train, prune, compare, explain, study, report.

    python -m sparsecore study --preset default --out runs/demo     # the whole study
    python -m sparsecore train --dataset digits --model conv4 --out runs/c4
    python -m sparsecore prune runs/c4/model.pt --sparsity 0.9 --out runs/c4-90.pt
    python -m sparsecore train --init-from runs/c4-90.pt --epochs 5 --out runs/c4-90ft
    python -m sparsecore compare runs/c4/model.pt runs/c4-90ft/model.pt
    python -m sparsecore explain runs/c4-90ft/model.pt               # kernels per layer, speed
    python -m sparsecore report runs/demo                           # redo report.md + figures

`train` also runs under torchrun (DDP; gloo on CPU, NCCL on GPU):
    torchrun --nproc_per_node 2 -m sparsecore train --dataset digits --out runs/ddp

A value out of range stops the command before any work, with one line saying which and exit
status 2 (argparse's usage line before it for a single flag's value).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from sparsecore import hparams as H
from sparsecore import prune
from sparsecore import train as T
from sparsecore._io import atomic_write_text, check_writable, remove_stale_tmp


class CLIError(Exception):
    """A user error: printed as one line with what to do, exit status 2."""


def _device(text: str) -> str:
    try:
        return T.check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", type=_device,
                   help="cpu, cuda, cuda:N or auto (cuda when available) (default: auto)")
    p.add_argument("--threads", type=H.arg_type(int, H.number(1)), default=None,
                   help="torch CPU threads (default: torch's choice, all cores; study: also "
                        "the threads of its inference timing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _setup(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


# ---------------------------------------------------------------------------- train


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model (dense, pruned at init, or from a model file)",
        description="Train a model and write DIR/checkpoint.pt (resumable: run the same "
                    "command again after a kill), DIR/metrics.jsonl, DIR/model.pt and "
                    "DIR/final.json. Runs under torchrun for DDP.")
    p.add_argument("--out", required=True, type=H.path_arg, help="run directory")
    p.add_argument("--init-from", default=None,
                   help="start from this model file (e.g. the output of `prune`, to "
                        "fine-tune); its model and data flags are used")
    p.add_argument("--prune-method", default=None, choices=prune.available(),
                   help="prune at initialisation with this method before training")
    p.add_argument("--sparsity", type=H.arg_type(float, H.FRACTION), default=None,
                   help="target sparsity for --prune-method (e.g. 0.9)")
    p.add_argument("--fresh", action="store_true",
                   help="delete the checkpoint in --out and start over (a run is resumed only "
                        "with the flags it was started with)")
    H.add_arguments(p, H.DataHparams)
    H.add_arguments(p, H.ModelHparams)
    H.add_arguments(p, H.TrainHparams)
    _add_common(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    if args.prune_method and args.sparsity is None:
        raise CLIError("--prune-method needs --sparsity (e.g. --sparsity 0.9)")
    if args.sparsity is not None and not args.prune_method:
        raise CLIError("--sparsity needs --prune-method (e.g. --prune-method magnitude); to "
                       "prune a trained model use `python -m sparsecore prune`")
    hp = H.from_args(H.TrainHparams, args)
    check_writable(args.out)
    device = T.resolve_device(args.device)
    info = T.init_distributed(device)
    device = T.resolve_device(args.device, info)
    if args.init_from:
        model, data_hp, model_hp, _ = T.load_model(args.init_from)
        splits = data_hp.load()
    else:
        data_hp, model_hp = H.from_args(H.DataHparams, args), H.from_args(H.ModelHparams, args)
        splits = data_hp.load()
        model = model_hp.build(splits, hp.seed)
    if args.prune_method:
        _prune(model, splits, args.prune_method, args.sparsity, hp.seed)
    if args.fresh and info.is_main:
        for f in ("checkpoint.pt", "metrics.jsonl"):
            if os.path.exists(os.path.join(args.out, f)):
                os.unlink(os.path.join(args.out, f))
    # what else makes the run: a checkpoint is resumed only under the same settings
    settings = {"data": dataclasses.asdict(data_hp), "model": dataclasses.asdict(model_hp),
                "init_from": os.path.abspath(args.init_from) if args.init_from else None,
                "prune_method": args.prune_method, "sparsity": args.sparsity}
    r = T.train(model, splits, hp, out_dir=args.out, device=device,
                progress=not args.no_progress, info=info, settings=settings)
    if info.is_main:
        T.save_model(os.path.join(args.out, "model.pt"), r.model, data_hp, model_hp,
                     train_hparams=dataclasses.asdict(hp))
        final = {**r.final, "epochs": hp.epochs, "resumed_from_epoch": r.resumed_from,
                 "world_size": info.world, "density": prune.summary(r.model).masked_density}
        atomic_write_text(os.path.join(args.out, "final.json"), json.dumps(final, indent=1))
        print(f"{model_hp.model} on {data_hp.dataset}: held-out accuracy {r.final['acc']:.4f}"
              f" (loss {r.final['loss']:.4f}); wrote {args.out}/model.pt")
    T.finish_distributed(info)
    return 0


# ---------------------------------------------------------------------------- prune


def _prune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model file (one shot) and write a new one",
                       description="Prune MODEL (a model.pt from `train`) and write --out; "
                                   "fine-tune it with `train --init-from OUT`.")
    p.add_argument("model", help="model file (DIR/model.pt of a `train` run)")
    p.add_argument("--out", required=True, type=H.path_arg,
                   help="where to write the pruned model file")
    p.add_argument("--method", default="magnitude", choices=prune.available(),
                   help="pruning method (default: magnitude)")
    p.add_argument("--sparsity", type=H.arg_type(float, H.FRACTION), required=True,
                   help="fraction of weights removed, in [0, 1)")
    p.add_argument("--scope", default="global", choices=prune.SCOPES,
                   help="one threshold over all layers, or the same sparsity per layer "
                        "(default: global)")
    p.add_argument("--seed", type=int, default=0, help="seed for random methods (default: 0)")
    _add_common(p)
    p.set_defaults(func=cmd_prune)


def _prune(model: torch.nn.Module, splits, method: str, sparsity: float, seed: int,
           **options) -> None:
    """Prune in place; the methods that score with data (SNIP, GraSP) see one training
    batch, SynFlow takes the input shape from it."""
    batch = next(iter(T.data_lib.Loader.for_split(splits, "train", 256, train=True, seed=seed)))
    prune.prune(model, method, sparsity=sparsity, seed=seed, data=batch, **options)


def cmd_prune(args: argparse.Namespace) -> int:
    if os.path.isdir(args.out):
        raise CLIError(f"--out {args.out} is a directory; give the model file to write, e.g. "
                       f"{os.path.join(args.out, 'pruned.pt')}")
    folder = os.path.dirname(args.out) or "."
    check_writable(folder, "the folder of --out")
    remove_stale_tmp(folder, os.path.basename(args.out))
    model, data_hp, model_hp, _ = T.load_model(args.model)
    _prune(model, data_hp.load(), args.method, args.sparsity, args.seed, scope=args.scope)
    print(prune.summary(model))
    T.save_model(args.out, model, data_hp, model_hp,
                 pruned={"method": args.method, "sparsity": args.sparsity, "scope": args.scope,
                         "from": os.path.abspath(args.model)})
    print(f"wrote {args.out}; fine-tune it with: python -m sparsecore train --init-from "
          f"{args.out} --out DIR")
    return 0


# ---------------------------------------------------------------------------- compare


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    from sparsecore.study import config as study

    p = sub.add_parser("compare", help="layer-by-layer similarity of two model files",
                       description="SVCCA and CKA between the representations of two models "
                                   "on held-out data, layer by layer (both models must be the "
                                   "same architecture on the same data).")
    p.add_argument("a", help="model file A")
    p.add_argument("b", help="model file B")
    p.add_argument("--metrics", default=["svcca", "linear_cka"], type=study.METRIC_LIST,
                   help="comma-separated similarity metrics (default: svcca,linear_cka)")
    p.add_argument("--points", type=study.POINTS, default=2000,
                   help=f"held-out data points per layer, at least {study.MIN_POINTS} "
                        "(default: 2000)")
    p.add_argument("--all-pairs", action="store_true",
                   help="print the full layer x layer matrix of the first metric too")
    _add_common(p)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from sparsecore import study

    model_a, data_hp, model_hp, _ = T.load_model(args.a)
    splits = data_hp.load()
    model_b, data_b, model_hp_b, _ = T.load_model(args.b, splits)
    if model_hp_b.model != model_hp.model or model_hp_b.width != model_hp.width:
        raise CLIError(f"{args.a} is {model_hp.model} x{model_hp.width} but {args.b} is "
                       f"{model_hp_b.model} x{model_hp_b.width}: compare two models of the "
                       "same architecture")
    device = T.resolve_device(args.device)
    metrics = args.metrics
    table = study.layer_similarity(model_a, model_b, splits, metrics, points=args.points,
                                   device=device, all_pairs=args.all_pairs)
    layers = model_a.feature_layers
    w = max(len(n) for n in layers)
    print(f"{'layer':<{w}}  " + "  ".join(f"{m:>10}" for m in metrics))
    for i, n in enumerate(layers):
        print(f"{n:<{w}}  " + "  ".join(f"{table[m][i]:>10.4f}" for m in metrics))
    if args.all_pairs:
        print(f"\n{metrics[0]}, all pairs (rows: A's layers, columns: B's layers)")
        for i, row in enumerate(table["all_pairs"]):
            print(f"{layers[i]:<{w}}  " + " ".join(f"{v:.2f}" for v in row))
    return 0


# ---------------------------------------------------------------------------- explain


def _explain_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="per-layer kernels and speed of a model after "
                                       "sparsecore.optimize",
                       description="Optimize MODEL for inference (sparsecore.optimize: "
                                   "BatchNorm folded, ReLU fused, each layer's kernel chosen "
                                   "by timing) and print per layer: shape, density, FLOPs, "
                                   "the time of every candidate kernel and the one chosen; "
                                   "then the predicted and measured whole-model speedup over "
                                   "dense kernels.")
    p.add_argument("model", help="model file (from `train` or `prune`)")
    p.add_argument("--input-shape", default=None,
                   help="time a random normal input of this comma-separated shape, e.g. "
                        "64,3,32,32 (default: a held-out batch of the model's data)")
    p.add_argument("--batch", type=H.arg_type(int, H.number(1)), default=64,
                   help="held-out examples per batch when no --input-shape (default: 64)")
    p.add_argument("--layouts", default="dense,csr,bsr",
                   help="comma-separated weight layouts to consider (default: dense,csr,bsr)")
    p.add_argument("--no-cache", action="store_true",
                   help="time every kernel again instead of reading the timing cache "
                        "(~/.cache/sparsecore or $SPARSECORE_CACHE_DIR)")
    _add_common(p)
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from sparsecore.nn.explain import explain

    shape = None
    if args.input_shape:
        try:
            shape = [int(s) for s in args.input_shape.split(",")]
        except ValueError:
            shape = []
        if not shape or min(shape) < 1:
            raise CLIError(f"--input-shape must be comma-separated positive integers, e.g. "
                           f"64,3,32,32; got {args.input_shape!r}")
    model, data_hp, _, _ = T.load_model(args.model)
    if shape:
        x = torch.randn(shape)
    else:
        x, _ = next(iter(T.data_lib.Loader.for_split(data_hp.load(), "heldout", args.batch)))
    device = T.resolve_device(args.device)
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    try:
        report = explain(model.to(device), x.to(device), layouts=layouts,
                         cache=not args.no_cache)
    except RuntimeError as exc:
        if not shape:
            raise
        raise CLIError(f"the model does not take an input of shape {tuple(shape)} "
                       f"(--input-shape): {str(exc).splitlines()[0]}") from None
    print(report)
    return 0


# ---------------------------------------------------------------------------- study, report


def _study_parser(sub: argparse._SubParsersAction) -> None:
    from sparsecore import study

    p = sub.add_parser("study", help="the 'Is Pruning Compression?' study, end to end",
                       description=study.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_arguments(p)
    _add_common(p)
    p.set_defaults(func=cmd_study)


def cmd_study(args: argparse.Namespace) -> int:
    from sparsecore import study
    from sparsecore.study.executors import make_executor

    cfg = study.config_from_args(args)
    if args.dry_run:
        from sparsecore.study.dryrun import dry_run
        from sparsecore.train import resolve_device

        print(dry_run(cfg, resolve_device(cfg.device)))
        return 0
    executor = make_executor(args.executor, args.address)
    study.run(cfg, out=args.out, fresh=args.fresh, progress=not args.no_progress,
              timing_threads=args.threads, executor=executor)
    return 0


def _report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rewrite report.md and the figures of a study run",
                       description="Rebuild RUN/report.md and RUN/*.png from RUN/results.json "
                                   "(no training).")
    p.add_argument("run", help="the study's --out directory")
    _add_common(p)
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from sparsecore import study

    path = study.write_report(args.run)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sparsecore", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_train_parser, _prune_parser, _compare_parser, _explain_parser, _study_parser,
                _report_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup(args)
    try:
        return args.func(args)
    except (CLIError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
