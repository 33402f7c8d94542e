"""Unstructured (CSR) sparse Linear / Conv2d: sparsecore vs dense torch and torch.sparse CSR.

Each row: one layer shape, batch, sparsity and mode (fwd, or fwd+bwd: the training step of
the layer, input and weight gradients). Columns: dense torch on the same (pruned) weights,
torch.sparse CSR (`to_sparse_csr` @ x^T, forward of Linear: where torch has it), each
sparse backend of BACKENDS (sparsecore's SparseLinear / SparseConv2d as `csr`), their
speedups over dense, and `path`: the backend sparsecore's dispatcher chose for the forward
("dense" below the measured crossover, ops.CSR_DENSE_BELOW).

The crossover: run with `--backend cpp` (the C++ kernel forced at every sparsity) and read
the lowest sparsity whose speedup is >= 1. Table to stdout, JSON + a speedup-vs-sparsity PNG
under bench/results/ (layers[-tag]-<device>.json / .png).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from bench.common import RESULTS_DIR, format_table, save_results, speedup, time_fn
from sparsecore import ops, use_backend
from sparsecore.nn import SparseConv2d, SparseLinear

SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
LINEAR_SHAPES = ((1024, 1024), (4096, 4096), (4096, 11008))  # (in, out)
LINEAR_BATCHES = (1, 64, 256)
CONV_SHAPES = ((64, 32), (128, 16), (256, 8), (512, 4))  # (channels, side): 3x3, pad 1
CONV_BATCHES = (64, 128)
MODES = ("fwd", "fwd+bwd")
# --quick: one small shape per kind, two sparsities (checks that the bench runs).
QUICK = {"linear": ((1024, 1024),), "conv": ((64, 32),), "batch": (64,), "sparsity": (0.5, 0.9)}

# name -> builds the sparse module from a dense one at a sparsity. (Another layout adds a
# factory here, and its rows appear as columns <name>_ms / <name>_x.)
BACKENDS: dict[str, Callable[[nn.Module, float], nn.Module]] = {
    "csr": lambda m, s: (SparseLinear if isinstance(m, nn.Linear) else SparseConv2d)
    .from_dense(m, sparsity=s),
}

COLUMNS = ["kind", "shape", "batch", "sparsity", "mode", "dense_ms", "torch_csr_ms",
           "torch_csr_x", *(c for b in BACKENDS for c in (f"{b}_ms", f"{b}_x")), "path",
           "max_abs_diff"]


@dataclass(frozen=True)
class Case:
    kind: str  # "linear" | "conv"
    dims: tuple[int, int]  # (in, out) or (channels, side)
    batch: int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=("linear", "conv"), default=None,
                   help="only Linear or only Conv2d rows (default: both)")
    p.add_argument("--sparsity", default=None,
                   help="comma-separated sparsities (default: 0.5,0.8,0.9,0.95,0.98)")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes")
    p.add_argument("--shape", default=None,
                   help="comma-separated shapes: INxOUT for Linear (e.g. 4096x4096), C@SIDE for "
                        "Conv2d (e.g. 256@8)")
    p.add_argument("--mode", choices=MODES, default=None, help="only fwd or only fwd+bwd")
    p.add_argument("--quick", action="store_true",
                   help="a small subset (one shape per kind, two sparsities) to check it runs")
    p.add_argument("--backend", default=None,
                   help="force a sparsecore backend (e.g. cpp: the kernel at every sparsity, "
                        "which measures the dense crossover)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true",
                   help="one thread, timed by the thread's CPU time: the per-core ratio, "
                        "robust to other load on a shared machine")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--tag", default=None, help="suffix of the results file names")


def _floats(text: str | None, default: tuple) -> tuple:
    return default if text is None else tuple(float(v) for v in text.split(","))


def cases(args: argparse.Namespace) -> Iterator[Case]:
    kinds = (args.kind,) if args.kind else ("linear", "conv")
    batches = tuple(int(b) for b in _floats(args.batch, ()))
    shapes = None if args.shape is None else {
        tuple(int(v) for v in s.replace("@", "x").split("x")) for s in args.shape.split(",")}
    for kind, all_shapes, all_batches in (("linear", LINEAR_SHAPES, LINEAR_BATCHES),
                                          ("conv", CONV_SHAPES, CONV_BATCHES)):
        if kind not in kinds:
            continue
        for batch in batches or (QUICK["batch"] if args.quick else all_batches):
            for dims in QUICK[kind] if args.quick else all_shapes:
                if shapes is None or dims in shapes:
                    yield Case(kind, dims, batch)


def _fwd_bwd(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One training step of the layer: forward, then input and weight gradients."""
    xg = x.detach().requires_grad_(True)
    g = torch.randn_like(module(x))

    def run() -> None:
        module(xg).backward(g)
        module.zero_grad(set_to_none=True)
        xg.grad = None

    return run


def _no_grad(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return module(x)

    return run


def _torch_csr(weight: torch.Tensor, x: torch.Tensor, timer: Callable) -> float | None:
    """torch.sparse CSR forward (y^T = W_csr @ x^T) in ms, where torch runs it."""
    try:
        w = weight.detach().to_sparse_csr()
        xt = x.t().contiguous()
        w @ xt
        return timer(lambda: w @ xt) * 1e3
    except (RuntimeError, NotImplementedError):  # a dtype / device torch does not implement
        return None


def _path(module: nn.Module, x: torch.Tensor) -> str:
    """The backend sparsecore's dispatcher picks for this forward."""
    w = module.weight_csr()
    tiling, _ = w.cpu_tilings()
    if isinstance(module, SparseLinear):
        return ops.csr._csr_dsd_dispatch.select(x, w.values, w.col_idx, w.row_ptr,
                                                w.row_order, tiling, w.n_rows).name
    return ops.csr._csr_conv2d_dispatch.select(x, w.values, w.col_idx, w.row_ptr, tiling,
                                               list(w.shape), list(module.stride),
                                               list(module.padding), list(module.dilation)).name


def run(args: argparse.Namespace) -> list[dict]:
    device = args.device
    if args.cpu_time:
        torch.set_num_threads(1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    clock = "thread" if args.cpu_time and device == "cpu" else "wall"

    def timer(fn: Callable[[], object]) -> float:
        return time_fn(fn, device, warmup=2, reps=7, min_time=0.3, clock=clock)

    sparsities = _floats(args.sparsity, QUICK["sparsity"] if args.quick else SPARSITIES)
    modes = (args.mode,) if args.mode else MODES
    def forced() -> contextlib.AbstractContextManager:
        return use_backend(args.backend) if args.backend else contextlib.nullcontext()

    out: list[dict] = []
    for case in cases(args):
        torch.manual_seed(0)
        if case.kind == "linear":
            n_in, n_out = case.dims
            dense = nn.Linear(n_in, n_out, device=device)
            x = torch.randn(case.batch, n_in, device=device)
            shape = f"{n_in}x{n_out}"
        else:
            c, side = case.dims
            dense = nn.Conv2d(c, c, 3, padding=1, device=device)
            x = torch.randn(case.batch, c, side, side, device=device)
            shape = f"{c}->{c} 3x3 @{side}x{side}"
        dense_ms: dict[str, float] = {}
        for sparsity in sparsities:
            sparse = {name: make(dense, sparsity) for name, make in BACKENDS.items()}
            twin = sparse["csr"].to_dense()  # dense torch on the same pruned weights
            for mode in modes:
                if mode not in dense_ms:  # dense time does not depend on the zeros
                    fn = _no_grad(twin, x) if mode == "fwd" else _fwd_bwd(twin, x)
                    dense_ms[mode] = timer(fn) * 1e3
                row = {"kind": case.kind, "shape": shape, "batch": case.batch,
                       "sparsity": sparsity, "mode": mode, "dtype": "float32", "device": device,
                       "threads": torch.get_num_threads(), "dense_ms": dense_ms[mode]}
                if mode == "fwd" and case.kind == "linear":
                    row["torch_csr_ms"] = _torch_csr(twin.weight, x, timer)
                    row["torch_csr_x"] = speedup(row["dense_ms"], row["torch_csr_ms"])
                with forced():
                    for name, module in sparse.items():
                        fn = _no_grad(module, x) if mode == "fwd" else _fwd_bwd(module, x)
                        row[f"{name}_ms"] = timer(fn) * 1e3
                        row[f"{name}_x"] = speedup(row["dense_ms"], row[f"{name}_ms"])
                    if mode == "fwd":
                        row["path"] = _path(sparse["csr"], x)
                        diff = _no_grad(sparse["csr"], x)() - _no_grad(twin, x)()
                        row["max_abs_diff"] = diff.abs().max().item()
                out.append(row)
                print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    return out


def plot(rows: list[dict], path: str) -> None:
    """Speedup over dense vs sparsity: one panel per (kind, mode), a line per shape x batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["kind"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (kind, mode) in zip(axes[0], panels):
        sel = [r for r in rows if r["kind"] == kind and r["mode"] == mode]
        for key in sorted({(r["shape"], r["batch"]) for r in sel}):
            pts = sorted((r["sparsity"], r["csr_x"]) for r in sel
                         if (r["shape"], r["batch"]) == key and r.get("csr_x"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{key[0]} b{key[1]}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set(title=f"{kind} {mode}", xlabel="sparsity", ylabel="speedup vs dense torch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    print(format_table([], COLUMNS))
    result = run(args)
    print()
    print(format_table(result, COLUMNS))
    extra = {"clock": "thread CPU time, 1 thread" if args.cpu_time else "wall, median",
             "backend": args.backend or "auto", "crossover": ops.CSR_DENSE_BELOW}
    path = save_results("layers", result, extra=extra, tag=args.tag)
    print(f"\nwrote {path}")
    if result and not args.no_plot:
        png = os.path.join(RESULTS_DIR, os.path.basename(path).replace(".json", ".png"))
        plot(result, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":  # python -m bench.layers
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
