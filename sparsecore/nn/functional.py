"""Autograd for the unstructured (CSR) sparse layers, one Function per layer kind.

Forward is the sparse product (ops.csr_dsd / ops.csr_conv2d); the input gradient is the same
product on the transposed CSR (ops.csr_dsd with values[t_perm] / ops.csr_conv2d_dx; a
stride-1 conv on the CPU also hands csr_conv2d_dx the transposed-flipped weight,
values[f_perm], which its C++ backend runs as a direct conv); the gradient of the kept
weights is an SDDMM evaluated only at the kept positions (ops.csr_sddmm /
ops.csr_conv2d_dw). Below the dispatcher's dense crossover a step runs on
the weight densified once (ops.csr_runs_dense), shared by the forward and the input
gradient of that step. A conv with a small output (ops.csr_conv_batch_last: at most
ops.CSR_BATCH_LAST_MAX_PIXELS pixels per sample, on the CPU with the extension) runs instead
on the batch-last C++ kernels, whatever the crossover says: the forward on the weight in
their tap-major order (values[perm], CSRWeight.cpu_conv_chwn), the weight gradient as their
tap-major SDDMM scattered back to CSR order, and the input gradient of a stride-1 conv as
the forward kernel on the transposed-flipped weight (other strides keep csr_conv2d_dx); their
outputs are laid out batch-last in memory. Pruned weights have no storage, so they get no
gradient and no optimizer (momentum, weight decay, Adam) can revive them: the mask is fixed
unless a pruner builds a new CSRWeight.

Every forward reads the values as they are: nothing computed from them (a densified or
re-laid-out weight) is kept from one call to the next, because nothing can tell reliably
that they changed (fused Adam/AdamW and `.data` edits write them without bumping autograd's
version counter). Only what depends on the sparsity pattern alone is kept, the C++ kernels'
tilings (CSRWeight.cpu_tilings), which the kernels check against col_idx / row_ptr on every
call, and the transposed-flipped structure and tap-major layouts (CSRWeight.cpu_conv_flip,
cpu_conv_chwn), which the layers rebuild whenever their pattern changes (on
load_state_dict).

`sparse_linear(x, weight, bias)` and `sparse_conv2d(x, weight, bias, stride, padding,
dilation)` take a CSRWeight whose `values` may be a Parameter (the layers pass theirs).

Why `autograd.Function` here and `torch.library.register_autograd` in sparsecore.linalg: a
layer's gradient is not a formula of one op's inputs and outputs. It needs the CSRWeight
itself (the transposed structure and the C++ tilings it builds lazily) and a per-step
choice, made once in the forward, between the sparse ops and
one densified weight reused by the input gradient; a custom op's schema carries only
tensors and scalars, and its registered backward sees only the op's inputs and outputs.
So each layer kind is a Function over the custom ops, which stay opaque ops with fake
kernels (the batch-last conv kernels, chosen by the layer rather than by an op's dispatch,
are called as the C++ helper ops, whose fakes sparsecore.ops._fakes registers). linalg's
svd / svdvals / eigh are tensor-to-tensor ops whose gradients are formulas of their outputs
(torch.linalg's), so there the backward is registered on the op, which makes the op
differentiable wherever it is called. The BSR layers
(sparsecore.nn.blocksparse) follow the Function style for the same reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from sparsecore import ops
from sparsecore.formats import CHWN_CHANNEL_TILE, CSRWeight, TapMajor
from sparsecore.ops._common import conv_out_hw

__all__ = ["CSRLinearFunction", "CSRConv2dFunction", "sparse_linear", "sparse_conv2d"]


def refuse_jit_trace(name: str) -> None:
    """RuntimeError under torch.jit.trace: it cannot record the sparse layers' autograd
    Functions (they take the weight's structure as a Python object) and would otherwise fail
    deep inside with an unhelpful `unordered_map::at`."""
    if torch.jit.is_tracing():
        raise RuntimeError(
            f"{name}: torch.jit.trace cannot record sparsecore's sparse layers; use "
            "torch.compile, or trace the dense twin (to_dense())"
        )


def _check_operands(name: str, x: Tensor, weight: CSRWeight, bias: Tensor | None) -> None:
    for what, t in (("weight", weight.values), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name}: input is {x.dtype} on {x.device} but the {what} is "
                             f"{t.dtype} on {t.device}; convert one with .to()")


class CSRLinearFunction(torch.autograd.Function):
    """y (M, n_out) = x (M, n_in) W^T + bias, W = weight (CSRWeight) with values `values`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, bias: Tensor | None,
                weight: CSRWeight) -> Tensor:
        tiling, _ = weight.cpu_tilings()
        args = (x, values, weight.col_idx, weight.row_ptr, weight.row_order, tiling,
                weight.n_rows)
        # Below the crossover the step runs dense: W densified once (from the values of this
        # call), for y and for this step's dX.
        dense = ops.csr_runs_dense("csr_dsd", *args)
        y = ops.csr_dsd(*args) if dense is None else x @ dense.t()
        if bias is not None:
            y = y.add_(bias)
        ctx.save_for_backward(x, values, dense)
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, values, dense = ctx.saved_tensors
        w: CSRWeight = ctx.weight
        tiling, t_tiling = w.cpu_tilings()
        dx = dvalues = dbias = None
        if ctx.needs_input_grad[0] and dense is not None:
            dx = dy @ dense
        elif ctx.needs_input_grad[0]:
            dx = ops.csr_dsd(dy, w.transposed_values(values), w.t_col_idx, w.t_row_ptr,
                             w.t_row_order, t_tiling, w.n_cols)
        if ctx.needs_input_grad[1]:
            dvalues = ops.csr_sddmm(dy, x, w.row_ptr, w.col_idx, w.row_idx, w.row_order, tiling)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum(0)
        return dx, dvalues, dbias, None


class CSRConv2dFunction(torch.autograd.Function):
    """y (N, C_out, Ho, Wo) = conv2d(x, W) + bias, W's matrix view (C_out, C_in*kh*kw) in CSR
    (weight, with values `values`); geom = (stride, padding, dilation) pairs."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, bias: Tensor | None, weight: CSRWeight,
                geom: tuple[list[int], list[int], list[int]]) -> Tensor:
        out_hw = conv_out_hw(x.shape[2:], weight.shape[2:], *geom)
        chwn = weight.cpu_conv_chwn() if ops.csr_conv_batch_last(x, values, out_hw) else None
        dense = None
        if chwn is not None:
            y = _chwn_conv(x, values, chwn, weight.shape, geom, bias)
        else:
            tiling, _ = weight.cpu_tilings()
            args = (x, values, weight.col_idx, weight.row_ptr, tiling, weight.shape, *geom)
            dense = ops.csr_runs_dense("csr_conv2d", *args)
            if dense is None:
                y = ops.csr_conv2d(*args)
            else:
                dense = dense.view(weight.shape)
                y = F.conv2d(x, dense, None, *geom)
            if bias is not None:
                y = y.add_(bias.view(1, -1, 1, 1))
        ctx.save_for_backward(x, values, dense)
        ctx.weight, ctx.geom = weight, geom
        ctx.batch_last = chwn is not None
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, values, dense = ctx.saved_tensors
        w: CSRWeight = ctx.weight
        tiling, t_tiling = w.cpu_tilings()
        # dX of a stride-1 conv = conv2d(dY, W', stride 1, padding d*(k-1)-p) (see
        # ops.flipped_conv_padding), on the batch-last kernel where the forward ran there.
        pad = ops.flipped_conv_padding(w.shape[2:], *ctx.geom) if ctx.batch_last else None
        dx = dvalues = dbias = None
        if ctx.needs_input_grad[0] and dense is not None:
            dx = torch.nn.grad.conv2d_input(x.shape, dense, dy, *ctx.geom)
        elif ctx.needs_input_grad[0] and pad is not None:
            c_out, c_in, kh, kw = w.shape
            dx = _chwn_conv(dy, values, w.cpu_conv_chwn(flipped=True), (c_in, c_out, kh, kw),
                            ([1, 1], pad, ctx.geom[2]))
        elif ctx.needs_input_grad[0]:
            dx = ops.csr_conv2d_dx(dy, w.transposed_values(values), w.t_col_idx, w.t_row_ptr,
                                   t_tiling, w.shape, x.shape[2:], *ctx.geom,
                                   *_flipped_operands(w, values, ctx.geom))
        if ctx.needs_input_grad[1] and ctx.batch_last:
            chwn = w.cpu_conv_chwn()
            dv = torch.ops.sparsecore._csr_conv2d_chwn_dw_cpu(
                dy, x, chwn.ci, chwn.tap_ptr, CHWN_CHANNEL_TILE, list(w.shape), *ctx.geom)
            dvalues = torch.empty_like(dv).index_put_((chwn.perm,), dv)  # back to CSR order
        elif ctx.needs_input_grad[1]:
            dvalues = ops.csr_conv2d_dw(dy, x, w.row_ptr, w.col_idx, w.row_idx, tiling, w.shape,
                                        *ctx.geom)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum((0, 2, 3))
        return dx, dvalues, dbias, None, None


def _chwn_conv(x: Tensor, values: Tensor, layout: TapMajor, weight_shape: Sequence[int],
               geom: tuple[Sequence[int], Sequence[int], Sequence[int]],
               bias: Tensor | None = None) -> Tensor:
    """conv2d(x, W) + bias on the batch-last C++ kernel, W (weight_shape) given by its values
    in CSR order and its tap-major layout (only the gather values[perm] runs per call); the
    output (N, C_out, Ho, Wo) is laid out (C_out, Ho, Wo, N) in memory."""
    return torch.ops.sparsecore._csr_conv2d_chwn_cpu(
        x, values.index_select(0, layout.perm), layout.ci, layout.tap_ptr, CHWN_CHANNEL_TILE,
        list(weight_shape), list(geom[0]), list(geom[1]), list(geom[2]), bias, None, False,
        False)


def _flipped_operands(w: CSRWeight, values: Tensor, geom: tuple[list[int], list[int], list[int]]
                      ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """csr_conv2d_dx's transposed-flipped weight (values[f_perm], f_col_idx, f_row_ptr) where
    its direct stride-1 kernel may run (CPU, geometry allowing), else Nones. Only the values
    are gathered here; the structure is built once per pattern."""
    if values.device.type != "cpu" or ops.flipped_conv_padding(w.shape[2:], *geom) is None:
        return None, None, None
    flip = w.cpu_conv_flip()
    if flip is None:
        return None, None, None
    return values.index_select(0, flip["f_perm"]), flip["f_col_idx"], flip["f_row_ptr"]


def sparse_linear(x: Tensor, weight: CSRWeight, bias: Tensor | None = None) -> Tensor:
    """F.linear with a CSR weight (out, in): x (..., in) -> (..., out), any leading shape and
    strides."""
    refuse_jit_trace("sparse_linear")
    if len(weight.shape) != 2:
        raise ValueError(f"sparse_linear: weight must be 2-D (out, in), got shape {weight.shape}")
    n_out, n_in = weight.shape
    if x.dim() < 1 or x.shape[-1] != n_in:
        raise ValueError(f"sparse_linear: expected input (..., {n_in}), got shape "
                         f"{tuple(x.shape)}")
    _check_operands("sparse_linear", x, weight, bias)
    lead = x.shape[:-1]
    y = CSRLinearFunction.apply(x.reshape(-1, n_in), weight.values, bias, weight)
    return y.view(*lead, n_out)


def sparse_conv2d(x: Tensor, weight: CSRWeight, bias: Tensor | None = None,
                  stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                  dilation: int | Sequence[int] = 1) -> Tensor:
    """F.conv2d (groups=1, zero padding) with a CSR weight (C_out, C_in, kh, kw); x (N, C_in,
    H, W) or unbatched (C_in, H, W)."""
    refuse_jit_trace("sparse_conv2d")
    if len(weight.shape) != 4:
        raise ValueError(f"sparse_conv2d: weight must be 4-D (C_out, C_in, kh, kw), "
                         f"got shape {weight.shape}")
    if x.dim() not in (3, 4) or x.shape[-3] != weight.shape[1]:
        raise ValueError(f"sparse_conv2d: expected input (N, {weight.shape[1]}, H, W) or "
                         f"({weight.shape[1]}, H, W), got shape {tuple(x.shape)}")
    _check_operands("sparse_conv2d", x, weight, bias)
    geom = tuple(list(_pair(v)) for v in (stride, padding, dilation))
    for name, v, lo in zip(("stride", "padding", "dilation"), geom, (1, 0, 1)):
        if min(v) < lo:
            raise ValueError(f"sparse_conv2d: {name} must be >= {lo}, got {tuple(v)}")
    unbatched = x.dim() == 3
    x4 = x.unsqueeze(0) if unbatched else x
    for i in range(2):
        span = geom[2][i] * (weight.shape[2 + i] - 1) + 1
        if x4.shape[2 + i] + 2 * geom[1][i] < span:
            raise ValueError(f"sparse_conv2d: input {tuple(x.shape)} (padded by {geom[1]}) is "
                             f"smaller than the dilated kernel {weight.shape[2:]}")
    y = CSRConv2dFunction.apply(x4, weight.values, bias, weight, geom)
    return y.squeeze(0) if unbatched else y
