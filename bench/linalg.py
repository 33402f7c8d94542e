"""Batched svd / svdvals / eigh of many small matrices: sparsecore.linalg vs torch.linalg.

Rows: op, shape (batch, m, n), dtype; torch.linalg time, the C++ kernel's time (forced;
`kernel` says which of the two runs at that size, jacobi or bidiag, and `backend` what the
automatic choice between C++ and torch.linalg would be) or with `--device cuda` the Triton
Jacobi kernel's (matrices up to 32 x 32), speedup, and the accuracy reached:
max error of the values relative to the largest one against float64 LAPACK, reconstruction
||U S V^T - A|| / ||A|| (or ||Q L Q^T - S|| / ||S||) and orthogonality max |U^T U - I|, both
for the sparsecore result.
eigh runs on A^T A + I (symmetric positive definite).
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import torch

from bench.common import format_table, save_results, speedup, time_fn
from sparsecore._dispatch import use_backend

SHAPES = [(4000, 16, 16), (500, 100, 100), (400, 64, 64), (100, 256, 256), (20, 512, 512)]
QUICK_SHAPES = [(4000, 16, 16), (500, 100, 100), (400, 64, 64)]
# CUDA: the Triton kernel keeps one matrix per program in registers (up to 32 x 32).
GPU_SHAPES = [(4000, 8, 8), (4000, 16, 16), (4000, 32, 32), (20000, 32, 32)]
GPU_QUICK_SHAPES = [(4000, 16, 16), (4000, 32, 32)]
OPS = ["svd", "svdvals", "eigh"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu: the C++ kernels; cuda: the Triton kernel (default: cpu)")
    p.add_argument("--quick", action="store_true", help="fewer shapes, fewer repetitions")
    p.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"],
                   choices=["float32", "float64"])
    p.add_argument("--shapes", nargs="+", default=None,
                   help="batch,m,n triples, e.g. 500,100,100 (default: SHAPES, on CUDA "
                        "GPU_SHAPES)")
    p.add_argument("--tag", default=None, help="suffix of the results file name")


def _accuracy(op: str, A: torch.Tensor, out: Any) -> dict[str, float]:
    A64 = A.double()
    if op == "eigh":
        L, Q = out
        ref = torch.linalg.eigvalsh(A64)
        scale = ref.abs().amax(-1, keepdim=True)
        rec = (Q.double() * L.double().unsqueeze(-2)) @ Q.double().mT
        orth = Q.double().mT @ Q.double()
    else:
        S = out if op == "svdvals" else out[1]
        ref = torch.linalg.svdvals(A64)
        scale = ref[..., :1]
        rec = orth = None
        if op == "svd":
            U, _, Vh = out
            rec = (U.double() * S.double().unsqueeze(-2)) @ Vh.double()
            orth = U.double().mT @ U.double()
        L = S
    acc = {"value_err": ((L.double() - ref).abs() / scale.clamp_min(1e-300)).max().item()}
    if rec is not None:
        nrm = A64.flatten(-2).norm(dim=-1)
        acc["recon_err"] = ((rec - A64).flatten(-2).norm(dim=-1) / nrm).max().item()
        eye = torch.eye(orth.shape[-1], dtype=torch.float64)
        acc["orth_err"] = (orth - eye).abs().max().item()
    return acc


def _input(op: str, shape: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
    A = torch.randn(*shape, dtype=torch.float64)
    if op == "eigh":
        A = A.mT @ A / shape[1] + torch.eye(shape[2], dtype=torch.float64)
    return A.to(dtype)


def main(args: argparse.Namespace) -> int:
    from sparsecore import linalg

    device = args.device
    on_gpu = device == "cuda"
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    elif on_gpu:
        shapes = GPU_QUICK_SHAPES if args.quick else GPU_SHAPES
    else:
        shapes = QUICK_SHAPES if args.quick else SHAPES
    too_big = [s for s in shapes if on_gpu and max(s[1:]) > linalg.TRITON_MAX_SIZE]
    if too_big:
        print(f"--device cuda: the Triton kernel takes matrices up to {linalg.TRITON_MAX_SIZE}"
              f" x {linalg.TRITON_MAX_SIZE}, not {too_big}")
        return 2
    forced = "triton" if on_gpu else "cpp"  # the kernel itself, whatever auto would pick
    reps, min_time, warmup = (1, 0.0, 1) if args.quick else (3, 0.5, 1)
    rows: list[dict[str, Any]] = []
    ours = {"svd": linalg.svd, "svdvals": linalg.svdvals, "eigh": linalg.eigh}
    theirs = {
        "svd": lambda a: torch.linalg.svd(a, full_matrices=False),
        "svdvals": torch.linalg.svdvals,
        "eigh": torch.linalg.eigh,
    }
    dispatch = {"svd": linalg._svd_dispatch, "svdvals": linalg._svdvals_dispatch}
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        for shape in shapes:
            for op in args.ops:
                torch.manual_seed(0)
                A_cpu = _input(op, shape, dtype)
                A = A_cpu.to(device)
                f_torch, f_ours = partial(theirs[op], A), partial(ours[op], A)
                timing = {"warmup": warmup, "reps": reps, "min_time": min_time}
                t_torch = time_fn(f_torch, device, **timing)
                with use_backend(forced):
                    t_ours = time_fn(f_ours, device, **timing)
                    out = ours[op](A)
                if op == "eigh":
                    backend = linalg._eigh_dispatch.select(A.reshape(-1, *shape[1:]), True).name
                else:
                    backend = dispatch[op].select(A).name
                kernel = "jacobi" if on_gpu else linalg.cpp_kernel(op, shape, dtype)
                out = out.cpu() if op == "svdvals" else tuple(t.cpu() for t in out)
                row = {
                    "op": op,
                    "shape": "x".join(map(str, shape)),
                    "dtype": dname,
                    "device": device,
                    "backend": backend,
                    "kernel": kernel,
                    "torch_ms": t_torch * 1e3,
                    "sparsecore_ms": t_ours * 1e3,
                    "speedup": speedup(t_torch, t_ours),
                    **_accuracy(op, A_cpu, out),
                }
                rows.append(row)
                print(format_table([row], list(row)).splitlines()[-1], flush=True)
    cols = ["op", "shape", "dtype", "backend", "kernel", "torch_ms", "sparsecore_ms", "speedup",
            "value_err", "recon_err", "orth_err"]
    print()
    print(format_table(rows, cols))
    path = save_results("linalg", rows, tag=args.tag or ("quick" if args.quick else None))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":  # python -m bench.linalg
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
