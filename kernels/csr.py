"""Triton kernels for the unstructured (CSR) sparse layers: SpMM (Y = X W^T) and SDDMM.

Tiling (SpMM). One program owns BLOCK_N output rows (of W, i.e. output features) and a
BLOCK_B tile of the batch. It walks those rows' nonzeros BLOCK_J at a time: each step loads
a (BLOCK_N, BLOCK_J) tile of values and column indices (contiguous per row, so coalesced),
gathers the matching (BLOCK_N, BLOCK_J, BLOCK_B) entries of X, and reduces over J into a
float32 (BLOCK_N, BLOCK_B) accumulator. Why this shape: at the sizes that matter on a GPU
(batch 1..64, 90 % sparsity) the product is memory-bound on the sparse weight, so the
tile is chosen to read every value and index exactly once from DRAM (the batch tiles of one
row block are neighbouring program ids, so their re-reads hit L2) and to keep enough
nonzeros in flight per program; B = 1 is a BLOCK_B = 1 tile, not a padded one. A config
with BLOCK_N = 1 is the classic "one row per program" CSR-vector kernel; the autotuner
chooses. An optional row order (rows sorted by length) groups rows of similar length in
one program, so its J loop wastes little on pruned layers whose row lengths vary.

Bandwidth limit to keep in mind: per nonzero the kernel reads 2 bytes of value (fp16) and
4 of int32 column index, against 2 bytes per dense weight for cuBLAS, so at 90 % sparsity
the ceiling is 2 / (0.1 * 6) = 3.3x; int16 column indices (accepted when K <= 32768) raise
it to 5x. At batch >= 16 the X gathers, not the weight, dominate and dense tensor cores are
hard to beat with an unstructured layout.

SDDMM: one program per BLOCK_NZ nonzeros, looping over the batch BLOCK_B at a time with a
float32 (BLOCK_NZ, BLOCK_B) accumulator reduced once at the end.

The configs below are reasoned starting points, tested for correctness under
TRITON_INTERPRET=1 and compiled ahead of time for sm_90 (all of them compile with triton
3.9); GPU timings: see bench/RESULTS.md (layers).

The transposed product (dX = dY W, the input gradient) is `spmm` on the transposed CSR of W
(values permuted, col_idx/row_ptr of W^T, n_out = K): no separate kernel.
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
# SpMM: BLOCK_B is fixed by the launcher from the batch size; these pick the row block and
# the nonzero chunk. Configs whose gather tile BLOCK_N * BLOCK_J * BLOCK_B would exceed
# _SPMM_TILE_BUDGET elements (register pressure) are pruned before tuning.
_SPMM_CONFIGS = [
    triton.Config({"BLOCK_N": 1, "BLOCK_J": 256}, num_warps=4),
    triton.Config({"BLOCK_N": 1, "BLOCK_J": 64}, num_warps=2),
    triton.Config({"BLOCK_N": 4, "BLOCK_J": 128}, num_warps=4),
    triton.Config({"BLOCK_N": 16, "BLOCK_J": 32}, num_warps=4),
    triton.Config({"BLOCK_N": 4, "BLOCK_J": 16}, num_warps=4),
    triton.Config({"BLOCK_N": 1, "BLOCK_J": 16}, num_warps=2),
]
_SPMM_TILE_BUDGET = 8192
_SPMM_MAX_BLOCK_B = 16
_SDDMM_CONFIGS = [
    triton.Config({"BLOCK_NZ": 128, "BLOCK_B": 16}, num_warps=4),
    triton.Config({"BLOCK_NZ": 64, "BLOCK_B": 64}, num_warps=4),
    triton.Config({"BLOCK_NZ": 256, "BLOCK_B": 1}, num_warps=4),
    triton.Config({"BLOCK_NZ": 32, "BLOCK_B": 128}, num_warps=8),
]
# Under TRITON_INTERPRET=1 one config runs (see _launch.launch); tiles that are large for
# the small test shapes keep the number of interpreted programs low.
_SPMM_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_J": 32})
_SDDMM_INTERPRETER_CONFIG = triton.Config({"BLOCK_NZ": 256, "BLOCK_B": 16})
# X is handed to the kernels batch-contiguous ((K, B) in memory) from this batch size on:
# a BLOCK_B run of one column is then one 32-byte sector instead of BLOCK_B sectors.
# Reasoned from sector sizes, not measured.
_BATCH_CONTIGUOUS_FROM = 16


def _prune_spmm(
    configs: list[triton.Config], named_args: dict, **kwargs: Any
) -> list[triton.Config]:
    block_b = {**named_args, **kwargs}["BLOCK_B"]
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_J"] * block_b <= _SPMM_TILE_BUDGET
    ]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_J"])]


def _prune_sddmm(
    configs: list[triton.Config], named_args: dict, **kwargs: Any
) -> list[triton.Config]:
    # A batch chunk far larger than the batch only pads; keep the configs that fit it.
    bucket = {**named_args, **kwargs}["batch_bucket"]
    kept = [c for c in configs if c.kwargs["BLOCK_B"] <= bucket]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_B"])]


# ---------------------------------------------------------------- kernels
@triton.jit
def _spmm_kernel(
    x_ptr, val_ptr, col_ptr, rowptr_ptr, order_ptr, y_ptr,
    n_batch, n_rows,
    stride_xb, stride_xk, stride_yb, stride_yn,
    row_len_bucket,  # autotune key only
    HAS_ORDER: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_btiles = tl.cdiv(n_batch, BLOCK_B)
    # batch tiles of one row block are adjacent program ids: their weight re-reads hit L2
    pid_n = pid // n_btiles
    pid_b = pid % n_btiles

    slot = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = slot < n_rows
    if HAS_ORDER:
        rows = tl.load(order_ptr + slot, mask=row_ok, other=0)
    else:
        rows = slot
    start = tl.load(rowptr_ptr + rows, mask=row_ok, other=0)
    length = tl.load(rowptr_ptr + rows + 1, mask=row_ok, other=0) - start

    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < n_batch

    acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    for j0 in range(0, tl.max(length, axis=0), BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        nz_ok = j[None, :] < length[:, None]
        idx = start[:, None] + j[None, :]
        v = tl.load(val_ptr + idx, mask=nz_ok, other=0.0).to(tl.float32)
        c = tl.load(col_ptr + idx, mask=nz_ok, other=0).to(tl.int32)
        x_ptrs = x_ptr + c[:, :, None] * stride_xk + b[None, None, :] * stride_xb
        xv = tl.load(x_ptrs, mask=nz_ok[:, :, None] & b_ok[None, None, :], other=0.0)
        acc += tl.sum(v[:, :, None] * xv.to(tl.float32), axis=1)

    y_ptrs = y_ptr + rows[:, None] * stride_yn + b[None, :] * stride_yb
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & b_ok[None, :])


@triton.jit
def _sddmm_kernel(
    dy_ptr, x_ptr, row_ptr, col_ptr, out_ptr,
    nnz, n_batch,
    stride_dyb, stride_dyn, stride_xb, stride_xk,
    batch_bucket,  # autotune key only
    BLOCK_NZ: tl.constexpr,
    BLOCK_B: tl.constexpr,
):  # fmt: skip
    k = tl.program_id(0) * BLOCK_NZ + tl.arange(0, BLOCK_NZ)
    k_ok = k < nnz
    r = tl.load(row_ptr + k, mask=k_ok, other=0)
    c = tl.load(col_ptr + k, mask=k_ok, other=0)

    acc = tl.zeros((BLOCK_NZ, BLOCK_B), dtype=tl.float32)
    for b0 in range(0, n_batch, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        m = k_ok[:, None] & (b < n_batch)[None, :]
        g = tl.load(dy_ptr + r[:, None] * stride_dyn + b[None, :] * stride_dyb, mask=m, other=0.0)
        xv = tl.load(x_ptr + c[:, None] * stride_xk + b[None, :] * stride_xb, mask=m, other=0.0)
        acc += g.to(tl.float32) * xv.to(tl.float32)

    tl.store(out_ptr + k, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=k_ok)


_spmm_tuned = triton.autotune(
    configs=_SPMM_CONFIGS,
    key=["n_rows", "row_len_bucket", "BLOCK_B"],
    prune_configs_by={"early_config_prune": _prune_spmm},
)(_spmm_kernel)
_sddmm_tuned = triton.autotune(
    configs=_SDDMM_CONFIGS,
    key=["nnz", "batch_bucket"],
    prune_configs_by={"early_config_prune": _prune_sddmm},
)(_sddmm_kernel)


# ---------------------------------------------------------------- launchers
def _batch_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` (B, C) with the batch as the unit-stride dim, for coalesced per-column gathers
    once the batch is large enough that a column run fills a sector."""
    if t.shape[0] >= _BATCH_CONTIGUOUS_FROM and t.stride(0) != 1:
        return t.t().contiguous().t()
    return t


def spmm(
    x: torch.Tensor,
    values: torch.Tensor,
    col_idx: torch.Tensor,
    row_ptr: torch.Tensor,
    n_out: int,
    row_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y = X W^T for W (n_out, K) in CSR. Returns Y (B, n_out) in x.dtype.

    x: (B, K), any strides; values: (nnz,) same dtype as x (float32/float16/bfloat16);
    col_idx: int32 (nnz,) (int16 also accepted when K <= 32768: fewer bytes per nonzero);
    row_ptr: int32 (n_out + 1,); row_order: optional int32 (n_out,) permutation of the rows
    (e.g. sorted by length, for load balance); the result does not depend on it.
    Accumulates in float32. Column indices are trusted to lie in [0, K) and row_ptr to be
    monotone with row_ptr[-1] == nnz (the format validates them; checking here would need a
    device sync).

    Transposed product: dX = dY W is spmm(dY, values[perm], col_idx_T, row_ptr_T, n_out=K)
    with the CSR of W^T.
    """
    check_float("x", x, 2)
    check_float("values", values, 1)
    dtype = same_dtype(_spmm_kernel, x=x, values=values)
    n_out = int(n_out)
    if n_out < 0:
        raise ValueError(f"n_out must be >= 0, got {n_out}")
    nnz = values.numel()
    batch, k = x.shape
    col_idx = check_index("col_idx", col_idx, nnz, dtypes=(torch.int32, torch.int16))
    if col_idx.dtype == torch.int16 and k > 2**15:
        raise ValueError(f"int16 col_idx needs K <= 32768, got K = {k}; use int32")
    row_ptr = check_index("row_ptr", row_ptr, n_out + 1)
    tensors = {"x": x, "values": values, "col_idx": col_idx, "row_ptr": row_ptr}
    if row_order is not None:
        row_order = check_index("row_order", row_order, n_out)
        tensors["row_order"] = row_order
    device = check_device(_spmm_kernel, **tensors)

    y = torch.empty(batch, n_out, dtype=dtype, device=device)
    check_span("the output", y)
    if batch == 0 or n_out == 0:
        return y
    if nnz == 0 or k == 0:
        return y.zero_()
    x = _batch_contiguous(x)
    block_b = min(next_pow2(batch), _SPMM_MAX_BLOCK_B)
    order = row_order if row_order is not None else row_ptr  # any valid pointer when unused
    args = (
        x, values.contiguous(), col_idx, row_ptr, order, y,
        batch, n_out,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        next_pow2(triton.cdiv(nnz, n_out)),
    )  # fmt: skip
    meta = {"HAS_ORDER": row_order is not None, "BLOCK_B": block_b}

    def grid(m: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(n_out, m["BLOCK_N"]) * triton.cdiv(batch, block_b),)

    launch(_spmm_tuned, _spmm_kernel, grid, args, meta, _SPMM_INTERPRETER_CONFIG, device)
    return y


def sddmm(
    dy: torch.Tensor, x: torch.Tensor, row_idx: torch.Tensor, col_idx: torch.Tensor
) -> torch.Tensor:
    """Sampled dense-dense product at the kept positions: out[k] = sum_b dy[b, row[k]] x[b, col[k]].

    dy: (B, N), x: (B, K), same dtype (float32/float16/bfloat16), any strides;
    row_idx, col_idx: int32 (nnz,), trusted to lie in [0, N) and [0, K).
    Returns (nnz,) in dy.dtype, accumulated in float32. This is the gradient of the CSR
    values of W when Y = X W^T (dy = dL/dY).
    """
    check_float("dy", dy, 2)
    check_float("x", x, 2)
    dtype = same_dtype(_sddmm_kernel, dy=dy, x=x)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(
            f"dy and x must share the batch size, got {tuple(dy.shape)} and {tuple(x.shape)}"
        )
    row_idx = check_index("row_idx", row_idx)
    nnz = row_idx.numel()
    col_idx = check_index("col_idx", col_idx, nnz)
    device = check_device(_sddmm_kernel, dy=dy, x=x, row_idx=row_idx, col_idx=col_idx)

    batch = dy.shape[0]
    out = torch.empty(nnz, dtype=dtype, device=device)
    check_span("the output", out)
    if nnz == 0:
        return out
    if batch == 0:
        return out.zero_()
    dy, x = _batch_contiguous(dy), _batch_contiguous(x)
    args = (
        dy, x, row_idx, col_idx, out,
        nnz, batch,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        next_pow2(batch),
    )  # fmt: skip

    def grid(m: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(nnz, m["BLOCK_NZ"]),)

    launch(_sddmm_tuned, _sddmm_kernel, grid, args, {}, _SDDMM_INTERPRETER_CONFIG, device)
    return out
