"""Fake (meta) kernels of the C++ helper ops that the layers call outside the public custom
ops, so that torch.compile and torch.export can trace a sparse layer's forward and backward.

The public ops (sparsecore.ops.csr / bsr) carry their own fakes; the C++ kernels they
dispatch to run inside them and are never traced. The helpers below are called directly
by CSRWeight (tilings, transposed values), by the layers (tiled values, the dense
fallback's weight, the batch-last conv kernel and its weight gradient) and by optimize()'s
fused conv kernels. Without the extension these ops do not exist and nothing registers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparsecore import _ext


def _register() -> None:
    @torch.library.register_fake("sparsecore::_csr_tiling_cpu")
    def _(col_idx: Tensor, row_ptr: Tensor, n_cols: int) -> Tensor:
        # The tiling's length (a header, per-segment pointers, the nonzeros' columns) follows
        # the tile width the C++ side picks; treat it as data-dependent.
        n = torch.library.get_ctx().new_dynamic_size()
        return col_idx.new_empty(n)

    @torch.library.register_fake("sparsecore::_csr_tile_values_cpu")
    def _(values: Tensor, col_idx: Tensor, row_ptr: Tensor, tiling: Tensor,
          n_cols: int) -> Tensor:
        return torch.empty_like(values, memory_format=torch.contiguous_format)

    @torch.library.register_fake("sparsecore::_csr_transpose_values_cpu")
    def _(values: Tensor, col_idx: Tensor, row_ptr: Tensor, t_row_ptr: Tensor) -> Tensor:
        return torch.empty_like(values, memory_format=torch.contiguous_format)

    def _conv_out(x: Tensor, weight_shape: list[int], stride: list[int], padding: list[int],
                  dilation: list[int], pool: bool) -> Tensor:
        from sparsecore.ops._common import conv_out_hw

        ho, wo = conv_out_hw(x.shape[-2:], weight_shape[2:], stride, padding, dilation)
        if pool:
            ho, wo = ho // 2, wo // 2
        return x.new_empty(x.shape[0], weight_shape[0], ho, wo)

    @torch.library.register_fake("sparsecore::_csr_dsd_cpu")
    def _(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor, tiling: Tensor | None,
          n_out: int, tiled_values: Tensor | None = None, bias: Tensor | None = None,
          residual: Tensor | None = None, act: int = 0, ln: bool = False,
          ln_weight: Tensor | None = None, ln_bias: Tensor | None = None,
          ln_eps: float = 1e-5) -> Tensor:
        return x.new_empty(x.shape[0], n_out)

    @torch.library.register_fake("sparsecore::_csr_mlp_cpu")
    def _(x: Tensor, values1: Tensor, col_idx1: Tensor, row_ptr1: Tensor,
          tiling1: Tensor | None, tiled_values1: Tensor | None, bias1: Tensor | None,
          act1: int, values2: Tensor, col_idx2: Tensor, row_ptr2: Tensor,
          tiling2: Tensor | None, tiled_values2: Tensor | None, bias2: Tensor | None,
          residual: Tensor | None, act2: int, ln: bool = False,
          ln_weight: Tensor | None = None, ln_bias: Tensor | None = None,
          ln_eps: float = 1e-5) -> Tensor:
        return x.new_empty(x.shape[0], row_ptr2.shape[0] - 1)

    @torch.library.register_fake("sparsecore::_attention_cpu")
    def _(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None = None) -> Tensor:
        return q.new_empty(q.shape)

    @torch.library.register_fake("sparsecore::_csr_conv2d_fused_cpu")
    def _(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor, weight_shape: list[int],
          padding: list[int], dilation: list[int], bias: Tensor | None,
          residual: Tensor | None, relu: bool, pool: bool,
          stride: Sequence[int] = (1, 1), plan: Tensor | None = None) -> Tensor:
        return _conv_out(x, weight_shape, stride, padding, dilation, pool)

    @torch.library.register_fake("sparsecore::_csr_conv2d_chwn_cpu")
    def _(x: Tensor, values: Tensor, ci: Tensor, tap_ptr: Tensor, channel_tile: int,
          weight_shape: list[int], stride: list[int], padding: list[int], dilation: list[int],
          bias: Tensor | None, residual: Tensor | None, relu: bool, pool: bool) -> Tensor:
        # The kernel's layout (csrc/cpu/conv_chwn.cpp): batch-last, channel planes one cache
        # line apart.
        n, c, h, w = _conv_out(x, weight_shape, stride, padding, dilation, pool).shape
        plane = h * w * n + 64 // x.element_size()
        return x.new_empty(c * plane).as_strided((n, c, h, w), (1, plane, w * n, n))

    @torch.library.register_fake("sparsecore::_csr_conv2d_chwn_dw_cpu")
    def _(dy: Tensor, x: Tensor, ci: Tensor, tap_ptr: Tensor, channel_tile: int,
          weight_shape: list[int], stride: list[int], padding: list[int],
          dilation: list[int]) -> Tensor:
        return x.new_empty(ci.shape[0])

    @torch.library.register_fake("sparsecore::_csr_to_dense_cpu")
    def _(values: Tensor, col_idx: Tensor, row_ptr: Tensor, n_cols: int) -> Tensor:
        return values.new_empty(row_ptr.shape[0] - 1, n_cols)


if _ext.has_cpu_ext():
    _register()
