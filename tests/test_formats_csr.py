"""CSRWeight: construction, derived arrays, round trips and the errors bad input gets."""

from __future__ import annotations

import math

import pytest
import torch

from sparsecore import formats, has_cpu_ext
from sparsecore.formats import (
    CSRWeight,
    TapMajor,
    conv_flip_structure,
    conv_tap_major_structure,
    csr_structure,
)
from sparsecore.nn.fused import tap_major_csr

CPP = pytest.mark.skipif(not has_cpu_ext(), reason="C++ extension not built")
SHAPES = [(37, 53), (1, 1), (5, 3, 3, 3), (16, 8, 1, 5)]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]


def masked(shape: tuple[int, ...], sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight and a random mask of that sparsity with row 0 pruned entirely."""
    w = torch.randn(shape, dtype=torch.float64)
    mask = torch.rand(shape) >= sparsity
    if sparsity > 0:
        mask[0] = False
    return w, mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_round_trip_and_derived_arrays(shape: tuple[int, ...], sparsity: float) -> None:
    w, mask = masked(shape, sparsity)
    csr = CSRWeight.from_dense(w, mask)
    assert csr.shape == shape and csr.nnz == int(mask.sum())
    assert torch.equal(csr.to_dense(), w * mask)
    assert torch.equal(csr.mask(), mask)
    assert csr.density == pytest.approx(mask.float().mean().item())
    n, k = csr.n_rows, csr.n_cols
    dense = (w * mask).reshape(n, k)
    m2 = mask.reshape(n, k)
    for name in ("col_idx", "row_ptr", "row_idx", "row_order", "t_perm", "t_col_idx",
                 "t_row_ptr", "t_row_order"):
        assert getattr(csr, name).dtype == torch.int32, name
    lengths = m2.sum(1)
    assert torch.equal(csr.row_idx.long(), torch.repeat_interleave(torch.arange(n), lengths))
    # rows by decreasing length, a permutation
    assert sorted(csr.row_order.tolist()) == list(range(n))
    assert (lengths[csr.row_order.long()].diff() <= 0).all()
    # the transpose is the CSR of W^T
    t = CSRWeight.from_dense(dense.t().contiguous(), m2.t().contiguous())
    assert torch.equal(csr.transposed_values(), t.values)
    assert torch.equal(csr.t_col_idx, t.col_idx) and torch.equal(csr.t_row_ptr, t.row_ptr)
    assert torch.equal(csr.t_row_order, t.row_order)


def test_mask_keeps_zero_weights() -> None:
    """A kept position whose weight is 0 is stored (it must keep training)."""
    w = torch.zeros(4, 6)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, 2] = mask[3, 5] = True
    csr = CSRWeight.from_dense(w, mask)
    assert csr.nnz == 2 and csr.values.abs().sum() == 0
    assert CSRWeight.from_dense(w).nnz == 0  # without a mask: the nonzeros


def test_constructor_accepts_valid_int64_and_validates() -> None:
    w, mask = masked((7, 9), 0.5)
    ref = CSRWeight.from_dense(w, mask)
    csr = CSRWeight(ref.values, ref.col_idx.long(), ref.row_ptr.long(), (7, 9))
    assert csr.col_idx.dtype == torch.int32 and torch.equal(csr.to_dense(), ref.to_dense())


def _bad(**overrides: object) -> dict[str, object]:
    w = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    ref = CSRWeight.from_dense(w)
    args = {"values": ref.values, "col_idx": ref.col_idx, "row_ptr": ref.row_ptr,
            "shape": (2, 3)}
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"values": torch.tensor([1, 2, 3])}, "values must be float"),
        ({"values": torch.ones(3, 1)}, "values must be 1-D"),
        ({"values": torch.tensor([1.0, float("nan"), 2.0])}, "NaN or Inf"),
        ({"col_idx": torch.tensor([0.0, 2.0, 1.0])}, "col_idx must be int32 or int64"),
        ({"col_idx": torch.tensor([0, 2], dtype=torch.int32)}, "col_idx has 2 entries"),
        ({"col_idx": torch.tensor([0, 3, 1], dtype=torch.int32)}, r"outside \[0, 3\)"),
        ({"col_idx": torch.tensor([2, 0, 1], dtype=torch.int32)}, "increase strictly"),
        ({"row_ptr": torch.tensor([0, 3], dtype=torch.int32)}, "n_rows \\+ 1 = 3"),
        ({"row_ptr": torch.tensor([1, 2, 3], dtype=torch.int32)}, "start at 0"),
        ({"row_ptr": torch.tensor([0, 3, 2, 3], dtype=torch.int32), "shape": (3, 3)},
         "non-decreasing"),
        ({"shape": (2,)}, "2\\+ non-negative dims"),
    ],
)
def test_constructor_errors(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CSRWeight(**_bad(**overrides))


def test_from_dense_errors() -> None:
    w = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"mask shape \(5, 4\) does not match weight shape"):
        CSRWeight.from_dense(w, torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        CSRWeight.from_dense(w, torch.full((4, 5), 2.0))
    with pytest.raises(ValueError, match="floating-point"):
        CSRWeight.from_dense(torch.ones(4, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="2\\+ dims"):
        CSRWeight.from_dense(torch.ones(5))
    bad = w.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        CSRWeight.from_dense(bad)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 1] = False
    assert CSRWeight.from_dense(bad, mask).nnz == 19  # a NaN at a pruned position is dropped


def test_to_moves_and_converts() -> None:
    w, mask = masked((6, 10), 0.7)
    csr = CSRWeight.from_dense(w, mask)
    f32 = csr.to(torch.float32)
    assert f32.dtype == torch.float32 and f32.col_idx.dtype == torch.int32
    assert torch.equal(f32.col_idx, csr.col_idx)
    assert torch.allclose(f32.to_dense().double(), csr.to_dense())
    assert csr.to("cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="floating point"):
        csr.to(torch.int32)
    v = torch.randn(csr.nnz, dtype=torch.float64)
    assert torch.equal(csr.with_values(v).values, v)
    with pytest.raises(ValueError, match="values must have shape"):
        csr.with_values(torch.randn(csr.nnz + 1))


def test_to_dense_is_differentiable() -> None:
    w, mask = masked((5, 7), 0.5)
    csr = CSRWeight.from_dense(w, mask)
    v = csr.values.clone().requires_grad_()
    (csr.to_dense(v) * torch.arange(35.0, dtype=torch.float64).view(5, 7)).sum().backward()
    assert torch.equal(v.grad, (csr.row_idx * 7 + csr.col_idx).double())


def test_structure_of_empty_matrices() -> None:
    st = csr_structure(torch.zeros(0, dtype=torch.int32), torch.zeros(4, dtype=torch.int32), 5)
    assert st["t_row_ptr"].tolist() == [0] * 6 and st["row_order"].tolist() == [0, 1, 2]


@CPP
def test_cpu_tilings_are_cached_and_checked() -> None:
    w, mask = masked((40, 300), 0.9)
    csr = CSRWeight.from_dense(w, mask)
    tiling, t_tiling = csr.cpu_tilings()
    assert tiling is not None and t_tiling is not None
    assert csr.cpu_tilings()[0] is tiling
    other = CSRWeight.from_dense(*masked((40, 300), 0.9))
    x = torch.randn(16, 300, dtype=torch.float64)
    op = torch.ops.sparsecore._csr_dsd_cpu
    with pytest.raises(RuntimeError, match="does not belong to this matrix"):
        op(x, csr.values, csr.col_idx, csr.row_ptr, other.cpu_tilings()[0], 40)
    corrupt = tiling.clone()
    corrupt[-1] = 10**6  # a column index out of range
    with pytest.raises(RuntimeError, match="corrupt"):
        op(x, csr.values, csr.col_idx, csr.row_ptr, corrupt, 40)


@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (16, 8, 1, 5), (7, 9, 5, 2), (1, 1, 1, 1),
                                   (11, 6, 1, 1)])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_conv_flip_structure(shape: tuple[int, ...], sparsity: float) -> None:
    """values[f_perm] in (f_col_idx, f_row_ptr) is a valid CSR of the weight transposed in
    its first two dims and flipped in both spatial ones."""
    w, mask = masked(shape, sparsity)
    csr = CSRWeight.from_dense(w, mask)
    st = conv_flip_structure(csr.row_idx, csr.col_idx, csr.shape)
    assert all(t.dtype == torch.int32 for t in st.values())
    assert torch.equal(st["f_perm"].sort().values, torch.arange(csr.nnz, dtype=torch.int32))
    c_out, c_in, kh, kw = shape
    flipped = CSRWeight(csr.values[st["f_perm"].long()], st["f_col_idx"], st["f_row_ptr"],
                        (c_in, c_out, kh, kw))  # validates: sorted columns, row_ptr
    assert torch.equal(flipped.to_dense(), csr.to_dense().transpose(0, 1).flip(2, 3))
    with pytest.raises(ValueError, match="4-D"):
        conv_flip_structure(csr.row_idx, csr.col_idx, (c_out, c_in * kh * kw))


@CPP
def test_cpu_conv_flip_is_cached_and_carried() -> None:
    w, mask = masked((6, 5, 3, 3), 0.7)
    csr = CSRWeight.from_dense(w, mask)
    assert csr.flip is None
    flip = csr.cpu_conv_flip()
    assert csr.cpu_conv_flip() is flip
    ref = conv_flip_structure(csr.row_idx, csr.col_idx, csr.shape)
    assert all(torch.equal(flip[k], ref[k]) for k in ref)
    assert csr.with_values(csr.values * 2).flip is flip
    assert csr.to(torch.float32).flip is flip  # a dtype change keeps the pattern's arrays
    with pytest.raises(ValueError, match="conv weight"):
        CSRWeight.from_dense(*masked((6, 5), 0.5)).cpu_conv_flip()


@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (16, 8, 1, 5), (7, 9, 5, 2), (1, 1, 1, 1),
                                   (11, 13, 1, 1), (6, 130, 3, 3)])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("channel_tile", [4, formats.CHWN_CHANNEL_TILE])
@pytest.mark.parametrize("flipped", [False, True])
def test_conv_tap_major_structure(shape: tuple[int, ...], sparsity: float, channel_tile: int,
                                  flipped: bool) -> None:
    """values[perm], ci and tap_ptr are the batch-last kernel's layout of the weight (or of
    its transposed-flipped twin), as tap_major_csr builds it from the dense weight; channel
    tiles of 4 split every shape's channels into several."""
    w, mask = masked(shape, sparsity)
    csr = CSRWeight.from_dense(w, mask)
    layout = conv_tap_major_structure(csr.row_idx, csr.col_idx, csr.shape, channel_tile,
                                      flipped=flipped)
    assert isinstance(layout, TapMajor)
    assert all(t.dtype == torch.int32 for t in layout)
    assert torch.equal(layout.perm.sort().values, torch.arange(csr.nnz, dtype=torch.int32))
    dense, kept = csr.to_dense(), mask
    if flipped:
        dense, kept = dense.transpose(0, 1).flip(2, 3), kept.transpose(0, 1).flip(2, 3)
    values, ci, tap_ptr = tap_major_csr(dense, kept, channel_tile)
    assert torch.equal(csr.values[layout.perm.long()], values)
    assert torch.equal(layout.ci, ci) and torch.equal(layout.tap_ptr, tap_ptr)
    with pytest.raises(ValueError, match="4-D"):
        conv_tap_major_structure(csr.row_idx, csr.col_idx, (shape[0], math.prod(shape[1:])))


@CPP
def test_cpu_conv_chwn_is_cached_and_carried() -> None:
    w, mask = masked((6, 5, 3, 3), 0.7)
    csr = CSRWeight.from_dense(w, mask)
    assert csr.chwn is None and csr.chwn_flip is None
    layout, flipped = csr.cpu_conv_chwn(), csr.cpu_conv_chwn(flipped=True)
    assert csr.cpu_conv_chwn() is layout and csr.cpu_conv_chwn(True) is flipped
    for got, flip in ((layout, False), (flipped, True)):
        ref = conv_tap_major_structure(csr.row_idx, csr.col_idx, csr.shape, flipped=flip)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    for other in (csr.with_values(csr.values * 2), csr.to(torch.float32)):
        assert other.chwn is layout and other.chwn_flip is flipped
    with pytest.raises(ValueError, match="conv weight"):
        CSRWeight.from_dense(*masked((6, 5), 0.5)).cpu_conv_chwn()


@CPP
def test_tiling_is_tied_to_the_column_indices() -> None:
    """A tiling of another pattern with the same row lengths (the same row_ptr), or of this
    one before its col_idx was edited in place, is refused, never used."""
    w, mask = masked((40, 300), 0.9)
    csr = CSRWeight.from_dense(w, mask)
    tiling = csr.cpu_tilings()[0]
    shifted = CSRWeight.from_dense(w, mask.roll(1, dims=1))  # same counts per row
    assert torch.equal(shifted.row_ptr, csr.row_ptr) and not torch.equal(shifted.col_idx,
                                                                         csr.col_idx)
    x = torch.randn(16, 300, dtype=torch.float64)
    op = torch.ops.sparsecore._csr_dsd_cpu
    with pytest.raises(RuntimeError, match="does not belong to this matrix"):
        op(x, shifted.values, shifted.col_idx, shifted.row_ptr, tiling, 40)
    csr.col_idx.copy_(shifted.col_idx)  # an in-place edit: the cached tiling is stale
    with pytest.raises(RuntimeError, match="does not belong to this matrix"):
        op(x, csr.values, csr.col_idx, csr.row_ptr, tiling, 40)


def test_from_dense_checks_int32_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """nnz, rows and columns must fit the int32 index arrays (checked before the casts; the
    limit is lowered here instead of allocating 2^31 entries)."""
    monkeypatch.setattr(formats, "_INT32_MAX", 20)
    w = torch.randn(4, 10)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[torch.randperm(40)[:21]] = True
    with pytest.raises(ValueError, match="must fit int32.*got 21"):
        CSRWeight.from_dense(w, mask.view(4, 10))
    mask[mask.nonzero()[0]] = False  # 20 kept: fits
    assert CSRWeight.from_dense(w, mask.view(4, 10)).nnz == 20
    with pytest.raises(ValueError, match="must fit int32"):  # 21 columns
        CSRWeight.from_dense(torch.randn(2, 21), torch.zeros(2, 21, dtype=torch.bool))


@CPP
@pytest.mark.parametrize("batch", [3, 16])
def test_cpp_op_rejects_bad_indices(batch: int) -> None:
    """The raw C++ ops check index contents too: an error, never an out-of-bounds read."""
    w, mask = masked((6, 9), 0.5)
    csr = CSRWeight.from_dense(w.float(), mask)
    x = torch.randn(batch, 9)
    op = torch.ops.sparsecore._csr_dsd_cpu
    col = csr.col_idx.clone()
    col[-1] = 9
    with pytest.raises(RuntimeError, match="invalid CSR structure"):
        op(x, csr.values, col, csr.row_ptr, None, 6)
    ptr = csr.row_ptr.clone()
    ptr[-1] += 1
    with pytest.raises(RuntimeError, match="row_ptr"):
        op(x, csr.values, csr.col_idx, ptr, None, 6)
    with pytest.raises(RuntimeError, match="int32"):
        op(x, csr.values, csr.col_idx.long(), csr.row_ptr, None, 6)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        op(x.double(), csr.values, csr.col_idx, csr.row_ptr, None, 6)
    with pytest.raises(RuntimeError, match="invalid CSR structure"):
        torch.ops.sparsecore._csr_to_dense_cpu(csr.values, col, csr.row_ptr, 9)
    with pytest.raises(RuntimeError, match="invalid CSR structure"):
        torch.ops.sparsecore._csr_sample_cpu(torch.randn(6, 9), csr.row_ptr, col)


@CPP
@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (300, 700), (700, 300), (5, 2000)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transposed_values_streamed_equal_the_gather(shape, sparsity, dtype) -> None:
    weight, mask = masked(shape, sparsity)
    w = CSRWeight.from_dense(weight.to(dtype), mask)
    streamed = torch.ops.sparsecore._csr_transpose_values_cpu(w.values, w.col_idx, w.row_ptr,
                                                             w.t_row_ptr)
    assert torch.equal(streamed, w.values.index_select(0, w.t_perm.long()))
    assert torch.equal(w.transposed_values(), streamed)
    dense_t = CSRWeight.from_dense(weight.to(dtype).t().contiguous(), mask.t().contiguous())
    assert torch.equal(streamed, dense_t.values)  # W^T's own CSR, built from scratch


@CPP
def test_transposed_values_rejects_a_foreign_transpose() -> None:
    weight, mask = masked((20, 30), 0.5)
    w = CSRWeight.from_dense(weight, mask)
    other = CSRWeight.from_dense(weight, torch.rand(20, 30) > 0.5)
    with pytest.raises(RuntimeError, match="do not match"):
        torch.ops.sparsecore._csr_transpose_values_cpu(w.values, w.col_idx, w.row_ptr,
                                                      other.t_row_ptr)
    with pytest.raises(RuntimeError, match="t_row_ptr"):
        torch.ops.sparsecore._csr_transpose_values_cpu(w.values, w.col_idx, w.row_ptr,
                                                      w.t_row_ptr[:-1])
