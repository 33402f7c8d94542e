"""Triton BSR kernels (kernels/bsr.py) against the float64 dense reference.

`interpreter` cases run on CPU tensors under TRITON_INTERPRET=1 (set by the conftest when
there is no GPU) on small odd block grids; `gpu` cases run on CUDA and skip cleanly without
one. bfloat16 is GPU-only (the interpreter's bfloat16 tl.dot is wrong; the launcher refuses
it there, tested in test_kernels_csr.py and below).
"""

from __future__ import annotations

import pytest
import torch

from sparsecore.testing import NO_GPU, assert_error_within, device_dtype_params, triton_marks

bsr = pytest.importorskip("sparsecore.kernels.bsr")
_launch = pytest.importorskip("sparsecore.kernels._launch")

INTERPRETED = _launch.is_interpreted(bsr._bsr_dsd_kernel)
MARKS = triton_marks(INTERPRETED)
CPU = pytest.param("cpu", marks=MARKS["cpu"])
CUDA = pytest.param("cuda", marks=MARKS["cuda"])
DEVICE_DTYPES = device_dtype_params(
    INTERPRETED,
    {"cpu": (torch.float32, torch.float16),
     "cuda": (torch.float32, torch.float16, torch.bfloat16)},
)
# square, rectangular, below tl.dot's 16 (padded in the kernel)
BLOCKS = [(16, 16), (32, 16), (16, 1), (1, 16), (8, 8)]


class RandomBSR:
    """A fresh random block-sparse W (n_brows * bs_r, n_bcols * bs_c) and its BSR arrays.

    Unless density is 1, block row 1 (and the last, when there are 3+) is kept empty.
    """

    def __init__(
        self,
        n_brows: int,
        n_bcols: int,
        block: tuple[int, int],
        density: float,
        dtype: torch.dtype,
        device: str,
    ) -> None:
        bs_r, bs_c = block
        bmask = torch.rand(n_brows, n_bcols) < density
        if density < 1 and n_brows >= 2:
            bmask[1] = False
        if density < 1 and n_brows >= 3:
            bmask[-1] = False
        mask = bmask.repeat_interleave(bs_r, 0).repeat_interleave(bs_c, 1)
        self.w = (torch.randn(n_brows * bs_r, n_bcols * bs_c).to(dtype) * mask).to(device)
        rows, cols = bmask.nonzero(as_tuple=True)
        tiles = self.w.reshape(n_brows, bs_r, n_bcols, bs_c).permute(0, 2, 1, 3)
        self.blocks = tiles[rows.to(device), cols.to(device)].contiguous()
        self.rows = rows.to(torch.int32).to(device)
        self.cols = cols.to(torch.int32).to(device)
        self.row_ptr = torch.zeros(n_brows + 1, dtype=torch.int32)
        self.row_ptr[1:] = torch.cumsum(bmask.sum(1), 0)
        self.row_ptr = self.row_ptr.to(device)
        self.bmask = bmask
        self.block = block

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BSR of W^T with blocks as a view: (blocks[perm].transpose(1, 2), cols, row_ptr)."""
        device = self.blocks.device
        index = torch.full(self.bmask.shape, -1, dtype=torch.long)
        index[self.bmask] = torch.arange(int(self.bmask.sum()))
        bmask_t = self.bmask.t()
        rows_t, cols_t = bmask_t.nonzero(as_tuple=True)
        perm = index[cols_t, rows_t].to(device)
        row_ptr_t = torch.zeros(bmask_t.shape[0] + 1, dtype=torch.int32)
        row_ptr_t[1:] = torch.cumsum(bmask_t.sum(1), 0)
        blocks_t = self.blocks[perm].transpose(1, 2)
        return blocks_t, cols_t.to(torch.int32).to(device), row_ptr_t.to(device)


def check_dsd(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, what: str = "bsr_dsd") -> None:
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.shape[0])
    assert_error_within(y, x.double() @ w.double().T, x @ w.T, what=what)


def check_sddmm(dy: torch.Tensor, x: torch.Tensor, m: RandomBSR, g: torch.Tensor) -> None:
    bs_r, bs_c = m.block
    assert g.dtype == dy.dtype and g.shape == m.blocks.shape

    def kept(full: torch.Tensor) -> torch.Tensor:
        nbr, nbc = m.bmask.shape
        tiles = full.reshape(nbr, bs_r, nbc, bs_c).permute(0, 2, 1, 3)
        return tiles[m.rows.long(), m.cols.long()]

    assert_error_within(g, kept(dy.double().T @ x.double()), kept(dy.T @ x), what="bsr_sddmm")


# ---------------------------------------------------------------- bsr_dsd
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("batch", [3, 20])
def test_dsd_matches_dense(device: str, dtype: torch.dtype, block: tuple, batch: int) -> None:
    m = RandomBSR(3, 5, block, 0.6, dtype, device)
    x = torch.randn(batch, m.w.shape[1], dtype=dtype, device=device)
    check_dsd(x, m.w, bsr.bsr_dsd(x, m.blocks, m.cols, m.row_ptr, m.w.shape[0]))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_dsd_density_extremes(device: str, dtype: torch.dtype, density: float) -> None:
    m = RandomBSR(3, 2, (16, 16), density, dtype, device)
    x = torch.randn(1, m.w.shape[1], dtype=dtype, device=device)
    check_dsd(x, m.w, bsr.bsr_dsd(x, m.blocks, m.cols, m.row_ptr, m.w.shape[0]))


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("block,grid", [((64, 64), (2, 3)), ((128, 32), (1, 3))])
def test_dsd_large_blocks(device: str, block: tuple, grid: tuple) -> None:
    m = RandomBSR(*grid, block, 0.7, torch.float16, device)
    x = torch.randn(5, m.w.shape[1], dtype=torch.float16, device=device)
    check_dsd(x, m.w, bsr.bsr_dsd(x, m.blocks, m.cols, m.row_ptr, m.w.shape[0]))


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("block", [(16, 32), (16, 1)])
def test_dsd_transposed_product_with_strided_views(device: str, block: tuple) -> None:
    """dX = dY W is bsr_dsd on W^T's BSR given as a transposed view of the blocks, and X
    may be non-contiguous."""
    m = RandomBSR(4, 3, block, 0.5, torch.float32, device)
    n, k = m.w.shape
    dy = torch.randn(n, 6, device=device).t()
    blocks_t, cols_t, row_ptr_t = m.transposed()
    dx = bsr.bsr_dsd(dy, blocks_t, cols_t, row_ptr_t, k)
    assert_error_within(dx, dy.double() @ m.w.double(), dy @ m.w, what="transposed bsr_dsd")


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_dsd_allow_tf32(device: str) -> None:
    m = RandomBSR(2, 3, (16, 16), 0.7, torch.float32, device)
    x = torch.randn(4, m.w.shape[1], device=device)
    y = bsr.bsr_dsd(x, m.blocks, m.cols, m.row_ptr, m.w.shape[0], allow_tf32=True)
    dense_tf32 = (x.double() @ m.w.double().T).float()
    if device == "cuda":
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            dense_tf32 = x @ m.w.T
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    assert_error_within(y, x.double() @ m.w.double().T, dense_tf32, what="bsr_dsd tf32")


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRETED, reason="TRITON_INTERPRET is not set")
def test_every_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each autotune config is a valid program (run one at a time under the interpreter)."""
    m = RandomBSR(3, 2, (16, 32), 0.6, torch.float32, "cpu")
    x = torch.randn(20, m.w.shape[1])
    dy = torch.randn(20, m.w.shape[0])
    for config in {str(c): c for c in bsr._DSD_CONFIGS + bsr._SDDMM_CONFIGS}.values():
        monkeypatch.setattr(bsr, "_INTERPRETER_CONFIG", config)
        check_dsd(x, m.w, bsr.bsr_dsd(x, m.blocks, m.cols, m.row_ptr, m.w.shape[0]))
        check_sddmm(dy, x, m, bsr.bsr_sddmm(dy, x, m.rows, m.cols, *m.block))


def test_config_pruning_follows_batch() -> None:
    def kept(batch: int) -> set[int]:
        return {c.kwargs["BLOCK_B"] for c in bsr._prune(bsr._DSD_CONFIGS, {"batch_bucket": batch})}

    assert kept(1) == kept(16) == {16}
    assert kept(64) == {16, 32, 64}
    assert kept(8192) == {16, 32, 64, 128, 256}


# ---------------------------------------------------------------- bsr_sddmm
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("batch", [3, 20])
def test_sddmm_matches_dense(device: str, dtype: torch.dtype, block: tuple, batch: int) -> None:
    m = RandomBSR(3, 5, block, 0.6, dtype, device)
    n, k = m.w.shape
    dy = torch.randn(batch, n, dtype=dtype, device=device)
    x = torch.randn(batch, k, dtype=dtype, device=device)
    check_sddmm(dy, x, m, bsr.bsr_sddmm(dy, x, m.rows, m.cols, *block))


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_sddmm_density_extremes_and_strides(device: str) -> None:
    for density in (0.0, 1.0):
        m = RandomBSR(2, 3, (16, 16), density, torch.float32, device)
        n, k = m.w.shape
        dy = torch.randn(n, 7, device=device).t()
        x = torch.randn(7, 2 * k, device=device)[:, ::2]
        check_sddmm(dy, x, m, bsr.bsr_sddmm(dy, x, m.rows, m.cols, 16, 16))


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_empty_batch(device: str) -> None:
    m = RandomBSR(2, 2, (16, 16), 1.0, torch.float32, device)
    x0 = torch.randn(0, 32, device=device)
    assert bsr.bsr_dsd(x0, m.blocks, m.cols, m.row_ptr, 32).shape == (0, 32)
    g = bsr.bsr_sddmm(torch.randn(0, 32, device=device), x0, m.rows, m.cols, 16, 16)
    assert torch.equal(g, torch.zeros_like(m.blocks))


# ---------------------------------------------------------------- launcher errors
def _dsd_inputs() -> dict:
    m = RandomBSR(3, 2, (16, 8), 1.0, torch.float32, "cpu")
    return {"x": torch.randn(2, 16), "blocks": m.blocks, "col_idx": m.cols, "row_ptr": m.row_ptr}


@pytest.mark.parametrize(
    "change,n_out,error,match",
    [
        ({}, 40, ValueError, "multiple of the block rows bs_r=16"),
        ({"x": lambda a: torch.randn(2, 12)}, 48, ValueError, "K=12 columns, not a multiple"),
        ({"blocks": lambda a: torch.randn(1, 256, 8)}, 48, ValueError, "must be in 1..128"),
        ({"blocks": lambda a: torch.randn(1, 16, 0)}, 48, ValueError, "must be in 1..128"),
        ({"col_idx": lambda a: a.long()}, 48, TypeError, "col_idx must be torch.int32"),
        ({"row_ptr": lambda a: a[:-1]}, 48, ValueError, "row_ptr must have 4 elements"),
        ({"blocks": lambda a: a[:-1]}, 48, ValueError, "col_idx must have"),
        ({"blocks": lambda a: a.half()}, 48, TypeError, "share one dtype"),
        ({"blocks": lambda a: a[0]}, 48, ValueError, "blocks must be 3-D"),
        ({"row_ptr": lambda a: a.to("meta")}, 48, ValueError, "one device"),
    ],
)
def test_dsd_rejects_bad_input(change: dict, n_out: int, error: type, match: str) -> None:
    args = _dsd_inputs()
    for name, f in change.items():
        args[name] = f(args[name])
    with pytest.raises(error, match=match):
        bsr.bsr_dsd(args["x"], args["blocks"], args["col_idx"], args["row_ptr"], n_out)


def test_sddmm_rejects_bad_input() -> None:
    idx = torch.tensor([0, 1], dtype=torch.int32)
    dy, x = torch.randn(3, 32), torch.randn(3, 16)
    with pytest.raises(ValueError, match="N=32 columns, not a multiple of the block rows bs_r=12"):
        bsr.bsr_sddmm(dy, x, idx, idx, 12, 16)
    with pytest.raises(ValueError, match="K=16 columns, not a multiple of the block columns"):
        bsr.bsr_sddmm(dy, x, idx, idx, 16, 32)
    with pytest.raises(ValueError, match="share the batch size"):
        bsr.bsr_sddmm(dy, torch.randn(2, 16), idx, idx, 16, 16)
    with pytest.raises(ValueError, match="col_idx must have 2 elements"):
        bsr.bsr_sddmm(dy, x, idx, idx[:1], 16, 16)
    with pytest.raises(TypeError, match="blocks_row must be torch.int32"):
        bsr.bsr_sddmm(dy, x, idx.long(), idx, 16, 16)
    with pytest.raises(ValueError, match="one device"):
        bsr.bsr_sddmm(dy, x, idx.to("meta"), idx, 16, 16)


def test_refuses_cpu_tensors_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_launch, "is_interpreted", lambda kernel: False)
    a = _dsd_inputs()
    with pytest.raises(ValueError, match="need CUDA tensors"):
        bsr.bsr_dsd(a["x"], a["blocks"], a["col_idx"], a["row_ptr"], 48)


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRETED, reason="TRITON_INTERPRET is not set")
def test_bfloat16_refused_under_interpreter() -> None:
    a = _dsd_inputs()
    with pytest.raises(TypeError, match="bfloat16 is not supported under TRITON_INTERPRET"):
        bsr.bsr_dsd(a["x"].bfloat16(), a["blocks"].bfloat16(), a["col_idx"], a["row_ptr"], 48)


# ------------------------------------------------ GPU shapes: Transformer projections
@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason=NO_GPU)
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("density", [0.1, 0.5])
def test_transformer_shape_gpu(block: int, density: float) -> None:
    m = RandomBSR(1024 // block, 4096 // block, (block, block), density, torch.bfloat16, "cuda")
    n, k = m.w.shape
    x = torch.randn(512, k, dtype=torch.bfloat16, device="cuda")
    check_dsd(x, m.w, bsr.bsr_dsd(x, m.blocks, m.cols, m.row_ptr, n))
    dy = torch.randn(512, n, dtype=torch.bfloat16, device="cuda")
    check_sddmm(dy, x, m, bsr.bsr_sddmm(dy, x, m.rows, m.cols, block, block))
