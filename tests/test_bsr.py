"""Block-sparse (BSR) weights, ops and layers against dense references on fresh random data.

The C++ kernels run wherever the extension is built; the Triton kernels run under
TRITON_INTERPRET=1 (marker `interpreter`) on small CPU tensors; GPU cases skip cleanly.
"""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
from torch import nn

from sparsecore import NotSupportedError, has_cpu_ext, ops, use_backend
from sparsecore.formats import (
    BSRWeight,
    block_mask_from_mask,
    block_mask_from_scores,
    block_scores,
    expand_block_mask,
)
from sparsecore.nn.blocksparse import BlockSparseConv2d, BlockSparseLinear
from sparsecore.testing import assert_error_within, kernel_threads

CPP = pytest.mark.skipif(not has_cpu_ext(), reason="C++ extension not built")
# square, rectangular (row / column structure), below the SIMD width, not a power of two
BLOCKS = [(16, 16), (8, 8), (1, 16), (16, 1), (3, 5), (32, 32)]


def random_bsr(grid: tuple[int, int], block: tuple[int, int], density: float,
               dtype: torch.dtype = torch.float32) -> BSRWeight:
    """A fresh random BSR; below density 1, block row 1 is empty (all-zero output rows)."""
    bmask = torch.rand(grid) < density
    if density < 1 and grid[0] > 1:
        bmask[1] = False
    w = torch.randn(grid[0] * block[0], grid[1] * block[1], dtype=torch.float64).to(dtype)
    return BSRWeight.from_dense(w, bmask, block_size=block)


def products(bsr: BSRWeight, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Y = X W^T, dX = dY W, dW blocks through the ops (whatever backend is active)."""
    (n, k), (br, bc) = bsr.shape, bsr.block_size
    return {
        "y": ops.bsr_dsd(x, bsr.blocks, bsr.col_idx, bsr.row_ptr, None, False, n),
        "dx": ops.bsr_dsd(dy, bsr.blocks, bsr.t_col_idx, bsr.t_row_ptr, bsr.t_perm, True, k),
        "dw": ops.bsr_sddmm(dy, x, bsr.row_ptr, bsr.col_idx, bsr.block_row, br, bc),
    }


def dense_products(bsr: BSRWeight, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same three through dense torch in x's dtype (blocks gathered from dY^T X)."""
    w = bsr.to_dense().to(x.dtype)
    (r, c), (br, bc) = bsr.grid, bsr.block_size
    full = (dy.t() @ x).view(r, br, c, bc).transpose(1, 2)
    return {"y": x @ w.t(), "dx": dy @ w,
            "dw": full[bsr.block_row.long(), bsr.col_idx.long()]}


def check_products(bsr: BSRWeight, batch: int, dtype: torch.dtype, device: str = "cpu") -> None:
    """The three products in `dtype` on `device` against float64 on the CPU."""
    x = torch.randn(batch, bsr.shape[1], dtype=torch.float64)
    dy = torch.randn(batch, bsr.shape[0], dtype=torch.float64)
    bsr64 = BSRWeight(bsr.shape, bsr.block_size, bsr.blocks.double(), bsr.col_idx, bsr.row_ptr,
                      bsr.block_row, bsr.t_perm, bsr.t_col_idx, bsr.t_row_ptr)
    ref = dense_products(bsr64, x, dy)
    index = {n: getattr(bsr, n).to(device)
             for n in ("col_idx", "row_ptr", "block_row", "t_perm", "t_col_idx", "t_row_ptr")}
    low = BSRWeight(bsr.shape, bsr.block_size, bsr.blocks.to(device, dtype), **index)
    x, dy = x.to(device, dtype), dy.to(device, dtype)
    got = products(low, x, dy)
    dense = dense_products(low, x, dy)
    for name in ref:
        assert_error_within(got[name].cpu(), ref[name], dense[name].cpu(), what=name)


# ---------------------------------------------------------------- format
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_bsr_weight_round_trip(block: tuple[int, int], density: float) -> None:
    grid = (5, 3)
    w = torch.randn(grid[0] * block[0], grid[1] * block[1])
    bmask = torch.rand(grid) < density
    bsr = BSRWeight.from_dense(w, bmask, block_size=block)
    elem = expand_block_mask(bmask, block)
    assert torch.equal(bsr.to_dense(), w * elem)
    assert torch.equal(bsr.block_mask(), bmask)
    assert bsr.nnzb == int(bmask.sum())
    # the element mask gives the same BSR; the zero pattern of w * mask does too
    assert torch.equal(BSRWeight.from_dense(w, elem, block_size=block).blocks, bsr.blocks)
    assert torch.equal(BSRWeight.from_dense(w * elem, block_size=block).block_mask(),
                       bmask if density else torch.zeros_like(bmask))


def test_transpose_structure() -> None:
    bsr = random_bsr((6, 4), (8, 16), 0.5)
    wt = bsr.to_dense().t()
    # W^T's BSR: its blocks in row order are W's blocks t_perm, transposed
    t = BSRWeight.from_dense(wt, bsr.block_mask().t(), block_size=bsr.block_size[::-1])
    assert torch.equal(t.col_idx, bsr.t_col_idx)
    assert torch.equal(t.row_ptr, bsr.t_row_ptr)
    assert torch.equal(bsr.blocks[bsr.t_perm.long()].transpose(1, 2), t.blocks)


def test_block_mask_from_scores() -> None:
    scores = torch.rand(7, 9)
    for density in (0.0, 0.1, 0.5, 1.0):
        m = block_mask_from_scores(scores, density)
        assert int(m.sum()) == round(density * 63)
        if 0 < density < 1:
            assert scores[m].min() >= scores[~m].max()
        rows = block_mask_from_scores(scores, density, per_row=True)
        assert (rows.sum(1) == round(density * 9)).all()
    ties = torch.ones(2, 4)
    assert block_mask_from_scores(ties, 0.25).nonzero().tolist() == [[0, 0], [0, 1]]
    w = torch.randn(32, 48)
    s = block_scores(w, (16, 8))
    assert s.shape == (2, 6)
    assert torch.allclose(s[1, 2], w[16:32, 16:24].norm())
    bsr = BSRWeight.from_dense(w, block_size=(16, 8), density=0.5)
    assert bsr.nnzb == 6 and torch.equal(bsr.block_mask(), block_mask_from_scores(s, 0.5))


def test_bad_format_input() -> None:
    w = torch.randn(32, 48)
    with pytest.raises(ValueError, match="does not divide"):
        BSRWeight.from_dense(w, block_size=(16, 10))
    with pytest.raises(ValueError, match="does not divide"):
        BSRWeight.from_dense(torch.randn(30, 48), block_size=16)
    mask = torch.ones(32, 48, dtype=torch.bool)
    mask[3, 5] = False
    with pytest.raises(ValueError, match="not aligned"):
        BSRWeight.from_dense(w, mask, block_size=16)
    with pytest.raises(ValueError, match="not aligned"):
        block_mask_from_mask(mask, 16)
    with pytest.raises(ValueError, match="block grid"):
        BSRWeight.from_dense(w, torch.ones(3, 3, dtype=torch.bool), block_size=16)
    with pytest.raises(ValueError, match="not both"):
        BSRWeight.from_dense(w, torch.ones(2, 3, dtype=torch.bool), block_size=16, density=0.5)
    with pytest.raises(ValueError, match="block_size"):
        BSRWeight.from_dense(w, block_size=0)
    good = BSRWeight.from_dense(w, block_size=16, density=0.5)
    fields = dict(good.__dict__)
    for name, bad, match in [
        ("col_idx", good.col_idx.long(), "col_idx must be int32"),
        ("col_idx", good.col_idx + 5, "outside"),
        ("row_ptr", good.row_ptr.flip(0), "row_ptr"),
        ("blocks", good.blocks[:, :8], "blocks must have shape"),
        ("blocks", good.blocks.int(), "floating point"),
        ("t_perm", good.t_perm.flip(0), "transpose"),
    ]:
        with pytest.raises(ValueError, match=match):
            BSRWeight(**(fields | {name: bad}))


# ---------------------------------------------------------------- ops
@CPP
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_products(block: tuple[int, int], dtype: torch.dtype) -> None:
    with use_backend("cpp"):
        for grid, batch, density in [((5, 3), 7, 0.5), ((3, 4), 13, 1.0), ((4, 2), 1, 0.0),
                                     ((2, 7), 37, 0.9)]:
            check_products(random_bsr(grid, block, density, dtype), batch, dtype)


@CPP
def test_cpp_big_blocks_and_empty_batch() -> None:
    with use_backend("cpp"):
        check_products(random_bsr((2, 3), (64, 64), 0.5), 19, torch.float32)
        check_products(random_bsr((2, 1), (128, 128), 0.7), 5, torch.float64)
        bsr = random_bsr((3, 2), (8, 8), 0.5)
        out = products(bsr, torch.randn(0, 16), torch.randn(0, 24))
        assert out["y"].shape == (0, 24) and out["dx"].shape == (0, 16)
        assert torch.equal(out["dw"], torch.zeros(bsr.nnzb, 8, 8))


@CPP
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("block", [(16, 16), (3, 5), (32, 8)])
def test_cpp_products_threaded(threads: int, block: tuple[int, int]) -> None:
    """Block rows shared by the team (forward, input gradient, block SDDMM)."""
    with use_backend("cpp"), kernel_threads(threads):
        for grid, batch, density in [((7, 5), 29, 0.6), ((9, 4), 8, 1.0), ((5, 6), 3, 0.4)]:
            check_products(random_bsr(grid, block, density), batch, torch.float32)


def test_reference_products() -> None:
    with use_backend("reference"):
        check_products(random_bsr((4, 3), (8, 16), 0.5, torch.float64), 9, torch.float64)


@CPP
def test_cpp_rejects_bad_input() -> None:
    bsr = random_bsr((3, 2), (8, 8), 1.0)
    x = torch.randn(4, 16)
    op = torch.ops.sparsecore._bsr_dsd_cpu
    with pytest.raises(RuntimeError, match="multiple of the block width"):
        op(torch.randn(4, 15), bsr.blocks, bsr.col_idx, bsr.row_ptr, None, False, 24)
    with pytest.raises(RuntimeError, match="int32"):
        op(x, bsr.blocks, bsr.col_idx.long(), bsr.row_ptr, None, False, 24)
    with pytest.raises(RuntimeError, match="outside"):
        op(x, bsr.blocks, bsr.col_idx + 3, bsr.row_ptr, None, False, 24)
    with pytest.raises(RuntimeError, match="dtype"):
        op(x.double(), bsr.blocks, bsr.col_idx, bsr.row_ptr, None, False, 24)
    with pytest.raises(RuntimeError, match="row_ptr"):
        op(x, bsr.blocks, bsr.col_idx, bsr.row_ptr.flip(0), None, False, 24)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.sparsecore._bsr_sddmm_cpu(torch.randn(4, 24).half(), x.half(), bsr.row_ptr,
                                           bsr.col_idx, 8, 8)
    # a dtype no backend but the reference runs: forcing the C++ one explains why it refuses
    with use_backend("cpp"), pytest.raises(NotSupportedError, match="cpp: dtype float16"):
        ops.bsr_dsd(x.half(), bsr.blocks.half(), bsr.col_idx, bsr.row_ptr, None, False, 24)


@pytest.mark.parametrize("transposed", [False, True])
def test_opcheck(transposed: bool) -> None:
    bsr = random_bsr((3, 4), (8, 4), 0.6)
    x, dy = torch.randn(5, 16), torch.randn(5, 24)
    if transposed:
        args = (dy, bsr.blocks, bsr.t_col_idx, bsr.t_row_ptr, bsr.t_perm, True, 16)
    else:
        args = (x, bsr.blocks, bsr.col_idx, bsr.row_ptr, None, False, 24)
    torch.library.opcheck(ops.bsr_dsd, args)
    torch.library.opcheck(ops.bsr_sddmm, (dy, x, bsr.row_ptr, bsr.col_idx, bsr.block_row, 8, 4))


@pytest.mark.parametrize(
    "geom", [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 2), (2, 1), (0, 1), (2, 1))]
)
def test_opcheck_conv(geom: tuple) -> None:
    bsr = BSRWeight.from_dense(torch.randn(16, 4, *geom[0]), density=0.5, block_size=(8, 6))
    x = torch.randn(2, 4, 7, 6)
    y = ops.bsr_conv2d(x, bsr.blocks, bsr.col_idx, bsr.row_ptr, *geom)
    dy2 = torch.randn_like(y)
    torch.library.opcheck(ops.bsr_conv2d, (x, bsr.blocks, bsr.col_idx, bsr.row_ptr, *geom))
    torch.library.opcheck(ops.bsr_conv2d_dx, (dy2, bsr.blocks, bsr.t_col_idx, bsr.t_row_ptr,
                                              bsr.t_perm, list(x.shape), *geom))
    torch.library.opcheck(ops.bsr_conv2d_dw, (dy2, x, bsr.row_ptr, bsr.col_idx, bsr.block_row,
                                              8, 6, *geom))


def conv_products(bsr: BSRWeight, x: torch.Tensor, dy2: torch.Tensor, geom: tuple) -> dict:
    """The BSR conv ops (whatever backend is active): y2 (B*Ho*Wo, C_out), dx, dblocks."""
    br, bc = bsr.block_size
    return {
        "y": ops.bsr_conv2d(x, bsr.blocks, bsr.col_idx, bsr.row_ptr, *geom),
        "dx": ops.bsr_conv2d_dx(dy2, bsr.blocks, bsr.t_col_idx, bsr.t_row_ptr, bsr.t_perm,
                                list(x.shape), *geom),
        "dw": ops.bsr_conv2d_dw(dy2, x, bsr.row_ptr, bsr.col_idx, bsr.block_row, br, bc,
                                *geom),
    }


def dense_conv_products(bsr: BSRWeight, x: torch.Tensor, dy2: torch.Tensor,
                        geom: tuple) -> dict:
    """The same through dense torch on the densified weight."""
    kernel, stride, padding, dilation = geom
    w = bsr.to_dense().view(bsr.shape[0], x.shape[1], *kernel)
    y = nn.functional.conv2d(x, w, None, stride, padding, dilation)
    b, c_out, ho, wo = y.shape
    dy = dy2.view(b, ho, wo, c_out).permute(0, 3, 1, 2)
    dw = torch.nn.grad.conv2d_weight(x, w.shape, dy, stride, padding, dilation)
    (r, c), (br, bc) = bsr.grid, bsr.block_size
    dw = dw.reshape(r, br, c, bc).transpose(1, 2)[bsr.block_row.long(), bsr.col_idx.long()]
    return {"y": y.permute(0, 2, 3, 1).reshape(-1, c_out),
            "dx": torch.nn.grad.conv2d_input(x.shape, w, dy, stride, padding, dilation),
            "dw": dw}


BSR_CONVS = [
    # (B, C, H, W, C_out, kernel, stride, padding, dilation, block): batches of several
    # work items, non-square inputs, asymmetric stride / padding / dilation
    (8, 4, 5, 5, 16, (3, 3), (1, 1), (1, 1), (1, 1), (8, 6)),  # 5x5 outputs: 3 images an item
    (8, 4, 9, 7, 16, (3, 3), (1, 1), (2, 1), (2, 1), (8, 12)),
    (8, 3, 7, 10, 32, (3, 2), (1, 2), (1, 0), (2, 1), (16, 6)),
    (5, 6, 11, 9, 8, (2, 3), (2, 1), (0, 2), (1, 2), (8, 9)),
    (2, 4, 12, 14, 16, (3, 3), (1, 1), (1, 1), (1, 1), (16, 12)),
]


@CPP
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("case", BSR_CONVS)
def test_cpp_conv_products(threads: int, case: tuple) -> None:
    """The C++ conv, its input gradient and its block gradient against dense torch in
    float64, on one thread and on several (per-thread block gradients, then their sum)."""
    b, c, h, w, c_out, kernel, *geom, block = case
    geom = (kernel, *geom)
    weight = torch.randn(c_out, c, *kernel, dtype=torch.float64)
    bsr = BSRWeight.from_dense(weight, density=0.6, block_size=block)
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    y_shape = nn.functional.conv2d(x, weight, None, *geom[1:]).shape
    dy2 = torch.randn(y_shape[0] * y_shape[2] * y_shape[3], c_out, dtype=torch.float64)
    with use_backend("cpp"), kernel_threads(threads):
        got = conv_products(bsr, x, dy2, geom)
    ref = dense_conv_products(bsr, x, dy2, geom)
    for key in got:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-10,
                                   msg=lambda m, key=key: f"{key}: {m}")


# ---------------------------------------------------------------- layers
def _masked_linear(m: BlockSparseLinear) -> nn.Linear:
    d = m.to_dense()
    d.weight.requires_grad_(True)
    return d


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=CPP), "reference"])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_linear_matches_dense(backend: str, density: float) -> None:
    lin = nn.Linear(48, 40)
    m = BlockSparseLinear.from_dense(lin, density=density, block_size=(8, 16))
    ref = m.to_dense().double()
    x = torch.randn(3, 7, 96)[..., ::2]  # non-contiguous, 3-D
    x.requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    with use_backend(backend):
        y = m(x)
        g = torch.randn_like(y)
        y.backward(g)
    y64 = ref(x64)
    y64.backward(g.double())
    dense = m.to_dense()(x.detach())
    assert_error_within(y, y64, dense)
    assert_error_within(x.grad, x64.grad, x64.grad.float(), factor=4)
    (r, c), (br, bc) = m.weight_bsr().grid, m.block_size
    gw = ref.weight.grad.view(r, br, c, bc).transpose(1, 2)[m.block_row.long(), m.col_idx.long()]
    assert torch.allclose(m.blocks.grad.double(), gw, rtol=1e-4, atol=1e-4)
    assert torch.allclose(m.bias.grad.double(), ref.bias.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=CPP), "reference"])
@pytest.mark.parametrize(
    "geom", [dict(), dict(stride=2, padding=1), dict(padding=2, dilation=2), dict(stride=(2, 1)),
             dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1))]
)
def test_conv_matches_dense(backend: str, geom: dict) -> None:
    conv = nn.Conv2d(6, 16, 3, **geom).double()
    m = BlockSparseConv2d.from_dense(conv, density=0.5, block_size=(8, 9))
    ref = m.to_dense()
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    with use_backend(backend):
        y = m(x)
    yr = ref(xr)
    assert y.shape == yr.shape
    assert torch.allclose(y, yr, atol=1e-12)
    g = torch.randn_like(y)
    with use_backend(backend):
        y.backward(g)
    yr.backward(g)
    assert torch.allclose(x.grad, xr.grad, atol=1e-12)
    (r, c), (br, bc) = m.weight_bsr().grid, m.block_size
    gw = ref.weight.grad.view(16, -1).view(r, br, c, bc).transpose(1, 2)
    assert torch.allclose(m.blocks.grad, gw[m.block_row.long(), m.col_idx.long()], atol=1e-12)
    assert torch.allclose(m.bias.grad, ref.bias.grad, atol=1e-12)
    assert m(x[0]).shape == yr.shape[1:]  # unbatched input


@CPP
def test_conv_float32_wide() -> None:
    """Block rows wider than a SIMD chunk, channel counts of real layers, float32 error rule."""
    conv = nn.Conv2d(32, 48, 3, padding=1)
    m = BlockSparseConv2d.from_dense(conv, density=0.4, block_size=(16, 32))
    x = torch.randn(3, 32, 6, 5, requires_grad=True)
    ref = m.to_dense().double()
    x64 = x.detach().double().requires_grad_(True)
    y, y64 = m(x), ref(x64)
    g = torch.randn_like(y)
    y.backward(g)
    y64.backward(g.double())
    assert_error_within(y, y64, m.to_dense()(x.detach()))
    assert_error_within(x.grad, x64.grad, x64.grad.float(), factor=4)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=CPP), "reference"])
def test_gradcheck(backend: str) -> None:
    lin = BlockSparseLinear(12, 8, block_size=4, density=0.5, dtype=torch.float64)
    conv = BlockSparseConv2d(2, 4, 3, padding=1, stride=2, block_size=(2, 6), density=0.5,
                             dtype=torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    xc = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    with use_backend(backend):
        for mod, inp in ((lin, x), (conv, xc)):
            params = (mod.blocks.detach().clone().requires_grad_(True),
                      mod.bias.detach().clone().requires_grad_(True))
            assert torch.autograd.gradcheck(
                lambda i, b, c, mod=mod: torch.func.functional_call(
                    mod, {"blocks": b, "bias": c}, (i,)),
                (inp, *params),
            )


def test_training_keeps_block_mask() -> None:
    model = nn.Sequential(BlockSparseLinear(32, 64, block_size=16, density=0.5), nn.ReLU(),
                          BlockSparseLinear(64, 8, block_size=8, density=0.25))
    masks = [m.block_mask().clone() for m in model if isinstance(m, BlockSparseLinear)]
    # The target: a teacher with the same block masks and other kept weights, which the model
    # can always reach (random masks may cut every path from x to the output, so a target
    # built from x alone was sometimes out of reach).
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0.0, 0.3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(64, 32)
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(150):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for m, mask in zip([m for m in model if isinstance(m, BlockSparseLinear)], masks):
        assert torch.equal(m.block_mask(), mask)
        dense = m.to_dense().weight
        assert (dense * ~expand_block_mask(mask, m.block_size)).abs().sum() == 0


def test_state_dict_round_trip() -> None:
    lin = nn.Linear(64, 32)
    a = BlockSparseLinear.from_dense(lin, density=0.5, block_size=16)
    b = BlockSparseLinear.from_dense(lin, density=0.25, block_size=16)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    x = torch.randn(5, 64)
    assert torch.equal(a(x), b(x))
    assert b.density == 0.5
    conv = nn.Conv2d(4, 16, 3)
    c1 = BlockSparseConv2d.from_dense(conv, density=1.0, block_size=(8, 4))
    c2 = BlockSparseConv2d.from_dense(conv, density=0.5, block_size=(8, 4))
    c2.load_state_dict(c1.state_dict())
    xc = torch.randn(2, 4, 6, 6)
    assert torch.allclose(c2(xc), conv(xc), atol=1e-5)
    bad = a.state_dict()
    bad["t_perm"] = bad["t_perm"].flip(0)
    with pytest.raises(RuntimeError, match="inconsistent BSR state"):
        b.load_state_dict(bad)


@pytest.mark.parametrize("corrupt", ["t_perm", "col_idx", "blocks", "bias", "wider"])
def test_failed_load_leaves_the_layer_unchanged(corrupt: str) -> None:
    """load_state_dict is all or nothing: a state it refuses changes no tensor of the layer
    (here the incoming state has another nnzb, so a partial load would resize some)."""
    lin = nn.Linear(64, 32)
    a = BlockSparseLinear.from_dense(lin, density=0.5, block_size=16)
    b = BlockSparseLinear.from_dense(lin, density=0.25, block_size=16)
    bad = a.state_dict()
    if corrupt == "wider":  # a layer with more inputs: a longer t_row_ptr, wider grid
        bad = BlockSparseLinear.from_dense(nn.Linear(96, 32), density=0.5,
                                           block_size=16).state_dict()
    elif corrupt == "blocks":
        bad["blocks"] = bad["blocks"][:-1]
    elif corrupt == "bias":
        bad["bias"] = torch.randn(33)
    else:
        bad[corrupt] = bad[corrupt].flip(0)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    x = torch.randn(5, 64)
    y = b(x)
    with pytest.raises(RuntimeError, match="BSR state|bias has shape"):
        b.load_state_dict(bad)
    after = b.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(b(x), y)


def test_layer_bad_input() -> None:
    m = BlockSparseLinear(32, 16, block_size=8, density=0.5)
    with pytest.raises(ValueError, match="in_features=32"):
        m(torch.randn(4, 31))
    with pytest.raises(ValueError, match="float64"):
        m(torch.randn(4, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not divide"):
        BlockSparseLinear.from_dense(nn.Linear(30, 16), block_size=8)
    with pytest.raises(ValueError, match="groups=1"):
        BlockSparseConv2d.from_dense(nn.Conv2d(8, 8, 3, groups=2), block_size=4)
    assert "density=0.500" in repr(m)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace itself
def test_jit_trace_is_refused_clearly() -> None:
    lin = BlockSparseLinear(16, 8, block_size=4, density=0.5)
    conv = BlockSparseConv2d(2, 4, 3, block_size=(2, 6), density=0.5)
    for layer, x in ((lin, torch.randn(9, 16)), (conv, torch.randn(1, 2, 5, 5))):
        with pytest.raises(RuntimeError, match="torch.jit.trace"):
            torch.jit.trace(layer, x)


# ---------------------------------------------------------------- triton (interpreter / GPU)
def _triton_or_skip() -> None:
    pytest.importorskip("triton")
    pytest.importorskip("sparsecore.kernels.bsr")


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="TRITON_INTERPRET unset")
@pytest.mark.parametrize("block", [(16, 16), (16, 8)])
def test_triton_products_interpreter(block: tuple[int, int]) -> None:
    _triton_or_skip()
    with use_backend("triton"):
        check_products(random_bsr((3, 2), block, 0.5), 5, torch.float32)
        m = BlockSparseLinear(32, 48, block_size=block, density=0.5)
        x = torch.randn(4, 32, requires_grad=True)
        m(x).sum().backward()
        c = BlockSparseConv2d(4, 16, 3, padding=1, block_size=(16, 12), density=0.5)
        xc = torch.randn(2, 4, 5, 5, requires_grad=True)
        yc = c(xc)
        yc.sum().backward()
    for mod, inp, out in ((m, x, None), (c, xc, yc)):
        ref = mod.to_dense()
        xr = inp.detach().clone().requires_grad_(True)
        yr = ref(xr)
        yr.sum().backward()
        if out is not None:
            assert torch.allclose(out, yr, atol=1e-4)
        assert torch.allclose(inp.grad, xr.grad, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (16, 8), (16, 1), (1, 16)])
def test_triton_products_gpu(dtype: torch.dtype, block: tuple[int, int]) -> None:
    """bsr_dsd (Y and, on the transposed view, dX) and bsr_sddmm (dW) on the Triton kernels."""
    _triton_or_skip()
    with use_backend("triton"):
        check_products(random_bsr((5, 3), block, 0.5), 37, dtype, device="cuda")


def _kept_blocks(m: BlockSparseLinear | BlockSparseConv2d, weight: torch.Tensor) -> torch.Tensor:
    """The blocks (nnzb, bs_r, bs_c) of a dense weight (or its gradient) that `m` keeps."""
    (r, c), (br, bc) = m.weight_bsr().grid, m.block_size
    return weight.reshape(r, br, c, bc).transpose(1, 2)[m.block_row.long(), m.col_idx.long()]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layers_gpu(dtype: torch.dtype, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """BlockSparseLinear / BlockSparseConv2d on the Triton kernels (bsr_dsd, bsr_sddmm,
    bsr_conv2d and its gradients): output and input, block and bias gradients against the
    float64 dense layer (the float32 dense conv that sets the bound without TF32)."""
    _triton_or_skip()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    if kind == "linear":
        m = BlockSparseLinear(256, 128, block_size=32, density=0.25, device="cuda", dtype=dtype)
        x = torch.randn(300, 256, device="cuda", dtype=dtype)
    else:
        m = BlockSparseConv2d(32, 64, 3, stride=(2, 1), padding=1, block_size=(16, 32),
                              density=0.4, device="cuda", dtype=dtype)
        x = torch.randn(4, 32, 9, 10, device="cuda", dtype=dtype)
    dense = m.to_dense()
    ref = m.to_dense().double()
    dy = torch.randn_like(dense(x))
    runs = {}
    for name, mod in (("sparse", m), ("dense", dense), ("ref", ref)):
        xg = x.detach().to(next(mod.parameters()).dtype).requires_grad_(True)
        with use_backend("triton"):
            y = mod(xg)
            y.backward(dy.to(y.dtype))
        weight = mod.blocks.grad if name == "sparse" else _kept_blocks(m, mod.weight.grad)
        runs[name] = {"y": y, "dx": xg.grad, "dw": weight, "db": mod.bias.grad}
    for what in runs["ref"]:
        assert_error_within(runs["sparse"][what], runs["ref"][what], runs["dense"][what],
                            what=what)
