"""BSR ops: block-sparse x dense (dsd), block SDDMM, and Conv2d on the BSR matrix view.

Backends: "cpp" (csrc/cpu/bsr.cpp: every kept block as a register-blocked dense GEMM, OpenMP
over block rows; conv reads its input in place; CPU float32/float64), "triton"
(kernels/bsr.py: tl.dot per kept block; CUDA float32/float16/bfloat16, or CPU under
TRITON_INTERPRET=1 when forced; conv through an im2col matrix), "reference" (dense torch on
the densified weight: the fallback and the oracle of every test).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsecore._dispatch import Backend, Dispatcher, cpp_reasons, triton_reasons
from sparsecore.ops._common import (
    TRITON_DTYPES,
    allow_tf32,
    always,
    col2im_rows,
    conv_out_hw,
    im2col_rows,
    rows_of,
)

__all__ = ["bsr_dsd", "bsr_sddmm", "bsr_conv2d", "bsr_conv2d_dx", "bsr_conv2d_dw"]

_TRITON_MAX_BLOCK = 128


def _triton_reasons(tensors: Sequence[Tensor], block: Sequence[int]) -> list[str]:
    why = triton_reasons(tensors, TRITON_DTYPES)
    if max(block) > _TRITON_MAX_BLOCK:
        why.append(f"block {block[0]}x{block[1]} above {_TRITON_MAX_BLOCK}")
    return why


def _logical_blocks(blocks: Tensor, block_idx: Tensor | None, trans_blocks: bool) -> Tensor:
    """The (nnzb, bs_r, bs_c) blocks in row order: blocks[block_idx], transposed if asked."""
    w = blocks if block_idx is None else blocks.index_select(0, block_idx.long())
    return w.transpose(1, 2) if trans_blocks else w


# ---- bsr_dsd
@dataclass(frozen=True)
class _DsdArgs:
    """The arguments of one bsr_dsd call (see bsr_dsd)."""

    x: Tensor
    blocks: Tensor
    col_idx: Tensor
    row_ptr: Tensor
    block_idx: Tensor | None
    trans_blocks: bool
    n_out: int


def _dsd_reference(a: _DsdArgs) -> Tensor:
    w = _logical_blocks(a.blocks, a.block_idx, a.trans_blocks)
    bs_r, bs_c = w.shape[1], w.shape[2]
    k = a.x.shape[1]
    dense = w.new_zeros(a.n_out // bs_r, k // bs_c, bs_r, bs_c)
    dense[rows_of(a.row_ptr), a.col_idx.long()] = w
    return a.x @ dense.transpose(1, 2).reshape(a.n_out, k).t()


def _dsd_triton(a: _DsdArgs) -> Tensor:
    from sparsecore.kernels.bsr import bsr_dsd as launch

    # The launcher reads blocks through their strides, so the transpose is a view; only the
    # reordering for W^T is a gather (on a GPU, a small fraction of the product).
    w = _logical_blocks(a.blocks, a.block_idx, a.trans_blocks)
    return launch(a.x, w, a.col_idx, a.row_ptr, a.n_out, allow_tf32=allow_tf32())


def _dsd_cpp(a: _DsdArgs) -> Tensor:
    return torch.ops.sparsecore._bsr_dsd_cpu(a.x, a.blocks, a.col_idx, a.row_ptr, a.block_idx,
                                             a.trans_blocks, a.n_out)


_bsr_dsd_dispatch = Dispatcher(
    "bsr_dsd",
    _DsdArgs,
    [
        Backend("cpp", lambda a: cpp_reasons([a.x, a.blocks]), _dsd_cpp),
        Backend("triton", lambda a: _triton_reasons([a.x, a.blocks], a.blocks.shape[1:]),
                _dsd_triton),
        Backend("reference", always, _dsd_reference),
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
@dataclass(frozen=True)
class _SddmmArgs:
    """The arguments of one bsr_sddmm call (see bsr_sddmm)."""

    dy: Tensor
    x: Tensor
    row_ptr: Tensor
    col_idx: Tensor
    block_row: Tensor
    bs_r: int
    bs_c: int


def _sddmm_reference(a: _SddmmArgs) -> Tensor:
    n, k = a.dy.shape[1], a.x.shape[1]
    full = (a.dy.t() @ a.x).view(n // a.bs_r, a.bs_r, k // a.bs_c, a.bs_c).transpose(1, 2)
    return full[a.block_row.long(), a.col_idx.long()].contiguous()


def _sddmm_triton(a: _SddmmArgs) -> Tensor:
    from sparsecore.kernels.bsr import bsr_sddmm as launch

    return launch(a.dy, a.x, a.block_row, a.col_idx, a.bs_r, a.bs_c, allow_tf32=allow_tf32())


def _sddmm_cpp(a: _SddmmArgs) -> Tensor:
    return torch.ops.sparsecore._bsr_sddmm_cpu(a.dy, a.x, a.row_ptr, a.col_idx, a.bs_r, a.bs_c)


_bsr_sddmm_dispatch = Dispatcher(
    "bsr_sddmm",
    _SddmmArgs,
    [
        Backend("cpp", lambda a: cpp_reasons([a.dy, a.x]), _sddmm_cpp),
        Backend("triton", lambda a: _triton_reasons([a.dy, a.x], (a.bs_r, a.bs_c)),
                _sddmm_triton),
        Backend("reference", always, _sddmm_reference),
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
# The C++ backend reads x in place (indirect convolution); the others go through an im2col
# matrix and the dsd / sddmm backend of the same name.
@dataclass(frozen=True)
class _ConvArgs:
    """The arguments of one bsr_conv2d call (see bsr_conv2d); geometry as lists."""

    x: Tensor
    blocks: Tensor
    col_idx: Tensor
    row_ptr: Tensor
    kernel: list[int]
    stride: list[int]
    padding: list[int]
    dilation: list[int]


@dataclass(frozen=True)
class _ConvDxArgs:
    """The arguments of one bsr_conv2d_dx call (see bsr_conv2d_dx); geometry as lists."""

    dy2: Tensor
    blocks: Tensor
    t_col_idx: Tensor
    t_row_ptr: Tensor
    t_perm: Tensor
    x_shape: list[int]
    kernel: list[int]
    stride: list[int]
    padding: list[int]
    dilation: list[int]


@dataclass(frozen=True)
class _ConvDwArgs:
    """The arguments of one bsr_conv2d_dw call (see bsr_conv2d_dw); geometry as lists."""

    dy2: Tensor
    x: Tensor
    row_ptr: Tensor
    col_idx: Tensor
    block_row: Tensor
    bs_r: int
    bs_c: int
    kernel: list[int]
    stride: list[int]
    padding: list[int]
    dilation: list[int]


def _conv_im2col(dsd: Callable[[_DsdArgs], Tensor]) -> Callable[[_ConvArgs], Tensor]:
    """The conv forward as im2col(x) times W^T through a dsd backend."""

    def run(a: _ConvArgs) -> Tensor:
        cols = im2col_rows(a.x, a.kernel, a.stride, a.padding, a.dilation)
        n_out = (a.row_ptr.numel() - 1) * a.blocks.shape[1]
        return dsd(_DsdArgs(x=cols, blocks=a.blocks, col_idx=a.col_idx, row_ptr=a.row_ptr,
                            block_idx=None, trans_blocks=False, n_out=n_out))

    return run


def _conv_dx_col2im(dsd: Callable[[_DsdArgs], Tensor]) -> Callable[[_ConvDxArgs], Tensor]:
    """The conv input gradient as col2im(dY W) through a dsd backend."""

    def run(a: _ConvDxArgs) -> Tensor:
        k = a.x_shape[1] * a.kernel[0] * a.kernel[1]
        dcols = dsd(_DsdArgs(x=a.dy2, blocks=a.blocks, col_idx=a.t_col_idx,
                             row_ptr=a.t_row_ptr, block_idx=a.t_perm, trans_blocks=True,
                             n_out=k))
        return col2im_rows(dcols, a.x_shape, a.kernel, a.stride, a.padding, a.dilation)

    return run


def _conv_dw_im2col(sddmm: Callable[[_SddmmArgs], Tensor]) -> Callable[[_ConvDwArgs], Tensor]:
    """The conv block gradient as a block SDDMM with im2col(x), through an sddmm backend."""

    def run(a: _ConvDwArgs) -> Tensor:
        cols = im2col_rows(a.x, a.kernel, a.stride, a.padding, a.dilation)
        return sddmm(_SddmmArgs(dy=a.dy2, x=cols, row_ptr=a.row_ptr, col_idx=a.col_idx,
                                block_row=a.block_row, bs_r=a.bs_r, bs_c=a.bs_c))

    return run


def _conv_cpp(a: _ConvArgs) -> Tensor:
    return torch.ops.sparsecore._bsr_conv2d_cpu(a.x, a.blocks, a.col_idx, a.row_ptr, a.kernel,
                                                a.stride, a.padding, a.dilation)


def _conv_dx_cpp(a: _ConvDxArgs) -> Tensor:
    return torch.ops.sparsecore._bsr_conv2d_dx_cpu(a.dy2, a.blocks, a.t_col_idx, a.t_row_ptr,
                                                   a.t_perm, a.x_shape, a.kernel, a.stride,
                                                   a.padding, a.dilation)


def _conv_dw_cpp(a: _ConvDwArgs) -> Tensor:
    return torch.ops.sparsecore._bsr_conv2d_dw_cpu(a.dy2, a.x, a.row_ptr, a.col_idx, a.bs_r,
                                                   a.bs_c, a.kernel, a.stride, a.padding,
                                                   a.dilation)


_bsr_conv2d_dispatch = Dispatcher(
    "bsr_conv2d",
    _ConvArgs,
    [
        Backend("cpp", lambda a: cpp_reasons([a.x, a.blocks]), _conv_cpp),
        Backend("triton", lambda a: _triton_reasons([a.x, a.blocks], a.blocks.shape[1:]),
                _conv_im2col(_dsd_triton)),
        Backend("reference", always, _conv_im2col(_dsd_reference)),
    ],
)
_bsr_conv2d_dx_dispatch = Dispatcher(
    "bsr_conv2d_dx",
    _ConvDxArgs,
    [
        Backend("cpp", lambda a: cpp_reasons([a.dy2, a.blocks]), _conv_dx_cpp),
        Backend("triton", lambda a: _triton_reasons([a.dy2, a.blocks], a.blocks.shape[1:]),
                _conv_dx_col2im(_dsd_triton)),
        Backend("reference", always, _conv_dx_col2im(_dsd_reference)),
    ],
)
_bsr_conv2d_dw_dispatch = Dispatcher(
    "bsr_conv2d_dw",
    _ConvDwArgs,
    [
        Backend("cpp", lambda a: cpp_reasons([a.dy2, a.x]), _conv_dw_cpp),
        Backend("triton", lambda a: _triton_reasons([a.dy2, a.x], (a.bs_r, a.bs_c)),
                _conv_dw_im2col(_sddmm_triton)),
        Backend("reference", always, _conv_dw_im2col(_sddmm_reference)),
    ],
)


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
    rows = x.shape[0] * math.prod(conv_out_hw(x.shape[2:], kernel, stride, padding, dilation))
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
