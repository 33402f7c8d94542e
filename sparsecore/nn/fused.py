"""Inference-only fused layers, as `sparsecore.optimize()` builds them.

A fused layer is one weight kernel followed by one epilogue: y = act(kernel(x) + bias [+
residual]), with an optional max-pool between the kernel and the epilogue (max commutes with
adding a per-channel constant and with ReLU, so the epilogue then touches a quarter of the
elements). Eval-mode BatchNorm is folded into the weight rows and the bias before the layer is
built, so the fused model has no BatchNorm pass and no separate ReLU pass.

Kernels (`KERNELS`), each holding its weight in its own layout as buffers (inference only:
nothing here has gradients):

- "dense": torch's dense conv / linear (oneDNN / MKL) on the masked weight;
- "csr": the CSR conv kernel that walks one sample's output pixels (ops.csr_conv2d), or the
  CSR Linear kernel (ops.csr_dsd);
- "csr_direct" (conv, CPU): the CSR conv read from per-sample column-shifted copies of the
  input (rows split by phase for a stride above 1), the output rows as the vector dimension
  (no im2col matrix), with the whole epilogue (2x2 max-pool, bias, residual, ReLU) done on
  the product's rows;
- "csr_chwn" (conv, CPU): the batch as the vector dimension, activations laid out
  (C, H, W, N) in memory (returned so, so that the next such layer reads them in place), taps
  that fall on the zero padding skipped, epilogue fused as in "csr_direct";
- "csr_unfold" (conv only): the batch folded into the GEMM rows: the whole batch's im2col
  matrix (B*Ho*Wo, kh*kw*C_in), built channels-last in one gather, times the CSR weight on the
  Linear kernel, which fills its SIMD lanes with rows where a 4x4 or 2x2 output leaves the
  per-sample conv kernel mostly idle;
- "bsr": the block-sparse kernels (ops.bsr_conv2d / ops.bsr_dsd), for block-aligned masks.

The sparse kernels call the C++ ops (torch.ops.sparsecore._*_cpu, what the ops' "cpp"
backends run) directly wherever they take the tensors: the choice among kernels was
measured, so the CSR ops' own dense crossover must not overrule it, and the custom-op
wrapper's per-call cost is a visible share of a small layer. Elsewhere (CUDA, other
dtypes, no extension) they go through the ops' automatic choice, except "csr_direct" and
"csr_chwn", which exist only on the CPU with the extension (optimize() offers them only
there). Conv kernels return NCHW-shaped tensors; "csr_unfold" and "bsr" return them
channels-last in memory (the product writes rows of channels), "csr_chwn" batch-last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from sparsecore import ops
from sparsecore._dispatch import CPP_DTYPES
from sparsecore._ext import has_cpu_ext
from sparsecore.formats import (
    CHWN_CHANNEL_TILE,
    BSRWeight,
    CSRWeight,
    conv_tap_major_structure,
)
from sparsecore.ops._common import conv_out_hw

__all__ = ["EPILOGUE_KERNELS", "KERNELS", "FusedConv2d", "FusedLinear", "FusedResidual",
           "FusedTransformerBlock", "epilogue", "im2col_nhwc", "max_pool_2x2", "tap_major_csr"]

KERNELS = ("dense", "csr", "csr_direct", "csr_chwn", "csr_unfold", "bsr")
# Kernels that run the whole epilogue themselves (max-pool only when it is a plain 2x2).
EPILOGUE_KERNELS = ("csr_direct", "csr_chwn")


def _on_cpp(x: Tensor, weight: Tensor) -> bool:
    """Whether the C++ kernels take x with this weight (checked per call: cheap tests only)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in CPP_DTYPES
            and weight.device.type == "cpu" and has_cpu_ext())


def epilogue(y: Tensor, bias: Tensor | None, residual: Tensor | None, relu: bool) -> Tensor:
    """act(y + bias [+ residual]) in place on y (a fresh kernel output): y (N, C, ...) or
    (M, C), bias (C,). On the CPU bias (or residual) + ReLU is one fused pass."""
    fused = y.device.type == "cpu"
    if bias is not None:
        b = bias.view(1, -1, *([1] * (y.dim() - 2))) if y.dim() > 2 else bias
        if residual is None and relu and fused:
            return torch.ops.aten._add_relu_(y, b)
        y = y.add_(b)
    if residual is not None:
        if relu and fused:
            return torch.ops.aten._add_relu_(y, residual)
        y = y.add_(residual)
    return y.relu_() if relu else y


def _is_2x2(pool: nn.MaxPool2d) -> bool:
    """A plain 2x2 / stride-2 max-pool (no padding, dilation or ceil mode)."""
    geom = (pool.kernel_size, pool.stride, pool.padding, pool.dilation)
    return ([_pair(v) for v in geom] == [(2, 2), (2, 2), (0, 0), (1, 1)]
            and not pool.ceil_mode and not pool.return_indices)


def max_pool_2x2(y: Tensor) -> Tensor:
    """F.max_pool2d(y, 2) for y (N, C, H, W) in any memory layout, as two elementwise
    maxima of strided halves (rows, then columns): torch's NCHW max-pool kernel computes
    indices and does not vectorise over this layout, which made it a sizeable part of a
    sparse net's time."""
    h, w = y.shape[-2] // 2 * 2, y.shape[-1] // 2 * 2
    rows = torch.maximum(y[..., 0:h:2, :w], y[..., 1:h:2, :w])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


# ---- kernels ----------------------------------------------------------------------------
class _Kernel(nn.Module):
    """One weight product. forward(x, bias) -> a fresh output tensor; only kernels with
    `adds_bias` add the bias (for free, inside the product); the others get None. Kernels
    with `fuses_epilogue` take forward(x, bias, residual, relu, pool) (conv) or forward(x,
    bias, residual, relu, gelu) (Linear) and return the layer's output."""

    name = ""
    adds_bias = False
    fuses_epilogue = False


def _csr_buffers(module: nn.Module, matrix: Tensor, mask: Tensor, *, tiled: bool) -> None:
    """The CSR of `matrix` (n_rows, n_cols) at `mask` as buffers of `module`: values, col_idx,
    row_ptr, row_order, the C++ tiling (None off the CPU / without the extension) and, with
    `tiled`, the values laid out in the tiling's order once."""
    csr = CSRWeight.from_dense(matrix, mask)
    tiling, _ = csr.cpu_tilings()
    for name in ("values", "col_idx", "row_ptr", "row_order"):
        module.register_buffer(name, getattr(csr, name).contiguous())
    module.register_buffer("tiling", tiling)
    tiled_values = None
    if tiled and tiling is not None:
        tiled_values = ops.csr_tile_values(csr.values, csr.col_idx, csr.row_ptr, tiling,
                                           csr.n_cols)
    module.register_buffer("tiled_values", tiled_values)


def _csr_dsd(kernel: nn.Module, x: Tensor, n_out: int) -> Tensor:
    """x (M, K) times the CSR weight held by `kernel` (its _csr_buffers) -> (M, n_out)."""
    if _on_cpp(x, kernel.values):
        return torch.ops.sparsecore._csr_dsd_cpu(x, kernel.values, kernel.col_idx,
                                                 kernel.row_ptr, kernel.tiling, n_out,
                                                 kernel.tiled_values)
    return ops.csr_dsd(x, kernel.values, kernel.col_idx, kernel.row_ptr, kernel.row_order,
                       kernel.tiling, n_out, kernel.tiled_values)


class _ConvGeom(nn.Module):
    """A conv kernel's geometry: weight_shape (C_out, C_in, kh, kw) and stride / padding /
    dilation pairs."""

    def _set_geom(self, weight_shape: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int]) -> None:
        self.weight_shape = [int(s) for s in weight_shape]
        self.stride, self.padding = list(stride), list(padding)
        self.dilation = list(dilation)

    def out_hw(self, x: Tensor) -> tuple[int, int]:
        return conv_out_hw(x.shape[-2:], self.weight_shape[2:], self.stride, self.padding,
                           self.dilation)

    def extra_repr(self) -> str:
        return (f"weight_shape={tuple(self.weight_shape)}, stride={tuple(self.stride)}, "
                f"padding={tuple(self.padding)}, dilation={tuple(self.dilation)}")


class DenseConv(_ConvGeom, _Kernel):
    name, adds_bias = "dense", True

    def __init__(self, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int]) -> None:
        super().__init__()
        self._set_geom(weight.shape, stride, padding, dilation)
        self.register_buffer("weight", weight.contiguous())

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, self.weight, bias, self.stride, self.padding, self.dilation)


class CSRConv(_ConvGeom, _Kernel):
    name = "csr"

    def __init__(self, weight: Tensor, mask: Tensor, stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int]) -> None:
        super().__init__()
        self._set_geom(weight.shape, stride, padding, dilation)
        _csr_buffers(self, weight.reshape(weight.shape[0], -1), mask.reshape(weight.shape[0], -1),
                     tiled=False)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        args = (x, self.values, self.col_idx, self.row_ptr, self.tiling, self.weight_shape,
                self.stride, self.padding, self.dilation)
        if _on_cpp(x, self.values):
            return torch.ops.sparsecore._csr_conv2d_cpu(*args)
        return ops.csr_conv2d(*args)


def _conv_epilogue_reference(x: Tensor, weight: Tensor, geom: _ConvGeom, bias: Tensor | None,
                             residual: Tensor | None, relu: bool, pool: bool) -> Tensor:
    """What the fused CPU kernels compute, with torch ops: conv2d [-> 2x2 max-pool] -> + bias
    [+ residual] [-> ReLU]. Where those kernels do not run (CUDA, other dtypes, no
    extension)."""
    y = F.conv2d(x, weight.to(x.dtype), None, geom.stride, geom.padding, geom.dilation)
    if pool:
        y = max_pool_2x2(y)
    return epilogue(y.contiguous(), bias, residual, relu)


class CSRDirectConv(_ConvGeom, _Kernel):
    """CSR conv over per-sample shifted copies of the input (no im2col), epilogue fused."""

    name, fuses_epilogue = "csr_direct", True

    def __init__(self, weight: Tensor, mask: Tensor, stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int]) -> None:
        super().__init__()
        self._set_geom(weight.shape, stride, padding, dilation)
        csr = CSRWeight.from_dense(weight.reshape(weight.shape[0], -1),
                                   mask.reshape(weight.shape[0], -1))
        for name in ("values", "col_idx", "row_ptr"):
            self.register_buffer(name, getattr(csr, name).contiguous())
        self._plan: tuple[tuple, Tensor] | None = None

    def plan(self, x: Tensor) -> Tensor | None:
        """The C++ op's plan for inputs shaped like x (each nonzero's offset in the shifted
        copies, built once per input size, dtype and sparsity pattern: at batch 1 building
        it took as long as the product), or None while torch.compile traces (the op then
        builds it per call). The key follows the index buffers' version counters, so an
        in-place load of another pattern rebuilds it; the op checks it against the pattern
        either way."""
        if torch.compiler.is_compiling():
            return None
        key = (tuple(x.shape[1:]), x.dtype, self.col_idx.data_ptr(), self.col_idx._version,
               self.row_ptr.data_ptr(), self.row_ptr._version)
        if self._plan is None or self._plan[0] != key:
            plan = torch.ops.sparsecore._csr_conv2d_fused_plan_cpu(
                self.col_idx, self.row_ptr, self.weight_shape, list(x.shape[2:]),
                self.padding, self.dilation, self.stride, x.dtype)
            self._plan = (key, plan)
        return self._plan[1]

    def forward(self, x: Tensor, bias: Tensor | None, residual: Tensor | None = None,
                relu: bool = False, pool: bool = False) -> Tensor:
        if not _on_cpp(x, self.values):
            n = self.weight_shape[0]
            rows = torch.repeat_interleave(torch.arange(n, device=self.values.device),
                                           (self.row_ptr[1:] - self.row_ptr[:-1]).long())
            weight = self.values.new_zeros(n, math.prod(self.weight_shape[1:]))
            weight[rows, self.col_idx.long()] = self.values
            weight = weight.view(self.weight_shape)
            return _conv_epilogue_reference(x, weight, self, bias, residual, relu, pool)
        return torch.ops.sparsecore._csr_conv2d_fused_cpu(
            x, self.values, self.col_idx, self.row_ptr, self.weight_shape, self.padding,
            self.dilation, bias, residual, relu, pool, self.stride, self.plan(x))


def tap_major_csr(weight: Tensor, mask: Tensor, channel_tile: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The kept weights of a conv (C_out, C_in, kh, kw) in (row, channel tile, tap, channel)
    order, a tile being `channel_tile` input channels: values (nnz,), their input channels ci
    (nnz,) int32, and tap_ptr (C_out * n_tiles * kh*kw + 1,) int32, where the nonzeros of
    row o, tile c and tap t = i*kw + j start (the "csr_chwn" kernel's layout; the structure
    is formats.conv_tap_major_structure's)."""
    c_out = weight.shape[0]
    rows, cols = mask.reshape(c_out, -1).nonzero(as_tuple=True)  # CSR order
    layout = conv_tap_major_structure(rows, cols, weight.shape, channel_tile)
    values = weight.reshape(c_out, -1)[rows, cols][layout.perm.long()].contiguous()
    return values, layout.ci, layout.tap_ptr


class CSRChwnConv(_ConvGeom, _Kernel):
    """CSR conv with the batch as the vector dimension, epilogue fused; returns
    (N, C_out, Ho, Wo) laid out (C_out, Ho, Wo, N) in memory when N fills whole vectors."""

    name, fuses_epilogue = "csr_chwn", True

    def __init__(self, weight: Tensor, mask: Tensor, stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int]) -> None:
        super().__init__()
        self._set_geom(weight.shape, stride, padding, dilation)
        self.channel_tile = CHWN_CHANNEL_TILE
        values, ci, tap_ptr = tap_major_csr(weight, mask, self.channel_tile)
        self.register_buffer("values", values)
        self.register_buffer("ci", ci)
        self.register_buffer("tap_ptr", tap_ptr)

    def dense_weight(self) -> Tensor:
        """The (C_out, C_in, kh, kw) weight this kernel holds, zeros included."""
        c_out, c_in, kh, kw = self.weight_shape
        taps = kh * kw
        n_tiles = -(-c_in // self.channel_tile)
        counts = (self.tap_ptr[1:] - self.tap_ptr[:-1]).long()
        seg = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device),
                                      counts)
        rows, tap = torch.div(seg, n_tiles * taps, rounding_mode="floor"), seg % taps
        weight = self.values.new_zeros(c_out, c_in, taps)
        weight[rows, self.ci.long(), tap] = self.values
        return weight.view(self.weight_shape)

    def forward(self, x: Tensor, bias: Tensor | None, residual: Tensor | None = None,
                relu: bool = False, pool: bool = False) -> Tensor:
        if not _on_cpp(x, self.values):
            return _conv_epilogue_reference(x, self.dense_weight(), self, bias, residual, relu,
                                            pool)
        return torch.ops.sparsecore._csr_conv2d_chwn_cpu(
            x, self.values, self.ci, self.tap_ptr, self.channel_tile, self.weight_shape,
            self.stride, self.padding, self.dilation, bias, residual, relu, pool)


def im2col_nhwc(x: Tensor, kernel: Sequence[int], stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """The im2col matrix (B*Ho*Wo, kh*kw*C) of x (B, C, H, W), columns in (i, j, c) order:
    x laid out channels-last (zero-padded) once, then one strided gather."""
    b, c, h, w = x.shape
    (ph, pw), (kh, kw) = padding, kernel
    ho, wo = conv_out_hw((h, w), kernel, stride, padding, dilation)
    if ph or pw:
        xl = x.new_zeros(b, h + 2 * ph, w + 2 * pw, c)
        xl[:, ph:ph + h, pw:pw + w] = x.permute(0, 2, 3, 1)
    else:
        xl = x.permute(0, 2, 3, 1).contiguous()
    s_b, s_h, s_w, s_c = xl.stride()
    view = xl.as_strided((b, ho, wo, kh, kw, c),
                         (s_b, stride[0] * s_h, stride[1] * s_w, dilation[0] * s_h,
                          dilation[1] * s_w, s_c))
    return view.reshape(b * ho * wo, kh * kw * c)


class CSRUnfoldConv(_ConvGeom, _Kernel):
    name = "csr_unfold"

    def __init__(self, weight: Tensor, mask: Tensor, stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int]) -> None:
        super().__init__()
        self._set_geom(weight.shape, stride, padding, dilation)
        # Columns in (i, j, c) order, to match im2col_nhwc.
        n = weight.shape[0]
        _csr_buffers(self, weight.permute(0, 2, 3, 1).reshape(n, -1),
                     mask.permute(0, 2, 3, 1).reshape(n, -1), tiled=True)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        ho, wo = self.out_hw(x)
        cols = im2col_nhwc(x, self.weight_shape[2:], self.stride, self.padding, self.dilation)
        n_out = self.weight_shape[0]
        y = _csr_dsd(self, cols, n_out)
        return y.view(x.shape[0], ho, wo, n_out).permute(0, 3, 1, 2)


def _bsr_buffers(module: nn.Module, matrix: Tensor, mask: Tensor,
                 block_size: tuple[int, int]) -> None:
    bsr = BSRWeight.from_dense(matrix, mask, block_size=block_size)
    module.block_size = bsr.block_size
    for name in ("blocks", "col_idx", "row_ptr"):
        module.register_buffer(name, getattr(bsr, name).contiguous())


class BSRConv(_ConvGeom, _Kernel):
    name = "bsr"

    def __init__(self, weight: Tensor, mask: Tensor, block_size: tuple[int, int],
                 stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int]) -> None:
        super().__init__()
        self._set_geom(weight.shape, stride, padding, dilation)
        n = weight.shape[0]
        _bsr_buffers(self, weight.reshape(n, -1), mask.reshape(n, -1), block_size)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        ho, wo = self.out_hw(x)
        args = (x, self.blocks, self.col_idx, self.row_ptr, self.weight_shape[2:], self.stride,
                self.padding, self.dilation)
        y = (torch.ops.sparsecore._bsr_conv2d_cpu(*args) if _on_cpp(x, self.blocks)
             else ops.bsr_conv2d(*args))
        return y.view(x.shape[0], ho, wo, self.weight_shape[0]).permute(0, 3, 1, 2)


class DenseLinear(_Kernel):
    name, adds_bias = "dense", True

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.contiguous())

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, self.weight, bias)


class CSRLinear(_Kernel):
    """The CSR Linear product; on the C++ kernel with the epilogue (bias, residual, ReLU or
    GELU) fused into its output pass."""

    name, fuses_epilogue = "csr", True

    def __init__(self, weight: Tensor, mask: Tensor) -> None:
        super().__init__()
        self.n_out = weight.shape[0]
        _csr_buffers(self, weight, mask, tiled=True)

    def forward(self, x: Tensor, bias: Tensor | None, residual: Tensor | None = None,
                relu: bool = False, gelu: bool = False) -> Tensor:
        if _on_cpp(x, self.values):
            act = 1 if relu else 2 if gelu else 0
            return torch.ops.sparsecore._csr_dsd_cpu(x, self.values, self.col_idx,
                                                     self.row_ptr, self.tiling, self.n_out,
                                                     self.tiled_values, bias, residual, act)
        y = epilogue(_csr_dsd(self, x, self.n_out), bias, residual, relu)
        return F.gelu(y) if gelu else y


class BSRLinear(_Kernel):
    name = "bsr"

    def __init__(self, weight: Tensor, mask: Tensor, block_size: tuple[int, int]) -> None:
        super().__init__()
        self.n_out = weight.shape[0]
        _bsr_buffers(self, weight, mask, block_size)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        args = (x, self.blocks, self.col_idx, self.row_ptr, None, False, self.n_out)
        if _on_cpp(x, self.blocks):
            return torch.ops.sparsecore._bsr_dsd_cpu(*args)
        return ops.bsr_dsd(*args)


# ---- fused layers ---------------------------------------------------------------------
class _Fused(nn.Module):
    """A weight kernel + epilogue. Until a kernel is chosen (`set_kernel`) the layer keeps
    its masked dense weight (`source`) to build any candidate from."""

    kind = ""
    kernel: _Kernel | None

    def __init__(self, weight: Tensor, mask: Tensor, bias: Tensor | None, relu: bool,
                 block_size: tuple[int, int] | None) -> None:
        super().__init__()
        self.register_buffer("bias", None if bias is None else bias.contiguous())
        self.relu = relu
        self.weight_shape = tuple(weight.shape)
        self.kernel = None
        # Until set_kernel: what make_kernel builds from (deliberately not module state).
        self.source: dict[str, Any] | None = {"weight": weight, "mask": mask,
                                              "block_size": block_size}
        self.info: Any = None  # what optimize() decided, and why (see LayerInfo)

    def make_kernel(self, name: str) -> _Kernel:
        raise NotImplementedError

    def set_kernel(self, kernel: _Kernel) -> None:
        """Use `kernel` from now on and drop the dense source weight."""
        self.kernel = kernel
        self.source = None

    def run(self, kernel: _Kernel, x: Tensor, residual: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if self.kernel is None:
            raise RuntimeError(f"{type(self).__name__}: no kernel chosen (build fused layers "
                               "with sparsecore.optimize)")
        return self.run(self.kernel, x, residual)

    def extra_repr(self) -> str:
        k = self.kernel.name if self.kernel is not None else None
        return f"kernel={k!r}, bias={self.bias is not None}, relu={self.relu}"


class FusedConv2d(_Fused):
    """conv2d(x, W) [-> max-pool] -> + bias [+ residual] [-> ReLU]; x (N, C_in, H, W) ->
    (N, C_out, Ho, Wo) (pooled if `pool`)."""

    kind = "conv"

    def __init__(self, weight: Tensor, mask: Tensor, bias: Tensor | None,
                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], *,
                 relu: bool = False, pool: nn.MaxPool2d | None = None,
                 block_size: tuple[int, int] | None = None) -> None:
        super().__init__(weight, mask, bias, relu, block_size)
        self.stride, self.padding = list(stride), list(padding)
        self.dilation = list(dilation)
        self.pool = pool

    def make_kernel(self, name: str) -> _Kernel:
        if self.source is None:
            raise RuntimeError("the kernel is already chosen")
        w, mask, bs = self.source["weight"], self.source["mask"], self.source["block_size"]
        geom = (self.stride, self.padding, self.dilation)
        if name == "dense":
            return DenseConv(w, *geom)
        if name == "csr":
            return CSRConv(w, mask, *geom)
        if name == "csr_unfold":
            return CSRUnfoldConv(w, mask, *geom)
        if name in EPILOGUE_KERNELS and self.epilogue_fusable(name):
            if name == "csr_direct":
                return CSRDirectConv(w, mask, *geom)
            return CSRChwnConv(w, mask, *geom)
        if name == "bsr" and bs is not None:
            return BSRConv(w, mask, bs, *geom)
        raise ValueError(f"no {name!r} kernel for this layer")

    def epilogue_fusable(self, kernel: str) -> bool:
        """Whether `kernel` (one of EPILOGUE_KERNELS) can run this layer: no pool or a plain
        2x2 one."""
        return self.pool is None or _is_2x2(self.pool)

    def out_shape(self, x: Tensor) -> tuple[int, ...]:
        """(N, C_out, Ho, Wo) of the product (before any pool)."""
        w = self.weight_shape
        ho, wo = conv_out_hw(x.shape[-2:], w[2:], self.stride, self.padding, self.dilation)
        return (x.shape[0], w[0], ho, wo)

    def flops(self, x: Tensor) -> int:
        """Multiply-adds x 2 of the dense product on x."""
        n, c_out, ho, wo = self.out_shape(x)
        return 2 * n * ho * wo * c_out * math.prod(self.weight_shape[1:])

    def run(self, kernel: _Kernel, x: Tensor, residual: Tensor | None = None) -> Tensor:
        bias = self.bias
        if kernel.fuses_epilogue:
            return kernel(x, bias, residual, self.relu, self.pool is not None)
        y = kernel(x, bias if kernel.adds_bias else None)
        if kernel.adds_bias:
            bias = None
        if self.pool is not None:
            small = min(y.shape[-2:]) < 2  # let torch's pool raise its error
            y = max_pool_2x2(y) if _is_2x2(self.pool) and not small else self.pool(y)
        return epilogue(y, bias, residual, self.relu)

    def extra_repr(self) -> str:
        return (f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, "
                f"dilation={tuple(self.dilation)}, " + super().extra_repr()
                + (", pool=True" if self.pool is not None else ""))


class FusedLinear(_Fused):
    """x W^T + bias [+ residual] [-> ReLU or GELU]; x (..., in) -> (..., out), residual
    (..., out). With a folded BatchNorm1d (`features_2d`) the input must be 2-D, where
    BatchNorm1d normalises the features. GELU is torch's default (erf) form."""

    kind = "linear"

    def __init__(self, weight: Tensor, mask: Tensor, bias: Tensor | None, *,
                 relu: bool = False, gelu: bool = False,
                 block_size: tuple[int, int] | None = None, features_2d: bool = False) -> None:
        if relu and gelu:
            raise ValueError("FusedLinear: relu and gelu are exclusive")
        super().__init__(weight, mask, bias, relu, block_size)
        self.gelu = gelu
        self.features_2d = features_2d

    def make_kernel(self, name: str) -> _Kernel:
        if self.source is None:
            raise RuntimeError("the kernel is already chosen")
        w, mask, bs = self.source["weight"], self.source["mask"], self.source["block_size"]
        if name == "dense":
            return DenseLinear(w)
        if name == "csr":
            return CSRLinear(w, mask)
        if name == "bsr" and bs is not None:
            return BSRLinear(w, mask, bs)
        raise ValueError(f"no {name!r} kernel for this layer")

    def out_shape(self, x: Tensor) -> tuple[int, ...]:
        return (*x.shape[:-1], self.weight_shape[0])

    def flops(self, x: Tensor) -> int:
        n_out, n_in = self.weight_shape
        return 2 * (x.numel() // max(x.shape[-1], 1)) * n_out * n_in

    def run(self, kernel: _Kernel, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if self.features_2d and x.dim() != 2:
            raise ValueError(f"FusedLinear: a folded BatchNorm1d needs 2-D input (N, "
                             f"features), got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        n_out = self.weight_shape[0]
        if residual is not None:
            residual = residual.reshape(x2.shape[0], n_out)
        bias = self.bias
        if kernel.fuses_epilogue:
            y = kernel(x2, bias, residual, self.relu, self.gelu)
            return y.view(*lead, n_out)
        y = kernel(x2, bias if kernel.adds_bias else None)
        if kernel.adds_bias:
            bias = None
        y = epilogue(y, bias, residual, self.relu)
        return (F.gelu(y) if self.gelu else y).view(*lead, n_out)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", gelu=True" if self.gelu else "")


class FusedResidual(nn.Module):
    """A residual block: the fused layers of the body in order (`names`), the last one taking
    the shortcut's output as its residual (its epilogue adds it and applies the ReLU).
    shortcut: a FusedConv2d, or None for the identity."""

    def __init__(self, layers: dict[str, _Fused], shortcut: _Fused | None) -> None:
        super().__init__()
        self.names = list(layers)
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = x
        for name in self.names[:-1]:
            y = getattr(self, name)(y)
        residual = x if self.shortcut is None else self.shortcut(x)
        return getattr(self, self.names[-1])(y, residual)


def causal_attention(qkv: Tensor, heads: int) -> Tensor:
    """Causal multi-head attention of stacked projections: qkv (B, T, 3d) = q | k | v, each
    d = heads x head_dim -> (B, T, d), the heads side by side (what the output projection
    reads). On the C++ kernel it reads q, k and v in place and writes that layout directly;
    elsewhere torch's scaled_dot_product_attention."""
    b, t, d3 = qkv.shape
    d = d3 // 3
    q, k, v = (z.view(b, t, heads, d // heads) for z in qkv.split(d, dim=-1))
    if (qkv.device.type == "cpu" and qkv.dtype in CPP_DTYPES and has_cpu_ext()
            and not (qkv.requires_grad and torch.is_grad_enabled())):
        return torch.ops.sparsecore._attention_cpu(q, k, v, True).view(b, t, d)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True)
    return y.transpose(1, 2).reshape(b, t, d)


class FusedTransformerBlock(nn.Module):
    """A pre-LayerNorm Transformer block (sparsecore.models.transformer.Block, eval mode):
    x + proj(causal attention(qkv(ln1(x)))), then that + fc2(GELU(fc1(ln2(.)))). `qkv` is the
    q, k and v projections stacked (output: q | k | v); proj and fc2 add the residual in
    their epilogue, fc1 applies the GELU in its own; on the CSR kernel (C++), ln1 / ln2
    (nn.LayerNorm over d) are applied while the kernel packs its input, and with fc1 and fc2
    both on it the MLP is one op whose hidden activation stays in the kernel's packed
    layout. x (B, T, d) -> (B, T, d)."""

    def __init__(self, ln1: nn.Module, qkv: FusedLinear, heads: int, proj: FusedLinear,
                 ln2: nn.Module, fc1: FusedLinear, fc2: FusedLinear) -> None:
        super().__init__()
        self.ln1, self.qkv, self.heads, self.proj = ln1, qkv, heads, proj
        self.ln2, self.fc1, self.fc2 = ln2, fc1, fc2

    def _ln_args(self, ln: nn.Module, x: Tensor, kernels: Sequence[_Kernel | None]
                 ) -> tuple[bool, Tensor | None, Tensor | None, float] | None:
        """The C++ kernels' LayerNorm arguments for `ln` on x (B, T, d), or None where they
        cannot take it (another norm, the CSR kernels not chosen or not on this input)."""
        if not (type(ln) is nn.LayerNorm and tuple(ln.normalized_shape) == (x.shape[-1],)
                and x.is_contiguous()
                and all(isinstance(k, CSRLinear) and _on_cpp(x, k.values) for k in kernels)):
            return None
        return True, ln.weight, ln.bias, float(ln.eps)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        k0 = self.qkv.kernel
        ln1 = None if self.qkv.relu else self._ln_args(self.ln1, x, [k0])
        if ln1 is not None:
            # LayerNorm applied while the CSR kernel packs its input
            qkv = torch.ops.sparsecore._csr_dsd_cpu(
                x.view(b * t, d), k0.values, k0.col_idx, k0.row_ptr, k0.tiling, k0.n_out,
                k0.tiled_values, self.qkv.bias, None, 0, *ln1).view(b, t, -1)
        else:
            qkv = self.qkv(self.ln1(x))
        x = self.proj(causal_attention(qkv, self.heads), x)
        k1, k2 = self.fc1.kernel, self.fc2.kernel
        ln2 = self._ln_args(self.ln2, x, [k1, k2])
        if ln2 is not None and not self.fc2.relu:
            # both on the CSR kernel: one op, LayerNorm applied while it packs its input, the
            # hidden activation never unpacked
            out = torch.ops.sparsecore._csr_mlp_cpu(
                x.view(b * t, d), k1.values, k1.col_idx, k1.row_ptr, k1.tiling,
                k1.tiled_values, self.fc1.bias, 2, k2.values, k2.col_idx, k2.row_ptr,
                k2.tiling, k2.tiled_values, self.fc2.bias, x.view(b * t, d), 0, *ln2)
            return out.view(b, t, -1)
        return self.fc2(self.fc1(self.ln2(x)), x)

    def extra_repr(self) -> str:
        return f"heads={self.heads}"
