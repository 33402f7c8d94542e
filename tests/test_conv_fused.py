"""The fused CPU conv kernels of sparsecore.optimize(): "csr_direct" (each zero-padded sample
read in place) and "csr_chwn" (the batch as the vector dimension, padding taps skipped), with
their epilogue (2x2 max-pool, bias, residual, ReLU), against float64 dense references on fresh
random data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecore import _ext
from sparsecore.nn.fused import CHWN_CHANNEL_TILE, tap_major_csr
from sparsecore.testing import kernel_threads

pytestmark = pytest.mark.skipif(not _ext.has_cpu_ext(), reason="needs the C++ extension")


def _weight(c_out: int, c_in: int, kh: int, kw: int, density: float,
            dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    mask = torch.rand(c_out, c_in, kh, kw) < density
    mask[0, 0, 0, 0] = True  # at least one kept weight
    return torch.randn(c_out, c_in, kh, kw, dtype=dtype) * mask, mask


def _csr(w: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    m = mask.reshape(w.shape[0], -1)
    rows, cols = m.nonzero(as_tuple=True)
    row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=w.shape[0]), 0)
    return w.reshape(w.shape[0], -1)[rows, cols].contiguous(), cols.to(torch.int32), row_ptr


def _reference(x: Tensor, w: Tensor, stride, padding, dilation, bias, residual, relu,
               pool) -> Tensor:
    y = F.conv2d(x.double(), w.double(), None, stride, padding, dilation)
    if pool:
        y = F.max_pool2d(y, 2)
    if bias is not None:
        y = y + bias.double().view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.double()
    return y.relu() if relu else y


def _run(kernel: str, x: Tensor, w: Tensor, mask: Tensor, stride, padding, dilation, bias,
         residual, relu, pool, channel_tile: int = CHWN_CHANNEL_TILE) -> Tensor:
    if kernel in ("csr_direct", "csr_direct_plan"):
        values, col, row_ptr = _csr(w, mask)
        plan = None
        if kernel == "csr_direct_plan":  # built for the input size, kept by the caller
            plan = torch.ops.sparsecore._csr_conv2d_fused_plan_cpu(
                col, row_ptr, list(w.shape), list(x.shape[2:]), list(padding),
                list(dilation), list(stride), x.dtype)
        return torch.ops.sparsecore._csr_conv2d_fused_cpu(
            x, values, col, row_ptr, list(w.shape), list(padding), list(dilation), bias,
            residual, relu, pool, list(stride), plan)
    values, ci, tap_ptr = tap_major_csr(w, mask, channel_tile)
    return torch.ops.sparsecore._csr_conv2d_chwn_cpu(
        x, values, ci, tap_ptr, channel_tile, list(w.shape), list(stride), list(padding),
        list(dilation), bias, residual, relu, pool)


def _close(got: Tensor, ref: Tensor, dtype: torch.dtype) -> None:
    assert got.shape == ref.shape
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    scale = ref.abs().max().item() + 1e-30
    err = (got.double() - ref).abs().max().item()
    assert err <= tol * scale, f"error {err:.3g} of {scale:.3g}"


# (N, C_in, H, W, C_out, kh, kw, stride, padding, dilation)
GEOMS = [
    (3, 5, 7, 9, 6, 3, 3, (1, 1), (1, 1), (1, 1)),
    (2, 16, 8, 8, 32, 3, 3, (1, 1), (1, 1), (1, 1)),
    (17, 9, 3, 5, 4, 3, 3, (1, 1), (1, 1), (1, 1)),  # a 3-row image, odd batch
    (32, 8, 2, 2, 8, 3, 3, (1, 1), (1, 1), (1, 1)),  # 2x2: most taps on the padding
    (64, 13, 4, 4, 24, 3, 3, (1, 1), (1, 1), (1, 1)),  # a whole-vector batch
    (4, 7, 5, 6, 3, 1, 1, (1, 1), (0, 0), (1, 1)),
    (2, 4, 9, 9, 5, 3, 3, (1, 1), (2, 2), (2, 2)),
    (16, 6, 6, 7, 9, 5, 3, (1, 1), (2, 0), (1, 1)),  # 5x3 kernel, uneven padding
    (1, 11, 12, 10, 7, 3, 3, (1, 1), (1, 1), (1, 1)),  # batch 1
    (2, 6, 5, 33, 5, 3, 3, (1, 1), (1, 1), (1, 1)),  # rows of several vectors, a tail
    (3, 4, 16, 16, 6, 3, 3, (1, 1), (1, 1), (1, 1)),  # rows of exactly one float32 vector
    # float32 on AVX-512 takes output shifts here: across vectors (rows of two), by two
    # columns (dilation), by up to two (5x5)
    (2, 5, 6, 32, 7, 3, 3, (1, 1), (1, 1), (1, 1)),
    (2, 4, 8, 8, 5, 3, 3, (1, 1), (2, 2), (2, 2)),
    (2, 3, 9, 16, 4, 5, 5, (1, 1), (2, 2), (1, 1)),
]
STRIDED = [
    (5, 6, 8, 8, 7, 3, 3, (2, 2), (1, 1), (1, 1)),
    (16, 5, 9, 7, 6, 3, 3, (2, 1), (1, 1), (1, 1)),
    (64, 9, 8, 8, 11, 1, 1, (2, 2), (0, 0), (1, 1)),  # a ResNet shortcut
    (4, 3, 7, 7, 5, 3, 3, (2, 3), (0, 0), (2, 1)),
    (3, 5, 33, 34, 6, 3, 3, (2, 2), (1, 1), (1, 1)),  # odd rows: a phase one row short
    (2, 4, 32, 32, 5, 3, 3, (2, 2), (1, 1), (1, 1)),  # a ResNet stage's first conv
    (3, 7, 9, 11, 4, 1, 1, (2, 2), (0, 0), (1, 1)),  # shortcut on odd sizes: one phase read
    (2, 3, 10, 9, 4, 3, 3, (1, 2), (1, 1), (1, 1)),  # column stride only
    (2, 3, 13, 12, 4, 3, 2, (3, 2), (2, 1), (2, 1)),  # stride 3 with dilation 2
    (1, 4, 11, 10, 5, 5, 5, (2, 2), (2, 2), (1, 1)),  # 5x5: taps two rows apart, same phase
]


KERNELS = ("csr_direct", "csr_direct_plan", "csr_chwn")
CASES = [(kernel, g) for kernel in KERNELS for g in GEOMS + STRIDED]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel,geom", CASES)
@pytest.mark.parametrize("epi", ["none", "bias_relu", "pool_bias_relu_residual", "residual"])
def test_matches_dense_reference(kernel, geom, dtype, epi) -> None:
    n, c_in, h, w_, c_out, kh, kw, stride, padding, dilation = geom
    pool = "pool" in epi
    w, mask = _weight(c_out, c_in, kh, kw, 0.3, dtype)
    x = torch.randn(n, c_in, h, w_, dtype=dtype)
    out_hw = F.conv2d(x, w, None, stride, padding, dilation).shape[-2:]
    pool = pool and min(out_hw) >= 2  # a 1-pixel output cannot be pooled (test_errors)
    bias = torch.randn(c_out, dtype=dtype) if "bias" in epi else None
    relu = "relu" in epi
    ref_shape = F.max_pool2d(torch.empty(1, 1, *out_hw), 2).shape[-2:] if pool else out_hw
    residual = (torch.randn(n, c_out, *ref_shape, dtype=dtype) if "residual" in epi else None)
    x_before = x.clone()
    got = _run(kernel, x, w, mask, stride, padding, dilation, bias, residual, relu, pool)
    _close(got, _reference(x, w, stride, padding, dilation, bias, residual, relu, pool), dtype)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("batch", [1, 3, 32])
def test_threaded_paths(kernel, batch) -> None:
    """Two threads on small shapes: sample-parallel (batch >= threads), and the rows of one
    sample shared by the team (batch 1) / the work items of the batch-last kernel."""
    w, mask = _weight(19, 6, 3, 3, 0.4, torch.float64)
    x = torch.randn(batch, 6, 10, 8, dtype=torch.float64)
    bias = torch.randn(19, dtype=torch.float64)
    for stride in ((1, 1), (2, 2)):
        with kernel_threads(2):
            got = _run(kernel, x, w, mask, stride, (1, 1), (1, 1), bias, None, True, True)
        _close(got, _reference(x, w, stride, (1, 1), (1, 1), bias, None, True, True),
               torch.float64)


@pytest.mark.parametrize("channel_tile", [1, 4, 7, 64])
def test_chwn_channel_tiles(channel_tile) -> None:
    w, mask = _weight(12, 23, 3, 3, 0.3, torch.float64)
    x = torch.randn(8, 23, 6, 5, dtype=torch.float64)
    got = _run("csr_chwn", x, w, mask, (1, 1), (1, 1), (1, 1), None, None, False, False,
               channel_tile)
    _close(got, _reference(x, w, (1, 1), (1, 1), (1, 1), None, None, False, False),
           torch.float64)


def test_chwn_layout_is_kept_between_layers() -> None:
    """The output is batch-last (channel planes one cache line apart) and the next csr_chwn
    layer reads it (in place when the batch fills whole vectors); a residual in that layout or
    in NCHW gives the same result."""
    torch.manual_seed(0)
    w1, m1 = _weight(24, 8, 3, 3, 0.3, torch.float32)
    w2, m2 = _weight(24, 24, 3, 3, 0.3, torch.float32)
    x = torch.randn(64, 8, 6, 6)
    y1 = _run("csr_chwn", x, w1, m1, (1, 1), (1, 1), (1, 1), None, None, True, False)
    assert y1.stride(0) == 1 and y1.stride(3) == 64 and y1.stride(1) > 36 * 64
    for residual in (y1, y1.contiguous()):
        y2 = _run("csr_chwn", y1, w2, m2, (1, 1), (1, 1), (1, 1), None, residual, True, False)
        ref1 = _reference(x, w1, 1, 1, 1, None, None, True, False)
        ref2 = _reference(ref1, w2, 1, 1, 1, None, ref1, True, False)
        _close(y2, ref2, torch.float32)
    odd = _run("csr_chwn", x[:5], w1, m1, (1, 1), (1, 1), (1, 1), None, None, True, False)
    assert odd.stride()[0] == 1 and odd.stride()[3] == 5  # batch-last whatever the batch
    odd2 = _run("csr_chwn", odd, w2, m2, (1, 1), (1, 1), (1, 1), None, None, True, False)
    ref1 = _reference(x[:5], w1, 1, 1, 1, None, None, True, False)
    _close(odd2, _reference(ref1, w2, 1, 1, 1, None, None, True, False), torch.float32)


@pytest.mark.parametrize("kernel", ["csr_direct", "csr_chwn"])
def test_empty_batch(kernel) -> None:
    w, mask = _weight(4, 3, 3, 3, 0.5, torch.float32)
    out = _run(kernel, torch.randn(0, 3, 6, 6), w, mask, (1, 1), (1, 1), (1, 1),
               torch.randn(4), None, True, True)
    assert out.shape == (0, 4, 3, 3)


def test_errors() -> None:
    w, mask = _weight(4, 3, 3, 3, 0.5, torch.float32)
    x = torch.randn(2, 3, 6, 6)
    values, ci, tap_ptr = tap_major_csr(w, mask, 8)
    chwn = torch.ops.sparsecore._csr_conv2d_chwn_cpu
    args = (values, ci, tap_ptr, 8, [4, 3, 3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="channels"):
        chwn(torch.randn(2, 5, 6, 6), *args, None, None, False, False)
    bad_ci = ci.clone()
    bad_ci[0] = 3
    with pytest.raises(RuntimeError, match="invalid weight structure"):
        chwn(x, values, bad_ci, tap_ptr, *args[3:], None, None, False, False)
    bad_ptr = tap_ptr.clone()
    bad_ptr[-1] += 1
    with pytest.raises(RuntimeError, match="invalid weight structure"):
        chwn(x, values, ci, bad_ptr, *args[3:], None, None, False, False)
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        chwn(x, *args, None, torch.randn(2, 4, 5, 6), False, False)
    with pytest.raises(RuntimeError, match="float32 or both float64"):
        chwn(x.double(), *args, None, None, False, False)
    with pytest.raises(RuntimeError, match="too small to max-pool"):
        chwn(torch.randn(2, 3, 1, 1), *args, None, None, False, True)
    values, col, row_ptr = _csr(w, mask)
    direct = torch.ops.sparsecore._csr_conv2d_fused_cpu
    bad_col = col.clone()
    bad_col[0] = 27
    with pytest.raises(RuntimeError, match="out of range"):
        direct(x, values, bad_col, row_ptr, [4, 3, 3, 3], [1, 1], [1, 1], None, None, False,
               False)
    with pytest.raises(RuntimeError, match="bias must be"):
        direct(x, values, col, row_ptr, [4, 3, 3, 3], [1, 1], [1, 1], torch.randn(5), None,
               False, False)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        direct(torch.randn(2, 3, 1, 1), values, col, row_ptr, [4, 3, 3, 3], [0, 0], [1, 1],
               None, None, False, False)


def test_plan_checked_against_the_call() -> None:
    """A kept plan fits one input size, geometry, dtype and sparsity pattern; any other, or
    a plan whose offsets or segments were edited, is refused (never read out of bounds)."""
    w, mask = _weight(6, 5, 3, 3, 0.4, torch.float32)
    values, col, row_ptr = _csr(w, mask)
    x = torch.randn(2, 5, 8, 8)
    make = torch.ops.sparsecore._csr_conv2d_fused_plan_cpu
    direct = torch.ops.sparsecore._csr_conv2d_fused_cpu
    shape, one = list(w.shape), [1, 1]
    plan = make(col, row_ptr, shape, [8, 8], one, one, one, torch.float32)

    def run(x_, plan_, col_=col, stride=one):
        return direct(x_, values, col_, row_ptr, shape, one, one, None, None, False, False,
                      stride, plan_)

    _close(run(x, plan), _reference(x, w, one, one, one, None, None, False, False),
           torch.float32)
    with pytest.raises(RuntimeError, match="another input size"):
        run(torch.randn(2, 5, 9, 8), plan)
    with pytest.raises(RuntimeError, match="another input size"):
        run(x, plan, stride=[2, 2])
    with pytest.raises(RuntimeError, match="another input size"):
        direct(x.double(), values.double(), col, row_ptr, shape, one, one, None, None, False,
               False, one, plan)
    moved = col.clone()  # the same number of nonzeros, one moved to another column
    free = sorted(set(range(45)) - set(col[row_ptr[0]:row_ptr[1]].tolist()))
    moved[0] = free[0]
    moved[:row_ptr[1]] = moved[:row_ptr[1]].sort().values
    with pytest.raises(RuntimeError, match="another sparsity pattern"):
        run(x, plan, moved)
    header, groups = 19, 15  # the plan's header fields, and where G is (conv_direct.cpp)
    edits = [(lambda p: p.__setitem__(header, -1), "leave the input"),
             (lambda p: p.__setitem__(header + 1, 1 << 30), "leave the input"),
             (lambda p: p.__setitem__(-2, p[-1] + 1), "segments"),
             (lambda p: p.__setitem__(0, 7), "another input size"),
             (lambda p: p.__setitem__(groups, 1), "another input size")]
    if plan[groups] > 1:  # output shifts (AVX-512): the values' order follows the plan
        nnz = col.numel()
        edits += [(lambda p: p.__setitem__(header + nnz, nnz), "leaves the values"),
                  (lambda p: p.__setitem__(header + nnz, -1), "leaves the values")]
    for edit, match in edits:
        bad = plan.clone()
        edit(bad)
        with pytest.raises(RuntimeError, match=match):
            run(x, bad)
    with pytest.raises(RuntimeError, match="1-D contiguous int32"):
        run(x, plan.long())
    with pytest.raises(RuntimeError, match="float32 or float64"):
        make(col, row_ptr, shape, [8, 8], one, one, one, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c_in", [100, 97])
def test_direct_channel_tiles(dtype, c_in) -> None:
    """Inputs too wide for one channel tile in L1: the plan cuts the channels into tiles of
    equal size (within one channel; no short last tile), and the rows' partial sums carried
    from tile to tile give the float64 reference, with bias, residual and ReLU."""
    w, mask = _weight(9, c_in, 3, 3, 0.5, dtype)
    values, col, row_ptr = _csr(w, mask)
    x = torch.randn(2, c_in, 32, 32, dtype=dtype)
    one = [1, 1]
    plan = torch.ops.sparsecore._csr_conv2d_fused_plan_cpu(
        col, row_ptr, list(w.shape), [32, 32], one, one, one, dtype)
    tiles, tile_c = int(plan[16]), int(plan[17])  # the header's kPTiles, kPTileC
    assert tiles >= 2
    assert tiles * tile_c >= c_in > (tiles - 1) * tile_c
    assert c_in - (tiles - 1) * tile_c >= tile_c - tiles  # the last tile is no short one
    bias, residual = torch.randn(9, dtype=dtype), torch.randn(2, 9, 32, 32, dtype=dtype)
    got = torch.ops.sparsecore._csr_conv2d_fused_cpu(
        x, values, col, row_ptr, list(w.shape), one, one, bias, residual, True, False, one,
        plan)
    _close(got, _reference(x, w, one, one, one, bias, residual, True, False), dtype)


def test_direct_layer_keeps_its_plan() -> None:
    """CSRDirectConv builds its plan once per input size and rebuilds it when its index
    buffers are overwritten in place (another pattern of the same size loaded)."""
    from sparsecore.nn.fused import CSRDirectConv

    w, mask = _weight(8, 4, 3, 3, 0.5, torch.float32)
    layer = CSRDirectConv(w, mask, (1, 1), (1, 1), (1, 1))
    x = torch.randn(3, 4, 7, 7)
    layer(x, None)
    first = layer.plan(x)
    layer(torch.randn(1, 4, 7, 7), None)  # another batch: the same plan
    assert layer.plan(x) is first
    assert layer.plan(torch.randn(1, 4, 9, 9)) is not first
    mask2 = mask.flatten()[torch.randperm(mask.numel())].view(mask.shape)  # as many kept
    w2 = torch.randn(w.shape) * mask2
    layer.load_state_dict(CSRDirectConv(w2, mask2, (1, 1), (1, 1), (1, 1)).state_dict())
    assert layer.plan(x) is not first
    got = layer(x, None)
    _close(got, _reference(x, w2, (1, 1), (1, 1), (1, 1), None, None, False, False),
           torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geom", GEOMS + STRIDED)
@pytest.mark.parametrize("layout", ["nchw", "batch_last"])
def test_chwn_weight_gradient(geom, dtype, layout) -> None:
    """dW at the kept positions, in the tap-major order of the values, vs torch's conv weight
    gradient; dy / x in NCHW or in the kernel's own batch-last layout."""
    n, c_in, h, w_, c_out, kh, kw, stride, padding, dilation = geom
    w, mask = _weight(c_out, c_in, kh, kw, 0.3, dtype)
    x = torch.randn(n, c_in, h, w_, dtype=dtype)
    dy = torch.randn_like(F.conv2d(x, w, None, stride, padding, dilation))
    ref = torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), stride, padding,
                                      dilation)
    values, ci, tap_ptr = tap_major_csr(ref, mask, 5)
    if layout == "batch_last":  # the forward op's output layout, via an identity 1x1 conv
        def batch_last(t: Tensor) -> Tensor:
            c = t.shape[1]
            eye = torch.eye(c, dtype=dtype).view(c, c, 1, 1)
            out = _run("csr_chwn", t, eye, eye != 0, (1, 1), (0, 0), (1, 1), None, None, False,
                       False)
            assert torch.equal(out, t) and out.stride(0) == 1
            return out

        x, dy = batch_last(x), batch_last(dy)
    with kernel_threads(2):
        got = torch.ops.sparsecore._csr_conv2d_chwn_dw_cpu(
            dy, x, ci, tap_ptr, 5, list(w.shape), list(stride), list(padding), list(dilation))
    _close(got, values, dtype)


def test_big_output_direct() -> None:
    """An output of 4 MiB and more (written with non-temporal stores) and one just below,
    with bias, residual and ReLU, against the float64 reference."""
    for n in (64, 63):
        w, mask = _weight(64, 3, 3, 3, 0.5, torch.float32)
        x = torch.randn(n, 3, 16, 16)
        bias, residual = torch.randn(64), torch.randn(n, 64, 16, 16)
        got = _run("csr_direct", x, w, mask, (1, 1), (1, 1), (1, 1), bias, residual, True, False)
        _close(got, _reference(x, w, (1, 1), (1, 1), (1, 1), bias, residual, True, False),
               torch.float32)


def test_denormals_flushed_inside_and_kept_outside() -> None:
    """The kernels run with denormals as zero (an input decayed into denormals takes no
    microcode assists) and give the calling thread its IEEE mode back: torch's own ops
    after them still produce denormals."""
    w, mask = _weight(8, 4, 3, 3, 0.5, torch.float32)
    x = torch.randn(2, 4, 6, 6) * 1e-39  # denormal float32 inputs
    x[0, 0, 0, 0] = 1.0
    got = _run("csr_direct", x, w, mask, (1, 1), (1, 1), (1, 1), None, None, False, False)
    _close(got, _reference(x, w, (1, 1), (1, 1), (1, 1), None, None, False, False),
           torch.float32)
    tiny = torch.tensor([1e-38]) * torch.tensor([1e-2])
    assert tiny.item() != 0.0  # not flushed: the thread's mode was restored
