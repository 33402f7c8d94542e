"""Block-sparse (BSR) Linear / Conv2d / Transformer projections: sparsecore vs dense torch
and torch.sparse BSR (plus 2:4 semi-structured on GPU).

Each row: one layer shape, block size, block density and mode (fwd, or fwd+bwd: the
training step of the layer, input and weight gradients). Columns: dense torch time
(same weights, zeros in place), sparsecore's BlockSparse* time, torch.sparse BSR
(`to_sparse_bsr` + matmul, forward only, where torch runs it), and on GPU the 2:4
semi-structured baseline and the fraction of the bf16 roofline the sparse forward reaches.

CPU run time is kept sane by a default subset (see _cases; about 5-10 min on a 2-core
machine); `--full` (the default on a GPU) runs every block size x density x shape,
Transformer tokens to 8192 included; `--quick` runs one case per layer kind on any device.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

import torch
from torch import nn

from bench.common import format_table, save_results, speedup, time_fn
from sparsecore.formats import block_mask_from_scores
from sparsecore.nn.blocksparse import BlockSparseConv2d, BlockSparseLinear

BLOCKS = (16, 32, 64)
DENSITIES = (0.5, 0.25, 0.1, 0.05)
# (name, n_in, n_out, batch)
LINEAR_FULL = [("linear", 4096, 4096, 256), ("linear", 1024, 1024, 256),
               ("linear", 4096, 11008, 64)]
# Transformer projections at d_model in {768, 1024, 4096}: attention (d -> d), MLP up
# (d -> 4d) and down (4d -> d); rows = tokens.
TRANSFORMER_D = (768, 1024, 4096)
TRANSFORMER_TOKENS = (512, 2048, 8192)
# (name, channels, side, batch): CIFAR VGG/ResNet 3x3 layers, as the CSR bench.
CONV = [("conv", 64, 32, 64), ("conv", 128, 16, 64), ("conv", 256, 8, 128), ("conv", 512, 4, 128)]
# --quick: (kind, layer, dims, rows, block): the 4096-wide Linear, a Transformer MLP
# up-projection and a 256-channel conv, each at two densities, fwd and fwd+bwd.
QUICK = [("linear", "linear", (4096, 4096), 256, 32),
         ("transformer", "tf1024.mlp_up", (1024, 4096), 2048, 64),
         ("conv", "conv", (256, 8), 128, 32)]
QUICK_DENSITIES = (0.5, 0.1)

COLUMNS = ["layer", "shape", "rows", "block", "density", "mode", "dtype", "device", "dense_ms",
           "bsr_ms", "speedup", "torch_bsr_ms", "torch_bsr_x", "semi24_ms", "roofline",
           "max_abs_diff"]

# Dense bf16 tensor-core peak (FLOP/s) and HBM bandwidth (B/s) by GPU name, for the roofline.
_GPU_PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None,
                   help="float32 / float16 / bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--full", action="store_true",
                   help="every block size, density and shape (long on a CPU)")
    p.add_argument("--quick", action="store_true",
                   help="one case per layer kind, two densities (checks that the bench runs)")
    p.add_argument("--only", default=None,
                   help="comma-separated layer kinds to run: linear, transformer, conv")
    p.add_argument("--cpu-time", action="store_true",
                   help="CPU: one thread, timed by the thread's CPU time (time.thread_time): "
                        "the per-core ratio, robust to other load on a shared machine")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--tag", default=None, help="suffix of the results file name")


Case = tuple[str, tuple[int, int], int, int, tuple[float, ...], tuple[str, ...]]


def _cases(args: argparse.Namespace) -> Iterator[Case]:
    """(layer, dims, rows, block, densities, modes). dims: (n_in, n_out) or (C, side)."""
    full = args.full or args.device != "cpu"
    only = set(args.only.split(",")) if args.only else {"linear", "transformer", "conv"}
    both = ("fwd", "fwd+bwd")
    if args.quick:
        for kind, layer, dims, nrows, bs in QUICK:
            if kind in only:
                yield layer, dims, nrows, bs, QUICK_DENSITIES, both
        return
    if "linear" in only:
        for name, n_in, n_out, batch in LINEAR_FULL:
            main = (n_in, n_out, batch) == (4096, 4096, 256)
            for bs in BLOCKS if (full or main) else (32,):
                modes = both if (full or main) else ("fwd",)
                yield name, (n_in, n_out), batch, bs, DENSITIES, modes
    if "transformer" in only:
        # CPU default: one token count per width (the 4096-wide MLP is slow to time on a
        # small CPU already at 512 tokens); --full: all of 512 / 2048 / 8192.
        default = {768: 2048, 1024: 512, 4096: 512}
        for d in TRANSFORMER_D:
            for tokens in TRANSFORMER_TOKENS if full else (default[d],):
                for part, (n_in, n_out) in (("attn", (d, d)), ("mlp_up", (d, 4 * d)),
                                            ("mlp_down", (4 * d, d))):
                    dens = DENSITIES if full else (0.5, 0.1)
                    modes = both if (full or (d == 768 and part == "mlp_up")) else ("fwd",)
                    yield f"tf{d}.{part}", (n_in, n_out), tokens, 64 if full else 32, dens, modes
    if "conv" in only:
        for name, c, side, batch in CONV:
            for bs in BLOCKS if full else (32,):
                yield name, (c, side), batch, bs, DENSITIES if full else (0.5, 0.1), both


Timer = Callable[..., float]


def _timer(device: str, clock: str) -> Timer:
    """timer(fn, reps=10): median time of fn() in ms, bench.common.time_fn on `clock`."""

    def timer(fn: Callable[[], object], reps: int = 10) -> float:
        warmup = 2 if device == "cpu" else 3
        return time_fn(fn, device, warmup=warmup, reps=reps, clock=clock) * 1e3

    return timer


def _cpu_time(args: argparse.Namespace) -> bool:
    """--cpu-time applies on the CPU only."""
    return bool(getattr(args, "cpu_time", False)) and args.device == "cpu"


def _fwd_bwd(module: nn.Module, x: torch.Tensor):
    xg = x.detach().requires_grad_(True)
    g = None

    def run() -> None:
        nonlocal g
        y = module(xg)
        if g is None:
            g = torch.randn_like(y)
        y.backward(g)
        module.zero_grad(set_to_none=True)
        xg.grad = None

    return run


def _block_mask(weight: torch.Tensor, bs: int, density: float) -> torch.Tensor:
    """A random block mask with exactly density * blocks kept (random scores: speed only
    depends on the count and spread of blocks, not on which)."""
    r, c = weight.shape[0] // bs, weight.reshape(weight.shape[0], -1).shape[1] // bs
    return block_mask_from_scores(torch.rand(r, c), density)


def _roofline(flops: float, nbytes: float, ms: float) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in _GPU_PEAKS.items() if k in name), None)
    if peak is None:
        return None
    best_ms = max(flops / peak[0], nbytes / peak[1]) * 1e3
    return best_ms / ms


def _semi_structured(dense: nn.Linear, x: torch.Tensor, device: str,
                     timer: Timer) -> float | None:
    """2:4 semi-structured forward time (GPU, half precision) of a 50%-pruned copy."""
    if not device.startswith("cuda") or x.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from torch.sparse import to_sparse_semi_structured

        w = dense.weight.detach().clone()
        w.view(-1, 4)[:, 2:] = 0  # a valid 2:4 pattern
        ws = to_sparse_semi_structured(w)
        return timer(lambda: torch.nn.functional.linear(x, ws))
    except Exception:  # unsupported GPU / shape / torch build: no baseline
        return None


def _torch_bsr(weight2d: torch.Tensor, x: torch.Tensor, bs: int, timer: Timer) -> float | None:
    """torch.sparse BSR forward (y^T = W_bsr @ x^T), timed with few reps (it is slow on CPU)."""
    try:
        wb = weight2d.detach().to_sparse_bsr((bs, bs))
        xt = x.t().contiguous()
        wb @ xt
        return timer(lambda: wb @ xt, reps=3)
    except Exception:  # dtype/device combination torch does not implement
        return None


def rows(args: argparse.Namespace) -> list[dict]:
    device = args.device
    if _cpu_time(args):
        torch.set_num_threads(1)
    timer = _timer(device, "thread" if _cpu_time(args) else "wall")
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.float32 if device == "cpu" else torch.bfloat16)
    out: list[dict] = []
    dense_cache: dict[tuple, float] = {}
    for layer, dims, nrows, bs, densities, modes in _cases(args):
        torch.manual_seed(0)
        if layer == "conv":
            c, side = dims
            dense = nn.Conv2d(c, c, 3, padding=1).to(device, dtype)
            x = torch.randn(nrows, c, side, side, device=device, dtype=dtype)
            shape = f"{c}->{c} 3x3 @{side}x{side}"
            flops_full = 2 * nrows * side * side * c * c * 9
        else:
            n_in, n_out = dims
            dense = nn.Linear(n_in, n_out).to(device, dtype)
            x = torch.randn(nrows, n_in, device=device, dtype=dtype)
            shape = f"{n_in}->{n_out}"
            flops_full = 2 * nrows * n_in * n_out
        for density in densities:
            mask = _block_mask(dense.weight, bs, density)
            make = BlockSparseConv2d if layer == "conv" else BlockSparseLinear
            sparse = make.from_dense(dense, mask, block_size=bs)
            twin = sparse.to_dense()  # dense torch on the same (pruned) weights
            for mode in modes:
                key = (layer, dims, nrows, mode)
                if key not in dense_cache:
                    if mode == "fwd":
                        with torch.no_grad():
                            dense_cache[key] = timer(lambda twin=twin, x=x: twin(x))
                    else:
                        dense_cache[key] = timer(_fwd_bwd(twin, x))
                row = {"layer": layer, "shape": shape, "rows": nrows, "block": bs,
                       "density": density, "mode": mode, "dtype": str(dtype)[6:],
                       "device": device, "dense_ms": dense_cache[key]}
                if mode == "fwd":
                    with torch.no_grad():
                        row["bsr_ms"] = timer(lambda sparse=sparse, x=x: sparse(x))
                        y = sparse(x)
                        row["max_abs_diff"] = (y - twin(x)).abs().max().item()
                    if layer != "conv":
                        row["torch_bsr_ms"] = _torch_bsr(twin.weight, x, bs, timer)
                        if density == 0.5:
                            row["semi24_ms"] = _semi_structured(dense, x, device, timer)
                    nbytes = x.element_size() * (x.numel() + sparse.blocks.numel() + y.numel())
                    row["roofline"] = _roofline(flops_full * sparse.density, nbytes, row["bsr_ms"])
                else:
                    row["bsr_ms"] = timer(_fwd_bwd(sparse, x))
                row["speedup"] = speedup(row["dense_ms"], row["bsr_ms"])
                row["torch_bsr_x"] = speedup(row["dense_ms"], row.get("torch_bsr_ms"))
                out.append(row)
                print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    return out


def plot(result: list[dict], path: str) -> None:
    """Speedup over dense vs density: a panel per (layer family, mode), a line per shape and
    block size (log-scaled density axis: the interesting range is 0.05..0.5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    family = {r["layer"]: r["layer"].split(".")[0].rstrip("0123456789") or r["layer"]
              for r in result}
    panels = sorted({(family[r["layer"]], r["mode"]) for r in result})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (fam, mode) in zip(axes[0], panels):
        sel = [r for r in result if family[r["layer"]] == fam and r["mode"] == mode]
        for key in sorted({(r["layer"], r["shape"], r["block"]) for r in sel}):
            pts = sorted((r["density"], r["speedup"]) for r in sel
                         if (r["layer"], r["shape"], r["block"]) == key and r.get("speedup"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{key[0]} {key[1]} b{key[2]}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set(title=f"{fam} {mode}", xlabel="density (kept blocks)",
               ylabel="speedup vs dense torch")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    print(format_table([], COLUMNS))
    result = rows(args)
    print()
    print(format_table(result, COLUMNS))
    extra = {"clock": "thread CPU time, 1 thread" if _cpu_time(args) else "wall, median"}
    path = save_results("layers-bsr", result, extra=extra, tag=args.tag)
    print(f"\nwrote {path}")
    if result and not args.no_plot:
        png = path.replace(".json", ".png")
        plot(result, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":  # python -m bench.layers_bsr
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
