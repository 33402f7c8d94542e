"""Fake (meta) kernels of the C++ helper ops that the layers call outside the public custom
ops, so that torch.compile and torch.export can trace a sparse layer's forward and backward.

The public ops (sparsecore.ops.csr / bsr) carry their own fakes; the C++ kernels they
dispatch to run inside them and are never traced. The helpers below are called directly
by CSRWeight (tilings, transposed values) and by the layers (tiled values, the dense
fallback's weight). Without the extension these ops do not exist and nothing registers.
"""

from __future__ import annotations

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

    @torch.library.register_fake("sparsecore::_csr_to_dense_cpu")
    def _(values: Tensor, col_idx: Tensor, row_ptr: Tensor, n_cols: int) -> Tensor:
        return values.new_empty(row_ptr.shape[0] - 1, n_cols)


if _ext.has_cpu_ext():
    _register()
