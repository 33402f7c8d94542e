"""Helpers shared by the CSR and BSR ops: backend checks, im2col / col2im, conv output size,
row expansion from a row pointer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# The dtypes the Triton kernels of both layouts take.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def always(_: object) -> list[str]:
    """The check of a backend that runs every input (the references)."""
    return []


def allow_tf32() -> bool:
    """Whether float32 products may use TF32 tensor cores (torch's matmul setting)."""
    return torch.backends.cuda.matmul.allow_tf32


def rows_of(row_ptr: Tensor, nnz: int | None = None) -> Tensor:
    """Row (int64) of every stored entry (nonzero or block) from row_ptr (n_rows + 1,);
    `nnz`, when known, spares a device sync."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=row_ptr.device), counts,
                                   output_size=nnz)


def conv_out_hw(hw: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, int]:
    """(Ho, Wo) of a 2-D convolution over an (H, W) = hw input."""
    ho, wo = ((hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
              for i in range(2))
    return ho, wo


def im2col_rows(x: Tensor, kernel: list[int], stride: list[int], padding: list[int],
                dilation: list[int]) -> Tensor:
    """im2col rows (B*Ho*Wo, C*kh*kw) of x (B, C, H, W), (b, oy, ox) x (c, i, j) order."""
    cols = torch.nn.functional.unfold(x, kernel, dilation, padding, stride)  # (B, CK, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def col2im_rows(dcols: Tensor, x_shape: list[int], kernel: list[int], stride: list[int],
                padding: list[int], dilation: list[int]) -> Tensor:
    """The adjoint of im2col_rows: (B, C, H, W) from (B*Ho*Wo, C*kh*kw)."""
    d = dcols.view(x_shape[0], -1, dcols.shape[1]).transpose(1, 2)
    return torch.nn.functional.fold(d, x_shape[2:], kernel, dilation, padding, stride)
