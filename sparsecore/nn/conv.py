"""SparseConv2d: nn.Conv2d (groups=1, zero padding) with an unstructured (CSR) sparse weight.

The weight's matrix view (C_out, C_in*kh*kw) is the CSR matrix; the C++ backend runs the
conv, and its input gradient at stride 1, as direct sparse convolutions, the input gradient
at other strides as im2col and the CSR product sample by sample (see ops.csr_conv2d,
ops.csr_conv2d_dx), and a conv with a small output on the batch-last kernels (see
ops.csr_conv_batch_last and sparsecore.nn.functional). State and loading as SparseLinear.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from sparsecore.formats import CSRWeight
from sparsecore.nn.functional import sparse_conv2d
from sparsecore.nn.linear import _CSRModule, _resolve_mask
from sparsecore.ops import flipped_conv_padding

__all__ = ["SparseConv2d", "conv_unsupported"]

Pair = int | tuple[int, int]


def conv_unsupported(module: nn.Conv2d) -> str | None:
    """Why a Conv2d cannot become a SparseConv2d (None when it can)."""
    if module.groups != 1:
        return f"groups={module.groups} (only groups=1 is supported)"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
    if module.padding == "same" and any(
        d * (k - 1) % 2 for d, k in zip(_pair(module.dilation), _pair(module.kernel_size))
    ):
        return "padding='same' with an even dilated kernel (asymmetric padding)"
    return None


def _explicit_padding(module: nn.Conv2d) -> tuple[int, int]:
    """nn.Conv2d's padding as a pair of ints ('valid' -> 0, 'same' -> half the dilated kernel)."""
    if module.padding == "valid":
        return 0, 0
    if module.padding == "same":
        d, k = _pair(module.dilation), _pair(module.kernel_size)
        return d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2
    return _pair(module.padding)


class SparseConv2d(_CSRModule):
    """nn.Conv2d with a CSR weight (groups=1, padding_mode='zeros'); stride, padding (int or
    pair), dilation and bias as nn.Conv2d. Input (N, C_in, H, W) or (C_in, H, W).

    Build from a trained layer with `from_dense(conv, mask=... | sparsity=...)`. The
    constructor makes a layer holding `weight` (a CSRWeight of shape (C_out, C_in, kh, kw))
    and a zero bias, or without `weight` an empty one that load_state_dict fills.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Pair,
                 stride: Pair = 1, padding: Pair = 0, dilation: Pair = 1, groups: int = 1,
                 bias: bool = True, padding_mode: str = "zeros", *,
                 weight: CSRWeight | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if groups != 1 or padding_mode != "zeros" or isinstance(padding, str):
            raise ValueError(
                "SparseConv2d supports groups=1, padding_mode='zeros' and numeric padding; got "
                f"groups={groups}, padding_mode={padding_mode!r}, padding={padding!r}"
            )
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation)
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        if weight is None:
            weight = CSRWeight.from_dense(torch.zeros(shape, device=device, dtype=dtype))
        elif weight.shape != shape:
            raise ValueError(f"weight has shape {weight.shape}, expected {shape}")
        zeros = torch.zeros(self.out_channels, device=weight.device, dtype=weight.dtype)
        self._set_weight(weight, zeros if bias else None)

    def _set_geometry(self, in_channels: int, out_channels: int, kernel_size: Pair,
                      stride: Pair, padding: Pair, dilation: Pair) -> None:
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, mask: Tensor | None = None, *,
                   sparsity: float | None = None) -> SparseConv2d:
        """The sparse twin of `module`; mask (the conv weight's 4-D shape) / sparsity as in
        SparseLinear.from_dense. Raises ValueError for groups != 1 or a non-zero padding
        mode."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(module).__name__}")
        why = conv_unsupported(module)
        if why is not None:
            raise ValueError(f"SparseConv2d.from_dense: unsupported Conv2d: {why}")
        csr = CSRWeight.from_dense(module.weight.detach(), _resolve_mask(module, mask, sparsity))
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._set_geometry(module.in_channels, module.out_channels, module.kernel_size,
                           module.stride, _explicit_padding(module), module.dilation)
        self._set_weight(csr, None if module.bias is None else module.bias.detach())
        return self

    def to_dense(self) -> nn.Conv2d:
        """An nn.Conv2d with the same function (zeros where pruned)."""
        out = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                        self.padding, self.dilation, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            out.weight.copy_(self.dense_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def _uses_flip(self) -> bool:
        return flipped_conv_padding(self.kernel_size, self.stride, self.padding,
                                    self.dilation) is not None

    def _uses_chwn(self) -> bool:
        return True

    def forward(self, x: Tensor) -> Tensor:
        return sparse_conv2d(x, self.weight_csr(), self.bias, self.stride, self.padding,
                             self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                + self._density_repr())

