"""Time one ONNX model on ONNX Runtime or DeepSparse; run by `python -m bench models` as a
subprocess under the engine's own Python (.venv-ort, .venv-deepsparse), so neither engine is
ever a dependency of sparsecore. Imports only the standard library, numpy and the engine.

    python bench/_onnx_runner.py --engine ort --model m.onnx --input x.npy --threads 1 \\
        --output y.npy

Inputs are .npy files, one per graph input in order (their shapes fix the batch). After
`--warmup` untimed runs it times at least `--reps` runs and at least `--min-time` seconds
(at most 200 runs), saves the first output of the last run to `--output`, and prints one
JSON line last: engine, version, threads, reps, median_ms, p10_ms, p90_ms, mean_ms, plus
what the engine reports about itself (DeepSparse: ISA, fraction of ops it runs).

With `--rounds N` (N > 1) the caller interleaves this engine with others: the runner builds
the engine, prints {"ready": true}, and then times one round (warm-up included) for every
line it reads on standard input, printing {"round": i, "times_ms": [...]} after each; after
the N-th it prints the summary line over all rounds' runs, with each round's median in
round_median_ms. End of input before the N-th round is an error (exit status 3).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ENGINES = ("ort", "deepsparse")


def _ort(model: str, inputs: list[np.ndarray], threads: int
         ) -> tuple[Callable[[], list[np.ndarray]], dict[str, Any]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: x for i, x in zip(session.get_inputs(), inputs)}
    return (lambda: session.run(None, feeds)), {"version": ort.__version__}


def _deepsparse(model: str, inputs: list[np.ndarray], threads: int
                ) -> tuple[Callable[[], list[np.ndarray]], dict[str, Any]]:
    import deepsparse

    engine = deepsparse.compile_model(model, batch_size=inputs[0].shape[0], num_cores=threads)
    engine.run(inputs)  # validates the inputs once; the timed runs skip that
    info = {"version": deepsparse.__version__,
            "isa": str(getattr(engine, "cpu_avx_type", "")),
            "fraction_of_supported_ops": float(getattr(engine, "fraction_of_supported_ops", 0))}
    return (lambda: engine.run(inputs, val_inp=False)), info


def time_runs(fn: Callable[[], Any], warmup: int, reps: int, min_time: float
              ) -> tuple[list[float], Any]:
    """Seconds of each timed call of fn (after `warmup` calls), and the last call's result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return times, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=ENGINES, required=True)
    p.add_argument("--model", required=True, help="the .onnx file")
    p.add_argument("--input", action="append", required=True, help=".npy, one per graph input")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--min-time", type=float, default=0.2, help="seconds")
    p.add_argument("--output", default=None, help="save the first output here (.npy)")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds, each started by a line on standard input when > 1")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    inputs = [np.load(path, allow_pickle=False) for path in args.input]
    build = _ort if args.engine == "ort" else _deepsparse
    fn, info = build(args.model, inputs, args.threads)
    times: list[float] = []
    medians: list[float] = []
    out = None
    if args.rounds > 1:
        print(json.dumps({"ready": True}), flush=True)
    for i in range(args.rounds):
        if args.rounds > 1 and not sys.stdin.readline():
            print(f"standard input ended before round {i + 1} of {args.rounds}",
                  file=sys.stderr)
            return 3
        got, out = time_runs(fn, args.warmup, args.reps, args.min_time)
        times += got
        medians.append(1e3 * float(np.median(got)))
        if args.rounds > 1:
            print(json.dumps({"round": i, "times_ms": [1e3 * t for t in got]}), flush=True)
    if args.output:
        np.save(args.output, np.asarray(out[0]))
    ms = 1e3 * np.asarray(times)
    print(json.dumps({
        "engine": args.engine, **info, "threads": args.threads, "reps": len(times),
        "median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean()),
        "round_median_ms": medians,
    }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
