"""Whole-model inference of pruned nets: torch dense, ONNX Runtime, DeepSparse, sparsecore.

Each row is one model magnitude-pruned to one sparsity (global: one threshold over all
layers; every-layer: each layer at that sparsity), one batch and one thread count ("all":
torch's default), timed on every engine in the same run and on the same pruned weights.
torch runs the masked dense model eagerly with the zeros baked in (prune.remove); ONNX
Runtime and DeepSparse run that model exported to ONNX (TorchScript exporter, opset 17,
eval mode: BatchNorm is folded into the convolutions, which keeps the zeros), each in its
own virtual environment through bench/_onnx_runner.py (`make bench-baselines` creates
.venv-ort and .venv-deepsparse, used when present; neither engine is a dependency of
sparsecore); sparsecore is `sparsecore_model` (sparsecore.optimize, per thread count), and
"sparsify" the same weights after sparsecore.nn.sparsify alone. Every engine's output is
compared to torch's (max abs diff). Models are freshly initialised: timing does not depend
on training. All engines of a row are built first and then timed in `--rounds` rounds, each
engine in turn (the ONNX engines stay loaded in their runners between rounds); an engine's
time is the median over all its rounds' runs, and each round's median is kept
(ENGINE_rounds_ms), so a burst of load from elsewhere on a shared machine lands on every
engine instead of on whichever ran then.

Rows of record: VGG-16 and ResNet-18 (CIFAR, 32x32, batch 1 and 64), ResNet-50 (ImageNet,
224x224, batch 1 and 64), and the project's Transformer at 4 layers x 512 (8 heads, 128
tokens, vocabulary 256, batch 1 and 8; its Linear layers are the prunable ones), at 80, 90
and 95 %. `--run DIR` times the magnitude-pruned nets of a study run instead.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import subprocess
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import sparsecore
from bench.common import format_table, save_results, speedup, time_fn, time_samples
from sparsecore import models, prune
from sparsecore import train as T
from sparsecore.nn import sparsify
from sparsecore.nn.optimize import fused_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "bench", "_onnx_runner.py")
DEFAULT_PYTHON = {"ort": os.path.join(ROOT, ".venv-ort", "bin", "python"),
                  "deepsparse": os.path.join(ROOT, ".venv-deepsparse", "bin", "python")}
ENGINES = ("ort", "deepsparse")
# --pruning name -> sparsecore.prune scope
SCOPES = {"global": "global", "every-layer": "layerwise"}


def _images(size: int) -> Callable[[int], Tensor]:
    return lambda batch: torch.randn(batch, 3, size, size)


@dataclass(frozen=True)
class ModelSpec:
    """How the bench builds a model (models.create keywords) and a batch of its input."""

    kwargs: dict[str, Any]
    example: Callable[[int], Tensor] = field(default=_images(32))  # batch -> input
    batches: tuple[int, ...] = (1, 64)


_CIFAR = {"num_classes": 10, "in_channels": 3, "input_size": 32}
SPECS: dict[str, ModelSpec] = {
    "vgg16": ModelSpec(_CIFAR),
    "resnet18": ModelSpec(_CIFAR),
    "resnet50": ModelSpec({"num_classes": 1000, "in_channels": 3, "input_size": 224},
                          _images(224)),
    "transformer": ModelSpec(
        {"num_classes": 256, "input_size": 128, "d_model": 512, "depth": 4, "heads": 8},
        lambda batch: torch.randint(256, (batch, 128)), batches=(1, 8)),
}

FULL = {"models": "vgg16,resnet18,resnet50,transformer", "sparsities": "0.8,0.9,0.95",
        "pruning": "global,every-layer", "threads": "1,all"}
QUICK = {"models": "resnet8", "sparsities": "0.9", "pruning": "global", "threads": "1",
         "batches": "1", "reps": 3, "warmup": 1, "rounds": 1, "tag": "quick"}


def spec(name: str) -> ModelSpec:
    """The bench's spec of a model; other registered models run CIFAR-shaped."""
    return SPECS.get(name, ModelSpec(_CIFAR))


def sparsecore_model(model: nn.Module, example_input: Tensor) -> tuple[nn.Module, str]:
    """The sparsecore engine: sparsecore.optimize(model, example_input) (BatchNorm folded,
    ReLU fused, each layer's kernel timed on example_input's activation at the current thread
    count), to be called on inputs shaped like `example_input`, and a note on the kernels it
    chose."""
    fast = sparsecore.optimize(model, example_input)
    kinds = Counter(layer.info.choice for _, layer in fused_layers(fast))
    return fast, "optimize: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))


def sparsify_model(model: nn.Module) -> tuple[nn.Module, str]:
    """sparsify() alone, for comparison: a copy of the masked `model` with the layers at or
    above the measured crossover sparsity on sparsecore's kernels."""
    twin = copy.deepcopy(model)
    report = sparsify(twin)
    n = len(report.swapped) + len(report.skipped)
    return twin.eval(), f"sparsify: {len(report.swapped)}/{n} layers sparse"


def export_onnx(model: nn.Module, x: Tensor, path: str) -> None:
    """The dense `model` (zeros baked in) for input `x` as ONNX (opset 17, static shapes)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17)


class OnnxWorker:
    """`onnx_path` on `engine` ("ort" or "deepsparse") under another Python: `runner` in a
    subprocess, inputs as .npy files, the first output saved to `output`. Built once; with
    rounds > 1 each round() times one round there (its runs' seconds), so that the engine's
    rounds interleave with the other engines'; finish() returns the runner's summary JSON.
    A runner that fails raises RuntimeError with the tail of its stderr."""

    def __init__(self, python: str, engine: str, onnx_path: str, inputs: list[str],
                 threads: int, *, output: str, warmup: int = 3, reps: int = 10,
                 min_time: float = 0.2, rounds: int = 1, runner: str = RUNNER) -> None:
        cmd = [python, runner, "--engine", engine, "--model", onnx_path, "--threads",
               str(threads), "--warmup", str(warmup), "--reps", str(reps), "--min-time",
               str(min_time), "--output", output, "--rounds", str(rounds)]
        for path in inputs:
            cmd += ["--input", path]
        # NM_DISABLE_ANALYTICS: DeepSparse would otherwise send usage events (and look up the
        # country first) from the timed process.
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), NM_DISABLE_ANALYTICS="1")
        self.engine, self.rounds = engine, rounds
        self._err = tempfile.TemporaryFile(mode="w+")  # a file: a full pipe would block it
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._err, text=True, env=env)
        if rounds > 1:
            self._read("ready")

    def _read(self, key: str) -> dict[str, Any]:
        """The next JSON line of the runner's that has `key`."""
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith("{"):
                msg = json.loads(line)
                if key in msg:
                    return msg
        code = self._proc.wait()
        self._err.seek(0)
        tail = " | ".join(self._err.read().strip().splitlines()[-3:])
        if code == 0:
            raise RuntimeError(f"{self.engine} runner printed no JSON")
        raise RuntimeError(f"{self.engine} runner exited with {code}: {tail}")

    def round(self) -> list[float]:
        """One round timed in the runner: seconds of each run."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write("go\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # the runner is gone: _read says why
        return [t / 1e3 for t in self._read("round")["times_ms"]]

    def finish(self) -> dict[str, Any]:
        """The summary over all rounds (after the last round())."""
        res = self._read("median_ms")
        self._proc.wait()
        return res

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for f in (self._proc.stdin, self._proc.stdout, self._err):
            if f is not None:
                f.close()


def run_onnx(python: str, engine: str, onnx_path: str, inputs: list[str], threads: int, *,
             output: str, warmup: int = 3, reps: int = 10, min_time: float = 0.2,
             runner: str = RUNNER) -> dict[str, Any]:
    """One round of OnnxWorker: the runner's summary JSON."""
    worker = OnnxWorker(python, engine, onnx_path, inputs, threads, output=output,
                        warmup=warmup, reps=reps, min_time=min_time, runner=runner)
    try:
        return worker.finish()
    finally:
        worker.close()


def max_abs_diff(ref: Tensor, out: Tensor | np.ndarray) -> float | None:
    """Largest |ref - out|, or None when the shapes differ."""
    out = torch.as_tensor(np.asarray(out)) if not isinstance(out, Tensor) else out
    if tuple(out.shape) != tuple(ref.shape):
        return None
    return float((ref.detach().double() - out.detach().double()).abs().max())


@dataclass
class Case:
    """One pruned model to time at several batches."""

    model: str
    pruning: str
    sparsity: float
    net: nn.Module  # masked (prune parametrizations), eval mode
    example: Callable[[int], Tensor]
    batches: tuple[int, ...]


def cases(args: argparse.Namespace) -> Iterator[Case]:
    """One Case per (model, pruning, sparsity) of args (models, pruning, sparsities, batches;
    each model freshly initialised from seed 0 and magnitude-pruned), or per magnitude-pruned
    net of the study run args.run."""
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else None
    if args.run:
        paths = sorted(glob.glob(os.path.join(args.run, "stages", "*", "s*", "magnitude-*",
                                              "model.pt")))
        if not paths:
            raise SystemExit(f"no magnitude-pruned models under {args.run}/stages")
        for path in paths:
            net, data_hp, model_hp, _ = T.load_model(path)
            splits = data_hp.load()

            def example(b: int, splits=splits) -> Tensor:
                return next(iter(T.data_lib.Loader.for_split(splits, "heldout", b)))[0]

            yield Case(model_hp.model, "study", 1 - prune.summary(net).masked_density,
                       net.eval(), example, batches or (1, 64))
        return
    for name in args.models.split(","):
        s = spec(name)
        for pruning in args.pruning.split(","):
            if pruning not in SCOPES:
                raise SystemExit(f"--pruning: {pruning!r} is not one of {', '.join(SCOPES)}")
            for sp in (float(v) for v in args.sparsities.split(",")):
                torch.manual_seed(0)
                net = models.create(name, **s.kwargs).eval()
                prune.prune(net, "magnitude", sparsity=sp, scope=SCOPES[pruning])
                yield Case(name, pruning, sp, net, s.example, batches or s.batches)


def thread_counts(text: str) -> list[int]:
    """"1,all" -> [1, torch's default thread count]."""
    return [torch.get_num_threads() if t == "all" else int(t) for t in text.split(",")]


def _engines(args: argparse.Namespace) -> dict[str, str]:
    """engine -> Python to run it with, for the engines that run; prints why others do not."""
    chosen = {"ort": (args.ort, args.ort_python), "deepsparse": (args.deepsparse,
                                                                 args.deepsparse_python)}
    out: dict[str, str] = {}
    for engine, (on, python) in chosen.items():
        python = python or DEFAULT_PYTHON[engine]
        if not on:
            print(f"{engine}: off")
        elif args.device != "cpu":
            print(f"{engine}: CPU only, not run on {args.device}")
        elif not os.path.exists(python):
            print(f"{engine}: no Python at {python} (make bench-baselines, or "
                  f"--{'ort' if engine == 'ort' else 'deepsparse'}-python PATH)")
        else:
            out[engine] = python
    return out


COLUMNS = ["model", "pruning", "sparsity", "batch", "threads", "torch_ms", "ort_ms",
           "deepsparse_ms", "sparsecore_ms", "sparsecore_x", "sparsify_x", "ort_x",
           "deepsparse_x", "vs_deepsparse", "max_diff", "note"]


# Seconds between two engines' rounds: idle worker threads (OpenMP's, ONNX Runtime's) spin
# for a while after their last task, and would take cores from the next engine's runs.
PAUSE = 0.2


def _summary(engine: str, times_s: list[float], rounds: list[float]) -> dict[str, Any]:
    """Row cells of one engine timed in this process: median over every round's runs."""
    ms = 1e3 * np.asarray(times_s)
    return {f"{engine}_ms": float(np.median(ms)),
            f"{engine}_p10_ms": float(np.percentile(ms, 10)),
            f"{engine}_p90_ms": float(np.percentile(ms, 90)),
            f"{engine}_rounds_ms": [round(1e3 * r, 3) for r in rounds]}


def _baseline(engine: str, res: dict[str, Any], out_path: str, ref: Tensor) -> dict[str, Any]:
    """Row cells of one ONNX engine from its runner's summary: times, output difference,
    what the engine reported."""
    cells = {f"{engine}_ms": res["median_ms"], f"{engine}_p10_ms": res["p10_ms"],
             f"{engine}_p90_ms": res["p90_ms"],
             f"{engine}_rounds_ms": [round(r, 3) for r in res.get("round_median_ms", [])],
             f"{engine}_diff": max_abs_diff(ref.cpu(), np.load(out_path)),
             f"{engine}_version": res.get("version")}
    if "fraction_of_supported_ops" in res:
        cells[f"{engine}_supported_ops"] = res["fraction_of_supported_ops"]
    if res.get("isa"):
        cells[f"{engine}_isa"] = res["isa"]
    return cells


def _time_rounds(fns: dict[str, Callable[[], Any]], workers: dict[str, OnnxWorker],
                 args: argparse.Namespace, notes: list[str]) -> dict[str, list[list[float]]]:
    """args.rounds rounds; in each, every engine in turn runs its warm-up and timed runs
    (time_samples; a worker in its own process), so that a change of load on a shared
    machine hits every engine alike. engine -> each round's samples (seconds). A worker that
    fails is noted and dropped."""
    samples: dict[str, list[list[float]]] = {name: [] for name in (*fns, *workers)}
    cuda = args.device.startswith("cuda")
    for _ in range(args.rounds):
        for name, fn in fns.items():
            # CUDA: time_fn's do_bench median (it flushes L2 between runs), one per round
            samples[name].append([time_fn(fn, args.device)] if cuda else time_samples(
                fn, args.device, warmup=args.warmup, reps=args.reps))
            time.sleep(PAUSE if args.rounds > 1 or workers else 0)
        for engine, worker in list(workers.items()):
            try:
                samples[engine].append(worker.round())
            except Exception as exc:  # a baseline's failure is reported, not fatal
                notes.append(f"{engine}: {type(exc).__name__}: {exc}")
                worker.close()
                del workers[engine]
                samples.pop(engine)
            time.sleep(PAUSE)
    return samples


@torch.no_grad()
def _rows(case: Case, threads: list[int | None], engines: dict[str, str],
          args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Rows of one pruned model: for each batch and thread count, every engine timed, in
    args.rounds interleaved rounds."""
    dense = copy.deepcopy(case.net)
    prune.remove(dense)
    dense = dense.to(args.device).eval()
    achieved = 1 - prune.summary(case.net).masked_density
    for batch in case.batches:
        torch.manual_seed(1)
        x = case.example(batch).to(args.device)
        ref = dense(x)
        notes: list[str] = []
        with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
            onnx_path, x_path = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "x.npy")
            runnable = dict(engines)
            if runnable:
                try:
                    export_onnx(dense, x, onnx_path)
                    np.save(x_path, x.cpu().numpy())
                except Exception as exc:
                    notes.append(f"ONNX export failed: {type(exc).__name__}: {exc}")
                    runnable = {}
            for t in threads:
                if t is not None:
                    torch.set_num_threads(t)
                row: dict[str, Any] = {
                    "model": case.model, "pruning": case.pruning, "sparsity": case.sparsity,
                    "achieved_sparsity": round(achieved, 6), "batch": batch, "threads": t,
                    "device": args.device, "output_max_abs": float(ref.abs().max())}
                row_notes = list(notes)
                fns: dict[str, Callable[[], Any]] = {"torch": lambda x=x: dense(x)}
                net = case.net.to(args.device)
                for engine in ("sparsecore", "sparsify"):
                    try:  # built per thread count: optimize() times at the current one
                        sc, sc_note = (sparsecore_model(net, x) if engine == "sparsecore"
                                       else sparsify_model(net))
                        row.update({f"{engine}_diff": max_abs_diff(ref, sc(x)),
                                    f"{engine}_note": sc_note})
                        fns[engine] = lambda sc=sc, x=x: sc(x)
                    except Exception as exc:  # reported in the row; the others still run
                        row_notes.append(f"{engine} failed: {type(exc).__name__}: {exc}")
                workers: dict[str, OnnxWorker] = {}
                try:
                    for engine, python in runnable.items():
                        try:
                            workers[engine] = OnnxWorker(
                                python, engine, onnx_path, [x_path], t or 1,
                                output=os.path.join(tmp, f"{engine}-out.npy"),
                                warmup=args.warmup, reps=args.reps, rounds=args.rounds)
                        except Exception as exc:
                            row_notes.append(f"{engine}: {type(exc).__name__}: {exc}")
                    samples = _time_rounds(fns, workers, args, row_notes)
                    for engine, worker in workers.items():
                        try:
                            row.update(_baseline(engine, worker.finish(),
                                                 os.path.join(tmp, f"{engine}-out.npy"), ref))
                        except Exception as exc:
                            row_notes.append(f"{engine}: {type(exc).__name__}: {exc}")
                finally:
                    for worker in workers.values():
                        worker.close()
                for name in fns:
                    per_round = samples[name]
                    row.update(_summary(name, [s for r in per_round for s in r],
                                        [float(np.median(r)) for r in per_round]))
                for engine in ("sparsecore", "sparsify", *ENGINES):
                    row[f"{engine}_x"] = speedup(row["torch_ms"], row.get(f"{engine}_ms"))
                # sparsecore's speed as a fraction of DeepSparse's (1: as fast)
                row["vs_deepsparse"] = speedup(row.get("deepsparse_ms"),
                                               row.get("sparsecore_ms"))
                diffs = [row.get(f"{e}_diff") for e in ("sparsecore", "sparsify", *ENGINES)]
                row["max_diff"] = max((d for d in diffs if d is not None), default=None)
                row["note"] = "; ".join(row_notes) or None
                yield row


def add_case_arguments(p: argparse.ArgumentParser, full: dict[str, str],
                       batches: str) -> None:
    """The options that pick the rows (shared with bench train): --models, --sparsities,
    --pruning, --batches (`batches`: its default, in words), --threads; `full`: the full
    bench's defaults."""
    p.add_argument("--models", default=None,
                   help=f"comma-separated model names (default: {full['models']})")
    p.add_argument("--sparsities", default=None,
                   help=f"comma-separated sparsities (default: {full['sparsities']})")
    p.add_argument("--pruning", default=None,
                   help="global (one threshold over all layers) and/or every-layer (each "
                        f"layer at the sparsity), comma-separated (default: {full['pruning']})")
    p.add_argument("--batches", default=None,
                   help=f"comma-separated batch sizes (default: {batches})")
    p.add_argument("--threads", default=None,
                   help="comma-separated CPU thread counts, 'all' for torch's default count "
                        f"(default: {full['threads']})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_case_arguments(p, FULL, "each model's own; 1,64, the Transformer 1,8 sequences of "
                                "128 tokens")
    p.add_argument("--ort", action=argparse.BooleanOptionalAction, default=True,
                   help="time ONNX Runtime (default: on, when its Python exists)")
    p.add_argument("--ort-python", default=None,
                   help="Python with onnxruntime + numpy (default: .venv-ort/bin/python)")
    p.add_argument("--deepsparse", action=argparse.BooleanOptionalAction, default=True,
                   help="time DeepSparse (default: on, when its Python exists)")
    p.add_argument("--deepsparse-python", default=None,
                   help="Python with deepsparse + numpy (default: .venv-deepsparse/bin/python)")
    p.add_argument("--reps", type=int, default=None, help="timed runs, at least (default: 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 3)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of every engine in turn, each with its warm-up and timed runs; "
                        "an engine's time is the median over all rounds' runs (default: 3)")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda; on cuda only torch and sparsecore run (default: cpu)")
    p.add_argument("--run", default=None,
                   help="time the magnitude-pruned nets of this study run directory instead")
    p.add_argument("--quick", action="store_true",
                   help="one small row (ResNet-8, 90%%, global, batch 1, 1 thread, 3 runs) to "
                        "check the plumbing; results go to models-quick-*.json")
    p.add_argument("--tag", default=None, help="suffix of the results file name")


def fill_defaults(args: argparse.Namespace, defaults: dict[str, Any],
                  quick: dict[str, Any]) -> None:
    """Fill the options left unset from `quick` (with --quick) over `defaults` (shared with
    bench train)."""
    values = {**defaults, **quick} if args.quick else defaults
    for key, value in values.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _resolve(args: argparse.Namespace) -> None:
    """Fill the options left unset from --quick's or the full bench's defaults."""
    fill_defaults(args, {**FULL, "batches": None, "reps": 10, "warmup": 3, "rounds": 3,
                         "tag": None}, QUICK)
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")


def main(args: argparse.Namespace) -> int:
    _resolve(args)
    threads: list[int | None] = thread_counts(args.threads) if args.device == "cpu" else [None]
    all_threads = torch.get_num_threads()
    engines = _engines(args)
    rows: list[dict[str, Any]] = []
    try:
        for case in cases(args):
            for row in _rows(case, threads, engines, args):
                rows.append(row)
                print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    finally:
        torch.set_num_threads(all_threads)
    print()
    print(format_table(rows, COLUMNS))
    extra = {"isa": torch.backends.cpu.get_cpu_capability(), "all_threads": all_threads,
             "engines": engines, "settings": {k: getattr(args, k) for k in (
                 "models", "sparsities", "pruning", "batches", "threads", "reps", "warmup",
                 "rounds",
                 "device", "run")}}
    print(f"wrote {save_results('models', rows, extra=extra, tag=args.tag)}")
    return 0
