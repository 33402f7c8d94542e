"""CSR ops: unstructured sparse x dense (dsd), SDDMM, and Conv2d on the CSR matrix view.

Backends: "dense" (dense torch on the weight densified in C++, chosen on the CPU below the
measured crossover sparsity, where MKL's dense product beats the sparse kernel), "cpp"
(csrc/cpu/csr.cpp: tile-major CSR walk over feature-major packed operands, OpenMP; a conv
as a direct sparse convolution over per-sample shifted copies of the input, its input
gradient likewise at stride 1 and as im2col + the same walk, sample by sample, otherwise;
CPU float32/float64), "triton" (kernels/csr.py;
CUDA float32/float16/bfloat16, or CPU under TRITON_INTERPRET=1 when forced; conv through an
im2col matrix), "reference" (dense torch on the densified weight: the fallback and the
oracle of every test).

`tiling` arguments are the C++ kernels' tile-major layouts (CSRWeight.cpu_tilings()); None
makes the C++ backend build one per call, and the other backends ignore them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsecore._dispatch import (
    Backend,
    Dispatcher,
    cpp_reasons,
    forced_backend,
    triton_reasons,
)
from sparsecore.ops._common import (
    TRITON_DTYPES,
    always,
    col2im_rows,
    conv_out_hw,
    im2col_rows,
    rows_of,
)

__all__ = [
    "CSR_BATCH_LAST_MAX_PIXELS",
    "CSR_DENSE_BELOW",
    "csr_conv_batch_last",
    "csr_conv_crossover",
    "csr_runs_dense",
    "csr_tile_values",
    "csr_dsd",
    "csr_sddmm",
    "csr_conv2d",
    "csr_conv2d_dx",
    "csr_conv2d_dw",
    "flipped_conv_padding",
]

# Dense crossover on the CPU: the sparse kernels run from this sparsity up (below it the
# "dense" backend runs the reference, i.e. MKL/oneDNN on the densified weight). Chosen where
# the product reached parity with dense in `python -m bench layers` (fwd and fwd+bwd; a batch
# below 8 runs the gather kernel, which beats dense GEMV at a lower sparsity): see
# bench/RESULTS.md (layers, crossover).
CSR_DENSE_BELOW = {"linear": 0.6, "linear_small_batch": 0.3, "conv": 0.6}
# The sparse conv layers (sparsecore.nn) run a conv whose output has at most this many
# pixels per sample (the 8x8, 4x4 and 2x2 maps of CIFAR nets' deep layers, most of which
# csr_conv_crossover sends to dense) on the batch-last ("CHWN") C++ kernels on the CPU: the
# batch is their vector dimension, which a small map cannot fill in the per-sample kernels
# (see csr_conv_batch_last).
CSR_BATCH_LAST_MAX_PIXELS = 64


def csr_conv_crossover(weight_shape: Sequence[int], out_pixels: int) -> float:
    """The sparsity from which the CSR Conv2d kernels beat dense on the CPU, by shape.

    Few output pixels per sample (deep layers of CIFAR nets) or a short reduction (few input
    channels) leave the kernel too little reuse per gathered weight. The bands below follow
    the per-shape crossover measured with the kernel forced (batch 64, 3x3, float32, fwd and
    fwd+bwd vs oneDNN): see bench/RESULTS.md (layers, conv crossover by shape). 2x2 outputs
    never reached parity, so they are never chosen automatically. (The sparse conv layers run
    outputs of up to CSR_BATCH_LAST_MAX_PIXELS pixels on the batch-last kernels instead, on
    the CPU with the extension: see csr_conv_batch_last; this crossover then decides for the
    other layers and for direct callers of the ops.)
    """
    reduction = math.prod(weight_shape[1:])
    if out_pixels < 16:
        return 1.0  # never chosen automatically (use_backend("cpp") still forces it)
    if out_pixels < 64 or reduction < 576:
        return 0.9
    if out_pixels * reduction < 64 * 1152:
        return 0.8
    return CSR_DENSE_BELOW["conv"]


def csr_conv_batch_last(x: Tensor, values: Tensor, out_hw: Sequence[int]) -> bool:
    """Whether the sparse conv layers run a conv of input x and kept weights `values` whose
    output is out_hw (Ho, Wo) on the batch-last C++ kernels (forward, the weight gradient and,
    at stride 1, the input gradient) rather than through the ops' dispatch: an output of at
    most CSR_BATCH_LAST_MAX_PIXELS pixels, a batch that is not empty, the C++ kernels able to
    take these tensors (CPU, float32/float64, extension loaded), and no backend but "cpp"
    forced (use_backend("dense") or "reference" keep those ops'). Unlike the dense crossover
    this does not look at the sparsity: sparsify() leaves layers too dense for the sparse
    kernels dense already."""
    forced = forced_backend()
    if forced != "cpp" and forced in {b.name for b in _csr_conv2d_dispatch.backends}:
        return False
    if out_hw[0] * out_hw[1] > CSR_BATCH_LAST_MAX_PIXELS or x.shape[0] == 0:
        return False
    return not cpp_reasons([x, values])


def _dense_reasons(kind: str, tensor: Tensor, nnz: int, n_rows: int, n_cols: int,
                   crossover: float | None = None) -> list[str]:
    """Why the dense fallback is not chosen: no C++ helpers for these tensors, or sparse
    enough for the kernels (that part is waived when forced with use_backend("dense"))."""
    why = cpp_reasons([tensor])
    if why or forced_backend() == "dense":
        return why
    total = n_rows * n_cols
    sparsity = 1.0 - nnz / total if total else 1.0
    crossover = CSR_DENSE_BELOW[kind] if crossover is None else crossover
    if sparsity >= crossover:
        return [f"sparsity {sparsity:.2f} is at or above the {kind} crossover "
                f"{crossover:.2f} (the sparse kernels win there)"]
    return []


def _csr_dense(values: Tensor, col_idx: Tensor, row_ptr: Tensor, n_cols: int) -> Tensor:
    """The dense (n_rows, n_cols) matrix of a CSR."""
    rows = rows_of(row_ptr, values.numel())
    out = values.new_zeros(row_ptr.numel() - 1, n_cols)
    return out.index_put_((rows, col_idx.long()), values)


def _check_same(op: str, a: Tensor, b: Tensor, what: str) -> None:
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"sparsecore.{op}: {what} are {a.dtype} on {a.device} and {b.dtype} on "
                         f"{b.device}; they must match")


def _densify(values: Tensor, col_idx: Tensor, row_ptr: Tensor, n_cols: int) -> Tensor:
    return torch.ops.sparsecore._csr_to_dense_cpu(values.contiguous(), col_idx, row_ptr, n_cols)


def _sample(full: Tensor, row_ptr: Tensor, col_idx: Tensor) -> Tensor:
    return torch.ops.sparsecore._csr_sample_cpu(full, row_ptr, col_idx)


# ---- csr_dsd
@dataclass(frozen=True)
class _DsdArgs:
    """The arguments of one csr_dsd call (see csr_dsd)."""

    x: Tensor
    values: Tensor
    col_idx: Tensor
    row_ptr: Tensor
    row_order: Tensor
    tiling: Tensor | None
    n_out: int
    tiled_values: Tensor | None = None


def _dsd_dense(a: _DsdArgs) -> Tensor:
    return torch.ops.sparsecore._csr_dsd_dense_cpu(a.x, a.values.contiguous(), a.col_idx,
                                                   a.row_ptr, a.n_out)


def _dsd_cpp(a: _DsdArgs) -> Tensor:
    return torch.ops.sparsecore._csr_dsd_cpu(a.x, a.values.contiguous(), a.col_idx, a.row_ptr,
                                             a.tiling, a.n_out, a.tiled_values)


def _dsd_reference(a: _DsdArgs) -> Tensor:
    return a.x @ _csr_dense(a.values, a.col_idx, a.row_ptr, a.x.shape[1]).t()


def _dsd_triton(a: _DsdArgs) -> Tensor:
    from sparsecore.kernels.csr import spmm

    return spmm(a.x, a.values, a.col_idx, a.row_ptr, a.n_out, a.row_order)


def _dsd_dense_reasons(a: _DsdArgs) -> list[str]:
    kind = "linear" if a.x.shape[0] >= 8 else "linear_small_batch"
    return _dense_reasons(kind, a.x, a.values.numel(), a.row_ptr.numel() - 1, a.x.shape[1])


_csr_dsd_dispatch = Dispatcher(
    "csr_dsd",
    _DsdArgs,
    [
        Backend("dense", _dsd_dense_reasons, _dsd_dense),
        Backend("cpp", lambda a: cpp_reasons([a.x, a.values]), _dsd_cpp),
        Backend("triton", lambda a: triton_reasons([a.x, a.values], TRITON_DTYPES), _dsd_triton),
        Backend("reference", always, _dsd_reference),
    ],
)


def csr_runs_dense(op: str, *args: object) -> Tensor | None:
    """The dense weight matrix (n_rows, n_cols) when `op`'s dispatcher ("csr_dsd" or
    "csr_conv2d", with that op's arguments) picks the dense fallback, else None. The layers
    ask once per forward and reuse the matrix for the input gradient, instead of densifying
    W and W^T op by op."""
    dispatch = _csr_dsd_dispatch if op == "csr_dsd" else _csr_conv2d_dispatch
    if dispatch.select(*args).name != "dense":
        return None
    a = dispatch.args(*args)
    n_cols = a.x.shape[1] if isinstance(a, _DsdArgs) else math.prod(a.weight_shape[1:])
    return _densify(a.values, a.col_idx, a.row_ptr, n_cols)


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
@dataclass(frozen=True)
class _SddmmArgs:
    """The arguments of one csr_sddmm call (see csr_sddmm)."""

    dy: Tensor
    x: Tensor
    row_ptr: Tensor
    col_idx: Tensor
    row_idx: Tensor
    row_order: Tensor
    tiling: Tensor | None


def _sddmm_dense(a: _SddmmArgs) -> Tensor:
    return _sample(a.dy.t() @ a.x, a.row_ptr, a.col_idx)


def _sddmm_cpp(a: _SddmmArgs) -> Tensor:
    return torch.ops.sparsecore._csr_sddmm_cpu(a.dy, a.x, a.row_ptr, a.col_idx, a.tiling)


def _sddmm_reference(a: _SddmmArgs) -> Tensor:
    return (a.dy.t() @ a.x)[a.row_idx.long(), a.col_idx.long()]


def _sddmm_triton(a: _SddmmArgs) -> Tensor:
    from sparsecore.kernels.csr import sddmm

    return sddmm(a.dy, a.x, a.row_idx, a.col_idx)


def _sddmm_dense_reasons(a: _SddmmArgs) -> list[str]:
    kind = "linear" if a.x.shape[0] >= 8 else "linear_small_batch"
    return _dense_reasons(kind, a.x, a.col_idx.numel(), a.dy.shape[1], a.x.shape[1])


_csr_sddmm_dispatch = Dispatcher(
    "csr_sddmm",
    _SddmmArgs,
    [
        Backend("dense", _sddmm_dense_reasons, _sddmm_dense),
        Backend("cpp", lambda a: cpp_reasons([a.dy, a.x]), _sddmm_cpp),
        Backend("triton", lambda a: triton_reasons([a.dy, a.x], TRITON_DTYPES), _sddmm_triton),
        Backend("reference", always, _sddmm_reference),
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
# The C++ backend runs a conv directly on per-sample shifted copies of the input
# (_csr_conv2d_fused_cpu: no im2col), and the input gradient of a stride-1 conv as that same
# kernel on the transposed-flipped weight (see flipped_conv_padding); the input gradient at
# other strides, and the weight gradient, run im2col + the CSR walk per sample, with the
# sample's output pixels as the vector dimension (see csrc/cpu/csr.cpp). The other backends
# go through an im2col matrix of the whole batch.
def flipped_conv_padding(kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                         dilation: Sequence[int]) -> list[int] | None:
    """The padding d*(k-1)-p under which the input gradient of a stride-1 conv is the stride-1
    conv of dY with the transposed-flipped weight W' (C_in, C_out, kh, kw), W'[i, o, u, v] =
    W[o, i, kh-1-u, kw-1-v] (conv_transpose2d as a conv); None where that does not hold (a
    stride other than 1, or padding beyond the dilated kernel's reach)."""
    if list(stride) != [1, 1]:
        return None
    pad = [d * (k - 1) - p for k, p, d in zip(kernel, padding, dilation)]
    return pad if min(pad) >= 0 else None


@dataclass(frozen=True)
class _ConvArgs:
    """The arguments of one csr_conv2d call (see csr_conv2d); geometry as lists."""

    x: Tensor
    values: Tensor
    col_idx: Tensor
    row_ptr: Tensor
    tiling: Tensor | None
    weight_shape: list[int]
    stride: list[int]
    padding: list[int]
    dilation: list[int]


@dataclass(frozen=True)
class _ConvDxArgs:
    """The arguments of one csr_conv2d_dx call (see csr_conv2d_dx); geometry as lists."""

    dy: Tensor
    t_values: Tensor
    t_col_idx: Tensor
    t_row_ptr: Tensor
    t_tiling: Tensor | None
    weight_shape: list[int]
    input_hw: list[int]
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    f_values: Tensor | None = None
    f_col_idx: Tensor | None = None
    f_row_ptr: Tensor | None = None


@dataclass(frozen=True)
class _ConvDwArgs:
    """The arguments of one csr_conv2d_dw call (see csr_conv2d_dw); geometry as lists."""

    dy: Tensor
    x: Tensor
    row_ptr: Tensor
    col_idx: Tensor
    row_idx: Tensor
    tiling: Tensor | None
    weight_shape: list[int]
    stride: list[int]
    padding: list[int]
    dilation: list[int]


def _conv_dense(densify: Callable[..., Tensor]) -> Callable[[_ConvArgs], Tensor]:
    """The conv forward on the weight densified by `densify`."""

    def run(a: _ConvArgs) -> Tensor:
        w = densify(a.values, a.col_idx, a.row_ptr, math.prod(a.weight_shape[1:]))
        return torch.nn.functional.conv2d(a.x, w.view(a.weight_shape), None, a.stride,
                                          a.padding, a.dilation)

    return run


def _conv_dx_dense(densify: Callable[..., Tensor]) -> Callable[[_ConvDxArgs], Tensor]:
    """The conv input gradient on the weight densified (from its transpose) by `densify`."""

    def run(a: _ConvDxArgs) -> Tensor:
        wt = densify(a.t_values, a.t_col_idx, a.t_row_ptr, a.weight_shape[0])
        x_shape = [a.dy.shape[0], a.weight_shape[1], *a.input_hw]
        return torch.nn.grad.conv2d_input(x_shape, wt.t().reshape(a.weight_shape), a.dy,
                                          a.stride, a.padding, a.dilation)

    return run


def _conv_dw_dense(a: _ConvDwArgs) -> Tensor:
    dw = torch.nn.grad.conv2d_weight(a.x, a.weight_shape, a.dy, a.stride, a.padding,
                                     a.dilation)
    return _sample(dw.view(a.weight_shape[0], -1), a.row_ptr, a.col_idx)


def _conv_dw_reference(a: _ConvDwArgs) -> Tensor:
    dw = torch.nn.grad.conv2d_weight(a.x, a.weight_shape, a.dy, a.stride, a.padding,
                                     a.dilation)
    return dw.reshape(a.weight_shape[0], -1)[a.row_idx.long(), a.col_idx.long()]


def _conv_cpp(a: _ConvArgs) -> Tensor:
    # the direct kernel at every stride: faster than im2col + the tiled walk (_csr_conv2d_cpu)
    # on the bench's stride-2 convs too (bench/RESULTS.md)
    return torch.ops.sparsecore._csr_conv2d_fused_cpu(
        a.x, a.values.contiguous(), a.col_idx, a.row_ptr, a.weight_shape, a.padding,
        a.dilation, None, None, False, False, a.stride)


def _conv_dx_flipped_padding(a: _ConvDxArgs) -> list[int] | None:
    """The padding of the direct dX conv on the transposed-flipped weight, when it is given
    and the geometry allows it (the conv must give back the input's size), else None."""
    if a.f_values is None:
        return None
    pad = flipped_conv_padding(a.weight_shape[2:], a.stride, a.padding, a.dilation)
    if pad is None or list(conv_out_hw(a.dy.shape[2:], a.weight_shape[2:], [1, 1], pad,
                                       a.dilation)) != a.input_hw:
        return None
    return pad


def _conv_dx_cpp(a: _ConvDxArgs) -> Tensor:
    pad = _conv_dx_flipped_padding(a)
    if pad is not None:
        c_out, c_in, kh, kw = a.weight_shape
        return torch.ops.sparsecore._csr_conv2d_fused_cpu(
            a.dy, a.f_values.contiguous(), a.f_col_idx, a.f_row_ptr, [c_in, c_out, kh, kw],
            pad, a.dilation, None, None, False, False)
    return torch.ops.sparsecore._csr_conv2d_dx_cpu(a.dy, a.t_values.contiguous(), a.t_col_idx,
                                                   a.t_row_ptr, a.t_tiling, a.weight_shape,
                                                   a.input_hw, a.stride, a.padding, a.dilation)


def _conv_dw_cpp(a: _ConvDwArgs) -> Tensor:
    return torch.ops.sparsecore._csr_conv2d_dw_cpu(a.dy, a.x, a.row_ptr, a.col_idx, a.tiling,
                                                   a.weight_shape, a.stride, a.padding,
                                                   a.dilation)


def _conv_triton(a: _ConvArgs) -> Tensor:
    from sparsecore.kernels.csr import spmm

    n_out = a.weight_shape[0]
    cols = im2col_rows(a.x, a.weight_shape[2:], a.stride, a.padding, a.dilation)
    ho, wo = conv_out_hw(a.x.shape[2:], a.weight_shape[2:], a.stride, a.padding, a.dilation)
    y2 = spmm(cols, a.values, a.col_idx, a.row_ptr, n_out)
    return y2.view(a.x.shape[0], ho, wo, n_out).permute(0, 3, 1, 2).contiguous()


def _conv_dx_triton(a: _ConvDxArgs) -> Tensor:
    from sparsecore.kernels.csr import spmm

    dy2 = a.dy.permute(0, 2, 3, 1).reshape(-1, a.weight_shape[0])
    dcols = spmm(dy2, a.t_values, a.t_col_idx, a.t_row_ptr, a.t_row_ptr.numel() - 1)
    x_shape = [a.dy.shape[0], a.weight_shape[1], *a.input_hw]
    return col2im_rows(dcols, x_shape, a.weight_shape[2:], a.stride, a.padding, a.dilation)


def _conv_dw_triton(a: _ConvDwArgs) -> Tensor:
    from sparsecore.kernels.csr import sddmm

    cols = im2col_rows(a.x, a.weight_shape[2:], a.stride, a.padding, a.dilation)
    dy2 = a.dy.permute(0, 2, 3, 1).reshape(-1, a.weight_shape[0])
    return sddmm(dy2, cols, a.row_idx, a.col_idx)


def _conv_dense_reasons(t: Tensor, nnz: int, weight_shape: Sequence[int],
                        out_hw: Sequence[int]) -> list[str]:
    return _dense_reasons("conv", t, nnz, weight_shape[0], math.prod(weight_shape[1:]),
                          csr_conv_crossover(weight_shape, out_hw[0] * out_hw[1]))


def _conv_fwd_dense_reasons(a: _ConvArgs) -> list[str]:
    out_hw = conv_out_hw(a.x.shape[-2:], a.weight_shape[2:], a.stride, a.padding, a.dilation)
    return _conv_dense_reasons(a.x, a.values.numel(), a.weight_shape, out_hw)


_csr_conv2d_dispatch = Dispatcher(
    "csr_conv2d",
    _ConvArgs,
    [
        Backend("dense", _conv_fwd_dense_reasons, _conv_dense(_densify)),
        Backend("cpp", lambda a: cpp_reasons([a.x, a.values]), _conv_cpp),
        Backend("triton", lambda a: triton_reasons([a.x, a.values], TRITON_DTYPES), _conv_triton),
        Backend("reference", always, _conv_dense(_csr_dense)),
    ],
)
_csr_conv2d_dx_dispatch = Dispatcher(
    "csr_conv2d_dx",
    _ConvDxArgs,
    [
        Backend("dense", lambda a: _conv_dense_reasons(a.dy, a.t_values.numel(), a.weight_shape,
                                                       a.dy.shape[-2:]),
                _conv_dx_dense(_densify)),
        Backend("cpp", lambda a: cpp_reasons([a.dy, a.t_values]), _conv_dx_cpp),
        Backend("triton", lambda a: triton_reasons([a.dy, a.t_values], TRITON_DTYPES),
                _conv_dx_triton),
        Backend("reference", always, _conv_dx_dense(_csr_dense)),
    ],
)
_csr_conv2d_dw_dispatch = Dispatcher(
    "csr_conv2d_dw",
    _ConvDwArgs,
    [
        Backend("dense", lambda a: _conv_dense_reasons(a.x, a.col_idx.numel(), a.weight_shape,
                                                       a.dy.shape[-2:]),
                _conv_dw_dense),
        Backend("cpp", lambda a: cpp_reasons([a.dy, a.x]), _conv_dw_cpp),
        Backend("triton", lambda a: triton_reasons([a.dy, a.x], TRITON_DTYPES), _conv_dw_triton),
        Backend("reference", always, _conv_dw_reference),
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


def _check_flipped(weight_shape: Sequence[int], t_values: Tensor, f_values: Tensor | None,
                   f_col_idx: Tensor | None, f_row_ptr: Tensor | None) -> None:
    given = [t is not None for t in (f_values, f_col_idx, f_row_ptr)]
    if not any(given):
        return
    if not all(given):
        raise ValueError("sparsecore.csr_conv2d_dx: give all of f_values, f_col_idx and "
                         "f_row_ptr, or none")
    _check_same("csr_conv2d_dx", t_values, f_values, "t_values and f_values")
    c_in = weight_shape[1]
    if f_values.shape != t_values.shape or f_col_idx.shape != t_values.shape or \
            f_row_ptr.shape != (c_in + 1,):
        raise ValueError(
            f"sparsecore.csr_conv2d_dx: expected f_values and f_col_idx {tuple(t_values.shape)} "
            f"and f_row_ptr ({c_in + 1},); got {tuple(f_values.shape)}, "
            f"{tuple(f_col_idx.shape)}, {tuple(f_row_ptr.shape)}"
        )


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
    (N, C_out, Ho, Wo), contiguous.

    On the C++ backend the conv runs the direct kernel (_csr_conv2d_fused_cpu: reads
    per-sample shifted copies of the input, no im2col, ignores `tiling`)."""
    _check_conv("csr_conv2d", x, values, weight_shape, stride, padding, dilation)
    return _csr_conv2d_dispatch(x, values, col_idx, row_ptr, tiling, list(weight_shape),
                                list(stride), list(padding), list(dilation))


@csr_conv2d.register_fake
def _(x: Tensor, values: Tensor, col_idx: Tensor, row_ptr: Tensor, tiling: Tensor | None,
      weight_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
      dilation: Sequence[int]) -> Tensor:
    _check_conv("csr_conv2d", x, values, weight_shape, stride, padding, dilation)
    ho, wo = conv_out_hw(x.shape[2:], weight_shape[2:], stride, padding, dilation)
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
    f_values: Tensor | None = None,
    f_col_idx: Tensor | None = None,
    f_row_ptr: Tensor | None = None,
) -> Tensor:
    """Input gradient (N, C, H, W) of csr_conv2d from dy (N, C_out, Ho, Wo), through the
    transposed CSR of the weight's matrix view (t_values = values[t_perm], t_col_idx,
    t_row_ptr, t_tiling).

    f_values (= values[f_perm]), f_col_idx, f_row_ptr (C + 1,), optional: the CSR of the
    transposed-flipped weight W' (C, C_out, kh, kw) (CSRWeight.cpu_conv_flip()). Given them,
    the C++ backend runs a stride-1 conv whose padding p <= d*(k-1) (flipped_conv_padding) as
    dX = conv2d(dy, W', stride 1, padding d*(k-1)-p, dilation d) on the direct kernel
    (_csr_conv2d_fused_cpu, no im2col); every other case, and the other backends, use the
    transposed CSR: on the C++ backend its tiled walk per sample, then col2im
    (_csr_conv2d_dx_cpu)."""
    _check_conv("csr_conv2d_dx", dy, t_values, weight_shape, stride, padding, dilation)
    _check_flipped(weight_shape, t_values, f_values, f_col_idx, f_row_ptr)
    return _csr_conv2d_dx_dispatch(dy, t_values, t_col_idx, t_row_ptr, t_tiling,
                                   list(weight_shape), list(input_hw), list(stride),
                                   list(padding), list(dilation), f_values, f_col_idx,
                                   f_row_ptr)


@csr_conv2d_dx.register_fake
def _(dy: Tensor, t_values: Tensor, t_col_idx: Tensor, t_row_ptr: Tensor,
      t_tiling: Tensor | None, weight_shape: Sequence[int], input_hw: Sequence[int],
      stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
      f_values: Tensor | None = None, f_col_idx: Tensor | None = None,
      f_row_ptr: Tensor | None = None) -> Tensor:
    _check_conv("csr_conv2d_dx", dy, t_values, weight_shape, stride, padding, dilation)
    _check_flipped(weight_shape, t_values, f_values, f_col_idx, f_row_ptr)
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
