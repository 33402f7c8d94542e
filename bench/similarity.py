"""Layer similarity: all pairs between two 20-layer activation sets, sparsecore vs numpy.

Rows: for n data points and each metric (SVCCA, PWCCA, linear CKA), the time of
`similarity.compare(..., pairs="all")` against the per-pair numpy baseline
(bench/similarity_baseline.py), and their largest disagreement. Widths form a geometric
range 16..512 over the layers (sum ~3,000 channels per set, so n = 50,000 fits in memory:
1.2 GB per set in float64). Activations are float32 with a power-law spectrum (variance of
the i-th latent direction ~ 1/i, like trained networks' activations); the second set is a
noisy twin of the first. Where the baseline would take too long (--baseline-pairs), it
is timed on a fixed random sample of pairs and scaled to all pairs ("est" in the table).
Phase columns split our time: factor (QR + small SVD per layer), cross (the GEMMs) and
small (the batched small SVDs); gemm_gflops is the rate of the cross phase.

Threads: the JSON records the thread settings (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS) and
torch's thread count. Under load from other processes two threads made both sides slower,
ours far more; on a quiet machine both settings give similar ratios, so compare runs at
equal settings (see bench/RESULTS.md (similarity)).
"""

from __future__ import annotations

import argparse
import os
import random
import time

import numpy as np
import torch

from bench import similarity_baseline as baseline
from bench.common import format_table, save_results, time_fn
from sparsecore import similarity

METRICS = ("svcca", "pwcca", "linear_cka")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="n=2000, 8 layers, widths 16..128")
    p.add_argument("--n", type=int, nargs="+", default=[10_000, 50_000], help="data points")
    p.add_argument("--layers", type=int, default=20, help="layers per set")
    p.add_argument("--max-width", type=int, default=512, help="widest layer (smallest is 16)")
    p.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    p.add_argument(
        "--baseline-pairs",
        type=int,
        default=None,
        help="time the baseline on this many sampled pairs (default: all pairs up to "
        "n=10,000, 40 beyond)",
    )
    p.add_argument("--reps", type=int, default=3, help="timed runs of ours (median)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tag", default=None, help="suffix of the results file name")


def widths(layers: int, max_width: int) -> list[int]:
    """Geometric 16..max_width."""
    if layers == 1:
        return [max_width]
    return [round(16 * (max_width / 16) ** (k / (layers - 1))) for k in range(layers)]


def make_sets(
    n: int, ws: list[int], device: str, seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two activation sets {name: (n, w) float32}: layers mix a shared power-law latent;
    set b is set a with 50 % noise and a perturbed mixing."""
    g = torch.Generator().manual_seed(seed)
    d = max(ws)
    z = torch.randn(n, d, generator=g) * torch.arange(1, d + 1).pow(-0.5)
    a, b = {}, {}
    for k, w in enumerate(ws):
        mix = torch.randn(d, w, generator=g) / d**0.5
        xa = z @ mix
        scale = xa.std()
        xb = z @ (mix + 0.3 * torch.randn(d, w, generator=g) / d**0.5)
        xb += 0.5 * scale * torch.randn(n, w, generator=g)
        a[f"layer{k:02d}"] = xa.to(device)
        b[f"layer{k:02d}"] = xb.to(device)
    return a, b


def _pairs_for_baseline(layers: int, count: int | None, seed: int = 0) -> list[tuple[int, int]]:
    allp = [(i, j) for i in range(layers) for j in range(layers)]
    if count is None or count >= len(allp):
        return allp
    return sorted(random.Random(seed).sample(allp, count))


def run_case(
    n: int,
    ws: list[int],
    metric: str,
    args: argparse.Namespace,
    sets: tuple[dict, dict],
) -> dict:
    a, b = sets
    names = list(a)
    timings: dict[str, float] = {}

    def ours() -> similarity.SimilarityMatrix:
        return similarity.compare(a, b, metric, pairs="all")

    # Each run takes seconds: one warm-up and `reps` timed runs up to n = 10,000, one run above.
    small = n <= 10_000
    t_ours = time_fn(
        ours, args.device, warmup=int(small), reps=args.reps if small else 1, min_time=0
    )
    sim = similarity.compare(a, b, metric, pairs="all", timings=timings)

    count = (
        args.baseline_pairs if args.baseline_pairs is not None else (None if n <= 10_000 else 40)
    )
    pairs = _pairs_for_baseline(len(names), count)
    fn = baseline.METRICS[metric]
    an = {k: v.cpu().numpy() for k, v in a.items()}
    bn = {k: v.cpu().numpy() for k, v in b.items()}
    diff = 0.0
    t0 = time.perf_counter()
    for i, j in pairs:
        ref = fn(an[names[i]], bn[names[j]])
        diff = max(diff, abs(ref - sim[names[i], names[j]]))
    t_base = (time.perf_counter() - t0) * len(names) ** 2 / len(pairs)

    if metric == "linear_cka":
        gemm_flops = 2 * n * sum(ws) ** 2  # the cross-Gram GEMM
    else:
        gemm_flops = None
    row = {
        "metric": metric,
        "n": n,
        "layers": len(ws),
        "widths": f"{ws[0]}..{ws[-1]}",
        "device": args.device,
        "dtype": "float64",
        "pairs": len(names) ** 2,
        "ours_s": t_ours,
        "baseline_s": t_base,
        "baseline": "measured" if len(pairs) == len(names) ** 2 else f"est ({len(pairs)} pairs)",
        "speedup": t_base / t_ours,
        "max_abs_diff": diff,
        **{f"{k}_s": v for k, v in timings.items()},
    }
    if metric != "linear_cka":
        # Factored bases: the GEMM contracts n against the kept directions of both sets.
        ka = sum(sim_kept(a, metric))
        kb = sum(sim_kept(b, metric))
        gemm_flops = 2 * n * ka * kb
        row["kept"] = f"{ka}/{kb}"
    row["gemm_gflops"] = gemm_flops / timings["cross"] / 1e9 if timings.get("cross") else None
    return row


def sim_kept(acts: dict[str, torch.Tensor], metric: str) -> list[int]:
    """Directions each layer keeps (SVCCA's 99 % variance; the full rank otherwise)."""
    from sparsecore.similarity.cca import Reduction, factor

    reduce = Reduction(fraction=0.99) if metric == "svcca" else None
    return [int(factor(x.double(), reduce=reduce).count) for x in acts.values()]


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.n, args.layers, args.max_width, args.reps = [2000], 8, 128, 1
    ws = widths(args.layers, args.max_width)
    rows = []
    for n in args.n:
        sets = make_sets(n, ws, args.device)
        for metric in args.metrics:
            rows.append(run_case(n, ws, metric, args, sets))
            print(format_table(rows[-1:], list(rows[-1])), flush=True)
        del sets
    cols = [
        "metric",
        "n",
        "widths",
        "pairs",
        "ours_s",
        "baseline_s",
        "baseline",
        "speedup",
        "max_abs_diff",
        "factor_s",
        "cross_s",
        "small_s",
        "gemm_gflops",
        "kept",
    ]
    print()
    print(format_table(rows, cols))
    path = save_results(
        "similarity",
        rows,
        extra={
            "load_avg": os.getloadavg(),
            "numpy": np.__version__,
            "threads_env": {
                k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
            },
        },
        tag=args.tag or ("quick" if args.quick else None),
    )
    print(f"\nwrote {path}")
    return 0
