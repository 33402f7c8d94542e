"""Pruning: Ramanujan-graph metrics of a conv layer's mask (target: 512->512 3x3 at density
0.1 in under 1 s) against a networkx double loop, and the time each pruning method takes on
VGG-16.

Rows of the `ramanujan` table: one layer mask, our vectorised metrics (scipy.sparse +
ARPACK) vs the authors' construction (a networkx graph built edge by edge in a Python double
loop, then its adjacency's eigenvalues). Rows of the `methods` table: wall time of
`prune.prune(...)` on VGG-16 (CPU, one batch of random CIFAR-shaped data where needed).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import eigsh

from bench.common import format_table, save_results, time_fn
from sparsecore import models, prune
from sparsecore.prune import metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channels", type=int, default=512, help="c_in = c_out of the conv layer")
    p.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.3])
    p.add_argument("--no-reference", action="store_true",
                   help="skip the networkx double loop (slow by design)")
    p.add_argument("--methods", nargs="*", default=["magnitude", "random", "erk", "snip",
                                                    "grasp", "synflow"])
    p.add_argument("--width", type=float, default=0.5, help="VGG-16 width multiplier")


def _networkx_reference(mask: torch.Tensor) -> tuple[float, float]:
    """The authors' construction: a Python double loop adding one edge per kept weight, then
    the three largest |eigenvalues| of the adjacency with eigsh. Returns (lambda1, mu_hat)."""
    import networkx as nx

    w = mask.reshape(mask.shape[0], -1).T.numpy()  # (inputs, outputs)
    n_in, n_out = w.shape
    g = nx.Graph()
    for i in range(n_in):
        g.add_node(i)
        for j in range(n_out):
            g.add_node(n_in + j)
            if w[i, j]:
                g.add_edge(i, n_in + j)
    g.remove_nodes_from([v for v, d in dict(g.degree()).items() if d == 0])
    adj = sp.csr_matrix(nx.to_scipy_sparse_array(g, dtype=np.float64))
    vals = np.sort(np.abs(eigsh(adj, k=3, which="LM", return_eigenvectors=False)))[::-1]
    return float(vals[0]), float(vals[2])


def _ramanujan_rows(args: argparse.Namespace) -> list[dict]:
    c = args.channels
    rows = []
    for d in args.densities:
        g = torch.Generator().manual_seed(0)
        mask = torch.rand((c, c, 3, 3), generator=g) < d
        t = time_fn(lambda m=mask: metrics.ramanujan(m), warmup=1, reps=3, min_time=0.0)
        stats = metrics.ramanujan(mask)
        row = {"shape": f"{c}x{c}x3x3", "density": d, "ours_s": t,
               "lambda1": stats.lambda1, "mu_hat": stats.mu_hat, "imdb": stats.imdb,
               "subgraphs": stats.subgraphs, "networkx_s": None, "speedup": None}
        if not args.no_reference and d == 0.1:
            t0 = time.perf_counter()
            lam1, mu = _networkx_reference(mask)
            row["networkx_s"] = time.perf_counter() - t0
            row["speedup"] = row["networkx_s"] / t
            row["same_eigs"] = bool(np.isclose(lam1, stats.lambda1, rtol=1e-6)
                                    and np.isclose(mu, stats.mu_hat, rtol=1e-6))
        rows.append(row)
    return rows


def _method_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    data = (torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))
    for method in args.methods:
        torch.manual_seed(0)
        model = models.create("vgg16", num_classes=10, in_channels=3, input_size=32,
                              width=args.width)
        t0 = time.perf_counter()
        prune.prune(model, method, sparsity=0.9, data=data, seed=0)
        elapsed = time.perf_counter() - t0
        rows.append({"method": method, "model": f"vgg16 x{args.width}",
                     "params": sum(p.numel() for p in model.parameters()),
                     "sparsity": 0.9, "seconds": elapsed,
                     "density": prune.summary(model).masked_density})
    return rows


def main(args: argparse.Namespace) -> int:
    ram = _ramanujan_rows(args)
    print(format_table(ram, ["shape", "density", "ours_s", "networkx_s", "speedup", "lambda1",
                             "mu_hat", "imdb", "subgraphs"]))
    meth = _method_rows(args) if args.methods else []
    if meth:
        print()
        print(format_table(meth, ["method", "model", "params", "sparsity", "density", "seconds"]))
    path = save_results("prune", [{**r, "device": "cpu"} for r in ram + meth])
    print(f"\nwrote {path}")
    return 0
