"""Triton kernels for the block-sparse (BSR) layers: Y = X W^T (`bsr_dsd`) and the gradient
of the kept blocks (`bsr_sddmm`), both on `tl.dot` (tensor cores for float16/bfloat16;
float32 uses IEEE precision unless the caller opts into TF32 with allow_tf32=True).

Tiling (bsr_dsd). One program owns one block row of W (bs_r output features) and a
BLOCK_B tile of the batch; it walks that block row's kept blocks, and for each one
multiplies the (BLOCK_B, bs_c) slice of X by the (bs_c, bs_r) transposed block into a
float32 (BLOCK_B, bs_r) accumulator. Why: every kept block is exactly one dense tensor-core
product with no index work inside it, the accumulator never leaves registers, and the only
irregularity (how many blocks a row keeps) is a loop bound. Program ids run over block rows
fastest, so the programs resident at once share one X batch tile, which stays in L2.

bsr_sddmm: one program per kept block, looping over the batch BLOCK_B at a time:
out[k] += dY[b, rows(k)]^T @ X[b, cols(k)] as a (bs_r, BLOCK_B) x (BLOCK_B, bs_c) dot.

Block shapes. tl.dot needs every dimension >= 16 and tile sizes must be powers of two, so
each block dimension is padded inside the kernel to max(16, next power of two) with masked
loads (zeros) and masked stores. 16/32/64/128 blocks run unpadded; a rectangular block
such as (16, 1) or (1, 16), or 8x8, is correct but wastes tensor-core work in proportion
to the padding. Block dimensions above 128 are refused (a 256-wide float32 tile does not
fit in registers/shared memory with a useful batch tile).

Input gradient: dX = dY W is `bsr_dsd` on the BSR of W^T, whose blocks are W's blocks
transposed and reordered by block column: bsr_dsd(dy, blocks[perm].transpose(1, 2),
col_idx_T, row_ptr_T, n_out=K). `blocks` may have any strides, so the transpose is a view.

The configs below are reasoned starting points, tested for correctness under
TRITON_INTERPRET=1 and compiled ahead of time for sm_90 (see below); GPU timings: see
bench/RESULTS.md (layers-bsr).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._launch import (
    check_device,
    check_float,
    check_index,
    check_span,
    launch,
    next_pow2,
    same_dtype,
)

# ---------------------------------------------------------------- autotune configs
# BLOCK_B: batch rows per program (dsd) or batch chunk per loop step (sddmm). Configs with a
# BLOCK_B beyond the batch's next power of two are pruned (they would only pad). Compiled
# ahead of time for sm_90 (triton 3.9), every config compiles for blocks 1..128 and all
# three dtypes; only float32 with 128-wide blocks and BLOCK_B >= 128 needs more than the
# 227 KB of shared memory (the autotuner skips those), so the 16-row, 2-stage config is the
# fallback there. 16-bit loads are cp.async-pipelined when K and the block width are
# multiples of 16 (the JIT marks integer arguments divisible by 16); blocks one element
# wide are gathered without it.
_DSD_CONFIGS = [
    triton.Config({"BLOCK_B": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_B": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_B": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_B": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_B": 256}, num_warps=8, num_stages=2),
]
_SDDMM_CONFIGS = [
    triton.Config({"BLOCK_B": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_B": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_B": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_B": 128}, num_warps=8, num_stages=3),
]
# Under TRITON_INTERPRET=1 one config runs (see _launch.launch).
_INTERPRETER_CONFIG = triton.Config({"BLOCK_B": 16})
MAX_BLOCK_DIM = 128
_MIN_DOT = 16  # tl.dot's smallest M, N and K


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list[triton.Config]:
    bucket = {**named_args, **kwargs}["batch_bucket"]
    kept = [c for c in configs if c.kwargs["BLOCK_B"] <= max(bucket, _MIN_DOT)]
    return kept or configs[:1]


# ---------------------------------------------------------------- kernels
@triton.jit
def _bsr_dsd_kernel(
    x_ptr, blk_ptr, col_ptr, rowptr_ptr, y_ptr,
    n_batch, n_brows,
    stride_xb, stride_xk, stride_bn, stride_br, stride_bc, stride_yb, stride_yn,
    batch_bucket,  # autotune key only
    BS_R: tl.constexpr, BS_C: tl.constexpr,
    PAD_R: tl.constexpr, PAD_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_b = pid // n_brows
    pid_r = pid % n_brows

    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < n_batch
    r = tl.arange(0, PAD_R)
    r_ok = r < BS_R
    c = tl.arange(0, PAD_C)
    c_ok = c < BS_C

    start = tl.load(rowptr_ptr + pid_r)
    end = tl.load(rowptr_ptr + pid_r + 1)
    acc = tl.zeros((BLOCK_B, PAD_R), dtype=tl.float32)
    for k in range(start, end):
        bcol = tl.load(col_ptr + k)
        xt = tl.load(
            x_ptr + b[:, None] * stride_xb + (bcol * BS_C + c)[None, :] * stride_xk,
            mask=b_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        # the block read transposed, (PAD_C, PAD_R), so that acc += X_tile @ W_k^T
        wt = tl.load(
            blk_ptr + k * stride_bn + c[:, None] * stride_bc + r[None, :] * stride_br,
            mask=c_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION)

    y_ptrs = y_ptr + b[:, None] * stride_yb + (pid_r * BS_R + r)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=b_ok[:, None] & r_ok[None, :])


@triton.jit
def _bsr_sddmm_kernel(
    dy_ptr, x_ptr, brow_ptr, col_ptr, out_ptr,
    n_batch,
    stride_dyb, stride_dyn, stride_xb, stride_xk,
    batch_bucket,  # autotune key only
    BS_R: tl.constexpr, BS_C: tl.constexpr,
    PAD_R: tl.constexpr, PAD_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
):  # fmt: skip
    k = tl.program_id(0)
    brow = tl.load(brow_ptr + k)
    bcol = tl.load(col_ptr + k)
    r = tl.arange(0, PAD_R)
    r_ok = r < BS_R
    c = tl.arange(0, PAD_C)
    c_ok = c < BS_C
    rows = brow * BS_R + r
    cols = bcol * BS_C + c

    acc = tl.zeros((PAD_R, PAD_C), dtype=tl.float32)
    for b0 in range(0, n_batch, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_ok = b < n_batch
        gt = tl.load(
            dy_ptr + rows[:, None] * stride_dyn + b[None, :] * stride_dyb,
            mask=r_ok[:, None] & b_ok[None, :],
            other=0.0,
        )
        xv = tl.load(
            x_ptr + b[:, None] * stride_xb + cols[None, :] * stride_xk,
            mask=b_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(gt, xv, acc, input_precision=INPUT_PRECISION)

    out_ptrs = out_ptr + k * (BS_R * BS_C) + r[:, None] * BS_C + c[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])


_bsr_dsd_tuned = triton.autotune(
    configs=_DSD_CONFIGS,
    key=["n_brows", "batch_bucket", "BS_R", "BS_C"],
    prune_configs_by={"early_config_prune": _prune},
)(_bsr_dsd_kernel)
_bsr_sddmm_tuned = triton.autotune(
    configs=_SDDMM_CONFIGS,
    key=["batch_bucket", "BS_R", "BS_C"],
    prune_configs_by={"early_config_prune": _prune},
)(_bsr_sddmm_kernel)


# ---------------------------------------------------------------- launchers
def _block_meta(bs_r: int, bs_c: int, dtype: torch.dtype, allow_tf32: bool) -> dict:
    """Constexprs shared by both kernels: block dims, their padded tile sizes, dot precision."""
    for name, d in (("bs_r", bs_r), ("bs_c", bs_c)):
        if not 1 <= d <= MAX_BLOCK_DIM:
            raise ValueError(f"block dimension {name} must be in 1..{MAX_BLOCK_DIM}, got {d}")
    if dtype == torch.float32:
        precision = "tf32" if allow_tf32 else "ieee"
    else:
        precision = None  # half types: the tensor-core path, nothing to choose
    return {
        "BS_R": bs_r,
        "BS_C": bs_c,
        "PAD_R": max(_MIN_DOT, next_pow2(bs_r)),
        "PAD_C": max(_MIN_DOT, next_pow2(bs_c)),
        "INPUT_PRECISION": precision,
    }


def bsr_dsd(
    x: torch.Tensor,
    blocks: torch.Tensor,
    col_idx: torch.Tensor,
    row_ptr: torch.Tensor,
    n_out: int,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """Y = X W^T for W (n_out, K) in BSR with blocks (bs_r, bs_c). Returns (B, n_out) in x.dtype.

    x: (B, K), any strides; blocks: (nnzb, bs_r, bs_c), same dtype as x, any strides (so a
    transposed view works); col_idx: int32 (nnzb,), block column of each block;
    row_ptr: int32 (n_out / bs_r + 1,). Needs n_out % bs_r == 0 and K % bs_c == 0; block
    dims 1..128 (below 16 or not a power of two they are zero-padded inside the kernel).
    Accumulates in float32; allow_tf32 lets float32 inputs use TF32 tensor cores.
    col_idx is trusted to lie in [0, K / bs_c) and row_ptr to be monotone with
    row_ptr[-1] == nnzb (the format validates them).

    Input gradient: dX = dY W = bsr_dsd(dY, blocks[perm].transpose(1, 2), col_idx_T,
    row_ptr_T, n_out=K) with the BSR of W^T.
    """
    check_float("x", x, 2)
    check_float("blocks", blocks, 3)
    dtype = same_dtype(_bsr_dsd_kernel, x=x, blocks=blocks)
    nnzb, bs_r, bs_c = blocks.shape
    meta = _block_meta(bs_r, bs_c, dtype, allow_tf32)
    batch, k = x.shape
    n_out = int(n_out)
    if n_out < 0 or n_out % bs_r:
        raise ValueError(
            f"n_out ({n_out}) must be a non-negative multiple of the block rows bs_r={bs_r}"
        )
    if k % bs_c:
        raise ValueError(f"x has K={k} columns, not a multiple of the block columns bs_c={bs_c}")
    n_brows = n_out // bs_r
    col_idx = check_index("col_idx", col_idx, nnzb)
    row_ptr = check_index("row_ptr", row_ptr, n_brows + 1)
    device = check_device(_bsr_dsd_kernel, x=x, blocks=blocks, col_idx=col_idx, row_ptr=row_ptr)

    y = torch.empty(batch, n_out, dtype=dtype, device=device)
    check_span("the output", y)
    if batch == 0 or n_out == 0:
        return y
    if nnzb == 0 or k == 0:
        return y.zero_()
    args = (
        x, blocks, col_idx, row_ptr, y,
        batch, n_brows,
        x.stride(0), x.stride(1),
        blocks.stride(0), blocks.stride(1), blocks.stride(2),
        y.stride(0), y.stride(1),
        next_pow2(batch),
    )  # fmt: skip

    def grid(m: dict[str, Any]) -> tuple[int]:
        return (n_brows * triton.cdiv(batch, m["BLOCK_B"]),)

    launch(_bsr_dsd_tuned, _bsr_dsd_kernel, grid, args, meta, _INTERPRETER_CONFIG, device)
    return y


def bsr_sddmm(
    dy: torch.Tensor,
    x: torch.Tensor,
    blocks_row: torch.Tensor,
    col_idx: torch.Tensor,
    bs_r: int,
    bs_c: int,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """Gradient of the kept blocks: out[k] = dY[:, rows of block k]^T @ X[:, cols of block k].

    dy: (B, N), x: (B, K), same dtype, any strides; blocks_row, col_idx: int32 (nnzb,),
    block row and block column of each kept block (trusted to be in range);
    N % bs_r == 0, K % bs_c == 0, block dims 1..128. Returns (nnzb, bs_r, bs_c) contiguous,
    in dy.dtype, accumulated in float32; allow_tf32 as in bsr_dsd.
    """
    check_float("dy", dy, 2)
    check_float("x", x, 2)
    dtype = same_dtype(_bsr_sddmm_kernel, dy=dy, x=x)
    bs_r, bs_c = int(bs_r), int(bs_c)
    meta = _block_meta(bs_r, bs_c, dtype, allow_tf32)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(
            f"dy and x must share the batch size, got {tuple(dy.shape)} and {tuple(x.shape)}"
        )
    batch, n = dy.shape
    k = x.shape[1]
    if n % bs_r:
        raise ValueError(f"dy has N={n} columns, not a multiple of the block rows bs_r={bs_r}")
    if k % bs_c:
        raise ValueError(f"x has K={k} columns, not a multiple of the block columns bs_c={bs_c}")
    blocks_row = check_index("blocks_row", blocks_row)
    nnzb = blocks_row.numel()
    col_idx = check_index("col_idx", col_idx, nnzb)
    device = check_device(_bsr_sddmm_kernel, dy=dy, x=x, blocks_row=blocks_row, col_idx=col_idx)

    out = torch.empty(nnzb, bs_r, bs_c, dtype=dtype, device=device)
    check_span("the output", out)
    if nnzb == 0:
        return out
    if batch == 0:
        return out.zero_()
    args = (
        dy, x, blocks_row, col_idx, out,
        batch,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        next_pow2(batch),
    )  # fmt: skip

    def grid(m: dict[str, Any]) -> tuple[int]:
        return (nnzb,)

    launch(_bsr_sddmm_tuned, _bsr_sddmm_kernel, grid, args, meta, _INTERPRETER_CONFIG, device)
    return out
