"""The one op surface: torch.library custom ops with fake (meta) kernels and pure-PyTorch
references, each dispatched among backends by sparsecore._dispatch (forced with
`use_backend(...)`; refusals list every backend's reasons).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sparsecore import _ext
from sparsecore._dispatch import Backend, Dispatcher, tensor_reasons, triton_reasons

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


def _bsr_im2col(x: Tensor, kernel: list[int], stride: list[int], padding: list[int],
                dilation: list[int]) -> Tensor:
    """im2col rows (B*Ho*Wo, C*kh*kw) of x (B, C, H, W), (b, oy, ox) x (c, i, j) order."""
    cols = torch.nn.functional.unfold(x, kernel, dilation, padding, stride)  # (B, CK, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _bsr_col2im(dcols: Tensor, x_shape: list[int], kernel: list[int], stride: list[int],
                padding: list[int], dilation: list[int]) -> Tensor:
    """The adjoint of _bsr_im2col: (B, C, H, W) from (B*Ho*Wo, C*kh*kw)."""
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
                lambda *a: torch.ops.sparsecore.bsr_dsd_cpu(*a)),
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
                torch.ops.sparsecore.bsr_sddmm_cpu(dy, x, row_ptr, col_idx, bs_r, bs_c)),
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
        cols = _bsr_im2col(x, kernel, stride, padding, dilation)
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
        return _bsr_col2im(dcols, x_shape, kernel, stride, padding, dilation)

    return run


def _bsr_conv2d_dw_im2col(sddmm: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The conv block gradient as a block SDDMM with im2col(x), through an sddmm backend."""

    def run(dy2: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, block_row: Tensor,
            bs_r: int, bs_c: int, kernel: list[int], stride: list[int], padding: list[int],
            dilation: list[int]) -> Tensor:
        cols = _bsr_im2col(x, kernel, stride, padding, dilation)
        return sddmm(dy2, cols, row_ptr, col_idx, block_row, bs_r, bs_c)

    return run


_bsr_conv2d_dispatch = Dispatcher(
    "bsr_conv2d",
    [
        Backend("cpp", lambda x, blocks, *_: _bsr_cpp_reasons(x, blocks),
                lambda *a: torch.ops.sparsecore.bsr_conv2d_cpu(*a)),
        Backend("triton", lambda x, blocks, *_: _bsr_triton_reasons([x, blocks], blocks.shape[1:]),
                _bsr_conv2d_im2col(_bsr_dsd_triton)),
        Backend("reference", _always, _bsr_conv2d_im2col(_bsr_dsd_reference)),
    ],
)
_bsr_conv2d_dx_dispatch = Dispatcher(
    "bsr_conv2d_dx",
    [
        Backend("cpp", lambda dy2, blocks, *_: _bsr_cpp_reasons(dy2, blocks),
                lambda *a: torch.ops.sparsecore.bsr_conv2d_dx_cpu(*a)),
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
                torch.ops.sparsecore.bsr_conv2d_dw_cpu(dy2, x, row_ptr, col_idx, *a)),
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
