"""The one op surface: torch.library custom ops with fake (meta) kernels and pure-PyTorch
references, each dispatched among backends by sparsecore._dispatch (forced with
`use_backend(...)`; refusals list every backend's reasons).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sparsecore import _ext
from sparsecore._dispatch import (
    Backend,
    Dispatcher,
    forced_backend,
    tensor_reasons,
    triton_reasons,
)

# ---------------------------------------------------------------------------------------
# BSR: block-sparse x dense (dsd), block SDDMM, and Conv2d on the BSR matrix view
# ---------------------------------------------------------------------------------------
# Backends: "cpp" (csrc/cpu/bsr.cpp: every kept block as a register-blocked dense GEMM,
# OpenMP over block rows; conv reads its input in place; CPU float32/float64), "triton"
# (kernels/bsr.py: tl.dot per kept block; CUDA float32/float16/bfloat16, or CPU under
# TRITON_INTERPRET=1 when forced; conv through an im2col matrix), "reference" (dense torch
# on the densified weight: the fallback and the oracle of every test).
_BSR_CPP_DTYPES = (torch.float32, torch.float64)
_BSR_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BSR_TRITON_MAX_BLOCK = 128


def _bsr_cpp_reasons(*tensors: Tensor) -> list[str]:
    why = [] if _ext.has_cpu_ext() else [f"C++ extension not loaded ({_ext.cpu_ext_error()})"]
    return why + tensor_reasons(tensors, devices=("cpu",), dtypes=_BSR_CPP_DTYPES)


def _bsr_triton_reasons(tensors: Sequence[Tensor], block: Sequence[int]) -> list[str]:
    why = triton_reasons(tensors, _BSR_TRITON_DTYPES)
    if max(block) > _BSR_TRITON_MAX_BLOCK:
        why.append(f"block {block[0]}x{block[1]} above {_BSR_TRITON_MAX_BLOCK}")
    return why


def _always(*_: object) -> list[str]:
    return []


def _allow_tf32() -> bool:
    return torch.backends.cuda.matmul.allow_tf32


def _bsr_rows(row_ptr: Tensor) -> Tensor:
    """Block row of every block (int64) from row_ptr."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=row_ptr.device), counts)


def _bsr_logical_blocks(blocks: Tensor, block_idx: Tensor | None, trans_blocks: bool) -> Tensor:
    """The (nnzb, bs_r, bs_c) blocks in row order: blocks[block_idx], transposed if asked."""
    w = blocks if block_idx is None else blocks.index_select(0, block_idx.long())
    return w.transpose(1, 2) if trans_blocks else w


def _im2col_rows(x: Tensor, kernel: list[int], stride: list[int], padding: list[int],
                dilation: list[int]) -> Tensor:
    """im2col rows (B*Ho*Wo, C*kh*kw) of x (B, C, H, W), (b, oy, ox) x (c, i, j) order."""
    cols = torch.nn.functional.unfold(x, kernel, dilation, padding, stride)  # (B, CK, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _col2im_rows(dcols: Tensor, x_shape: list[int], kernel: list[int], stride: list[int],
                padding: list[int], dilation: list[int]) -> Tensor:
    """The adjoint of _im2col_rows: (B, C, H, W) from (B*Ho*Wo, C*kh*kw)."""
    d = dcols.view(x_shape[0], -1, dcols.shape[1]).transpose(1, 2)
    return torch.nn.functional.fold(d, x_shape[2:], kernel, dilation, padding, stride)


# ---- bsr_dsd
def _bsr_dsd_reference(x: Tensor, blocks: Tensor, col_idx: Tensor, row_ptr: Tensor,
                       block_idx: Tensor | None, trans_blocks: bool, n_out: int) -> Tensor:
    w = _bsr_logical_blocks(blocks, block_idx, trans_blocks)
    bs_r, bs_c = w.shape[1], w.shape[2]
    dense = w.new_zeros(n_out // bs_r, x.shape[1] // bs_c, bs_r, bs_c)
    dense[_bsr_rows(row_ptr), col_idx.long()] = w
    return x @ dense.transpose(1, 2).reshape(n_out, x.shape[1]).t()


def _bsr_dsd_triton(x: Tensor, blocks: Tensor, col_idx: Tensor, row_ptr: Tensor,
                    block_idx: Tensor | None, trans_blocks: bool, n_out: int) -> Tensor:
    from sparsecore.kernels.bsr import bsr_dsd as launch

    # The launcher reads blocks through their strides, so the transpose is a view; only the
    # reordering for W^T is a gather (on a GPU, a small fraction of the product).
    w = _bsr_logical_blocks(blocks, block_idx, trans_blocks)
    return launch(x, w, col_idx, row_ptr, n_out, allow_tf32=_allow_tf32())


_bsr_dsd_dispatch = Dispatcher(
    "bsr_dsd",
    [
        Backend("cpp", lambda x, blocks, *_: _bsr_cpp_reasons(x, blocks),
                lambda *a: torch.ops.sparsecore._bsr_dsd_cpu(*a)),
        Backend("triton", lambda x, blocks, *_: _bsr_triton_reasons([x, blocks], blocks.shape[1:]),
                _bsr_dsd_triton),
        Backend("reference", _always, _bsr_dsd_reference),
    ],
)


@torch.library.custom_op("sparsecore::bsr_dsd", mutates_args=())
def bsr_dsd(
    x: Tensor,
    blocks: Tensor,
    col_idx: Tensor,
    row_ptr: Tensor,
    block_idx: Tensor | None,
    trans_blocks: bool,
    n_out: int,
) -> Tensor:
    """Y = X W^T, (B, n_out), for x (B, K) and the BSR W (n_out, K).

    Block row r of W keeps blocks p in [row_ptr[r], row_ptr[r+1]) (int32) at block column
    col_idx[p] (int32); block p is blocks[block_idx[p]] (or blocks[p] when block_idx is
    None), transposed when trans_blocks. With W's own arrays this is the forward; with the
    transpose's (t_col_idx, t_row_ptr, t_perm, trans_blocks=True, n_out=n_in) it is the input
    gradient dX = dY W, reading the same blocks.
    """
    return _bsr_dsd_dispatch(x, blocks, col_idx, row_ptr, block_idx, trans_blocks, n_out)


@bsr_dsd.register_fake
def _(x: Tensor, blocks: Tensor, col_idx: Tensor, row_ptr: Tensor, block_idx: Tensor | None,
      trans_blocks: bool, n_out: int) -> Tensor:
    return x.new_empty(x.shape[0], n_out)


# ---- bsr_sddmm
def _bsr_sddmm_reference(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor,
                         block_row: Tensor, bs_r: int, bs_c: int) -> Tensor:
    n, k = dy.shape[1], x.shape[1]
    full = (dy.t() @ x).view(n // bs_r, bs_r, k // bs_c, bs_c).transpose(1, 2)
    return full[block_row.long(), col_idx.long()].contiguous()


def _bsr_sddmm_triton(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor,
                      block_row: Tensor, bs_r: int, bs_c: int) -> Tensor:
    from sparsecore.kernels.bsr import bsr_sddmm as launch

    return launch(dy, x, block_row, col_idx, bs_r, bs_c, allow_tf32=_allow_tf32())


_bsr_sddmm_dispatch = Dispatcher(
    "bsr_sddmm",
    [
        Backend("cpp", lambda dy, x, *_: _bsr_cpp_reasons(dy, x),
                lambda dy, x, row_ptr, col_idx, block_row, bs_r, bs_c:
                torch.ops.sparsecore._bsr_sddmm_cpu(dy, x, row_ptr, col_idx, bs_r, bs_c)),
        Backend("triton", lambda dy, x, *a: _bsr_triton_reasons([dy, x], a[-2:]),
                _bsr_sddmm_triton),
        Backend("reference", _always, _bsr_sddmm_reference),
    ],
)


@torch.library.custom_op("sparsecore::bsr_sddmm", mutates_args=())
def bsr_sddmm(
    dy: Tensor,
    x: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    block_row: Tensor,
    bs_r: int,
    bs_c: int,
) -> Tensor:
    """Gradient of the kept blocks, (nnzb, bs_r, bs_c): out[p] = dY[:, rows of p]^T X[:, cols
    of p] for dy (B, N), x (B, K); row_ptr / col_idx / block_row as in BSRWeight."""
    return _bsr_sddmm_dispatch(dy, x, row_ptr, col_idx, block_row, bs_r, bs_c)


@bsr_sddmm.register_fake
def _(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, block_row: Tensor, bs_r: int,
      bs_c: int) -> Tensor:
    return dy.new_empty(col_idx.shape[0], bs_r, bs_c)


# ---- bsr_conv2d (forward), bsr_conv2d_dx, bsr_conv2d_dw (its gradients)
def _bsr_conv2d_im2col(dsd: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The conv forward as im2col(x) times W^T through a dsd backend."""

    def run(x: Tensor, blocks: Tensor, col_idx: Tensor, row_ptr: Tensor, kernel: list[int],
            stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
        cols = _im2col_rows(x, kernel, stride, padding, dilation)
        n_out = (row_ptr.numel() - 1) * blocks.shape[1]
        return dsd(cols, blocks, col_idx, row_ptr, None, False, n_out)

    return run


def _bsr_conv2d_dx_col2im(dsd: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The conv input gradient as col2im(dY W) through a dsd backend."""

    def run(dy2: Tensor, blocks: Tensor, t_col_idx: Tensor, t_row_ptr: Tensor, t_perm: Tensor,
            x_shape: list[int], kernel: list[int], stride: list[int], padding: list[int],
            dilation: list[int]) -> Tensor:
        k = x_shape[1] * kernel[0] * kernel[1]
        dcols = dsd(dy2, blocks, t_col_idx, t_row_ptr, t_perm, True, k)
        return _col2im_rows(dcols, x_shape, kernel, stride, padding, dilation)

    return run


def _bsr_conv2d_dw_im2col(sddmm: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The conv block gradient as a block SDDMM with im2col(x), through an sddmm backend."""

    def run(dy2: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, block_row: Tensor,
            bs_r: int, bs_c: int, kernel: list[int], stride: list[int], padding: list[int],
            dilation: list[int]) -> Tensor:
        cols = _im2col_rows(x, kernel, stride, padding, dilation)
        return sddmm(dy2, cols, row_ptr, col_idx, block_row, bs_r, bs_c)

    return run


_bsr_conv2d_dispatch = Dispatcher(
    "bsr_conv2d",
    [
        Backend("cpp", lambda x, blocks, *_: _bsr_cpp_reasons(x, blocks),
                lambda *a: torch.ops.sparsecore._bsr_conv2d_cpu(*a)),
        Backend("triton", lambda x, blocks, *_: _bsr_triton_reasons([x, blocks], blocks.shape[1:]),
                _bsr_conv2d_im2col(_bsr_dsd_triton)),
        Backend("reference", _always, _bsr_conv2d_im2col(_bsr_dsd_reference)),
    ],
)
_bsr_conv2d_dx_dispatch = Dispatcher(
    "bsr_conv2d_dx",
    [
        Backend("cpp", lambda dy2, blocks, *_: _bsr_cpp_reasons(dy2, blocks),
                lambda *a: torch.ops.sparsecore._bsr_conv2d_dx_cpu(*a)),
        Backend("triton",
                lambda dy2, blocks, *_: _bsr_triton_reasons([dy2, blocks], blocks.shape[1:]),
                _bsr_conv2d_dx_col2im(_bsr_dsd_triton)),
        Backend("reference", _always, _bsr_conv2d_dx_col2im(_bsr_dsd_reference)),
    ],
)
_bsr_conv2d_dw_dispatch = Dispatcher(
    "bsr_conv2d_dw",
    [
        Backend("cpp", lambda dy2, x, *_: _bsr_cpp_reasons(dy2, x),
                lambda dy2, x, row_ptr, col_idx, block_row, *a:
                torch.ops.sparsecore._bsr_conv2d_dw_cpu(dy2, x, row_ptr, col_idx, *a)),
        Backend("triton", lambda dy2, x, *a: _bsr_triton_reasons([dy2, x], a[3:5]),
                _bsr_conv2d_dw_im2col(_bsr_sddmm_triton)),
        Backend("reference", _always, _bsr_conv2d_dw_im2col(_bsr_sddmm_reference)),
    ],
)


def _conv_out(x_shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
              padding: Sequence[int], dilation: Sequence[int]) -> int:
    """B * Ho * Wo of a conv over x_shape (B, C, H, W)."""
    ho, wo = (
        (x_shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    )
    return x_shape[0] * ho * wo


@torch.library.custom_op("sparsecore::bsr_conv2d", mutates_args=())
def bsr_conv2d(
    x: Tensor,
    blocks: Tensor,
    col_idx: Tensor,
    row_ptr: Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """conv2d(x, W) as (B*Ho*Wo, C_out) rows in (b, oy, ox) order, for x (B, C, H, W) and W's
    matrix view (C_out, C*kh*kw) in BSR (blocks, col_idx, row_ptr). The C++ backend reads x
    in place (indirect convolution: no im2col matrix); the others multiply im2col(x)."""
    geom = [list(v) for v in (kernel, stride, padding, dilation)]
    return _bsr_conv2d_dispatch(x, blocks, col_idx, row_ptr, *geom)


@bsr_conv2d.register_fake
def _(x: Tensor, blocks: Tensor, col_idx: Tensor, row_ptr: Tensor, kernel: Sequence[int],
      stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    rows = _conv_out(x.shape, kernel, stride, padding, dilation)
    return x.new_empty(rows, (row_ptr.shape[0] - 1) * blocks.shape[1])


@torch.library.custom_op("sparsecore::bsr_conv2d_dx", mutates_args=())
def bsr_conv2d_dx(
    dy2: Tensor,
    blocks: Tensor,
    t_col_idx: Tensor,
    t_row_ptr: Tensor,
    t_perm: Tensor,
    x_shape: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """Input gradient (B, C, H, W) of bsr_conv2d from dy2 (B*Ho*Wo, C_out), through W's
    transposed structure (t_col_idx, t_row_ptr, t_perm). The C++ backend adds each tile of
    dY W straight into the input gradient (no im2col-sized buffer)."""
    geom = [list(v) for v in (x_shape, kernel, stride, padding, dilation)]
    return _bsr_conv2d_dx_dispatch(dy2, blocks, t_col_idx, t_row_ptr, t_perm, *geom)


@bsr_conv2d_dx.register_fake
def _(dy2: Tensor, blocks: Tensor, t_col_idx: Tensor, t_row_ptr: Tensor, t_perm: Tensor,
      x_shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
      padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    return dy2.new_empty(list(x_shape))


@torch.library.custom_op("sparsecore::bsr_conv2d_dw", mutates_args=())
def bsr_conv2d_dw(
    dy2: Tensor,
    x: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    block_row: Tensor,
    bs_r: int,
    bs_c: int,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """Gradient (nnzb, bs_r, bs_c) of the kept blocks of bsr_conv2d's weight, from dy2
    (B*Ho*Wo, C_out) and x (B, C, H, W). The C++ backend gathers x in place."""
    geom = [list(v) for v in (kernel, stride, padding, dilation)]
    return _bsr_conv2d_dw_dispatch(dy2, x, row_ptr, col_idx, block_row, bs_r, bs_c, *geom)


@bsr_conv2d_dw.register_fake
def _(dy2: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, block_row: Tensor, bs_r: int,
      bs_c: int, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
      dilation: Sequence[int]) -> Tensor:
    return dy2.new_empty(col_idx.shape[0], bs_r, bs_c)


# ---------------------------------------------------------------------------------------
# CSR: unstructured sparse x dense (dsd), SDDMM, and Conv2d on the CSR matrix view
# ---------------------------------------------------------------------------------------
# Backends: "dense" (dense torch on the weight densified in C++, chosen on the CPU below the
# measured crossover sparsity, where MKL's dense product beats the sparse kernel), "cpp"
# (csrc/cpu/csr.cpp: tile-major CSR walk over feature-major packed operands, OpenMP;
# conv as im2col + the same walk, sample by sample; CPU float32/float64), "triton"
# (kernels/csr.py; CUDA float32/float16/bfloat16, or CPU under TRITON_INTERPRET=1 when
# forced; conv through an im2col matrix), "reference" (dense torch on the densified weight:
# the fallback and the oracle of every test).
#
# `tiling` arguments are the C++ kernels' tile-major layouts (CSRWeight.cpu_tilings());
# None makes the C++ backend build one per call, and the other backends ignore them.
_CSR_CPP_DTYPES = (torch.float32, torch.float64)
_CSR_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Dense crossover on the CPU: the sparse kernels run from this sparsity up (below it the
# "dense" backend runs the reference, i.e. MKL/oneDNN on the densified weight). Measured
# with `python -m bench layers` on an AMD EPYC (Zen 3, 2 cores), float32, fwd and fwd+bwd:
# see the bench's crossover note; the product reaches parity with dense around these
# sparsities (a batch below 8 runs the gather kernel, which beats dense GEMV from ~30%).
CSR_DENSE_BELOW = {"linear": 0.6, "linear_small_batch": 0.3, "conv": 0.6}


def csr_conv_crossover(weight_shape: Sequence[int], out_pixels: int) -> float:
    """The sparsity from which the CSR Conv2d kernels beat dense on the CPU, by shape.

    Few output pixels per sample (deep layers of CIFAR nets) or a short reduction (few input
    channels) leave the kernel too little reuse per gathered weight. Measured on the 2-core
    Zen 3, batch 64, 3x3, float32, fwd and fwd+bwd vs torch (oneDNN), with the kernel forced:
    2x2 outputs lose at every sparsity up to 95% (0.5x there); 4x4 (256/512 channels) reach
    parity between 80% and 90% (1.1-1.2x at 90%); 16 or 32 input channels at 16x16 / 32x32
    between 80% and 90%; 64 channels at 8x8 between 70% and 80%; 64 channels from 16x16 and
    128+ channels from 8x8 at or below 60% (CSR_DENSE_BELOW["conv"]).
    """
    reduction = math.prod(weight_shape[1:])
    if out_pixels < 16:
        return 1.0  # never chosen automatically (use_backend("cpp") still forces it)
    if out_pixels < 64 or reduction < 576:
        return 0.9
    if out_pixels * reduction < 64 * 1152:
        return 0.8
    return CSR_DENSE_BELOW["conv"]


def _csr_cpp_reasons(*tensors: Tensor) -> list[str]:
    why = [] if _ext.has_cpu_ext() else [f"C++ extension not loaded ({_ext.cpu_ext_error()})"]
    return why + tensor_reasons(tensors, devices=("cpu",), dtypes=_CSR_CPP_DTYPES)


def _csr_dense_reasons(kind: str, tensor: Tensor, nnz: int, n_rows: int, n_cols: int,
                       crossover: float | None = None) -> list[str]:
    """Why the dense fallback is not chosen: no C++ helpers for these tensors, or sparse
    enough for the kernels (that part is waived when forced with use_backend("dense"))."""
    why = _csr_cpp_reasons(tensor)
    if why or forced_backend() == "dense":
        return why
    total = n_rows * n_cols
    sparsity = 1.0 - nnz / total if total else 1.0
    crossover = CSR_DENSE_BELOW[kind] if crossover is None else crossover
    if sparsity >= crossover:
        return [f"sparsity {sparsity:.2f} is at or above the {kind} crossover "
                f"{crossover:.2f} (the sparse kernels win there)"]
    return []


def _csr_rows(row_ptr: Tensor, nnz: int) -> Tensor:
    """Row (int64) of every nonzero from row_ptr."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    return torch.repeat_interleave(
        torch.arange(counts.numel(), device=row_ptr.device), counts, output_size=nnz
    )


def _csr_dense(values: Tensor, col_idx: Tensor, row_ptr: Tensor, n_cols: int) -> Tensor:
    """The dense (n_rows, n_cols) matrix of a CSR."""
    rows = _csr_rows(row_ptr, values.numel())
    out = values.new_zeros(row_ptr.numel() - 1, n_cols)
    return out.index_put_((rows, col_idx.long()), values)


def _check_same(op: str, a: Tensor, b: Tensor, what: str) -> None:
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"sparsecore.{op}: {what} are {a.dtype} on {a.device} and {b.dtype} on "
                         f"{b.device}; they must match")


def _densify(values: Tensor, col_idx: Tensor, row_ptr: Tensor, n_cols: int) -> Tensor:
    return torch.ops.sparsecore._csr_to_dense_cpu(values.contiguous(), col_idx, row_ptr, n_cols)


def csr_runs_dense(op: str, *args: object) -> Tensor | None:
    """The dense weight matrix (n_rows, n_cols) when `op`'s dispatcher ("csr_dsd" or
    "csr_conv2d", with that op's arguments) picks the dense fallback, else None. The layers
    ask once per forward and reuse the matrix for the input gradient, instead of densifying
    W and W^T op by op."""
    dispatch = _csr_dsd_dispatch if op == "csr_dsd" else _csr_conv2d_dispatch
    if dispatch.select(*args).name != "dense":
        return None
    x, values, col_idx = args[:3]
    row_ptr = args[3]
    n_cols = x.shape[1] if op == "csr_dsd" else math.prod(args[5][1:])
    return _densify(values, col_idx, row_ptr, n_cols)


def _sample(full: Tensor, row_ptr: Tensor, col_idx: Tensor) -> Tensor:
    return torch.ops.sparsecore._csr_sample_cpu(full, row_ptr, col_idx)


# ---- csr_dsd
def _csr_dsd_dense(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor,
                   row_order: Tensor, tiling: Tensor | None, n_out: int,
                   tiled_values: Tensor | None = None) -> Tensor:
    return torch.ops.sparsecore._csr_dsd_dense_cpu(x, values.contiguous(), col_idx, row_ptr, n_out)


def _csr_dsd_reference(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor,
                       row_order: Tensor, tiling: Tensor | None, n_out: int,
                       tiled_values: Tensor | None = None) -> Tensor:
    return x @ _csr_dense(values, col_idx, row_ptr, x.shape[1]).t()


def _csr_dsd_triton(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor,
                    row_order: Tensor, tiling: Tensor | None, n_out: int,
                    tiled_values: Tensor | None = None) -> Tensor:
    from sparsecore.kernels.csr import spmm

    return spmm(x, values, col_idx, row_ptr, n_out, row_order)


def _csr_dsd_dense_reasons(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor,
                           *_: object) -> list[str]:
    kind = "linear" if x.shape[0] >= 8 else "linear_small_batch"
    return _csr_dense_reasons(kind, x, values.numel(), row_ptr.numel() - 1, x.shape[1])


_csr_dsd_dispatch = Dispatcher(
    "csr_dsd",
    [
        Backend("dense", _csr_dsd_dense_reasons, _csr_dsd_dense),
        Backend("cpp", lambda x, values, *_: _csr_cpp_reasons(x, values),
                lambda x, values, col_idx, row_ptr, row_order, *a:
                torch.ops.sparsecore._csr_dsd_cpu(x, values.contiguous(), col_idx, row_ptr, *a)),
        Backend("triton", lambda x, values, *_: triton_reasons([x, values], _CSR_TRITON_DTYPES),
                _csr_dsd_triton),
        Backend("reference", _always, _csr_dsd_reference),
    ],
)


def _check_dsd(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor, row_order: Tensor,
               n_out: int, tiled_values: Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"sparsecore.csr_dsd: x must be 2-D (B, K), got shape {tuple(x.shape)}")
    _check_same("csr_dsd", x, values, "x and values")
    if col_idx.shape != values.shape or row_ptr.shape != (n_out + 1,) or \
            row_order.shape != (n_out,):
        raise ValueError(
            f"sparsecore.csr_dsd: expected col_idx {tuple(values.shape)}, row_ptr ({n_out + 1},) "
            f"and row_order ({n_out},); got {tuple(col_idx.shape)}, {tuple(row_ptr.shape)}, "
            f"{tuple(row_order.shape)}"
        )
    if tiled_values is not None and tiled_values.shape != values.shape:
        raise ValueError(f"sparsecore.csr_dsd: tiled_values must have the shape of values, "
                         f"{tuple(values.shape)}; got {tuple(tiled_values.shape)}")


@torch.library.custom_op("sparsecore::csr_dsd", mutates_args=())
def csr_dsd(
    x: Tensor,
    values: Tensor,
    col_idx: Tensor,
    row_ptr: Tensor,
    row_order: Tensor,
    tiling: Tensor | None,
    n_out: int,
    tiled_values: Tensor | None = None,
) -> Tensor:
    """Y = X W^T, (B, n_out), for x (B, K) (any strides) and W (n_out, K) in CSR (values,
    col_idx, row_ptr, row_order as in CSRWeight; tiling from CSRWeight.cpu_tilings() or None).
    With the transpose's arrays (values[t_perm], t_col_idx, t_row_ptr, t_row_order, t_tiling,
    n_out=K) it is the input gradient dX = dY W. tiled_values: values already in the tiling's
    order (csr_tile_values), which the C++ backend then uses as they are (callers that keep
    values unchanged across calls, such as inference, lay them out once)."""
    _check_dsd(x, values, col_idx, row_ptr, row_order, n_out, tiled_values)
    return _csr_dsd_dispatch(x, values, col_idx, row_ptr, row_order, tiling, n_out, tiled_values)


@csr_dsd.register_fake
def _(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor, row_order: Tensor,
      tiling: Tensor | None, n_out: int, tiled_values: Tensor | None = None) -> Tensor:
    _check_dsd(x, values, col_idx, row_ptr, row_order, n_out, tiled_values)
    return x.new_empty(x.shape[0], n_out)


def csr_tile_values(values: Tensor, col_idx: Tensor, row_ptr: Tensor, tiling: Tensor,
                    n_cols: int) -> Tensor:
    """values (CSR order) laid out in the order of a C++ tiling (CSRWeight.cpu_tilings()), for
    csr_dsd's tiled_values."""
    return torch.ops.sparsecore._csr_tile_values_cpu(values.contiguous(), col_idx, row_ptr,
                                                    tiling, n_cols)


# ---- csr_sddmm
def _csr_sddmm_dense(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor,
                     row_idx: Tensor, row_order: Tensor, tiling: Tensor | None) -> Tensor:
    return _sample(dy.t() @ x, row_ptr, col_idx)


def _csr_sddmm_reference(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor,
                         row_idx: Tensor, row_order: Tensor, tiling: Tensor | None) -> Tensor:
    return (dy.t() @ x)[row_idx.long(), col_idx.long()]


def _csr_sddmm_triton(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor,
                      row_idx: Tensor, row_order: Tensor, tiling: Tensor | None) -> Tensor:
    from sparsecore.kernels.csr import sddmm

    return sddmm(dy, x, row_idx, col_idx)


def _csr_sddmm_dense_reasons(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor,
                             *_: object) -> list[str]:
    kind = "linear" if x.shape[0] >= 8 else "linear_small_batch"
    return _csr_dense_reasons(kind, x, col_idx.numel(), dy.shape[1], x.shape[1])


_csr_sddmm_dispatch = Dispatcher(
    "csr_sddmm",
    [
        Backend("dense", _csr_sddmm_dense_reasons, _csr_sddmm_dense),
        Backend("cpp", lambda dy, x, *_: _csr_cpp_reasons(dy, x),
                lambda dy, x, row_ptr, col_idx, row_idx, row_order, tiling:
                torch.ops.sparsecore._csr_sddmm_cpu(dy, x, row_ptr, col_idx, tiling)),
        Backend("triton", lambda dy, x, *_: triton_reasons([dy, x], _CSR_TRITON_DTYPES),
                _csr_sddmm_triton),
        Backend("reference", _always, _csr_sddmm_reference),
    ],
)


def _check_sddmm(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, row_idx: Tensor,
                 row_order: Tensor) -> None:
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"sparsecore.csr_sddmm: dy (B, N) and x (B, K) must be 2-D with one B, "
                         f"got {tuple(dy.shape)} and {tuple(x.shape)}")
    _check_same("csr_sddmm", dy, x, "dy and x")
    n = dy.shape[1]
    if row_ptr.shape != (n + 1,) or row_idx.shape != col_idx.shape or row_order.shape != (n,):
        raise ValueError(
            f"sparsecore.csr_sddmm: expected row_ptr ({n + 1},), row_idx like col_idx "
            f"{tuple(col_idx.shape)} and row_order ({n},); got {tuple(row_ptr.shape)}, "
            f"{tuple(row_idx.shape)}, {tuple(row_order.shape)}"
        )


@torch.library.custom_op("sparsecore::csr_sddmm", mutates_args=())
def csr_sddmm(
    dy: Tensor,
    x: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    row_idx: Tensor,
    row_order: Tensor,
    tiling: Tensor | None,
) -> Tensor:
    """Gradient of W's values, (nnz,): out[k] = sum_b dy[b, row_idx[k]] * x[b, col_idx[k]] for
    dy (B, N), x (B, K); the CSR arrays as in CSRWeight."""
    _check_sddmm(dy, x, row_ptr, col_idx, row_idx, row_order)
    return _csr_sddmm_dispatch(dy, x, row_ptr, col_idx, row_idx, row_order, tiling)


@csr_sddmm.register_fake
def _(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, row_idx: Tensor,
      row_order: Tensor, tiling: Tensor | None) -> Tensor:
    _check_sddmm(dy, x, row_ptr, col_idx, row_idx, row_order)
    return dy.new_empty(col_idx.shape[0])


# ---- csr_conv2d (forward), csr_conv2d_dx, csr_conv2d_dw (its gradients)
# The C++ backend runs im2col + the CSR walk per sample, with the sample's output pixels as
# the vector dimension (chosen by measurement against direct convolution: see
# csrc/cpu/csr.cpp); the others go through an im2col matrix of the whole batch.
def _conv_geom(weight_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int]) -> list[list[int]]:
    return [list(weight_shape[2:]), list(stride), list(padding), list(dilation)]


def _conv_hw(hw: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
             padding: Sequence[int], dilation: Sequence[int]) -> list[int]:
    return [(hw[i] + 2 * padding[i] - dilation[i] * (weight_shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)]


def _conv2d_dense(densify: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The conv forward on the weight densified by `densify`."""

    def run(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor, tiling: Tensor | None,
            weight_shape: list[int], stride: list[int], padding: list[int],
            dilation: list[int]) -> Tensor:
        w = densify(values, col_idx, row_ptr, math.prod(weight_shape[1:])).view(weight_shape)
        return torch.nn.functional.conv2d(x, w, None, stride, padding, dilation)

    return run


def _conv2d_dx_dense(densify: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The conv input gradient on the weight densified (from its transpose) by `densify`."""

    def run(dy: Tensor, t_values: Tensor, t_col_idx: Tensor, t_row_ptr: Tensor,
            t_tiling: Tensor | None, weight_shape: list[int], input_hw: list[int],
            stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
        w = densify(t_values, t_col_idx, t_row_ptr, weight_shape[0]).t().reshape(weight_shape)
        x_shape = [dy.shape[0], weight_shape[1], *input_hw]
        return torch.nn.grad.conv2d_input(x_shape, w, dy, stride, padding, dilation)

    return run


def _csr_conv2d_triton(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor,
                       tiling: Tensor | None, weight_shape: list[int], stride: list[int],
                       padding: list[int], dilation: list[int]) -> Tensor:
    from sparsecore.kernels.csr import spmm

    kernel, *_ = _conv_geom(weight_shape, stride, padding, dilation)
    cols = _im2col_rows(x, kernel, stride, padding, dilation)
    ho, wo = _conv_hw(x.shape[2:], weight_shape, stride, padding, dilation)
    y2 = spmm(cols, values, col_idx, row_ptr, weight_shape[0])
    return y2.view(x.shape[0], ho, wo, weight_shape[0]).permute(0, 3, 1, 2).contiguous()


def _csr_conv2d_dx_triton(dy: Tensor, t_values: Tensor, t_col_idx: Tensor, t_row_ptr: Tensor,
                          t_tiling: Tensor | None, weight_shape: list[int], input_hw: list[int],
                          stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    from sparsecore.kernels.csr import spmm

    kernel, *_ = _conv_geom(weight_shape, stride, padding, dilation)
    dy2 = dy.permute(0, 2, 3, 1).reshape(-1, weight_shape[0])
    dcols = spmm(dy2, t_values, t_col_idx, t_row_ptr, t_row_ptr.numel() - 1)
    x_shape = [dy.shape[0], weight_shape[1], *input_hw]
    return _col2im_rows(dcols, x_shape, kernel, stride, padding, dilation)


def _csr_conv2d_dw_reference(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor,
                             row_idx: Tensor, tiling: Tensor | None, weight_shape: list[int],
                             stride: list[int], padding: list[int],
                             dilation: list[int]) -> Tensor:
    dw = torch.nn.grad.conv2d_weight(x, weight_shape, dy, stride, padding, dilation)
    return dw.reshape(weight_shape[0], -1)[row_idx.long(), col_idx.long()]


def _csr_conv2d_dw_dense(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor,
                         row_idx: Tensor, tiling: Tensor | None, weight_shape: list[int],
                         stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    dw = torch.nn.grad.conv2d_weight(x, weight_shape, dy, stride, padding, dilation)
    return _sample(dw.view(weight_shape[0], -1), row_ptr, col_idx)


def _csr_conv2d_dw_triton(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor,
                          row_idx: Tensor, tiling: Tensor | None, weight_shape: list[int],
                          stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    from sparsecore.kernels.csr import sddmm

    kernel, *_ = _conv_geom(weight_shape, stride, padding, dilation)
    cols = _im2col_rows(x, kernel, stride, padding, dilation)
    dy2 = dy.permute(0, 2, 3, 1).reshape(-1, weight_shape[0])
    return sddmm(dy2, cols, row_idx, col_idx)


def _conv_dense_reasons(t: Tensor, nnz: int, weight_shape: Sequence[int],
                        out_hw: Sequence[int]) -> list[str]:
    return _csr_dense_reasons("conv", t, nnz, weight_shape[0], math.prod(weight_shape[1:]),
                              csr_conv_crossover(weight_shape, out_hw[0] * out_hw[1]))


_csr_conv2d_dispatch = Dispatcher(
    "csr_conv2d",
    [
        Backend("dense", lambda x, values, col_idx, row_ptr, tiling, ws, st, pad, dil, *_:
                _conv_dense_reasons(x, values.numel(), ws,
                                    _conv_hw(x.shape[-2:], ws, st, pad, dil)),
                _conv2d_dense(_densify)),
        Backend("cpp", lambda x, values, *_: _csr_cpp_reasons(x, values),
                lambda x, values, *a: torch.ops.sparsecore._csr_conv2d_cpu(x, values.contiguous(),
                                                                          *a)),
        Backend("triton", lambda x, values, *_: triton_reasons([x, values], _CSR_TRITON_DTYPES),
                _csr_conv2d_triton),
        Backend("reference", _always, _conv2d_dense(_csr_dense)),
    ],
)
_csr_conv2d_dx_dispatch = Dispatcher(
    "csr_conv2d_dx",
    [
        Backend("dense", lambda dy, t_values, t_col_idx, t_row_ptr, t_tiling, ws, *_:
                _conv_dense_reasons(dy, t_values.numel(), ws, dy.shape[-2:]),
                _conv2d_dx_dense(_densify)),
        Backend("cpp", lambda dy, t_values, *_: _csr_cpp_reasons(dy, t_values),
                lambda dy, t_values, *a:
                torch.ops.sparsecore._csr_conv2d_dx_cpu(dy, t_values.contiguous(), *a)),
        Backend("triton",
                lambda dy, t_values, *_: triton_reasons([dy, t_values], _CSR_TRITON_DTYPES),
                _csr_conv2d_dx_triton),
        Backend("reference", _always, _conv2d_dx_dense(_csr_dense)),
    ],
)
_csr_conv2d_dw_dispatch = Dispatcher(
    "csr_conv2d_dw",
    [
        Backend("dense", lambda dy, x, row_ptr, col_idx, row_idx, tiling, ws, *_:
                _conv_dense_reasons(x, col_idx.numel(), ws, dy.shape[-2:]), _csr_conv2d_dw_dense),
        Backend("cpp", lambda dy, x, *_: _csr_cpp_reasons(dy, x),
                lambda dy, x, row_ptr, col_idx, row_idx, *a:
                torch.ops.sparsecore._csr_conv2d_dw_cpu(dy, x, row_ptr, col_idx, *a)),
        Backend("triton", lambda dy, x, *_: triton_reasons([dy, x], _CSR_TRITON_DTYPES),
                _csr_conv2d_dw_triton),
        Backend("reference", _always, _csr_conv2d_dw_reference),
    ],
)


def _check_conv(op: str, t: Tensor, values_or_x: Tensor, weight_shape: Sequence[int],
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> None:
    if t.dim() != 4:
        raise ValueError(f"sparsecore.{op}: expected a 4-D (N, C, H, W) tensor, "
                         f"got shape {tuple(t.shape)}")
    _check_same(op, t, values_or_x, "the operands")
    if len(weight_shape) != 4 or not (len(stride) == len(padding) == len(dilation) == 2):
        raise ValueError(f"sparsecore.{op}: weight_shape must have 4 entries and stride, padding, "
                         "dilation 2 each")


@torch.library.custom_op("sparsecore::csr_conv2d", mutates_args=())
def csr_conv2d(
    x: Tensor,
    values: Tensor,
    col_idx: Tensor,
    row_ptr: Tensor,
    tiling: Tensor | None,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """conv2d(x, W) (groups=1, zero padding) for x (N, C, H, W) and the weight of shape
    weight_shape (C_out, C, kh, kw) whose matrix view (C_out, C*kh*kw) is in CSR. Returns
    (N, C_out, Ho, Wo), contiguous."""
    _check_conv("csr_conv2d", x, values, weight_shape, stride, padding, dilation)
    return _csr_conv2d_dispatch(x, values, col_idx, row_ptr, tiling, list(weight_shape),
                                list(stride), list(padding), list(dilation))


@csr_conv2d.register_fake
def _(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor, tiling: Tensor | None,
      weight_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
      dilation: Sequence[int]) -> Tensor:
    _check_conv("csr_conv2d", x, values, weight_shape, stride, padding, dilation)
    ho, wo = _conv_hw(x.shape[2:], weight_shape, stride, padding, dilation)
    return x.new_empty(x.shape[0], weight_shape[0], ho, wo)


@torch.library.custom_op("sparsecore::csr_conv2d_dx", mutates_args=())
def csr_conv2d_dx(
    dy: Tensor,
    t_values: Tensor,
    t_col_idx: Tensor,
    t_row_ptr: Tensor,
    t_tiling: Tensor | None,
    weight_shape: Sequence[int],
    input_hw: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """Input gradient (N, C, H, W) of csr_conv2d from dy (N, C_out, Ho, Wo), through the
    transposed CSR of the weight's matrix view (t_values = values[t_perm], t_col_idx,
    t_row_ptr, t_tiling)."""
    _check_conv("csr_conv2d_dx", dy, t_values, weight_shape, stride, padding, dilation)
    return _csr_conv2d_dx_dispatch(dy, t_values, t_col_idx, t_row_ptr, t_tiling,
                                   list(weight_shape), list(input_hw), list(stride),
                                   list(padding), list(dilation))


@csr_conv2d_dx.register_fake
def _(dy: Tensor, t_values: Tensor, t_col_idx: Tensor, t_row_ptr: Tensor,
      t_tiling: Tensor | None, weight_shape: Sequence[int], input_hw: Sequence[int],
      stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    _check_conv("csr_conv2d_dx", dy, t_values, weight_shape, stride, padding, dilation)
    return dy.new_empty(dy.shape[0], weight_shape[1], *input_hw)


@torch.library.custom_op("sparsecore::csr_conv2d_dw", mutates_args=())
def csr_conv2d_dw(
    dy: Tensor,
    x: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    row_idx: Tensor,
    tiling: Tensor | None,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """Gradient (nnz,) of the kept weights of csr_conv2d, from dy (N, C_out, Ho, Wo) and x."""
    _check_conv("csr_conv2d_dw", dy, x, weight_shape, stride, padding, dilation)
    return _csr_conv2d_dw_dispatch(dy, x, row_ptr, col_idx, row_idx, tiling, list(weight_shape),
                                   list(stride), list(padding), list(dilation))


@csr_conv2d_dw.register_fake
def _(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, row_idx: Tensor,
      tiling: Tensor | None, weight_shape: Sequence[int], stride: Sequence[int],
      padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    _check_conv("csr_conv2d_dw", dy, x, weight_shape, stride, padding, dilation)
    return dy.new_empty(col_idx.shape[0])
