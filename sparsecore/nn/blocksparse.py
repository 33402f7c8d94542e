"""Block-sparse (BSR) Linear and Conv2d: only the kept (bs_r, bs_c) blocks of the weight are
stored, multiplied and trained.

- `BlockSparseLinear`: y = x W^T + b with W (out, in) in BSR.
- `BlockSparseConv2d`: blocks over the conv weight's matrix view (C_out, C_in * kh * kw), the
  layout sparsecore.prune.structured's block masks use, run as im2col + the same block
  product. Why this and not channel blocks (a block = bs_out x bs_in channels x all taps):
  one kernel serves both layers, masks from the pruning half apply unchanged, and channel
  blocks are the special case block_size=(bs_out, bs_in * kh * kw) when the block is wanted
  at channel granularity.

Autograd (one Function per layer kind): forward is the block-sparse product (ops.bsr_dsd);
the input gradient is the same product on the transposed structure (no block is copied);
the gradient of the kept blocks is a block SDDMM (ops.bsr_sddmm). The block mask is fixed:
optimisers only ever see the kept blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from sparsecore import ops
from sparsecore.formats import BSRWeight
from sparsecore.nn.functional import refuse_jit_trace
from sparsecore.ops._common import conv_out_hw

__all__ = ["BlockSparseLinear", "BlockSparseConv2d", "BSRLinearFunction", "BSRConv2dFunction"]

# The index arrays of a BSRWeight, kept as buffers (they move with .to() and are saved).
_INDEX = ("col_idx", "row_ptr", "block_row", "t_perm", "t_col_idx", "t_row_ptr")


class _Structure(NamedTuple):
    """What the autograd Functions need besides the tensors that get gradients."""

    col_idx: Tensor
    row_ptr: Tensor
    block_row: Tensor
    t_perm: Tensor
    t_col_idx: Tensor
    t_row_ptr: Tensor
    n_out: int
    n_in: int


def _product_backward(
    ctx: Any, s: _Structure, x2: Tensor, blocks: Tensor, dy2: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """(dX2, dblocks) of Y2 = X2 W^T; each only when its input needs it."""
    dx = dblocks = None
    if ctx.needs_input_grad[0]:
        dx = ops.bsr_dsd(dy2, blocks, s.t_col_idx, s.t_row_ptr, s.t_perm, True, s.n_in)
    if ctx.needs_input_grad[1]:
        bs_r, bs_c = blocks.shape[1], blocks.shape[2]
        dblocks = ops.bsr_sddmm(dy2, x2, s.row_ptr, s.col_idx, s.block_row, bs_r, bs_c)
    return dx, dblocks


class BSRLinearFunction(torch.autograd.Function):
    """y (M, n_out) = x (M, n_in) W^T + bias, W the BSR (blocks, s)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, blocks: Tensor, bias: Tensor | None, s: _Structure) -> Tensor:
        y = ops.bsr_dsd(x, blocks, s.col_idx, s.row_ptr, None, False, s.n_out)
        if bias is not None:
            y = y.add_(bias)
        ctx.save_for_backward(x, blocks)
        ctx.s = s
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, blocks = ctx.saved_tensors
        dy = dy.contiguous()
        dx, dblocks = _product_backward(ctx, ctx.s, x, blocks, dy)
        dbias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dblocks, dbias, None


class BSRConv2dFunction(torch.autograd.Function):
    """y (B, C_out, Ho, Wo) = conv2d(x, W) + bias with W's matrix view (C_out, C_in*kh*kw) in
    BSR. Forward and backward read x in place (ops.bsr_conv2d, bsr_conv2d_dx, bsr_conv2d_dw:
    no im2col matrix on the C++ backend). The output comes back channels_last-strided (an
    NCHW-shaped tensor; the product writes it without a transposing copy)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, blocks: Tensor, bias: Tensor | None, s: _Structure,
                geom: tuple) -> Tensor:
        y2 = ops.bsr_conv2d(x, blocks, s.col_idx, s.row_ptr, *geom)
        if bias is not None:
            y2 = y2.add_(bias)
        ctx.save_for_backward(x, blocks)
        ctx.s, ctx.geom = s, geom
        ctx.has_bias = bias is not None
        ho, wo = conv_out_hw(x.shape[2:], *geom)
        return y2.view(x.shape[0], ho, wo, s.n_out).permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, blocks = ctx.saved_tensors
        s, geom = ctx.s, ctx.geom
        b, c_out, ho, wo = dy.shape
        dy2 = dy.permute(0, 2, 3, 1).reshape(b * ho * wo, c_out)
        dx = dblocks = dbias = None
        if ctx.needs_input_grad[0]:
            dx = ops.bsr_conv2d_dx(dy2, blocks, s.t_col_idx, s.t_row_ptr, s.t_perm, x.shape,
                                   *geom)
        if ctx.needs_input_grad[1]:
            dblocks = ops.bsr_conv2d_dw(dy2, x, s.row_ptr, s.col_idx, s.block_row,
                                        blocks.shape[1], blocks.shape[2], *geom)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy2.sum(0)
        return dx, dblocks, dbias, None, None


class _BlockSparseBase(nn.Module):
    """Holds a BSRWeight as a Parameter `blocks` (nnzb, bs_r, bs_c) + index buffers + bias."""

    blocks: nn.Parameter
    bias: nn.Parameter | None

    def _init_weight(self, bsr: BSRWeight, bias: Tensor | None) -> None:
        self.block_size = bsr.block_size
        self.blocks = nn.Parameter(bsr.blocks.detach().clone())
        for name in _INDEX:
            self.register_buffer(name, getattr(bsr, name).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def weight_bsr(self) -> BSRWeight:
        """The weight as a validated BSRWeight (shares this module's tensors)."""
        return BSRWeight(self._matrix_shape(), self.block_size, self.blocks.data,
                         **{n: getattr(self, n) for n in _INDEX})

    def _matrix_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def _structure(self) -> _Structure:
        n_out, n_in = self._matrix_shape()
        return _Structure(*(getattr(self, n) for n in _INDEX), n_out, n_in)

    def _check_input(self, x: Tensor, dim: int, features: int, what: str) -> None:
        refuse_jit_trace(type(self).__name__)
        if x.dim() < dim or x.shape[-dim] != features:
            raise ValueError(f"{type(self).__name__}: expected input with {what}={features}, "
                             f"got shape {tuple(x.shape)}")
        if x.dtype != self.blocks.dtype or x.device != self.blocks.device:
            raise ValueError(
                f"{type(self).__name__}: input is {x.dtype} on {x.device} but the weight is "
                f"{self.blocks.dtype} on {self.blocks.device}; convert one with .to()"
            )

    @property
    def density(self) -> float:
        """Fraction of the weight's blocks that are kept."""
        n_out, n_in = self._matrix_shape()
        grid = (n_out // self.block_size[0]) * (n_in // self.block_size[1])
        return self.blocks.shape[0] / grid if grid else 0.0

    def block_mask(self) -> Tensor:
        """bool (R, C): the kept blocks."""
        return self.weight_bsr().block_mask()

    def _state_error(self, state_dict: dict, prefix: str) -> str | None:
        """Why the incoming state (its entries, the layer's own for keys it lacks) is not a
        weight of this layer, or None. The index arrays fix the block grid and the blocks
        the block size, so together they fix the weight's shape."""
        dev = self.blocks.device
        fields = {n: state_dict.get(prefix + n, getattr(self, n)).detach().to(dev)
                  for n in ("blocks", *_INDEX)}
        try:
            BSRWeight(self._matrix_shape(), self.block_size, **fields)
        except ValueError as exc:
            return f"inconsistent BSR state: {exc}"
        bias = state_dict.get(prefix + "bias")
        if self.bias is not None and bias is not None and bias.shape != self.bias.shape:
            return f"bias has shape {tuple(bias.shape)}, expected {tuple(self.bias.shape)}"
        return None

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # All or nothing: the incoming weight is checked as a whole before the layer changes.
        why = self._state_error(state_dict, prefix)
        if why is not None:
            args[-1].append(f"{prefix or type(self).__name__}: {why}")  # error_msgs
            return
        # A state dict may carry another block mask (another nnzb): take its shapes first,
        # so that load_state_dict round-trips any BSR of the same layer shape. (A new
        # Parameter object then replaces `blocks`: re-create optimisers after such a load.)
        for name in ("blocks", *_INDEX):
            src = state_dict.get(prefix + name)
            cur = getattr(self, name)
            if isinstance(src, Tensor) and src.shape != cur.shape:
                new = torch.empty(src.shape, dtype=cur.dtype, device=cur.device)
                if name == "blocks":
                    self.blocks = nn.Parameter(new, requires_grad=cur.requires_grad)
                else:
                    setattr(self, name, new)
        super()._load_from_state_dict(state_dict, prefix, *args)


class BlockSparseLinear(_BlockSparseBase):
    """nn.Linear with a block-sparse weight: y = x W^T + b, W (out, in) in (bs_r, bs_c) blocks.

    Build from a trained layer with `from_dense(linear, block_mask=... | density=...,
    block_size=...)`; the constructor draws nn.Linear's initialisation and keeps the blocks
    of `block_mask` (bool (R, C)) or the `density` fraction with the largest norms.
    Input (..., in_features), any batch shape; output (..., out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_size: int | Sequence[int] = 32,
        bias: bool = True,
        *,
        block_mask: Tensor | None = None,
        density: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        dense = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        bsr = BSRWeight.from_dense(dense.weight, block_mask, block_size=block_size,
                                   density=density)
        self._init_weight(bsr, dense.bias)

    @classmethod
    def from_dense(
        cls,
        module: nn.Linear,
        block_mask: Tensor | None = None,
        *,
        block_size: int | Sequence[int] = 32,
        density: float | None = None,
    ) -> BlockSparseLinear:
        """The block-sparse twin of `module` (its weights, the kept blocks only).

        block_mask: bool (R, C) blocks, or an element mask of the weight's shape that is
        constant inside blocks (e.g. from sparsecore.prune.structured.block_mask); or density:
        keep that fraction of blocks by L2 norm; or neither: keep every nonzero block.
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = module.in_features, module.out_features
        bsr = BSRWeight.from_dense(module.weight, block_mask, block_size=block_size,
                                   density=density)
        self._init_weight(bsr, module.bias)
        return self

    def _matrix_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def to_dense(self) -> nn.Linear:
        """An nn.Linear with the same function (zeros outside the kept blocks)."""
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.blocks.device, dtype=self.blocks.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight_bsr().to_dense())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x, 1, self.in_features, "in_features")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = BSRLinearFunction.apply(x2, self.blocks, self.bias, self._structure())
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.block_size}, density={self.density:.3f}, "
                f"bias={self.bias is not None}")


class BlockSparseConv2d(_BlockSparseBase):
    """nn.Conv2d (groups=1, zero padding) with its (C_out, C_in*kh*kw) weight matrix in BSR.

    stride, padding (int / pair), dilation and bias as nn.Conv2d. Build from a trained layer
    with `from_dense(conv, block_mask=... | density=..., block_size=...)`; the block must divide
    C_out and C_in*kh*kw. The output is channels_last in memory (NCHW in shape).

    Blocks lie over the (C_out, C_in*kh*kw) matrix view, not over channel pairs: the Linear
    kernels then serve Conv2d unchanged (the forward reads the padded input in place as that
    matrix's columns), sparsecore.prune.structured scores the same view, and a block whose
    column size is a multiple of kh*kw is a channel block anyway (e.g. 16 x 144 for 3x3).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        block_size: int | Sequence[int] = 32,
        *,
        block_mask: Tensor | None = None,
        density: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dense = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                          bias=bias, device=device, dtype=dtype)
        self._init_from(dense, block_mask, block_size, density)

    def _init_from(self, conv: nn.Conv2d, block_mask: Tensor | None,
                   block_size: int | Sequence[int], density: float | None) -> None:
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                "BlockSparseConv2d supports groups=1, padding_mode='zeros' and numeric padding; "
                f"got groups={conv.groups}, padding_mode={conv.padding_mode!r}, "
                f"padding={conv.padding!r}"
            )
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = _pair(conv.kernel_size)
        self.stride, self.padding = _pair(conv.stride), _pair(conv.padding)
        self.dilation = _pair(conv.dilation)
        bsr = BSRWeight.from_dense(conv.weight, block_mask, block_size=block_size,
                                   density=density)
        self._init_weight(bsr, conv.bias)

    @classmethod
    def from_dense(
        cls,
        module: nn.Conv2d,
        block_mask: Tensor | None = None,
        *,
        block_size: int | Sequence[int] = 32,
        density: float | None = None,
    ) -> BlockSparseConv2d:
        """The block-sparse twin of `module`; block_mask / density as in
        BlockSparseLinear.from_dense (an element mask may have the conv weight's 4-D shape)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init_from(module, block_mask, block_size, density)
        return self

    def _matrix_shape(self) -> tuple[int, int]:
        return self.out_channels, self.in_channels * math.prod(self.kernel_size)

    def to_dense(self) -> nn.Conv2d:
        """An nn.Conv2d with the same function (zeros outside the kept blocks)."""
        out = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                        self.padding, self.dilation, bias=self.bias is not None,
                        device=self.blocks.device, dtype=self.blocks.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight_bsr().to_dense().view_as(out.weight))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x, 3, self.in_channels, "channels (dim -3)")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        geom = (self.kernel_size, self.stride, self.padding, self.dilation)
        y = BSRConv2dFunction.apply(x, self.blocks, self.bias, self._structure(), geom)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"block_size={self.block_size}, density={self.density:.3f}, "
                f"bias={self.bias is not None}")
