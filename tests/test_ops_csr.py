"""The CSR custom ops (csr_dsd, csr_sddmm, csr_conv2d, csr_conv2d_dx, csr_conv2d_dw) on every
CPU backend against float64 dense references, the C++ direct (stride-1) conv kernels and
which geometry runs them, opcheck, the dispatcher's refusals, and the Triton kernels under
TRITON_INTERPRET=1 (marker `interpreter`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsecore import NotSupportedError, has_cpu_ext, ops, use_backend
from sparsecore.formats import CSRWeight, conv_flip_structure
from sparsecore.testing import assert_error_within, kernel_threads

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["reference"] + (["dense", "cpp"] if has_cpu_ext() else [])
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]


def random_csr(shape: tuple[int, ...], sparsity: float,
               dtype: torch.dtype = torch.float32) -> CSRWeight:
    """A fresh random CSR weight; row 0 is empty whenever sparsity > 0."""
    mask = torch.rand(shape) >= sparsity
    if sparsity > 0:
        mask[0] = False
    return CSRWeight.from_dense(torch.randn(shape, dtype=torch.float64).to(dtype), mask)


def linear_products(w: CSRWeight, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Y = X W^T, dX = dY W, dW at the kept positions, through the ops."""
    tiling, t_tiling = w.cpu_tilings()
    return {
        "y": ops.csr_dsd(x, w.values, w.col_idx, w.row_ptr, w.row_order, tiling, w.n_rows),
        "dx": ops.csr_dsd(dy, w.transposed_values(), w.t_col_idx, w.t_row_ptr, w.t_row_order,
                          t_tiling, w.n_cols),
        "dw": ops.csr_sddmm(dy, x, w.row_ptr, w.col_idx, w.row_idx, w.row_order, tiling),
    }


def dense_linear(w: CSRWeight, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    d = w.to_dense().to(x.dtype)
    return {"y": x @ d.t(), "dx": dy @ d,
            "dw": (dy.t() @ x)[w.row_idx.long(), w.col_idx.long()]}


def check_all(got: dict, ref64: dict, dense: dict) -> None:
    for key in got:
        assert_error_within(got[key], ref64[key], dense[key], what=key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", [(37, 53), (8, 300)])
@pytest.mark.parametrize("batch", [1, 3, 8, 67])
def test_linear_ops(backend: str, sparsity: float, shape: tuple[int, int], batch: int) -> None:
    w = random_csr(shape, sparsity)
    x = torch.randn(batch, shape[1])
    dy = torch.randn(batch, shape[0])
    with use_backend(backend):
        got = linear_products(w, x, dy)
    ref64 = dense_linear(w.to(torch.float64), x.double(), dy.double())
    check_all(got, ref64, dense_linear(w, x, dy))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_ops_float64_and_strides(backend: str) -> None:
    w = random_csr((29, 70), 0.8, torch.float64)
    x = torch.randn(70, 40, dtype=torch.float64).t()  # non-contiguous (40, 70)
    dy = torch.randn(40, 58, dtype=torch.float64)[:, ::2]  # non-contiguous (40, 29)
    with use_backend(backend):
        got = linear_products(w, x, dy)
    ref = dense_linear(w, x.contiguous(), dy.contiguous())
    for key in got:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not has_cpu_ext(), reason="C++ extension not built")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [3, 130])  # the gather kernels and the tiled walk
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_without_tiling_and_threads(threads: int, batch: int, dtype: torch.dtype) -> None:
    """The C++ ops build a tiling when given none; the threads' row ranges (several K tiles,
    several batch chunks) and the per-thread column ranges of the transpose agree with the
    dense products."""
    w = random_csr((70, 530), 0.9, dtype)
    x, dy = torch.randn(batch, 530, dtype=dtype), torch.randn(batch, 70, dtype=dtype)
    with use_backend("cpp"), kernel_threads(threads):
        got = linear_products(w, x, dy)
        y = ops.csr_dsd(x, w.values, w.col_idx, w.row_ptr, w.row_order, None, 70)
        dw = ops.csr_sddmm(dy, x, w.row_ptr, w.col_idx, w.row_idx, w.row_order, None)
    assert torch.equal(y, got["y"]) and torch.equal(dw, got["dw"])
    check_all(got, dense_linear(w.to(torch.float64), x.double(), dy.double()),
              dense_linear(w, x, dy))


CONVS = [
    # (N, C, H, W, C_out, kh, kw, stride, padding, dilation)
    (2, 3, 7, 9, 5, 3, 3, (1, 1), (1, 1), (1, 1)),
    (3, 4, 11, 10, 6, 3, 2, (2, 1), (0, 2), (1, 2)),
    (1, 8, 8, 8, 16, 3, 3, (1, 1), (1, 1), (1, 1)),
    (4, 3, 5, 5, 7, 1, 1, (1, 1), (0, 0), (1, 1)),
    (2, 2, 6, 6, 4, 5, 5, (3, 3), (2, 2), (1, 1)),
    (2, 16, 12, 12, 8, 3, 3, (1, 1), (1, 1), (1, 1)),
    (3, 5, 4, 8, 6, 3, 3, (1, 1), (1, 1), (1, 1)),  # 4x8 outputs: one chunk in float64 too
]


def conv_products(w: CSRWeight, x: torch.Tensor, dy: torch.Tensor, geom: tuple) -> dict:
    tiling, t_tiling = w.cpu_tilings()
    return {
        "y": ops.csr_conv2d(x, w.values, w.col_idx, w.row_ptr, tiling, w.shape, *geom),
        "dx": ops.csr_conv2d_dx(dy, w.transposed_values(), w.t_col_idx, w.t_row_ptr, t_tiling,
                                w.shape, x.shape[2:], *geom),
        "dw": ops.csr_conv2d_dw(dy, x, w.row_ptr, w.col_idx, w.row_idx, tiling, w.shape, *geom),
    }


def dense_conv(w: CSRWeight, x: torch.Tensor, dy: torch.Tensor, geom: tuple) -> dict:
    d = w.to_dense().to(x.dtype)
    dw = torch.nn.grad.conv2d_weight(x, d.shape, dy, *geom)
    return {"y": F.conv2d(x, d, None, *geom),
            "dx": torch.nn.grad.conv2d_input(x.shape, d, dy, *geom),
            "dw": dw.reshape(d.shape[0], -1)[w.row_idx.long(), w.col_idx.long()]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("case", CONVS)
def test_conv_ops(backend: str, sparsity: float, case: tuple) -> None:
    n, c, h, wd, c_out, kh, kw, *geom = case
    w = random_csr((c_out, c, kh, kw), sparsity)
    x = torch.randn(n, c, h, wd)
    y_shape = F.conv2d(x, torch.zeros(c_out, c, kh, kw), None, *geom).shape
    dy = torch.randn(y_shape)
    with use_backend(backend):
        got = conv_products(w, x, dy, geom)
    ref64 = dense_conv(w.to(torch.float64), x.double(), dy.double(), geom)
    check_all(got, ref64, dense_conv(w, x, dy, geom))


@pytest.mark.skipif(not has_cpu_ext(), reason="C++ extension not built")
@pytest.mark.parametrize("case", [c for c in CONVS if c[7] == (1, 1) and c[9] == (1, 1)])
def test_conv_cpp_float64(case: tuple) -> None:
    """float64 (a chunk holds 32 pixels, not 64): the one-chunk im2col and the general one."""
    n, c, h, wd, c_out, kh, kw, *geom = case
    w = random_csr((c_out, c, kh, kw), 0.7, torch.float64)
    x = torch.randn(n, c, h, wd, dtype=torch.float64)
    dy = torch.randn(F.conv2d(x, torch.zeros(c_out, c, kh, kw, dtype=torch.float64), None,
                              *geom).shape, dtype=torch.float64)
    with use_backend("cpp"):
        got = conv_products(w, x, dy, geom)
    ref = dense_conv(w, x, dy, geom)
    for key in got:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-10)


THREADED_CONVS = [
    # (C, H, W, C_out, kh, kw, stride, padding, dilation): non-square, asymmetric geometry
    (16, 9, 11, 24, 3, 3, (1, 1), (1, 1), (1, 1)),
    (5, 13, 8, 12, 3, 2, (1, 2), (2, 0), (2, 1)),
    (6, 7, 12, 10, 2, 3, (2, 1), (1, 2), (1, 2)),
]


@pytest.mark.skipif(not has_cpu_ext(), reason="C++ extension not built")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2, 8])
@pytest.mark.parametrize("case", THREADED_CONVS)
def test_conv_cpp_threads(threads: int, batch: int, case: tuple) -> None:
    """Samples in parallel (batch >= threads: per-thread dW accumulators, then their sum)
    and rows in parallel (batch < threads), forward and both gradients."""
    c, h, wd, c_out, kh, kw, *geom = case
    w = random_csr((c_out, c, kh, kw), 0.7, torch.float64)
    x = torch.randn(batch, c, h, wd, dtype=torch.float64)
    dy = torch.randn(F.conv2d(x, w.to_dense(), None, *geom).shape, dtype=torch.float64)
    with use_backend("cpp"), kernel_threads(threads):
        got = conv_products(w, x, dy, geom)
    ref = dense_conv(w, x, dy, geom)
    for key in got:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-10,
                                   msg=lambda m, key=key: f"{key}: {m}")


def flipped(w: CSRWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """csr_conv2d_dx's transposed-flipped operands (values[f_perm], f_col_idx, f_row_ptr)."""
    st = conv_flip_structure(w.row_idx, w.col_idx, w.shape)
    return w.values[st["f_perm"].long()], st["f_col_idx"], st["f_row_ptr"]


DIRECT_CONVS = [
    # (N, C, H, W, C_out, kh, kw, padding, dilation) at stride 1: channel counts that are not
    # multiples of 8, non-square inputs; the last two pad beyond the dilated kernel, where dX
    # keeps the transposed product
    (1, 3, 7, 10, 5, 1, 1, (0, 0), (1, 1)),
    (5, 7, 9, 6, 11, 3, 3, (1, 1), (1, 1)),
    (5, 13, 8, 11, 6, 3, 3, (0, 2), (1, 1)),
    (1, 5, 12, 9, 9, 5, 5, (2, 2), (1, 1)),
    (5, 6, 10, 13, 3, 5, 3, (0, 1), (1, 1)),
    (1, 9, 11, 8, 10, 3, 3, (2, 2), (2, 2)),
    (5, 4, 9, 9, 7, 3, 5, (2, 0), (1, 2)),
    (5, 3, 6, 7, 12, 1, 1, (1, 1), (1, 1)),
    (1, 10, 8, 5, 5, 3, 3, (3, 1), (1, 1)),
]


@pytest.mark.skipif(not has_cpu_ext(), reason="C++ extension not built")
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("case", DIRECT_CONVS)
def test_conv_cpp_direct(threads: int, sparsity: float, case: tuple) -> None:
    """Stride 1 on the C++ backend: the direct forward, dX through the transposed-flipped
    weight (or the transposed product where the padding rules that out), and dW, in float64
    against the dense conv, on one thread and on several."""
    n, c, h, wd, c_out, kh, kw, padding, dilation = case
    geom = ((1, 1), padding, dilation)
    w = random_csr((c_out, c, kh, kw), sparsity, torch.float64)
    x = torch.randn(n, c, h, wd, dtype=torch.float64)
    dy = torch.randn(F.conv2d(x, w.to_dense(), None, *geom).shape, dtype=torch.float64)
    with use_backend("cpp"), kernel_threads(threads):
        got = conv_products(w, x, dy, geom)
        got["dx_flipped"] = ops.csr_conv2d_dx(dy, w.transposed_values(), w.t_col_idx,
                                              w.t_row_ptr, w.cpu_tilings()[1], w.shape,
                                              x.shape[2:], *geom, *flipped(w))
    ref = dense_conv(w, x, dy, geom)
    ref["dx_flipped"] = ref["dx"]
    for key in got:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-10,
                                   msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.skipif(not has_cpu_ext(), reason="C++ extension not built")
def test_conv_cpp_direct_kernel_runs_where_it_applies() -> None:
    """The forward ignores the tiling at every stride (the direct kernel takes none); dX
    reads the transposed-flipped operands exactly where the geometry allows (the transposed
    ones are zeroed there) and the transposed ones elsewhere (then the
    flipped ones are zeroed)."""
    w = random_csr((6, 5, 3, 3), 0.6, torch.float64)
    foreign = random_csr((6, 5, 3, 3), 0.6, torch.float64).cpu_tilings()[0]
    x = torch.randn(2, 5, 9, 7, dtype=torch.float64)
    with use_backend("cpp"):
        for geom in (((1, 1), (1, 1), (1, 1)), ((1, 1), (3, 0), (1, 1)), ((2, 2), (1, 1), (1, 1))):
            y_args = (x, w.values, w.col_idx, w.row_ptr, foreign, w.shape, *geom)
            direct = ops.flipped_conv_padding(w.shape[2:], *geom) is not None
            torch.testing.assert_close(ops.csr_conv2d(*y_args), F.conv2d(x, w.to_dense(),
                                                                         None, *geom))
            dy = torch.randn(F.conv2d(x, w.to_dense(), None, *geom).shape, dtype=torch.float64)
            t_values, f = w.transposed_values(), list(flipped(w))
            if direct:
                t_values = torch.zeros_like(t_values)
            else:
                f[0] = torch.zeros_like(f[0])
            dx = ops.csr_conv2d_dx(dy, t_values, w.t_col_idx, w.t_row_ptr, None, w.shape,
                                   x.shape[2:], *geom, *f)
            ref = torch.nn.grad.conv2d_input(x.shape, w.to_dense(), dy, *geom)
            torch.testing.assert_close(dx, ref, rtol=1e-10, atol=1e-10, msg=str(geom))
    assert ops.flipped_conv_padding([3, 3], [1, 1], [1, 1], [2, 1]) == [3, 1]
    assert ops.flipped_conv_padding([3, 3], [1, 2], [0, 0], [1, 1]) is None


def _op_samples() -> list[tuple]:
    w = random_csr((11, 3, 2, 2), 0.6)
    m = random_csr((11, 12), 0.6)
    x, dy = torch.randn(9, 12), torch.randn(9, 11)
    xc, dyc = torch.randn(2, 3, 5, 4), torch.randn(2, 11, 4, 3)
    geom = ([1, 1], [0, 0], [1, 1])
    tiling, t_tiling = m.cpu_tilings()
    ctiling, ct_tiling = w.cpu_tilings()
    return [
        (ops.csr_dsd, (x, m.values, m.col_idx, m.row_ptr, m.row_order, tiling, 11)),
        (ops.csr_dsd, (x[:2], m.values, m.col_idx, m.row_ptr, m.row_order, None, 11)),
        (ops.csr_dsd, (x, m.values, m.col_idx, m.row_ptr, m.row_order, tiling, 11,
                       ops.csr_tile_values(m.values, m.col_idx, m.row_ptr, tiling, 12)
                       if tiling is not None else None)),
        (ops.csr_sddmm, (dy, x, m.row_ptr, m.col_idx, m.row_idx, m.row_order, tiling)),
        (ops.csr_conv2d, (xc, w.values, w.col_idx, w.row_ptr, ctiling, list(w.shape), *geom)),
        (ops.csr_conv2d_dx, (dyc, w.transposed_values(), w.t_col_idx, w.t_row_ptr, ct_tiling,
                             list(w.shape), [5, 4], *geom)),
        (ops.csr_conv2d_dx, (dyc, w.transposed_values(), w.t_col_idx, w.t_row_ptr, ct_tiling,
                             list(w.shape), [5, 4], *geom, *flipped(w))),
        (ops.csr_conv2d_dw, (dyc, xc, w.row_ptr, w.col_idx, w.row_idx, None, list(w.shape),
                             *geom)),
    ]


@pytest.mark.parametrize("sample", range(8))
def test_opcheck(sample: int) -> None:
    op, args = _op_samples()[sample]
    torch.library.opcheck(op, args)


def test_dispatcher_explains_refusals() -> None:
    m = random_csr((5, 7), 0.9, torch.float16)
    x = torch.randn(9, 7, dtype=torch.float16)
    with use_backend("cpp"), pytest.raises(NotSupportedError) as exc:
        ops.csr_dsd(x, m.values, m.col_idx, m.row_ptr, m.row_order, None, 5)
    msg = str(exc.value)
    assert "csr_dsd" in msg and "cpp" in msg and "float16" in msg
    # automatic choice: the reference takes float16 on the CPU
    y = ops.csr_dsd(x, m.values, m.col_idx, m.row_ptr, m.row_order, None, 5)
    assert y.dtype == torch.float16
    dispatch = ops.csr._csr_dsd_dispatch
    reasons = dispatch.reasons(x, m.values, m.col_idx, m.row_ptr, m.row_order, None, 5)
    assert reasons["reference"] == [] and "float16" in reasons["dense"][-1]
    m32, x32 = m.to(torch.float32), x.float()
    reasons = dispatch.reasons(x32, m32.values, m32.col_idx, m32.row_ptr, m32.row_order, None,
                               5)
    assert "crossover" in reasons["dense"][0] if has_cpu_ext() else reasons["dense"]


def test_dense_crossover_choice() -> None:
    """Below the crossover sparsity the CPU runs the dense product; above it the kernel."""
    lo, hi = random_csr((16, 32), 0.2), random_csr((16, 32), 0.95)
    x = torch.randn(32, 32)
    pick = ops.csr._csr_dsd_dispatch.select
    assert pick(x, lo.values, lo.col_idx, lo.row_ptr, lo.row_order, None, 16).name == (
        "dense" if has_cpu_ext() else "reference")
    chosen = pick(x, hi.values, hi.col_idx, hi.row_ptr, hi.row_order, None, 16).name
    assert chosen == ("cpp" if has_cpu_ext() else "reference")


@pytest.mark.skipif(not has_cpu_ext(), reason="the crossover applies to the C++ backend")
def test_conv_crossover_depends_on_the_shape() -> None:
    """A 64-channel 3x3 conv at 90% runs the kernel on 16x16 inputs and the dense product on
    2x2 ones (output pixels too few); the forward and both gradients decide alike."""
    w = CSRWeight.from_dense(torch.randn(64, 64, 3, 3), torch.rand(64, 64, 3, 3) > 0.9)
    geom = ([1, 1], [1, 1], [1, 1])
    shape = list(w.shape)
    for side, expect in ((16, "cpp"), (2, "dense")):
        x = torch.randn(4, 64, side, side)
        dy = torch.randn(4, 64, side, side)
        fwd = ops.csr._csr_conv2d_dispatch.select(x, w.values, w.col_idx, w.row_ptr, None,
                                                  shape, *geom)
        dw = ops.csr._csr_conv2d_dw_dispatch.select(dy, x, w.row_ptr, w.col_idx, w.row_idx,
                                                    None, shape, *geom)
        assert (fwd.name, dw.name) == (expect, expect), side
    assert ops.csr_conv_crossover(shape, 4) == 1.0
    assert ops.csr_conv_crossover(shape, 256) == ops.CSR_DENSE_BELOW["conv"]
    assert ops.csr_conv_crossover([64, 16, 3, 3], 1024) == 0.9  # short reduction


def test_conv_batch_last_choice() -> None:
    """The layers take outputs of up to CSR_BATCH_LAST_MAX_PIXELS pixels to the batch-last
    kernels wherever the C++ backend takes the tensors and no other backend is forced; the
    sparsity does not matter."""
    x, values = torch.randn(2, 3, 9, 9), torch.randn(5)
    pick = ops.csr_conv_batch_last
    limit = ops.CSR_BATCH_LAST_MAX_PIXELS
    assert pick(x, values, (8, limit // 8)) == has_cpu_ext()
    assert pick(x.double(), values.double(), (1, 1)) == has_cpu_ext()
    assert not pick(x, values, (1, limit + 1))
    assert not pick(x[:0], values, (2, 2))  # an empty batch keeps the ops
    assert not pick(x.half(), values.half(), (2, 2))  # no C++ kernel for float16
    for backend, expect in (("cpp", has_cpu_ext()), ("dense", False), ("reference", False),
                            ("triton", False), ("not-a-csr-backend", has_cpu_ext())):
        with use_backend(backend):
            assert pick(x, values, (4, 4)) == expect, backend


def test_op_argument_errors() -> None:
    m = random_csr((5, 7), 0.5)
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.csr_dsd(torch.randn(7), m.values, m.col_idx, m.row_ptr, m.row_order, None, 5)
    with pytest.raises(ValueError, match="x and values"):
        ops.csr_dsd(torch.randn(2, 7, dtype=torch.float64), m.values, m.col_idx, m.row_ptr,
                    m.row_order, None, 5)
    with pytest.raises(ValueError, match="expected col_idx"):
        ops.csr_dsd(torch.randn(2, 7), m.values, m.col_idx, m.row_ptr, m.row_order, None, 6)
    with pytest.raises(ValueError, match="same B|one B"):
        ops.csr_sddmm(torch.randn(3, 5), torch.randn(2, 7), m.row_ptr, m.col_idx, m.row_idx,
                      m.row_order, None)
    w = random_csr((4, 3, 3, 3), 0.5)
    dx_args = (torch.randn(2, 4, 5, 5), w.transposed_values(), w.t_col_idx, w.t_row_ptr, None,
               list(w.shape), [5, 5], [1, 1], [1, 1], [1, 1])
    f_values, f_col_idx, f_row_ptr = flipped(w)
    with pytest.raises(ValueError, match="all of f_values"):
        ops.csr_conv2d_dx(*dx_args, f_values, f_col_idx, None)
    with pytest.raises(ValueError, match="f_row_ptr"):
        ops.csr_conv2d_dx(*dx_args, f_values, f_col_idx, w.t_row_ptr)
    with pytest.raises(ValueError, match="t_values and f_values"):
        ops.csr_conv2d_dx(*dx_args, f_values.double(), f_col_idx, f_row_ptr)


@pytest.mark.interpreter
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
def test_triton_interpreter(sparsity: float) -> None:
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the interpreter test runs where there is no GPU")
    w = random_csr((13, 21), sparsity)
    x, dy = torch.randn(5, 21), torch.randn(5, 13)
    with use_backend("triton"):
        got = linear_products(w, x, dy)
    check_all(got, dense_linear(w.to(torch.float64), x.double(), dy.double()),
              dense_linear(w, x, dy))
    wc = random_csr((6, 3, 3, 3), sparsity)
    xc = torch.randn(2, 3, 6, 5)
    geom = ((1, 1), (1, 1), (1, 1))
    dyc = torch.randn(2, 6, 6, 5)
    with use_backend("triton"):
        got = conv_products(wc, xc, dyc, geom)
    check_all(got, dense_conv(wc.to(torch.float64), xc.double(), dyc.double(), geom),
              dense_conv(wc, xc, dyc, geom))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_gpu(dtype: torch.dtype) -> None:
    w = random_csr((300, 257), 0.9, dtype).to("cuda")
    x, dy = torch.randn(33, 257, dtype=dtype, device="cuda"), torch.randn(33, 300, dtype=dtype,
                                                                          device="cuda")
    with use_backend("triton"):
        got = linear_products(w, x, dy)
    check_all(got, dense_linear(w.to(torch.float64), x.double(), dy.double()),
              dense_linear(w, x, dy))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CONVS[0], CONVS[1], CONVS[4]])
def test_triton_conv_gpu(dtype: torch.dtype, case: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """csr_conv2d and its two gradients (3x3, strided / padded / dilated 3x2, 5x5 stride 3)
    on the Triton kernels against the float64 dense conv (the float32 one without TF32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    n, c, h, wd, c_out, kh, kw, *geom = case
    w = random_csr((c_out, c, kh, kw), 0.7, dtype).to("cuda")
    x = torch.randn(n, c, h, wd, dtype=dtype, device="cuda")
    y_shape = F.conv2d(x.float(), torch.zeros(c_out, c, kh, kw, device="cuda"), None,
                       *geom).shape
    dy = torch.randn(y_shape, dtype=dtype, device="cuda")
    with use_backend("triton"):
        got = conv_products(w, x, dy, geom)
    check_all(got, dense_conv(w.to(torch.float64), x.double(), dy.double(), geom),
              dense_conv(w, x, dy, geom))
