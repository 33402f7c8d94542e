"""Triton CSR kernels (kernels/csr.py) against the float64 dense reference.

`interpreter` cases run the kernels on CPU tensors under TRITON_INTERPRET=1 (set by the
conftest when there is no GPU), with small odd shapes; `gpu` cases run them on CUDA and skip
cleanly without one. bfloat16 is GPU-only: Triton's interpreter mishandles it (see
kernels/_launch.py), and the launcher refuses it there, which is tested below. The last
test compiles the CSR and BSR kernels ahead of time for sm_90, which catches GPU-only
compile errors on a machine without a GPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sparsecore.testing import (
    NO_GPU,
    assert_error_within,
    device_dtype_params,
    run_uninterpreted,
    triton_marks,
)

csr = pytest.importorskip("sparsecore.kernels.csr")
_launch = pytest.importorskip("sparsecore.kernels._launch")

INTERPRETED = _launch.is_interpreted(csr._spmm_kernel)
MARKS = triton_marks(INTERPRETED)
CPU = pytest.param("cpu", marks=MARKS["cpu"])
CUDA = pytest.param("cuda", marks=MARKS["cuda"])
# bfloat16 only on the GPU: the interpreter refuses it (tested below)
DEVICE_DTYPES = device_dtype_params(
    INTERPRETED,
    {"cpu": (torch.float32, torch.float16),
     "cuda": (torch.float32, torch.float16, torch.bfloat16)},
)


def random_csr(
    n: int, k: int, density: float, dtype: torch.dtype, device: str, empty_rows: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fresh random W (n, k) in `dtype` and its CSR (values, col_idx, row_ptr).

    Unless density is 1, a few rows (first, one inside, last) are forced empty.
    """
    mask = torch.rand(n, k) < density
    if empty_rows and density < 1 and n >= 3:
        mask[[0, n // 2, n - 1]] = False
    w = torch.randn(n, k).to(dtype) * mask
    rows, cols = mask.nonzero(as_tuple=True)
    row_ptr = torch.zeros(n + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(mask.sum(1), 0)
    values = w[rows, cols]
    return (
        w.to(device),
        values.to(device),
        cols.to(torch.int32).to(device),
        row_ptr.to(device),
    )


def check_spmm(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.shape[0])
    ref = x.double() @ w.double().T
    assert_error_within(y, ref, x @ w.T, what="spmm")


# ---------------------------------------------------------------- spmm
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("batch", [1, 3, 20])
def test_spmm_matches_dense(device: str, dtype: torch.dtype, density: float, batch: int) -> None:
    n, k = 37, 53
    w, values, col_idx, row_ptr = random_csr(n, k, density, dtype, device)
    x = torch.randn(batch, k, dtype=dtype, device=device)
    check_spmm(x, w, csr.spmm(x, values, col_idx, row_ptr, n))


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_spmm_row_order_and_int16_columns(device: str) -> None:
    """A row order (rows sorted by length) and int16 column indices leave Y unchanged."""
    n, k = 29, 41
    w, values, col_idx, row_ptr = random_csr(n, k, 0.4, torch.float32, device)
    x = torch.randn(3, k, device=device)
    plain = csr.spmm(x, values, col_idx, row_ptr, n)
    order = torch.argsort(row_ptr[1:] - row_ptr[:-1], descending=True).to(torch.int32)
    ordered = csr.spmm(x, values, col_idx, row_ptr, n, row_order=order)
    short = csr.spmm(x, values, col_idx.to(torch.int16), row_ptr, n)
    check_spmm(x, w, plain)
    # same per-row summation order, so the results agree bit for bit
    assert torch.equal(plain, ordered)
    assert torch.equal(plain, short)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_spmm_strided_input_and_transposed_product(device: str) -> None:
    """Non-contiguous X (batch >= 16 takes the batch-contiguous path), and dX = dY W as
    spmm on the CSR of W^T with n_out = K."""
    n, k, batch = 23, 31, 17
    w, values, col_idx, row_ptr = random_csr(n, k, 0.5, torch.float16, device)
    x = torch.randn(k, batch, dtype=torch.float16, device=device).t()  # (batch, k), strided
    check_spmm(x, w, csr.spmm(x, values, col_idx, row_ptr, n))
    x_cols = torch.randn(batch, 2 * k, dtype=torch.float16, device=device)[:, ::2]
    check_spmm(x_cols, w, csr.spmm(x_cols, values, col_idx, row_ptr, n))

    wt = w.t()
    mask_t = wt != 0
    rows, cols = mask_t.nonzero(as_tuple=True)
    row_ptr_t = torch.zeros(k + 1, dtype=torch.int32, device=device)
    row_ptr_t[1:] = torch.cumsum(mask_t.sum(1), 0)
    dy = torch.randn(batch, n, dtype=torch.float16, device=device)
    dx = csr.spmm(dy, wt[rows, cols], cols.to(torch.int32), row_ptr_t, k)
    assert_error_within(dx, dy.double() @ w.double(), dy @ w, what="transposed spmm")


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRETED, reason="TRITON_INTERPRET is not set")
@pytest.mark.parametrize("batch", [1, 20])
def test_spmm_every_config(monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """Each autotune config is a valid program (run one at a time under the interpreter)."""
    n, k = 19, 23
    w, values, col_idx, row_ptr = random_csr(n, k, 0.5, torch.float32, "cpu")
    x = torch.randn(batch, k)
    for config in csr._SPMM_CONFIGS:
        monkeypatch.setattr(csr, "_SPMM_INTERPRETER_CONFIG", config)
        check_spmm(x, w, csr.spmm(x, values, col_idx, row_ptr, n))


def test_spmm_config_pruning_respects_tile_budget() -> None:
    for block_b in (1, 4, 16):
        kept = csr._prune_spmm(csr._SPMM_CONFIGS, {}, BLOCK_B=block_b)
        assert kept
        for c in kept:
            assert c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_J"] * block_b <= csr._SPMM_TILE_BUDGET


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_spmm_empty_dimensions(device: str) -> None:
    w, values, col_idx, row_ptr = random_csr(5, 7, 0.5, torch.float32, device)
    assert csr.spmm(torch.randn(0, 7, device=device), values, col_idx, row_ptr, 5).shape == (0, 5)
    empty = torch.zeros(0, device=device)
    no_idx = torch.zeros(0, dtype=torch.int32, device=device)
    one_row_ptr = torch.zeros(1, dtype=torch.int32, device=device)
    y = csr.spmm(torch.randn(2, 7, device=device), empty, no_idx, one_row_ptr, 0)
    assert y.shape == (2, 0)


# ---------------------------------------------------------------- sddmm
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 3, 20])
def test_sddmm_matches_dense(device: str, dtype: torch.dtype, density: float, batch: int) -> None:
    n, k = 37, 53
    w, _, col_idx, row_ptr = random_csr(n, k, density, dtype, device)
    rows, cols = (w != 0).nonzero(as_tuple=True)
    dy = torch.randn(batch, n, dtype=dtype, device=device)
    x = torch.randn(batch, k, dtype=dtype, device=device)
    g = csr.sddmm(dy, x, rows.to(torch.int32), cols.to(torch.int32))
    assert g.dtype == dtype and g.shape == rows.shape
    ref = (dy.double().T @ x.double())[rows, cols]
    assert_error_within(g, ref, (dy.T @ x)[rows, cols], what="sddmm")


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_sddmm_strided_inputs(device: str) -> None:
    n, k, batch = 13, 11, 18
    rows = torch.randint(0, n, (40,), dtype=torch.int32, device=device)
    cols = torch.randint(0, k, (40,), dtype=torch.int32, device=device)
    dy = torch.randn(n, batch, device=device).t()
    x = torch.randn(batch, 2 * k, device=device)[:, 1::2]
    g = csr.sddmm(dy, x, rows, cols)
    ref = (dy.double().T @ x.double())[rows.long(), cols.long()]
    assert_error_within(g, ref, (dy.T @ x)[rows.long(), cols.long()], what="sddmm")


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_sddmm_empty_batch_gives_zeros(device: str) -> None:
    rows = torch.tensor([0, 2], dtype=torch.int32, device=device)
    g = csr.sddmm(torch.randn(0, 3, device=device), torch.randn(0, 4, device=device), rows, rows)
    assert torch.equal(g, torch.zeros(2, device=device))


# ---------------------------------------------------------------- launcher errors
def _spmm_inputs() -> dict:
    _, values, col_idx, row_ptr = random_csr(6, 8, 1.0, torch.float32, "cpu")
    return {"x": torch.randn(2, 8), "values": values, "col_idx": col_idx, "row_ptr": row_ptr}


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"col_idx": lambda a: a.long()}, TypeError, "col_idx must be torch.int32 or torch.int16"),
        ({"row_ptr": lambda a: a.long()}, TypeError, "row_ptr must be torch.int32"),
        ({"row_ptr": lambda a: a[:-1]}, ValueError, "row_ptr must have 7 elements"),
        ({"col_idx": lambda a: a[:-1]}, ValueError, "col_idx must have"),
        ({"values": lambda a: a.double()}, TypeError, "float32, float16 or bfloat16"),
        ({"values": lambda a: a.half()}, TypeError, "share one dtype"),
        ({"x": lambda a: a[0]}, ValueError, "x must be 2-D"),
        ({"values": lambda a: a.to("meta")}, ValueError, "one device"),
    ],
)
def test_spmm_rejects_bad_input(change: dict, error: type, match: str) -> None:
    args = _spmm_inputs()
    for name, f in change.items():
        args[name] = f(args[name])
    with pytest.raises(error, match=match):
        csr.spmm(args["x"], args["values"], args["col_idx"], args["row_ptr"], 6)


def test_spmm_rejects_bad_row_order_and_int16_overflow() -> None:
    a = _spmm_inputs()
    with pytest.raises(ValueError, match="row_order must have 6 elements"):
        csr.spmm(a["x"], a["values"], a["col_idx"], a["row_ptr"], 6, row_order=a["row_ptr"])
    with pytest.raises(ValueError, match="int16 col_idx needs K <= 32768"):
        csr.spmm(torch.randn(1, 40000), a["values"], a["col_idx"].short(), a["row_ptr"], 6)


def test_launchers_refuse_cpu_tensors_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_launch, "is_interpreted", lambda kernel: False)
    a = _spmm_inputs()
    with pytest.raises(ValueError, match="need CUDA tensors"):
        csr.spmm(a["x"], a["values"], a["col_idx"], a["row_ptr"], 6)


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRETED, reason="TRITON_INTERPRET is not set")
def test_bfloat16_refused_under_interpreter() -> None:
    a = _spmm_inputs()
    with pytest.raises(TypeError, match="bfloat16 is not supported under TRITON_INTERPRET"):
        csr.spmm(a["x"].bfloat16(), a["values"].bfloat16(), a["col_idx"], a["row_ptr"], 6)
    with pytest.raises(TypeError, match="bfloat16 is not supported under TRITON_INTERPRET"):
        csr.sddmm(torch.randn(2, 6).bfloat16(), a["x"].bfloat16(), a["col_idx"], a["col_idx"])


def test_sddmm_rejects_bad_input() -> None:
    idx = torch.tensor([0, 1], dtype=torch.int32)
    dy, x = torch.randn(3, 4), torch.randn(3, 5)
    with pytest.raises(ValueError, match="share the batch size"):
        csr.sddmm(dy, torch.randn(2, 5), idx, idx)
    with pytest.raises(ValueError, match="col_idx must have 2 elements"):
        csr.sddmm(dy, x, idx, idx[:1])
    with pytest.raises(TypeError, match="row_idx must be torch.int32"):
        csr.sddmm(dy, x, idx.long(), idx)
    with pytest.raises(TypeError, match="share one dtype"):
        csr.sddmm(dy, x.half(), idx, idx)
    with pytest.raises(ValueError, match="one device"):
        csr.sddmm(dy, x.to("meta"), idx, idx)


# ------------------------------------------------------- GPU shapes: an LLM MLP layer
@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason=NO_GPU)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 64])
def test_spmm_llm_shape_gpu(dtype: torch.dtype, batch: int) -> None:
    n, k = 4096, 11008
    w, values, col_idx, row_ptr = random_csr(n, k, 0.1, dtype, "cuda")
    x = torch.randn(batch, k, dtype=dtype, device="cuda")
    check_spmm(x, w, csr.spmm(x, values, col_idx, row_ptr, n))


# ---------------------------------------------------------------- compile check without a GPU
_COMPILE_SCRIPT = r"""
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparsecore.kernels import bsr, csr

INDEX = {"col_ptr", "rowptr_ptr", "order_ptr", "row_ptr", "brow_ptr"}
UNIT = {"stride_xk", "stride_yn", "stride_bc", "stride_dyn"}  # as the JIT specialises them


def compile_sm90(fn, dtype, consts, config):
    consts = {**consts, **config.kwargs, **{n: 1 for n in UNIT if n in fn.arg_names}}
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n in consts:
            sig[n] = "constexpr"
            continue
        sig[n] = ("*i32" if n in INDEX else "*" + dtype) if n.endswith("_ptr") else "i32"
        if n.endswith("_ptr") or n.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert kernel.metadata.shared <= 227 * 1024, (fn.__name__, kernel.metadata.shared)


compile_sm90(csr._spmm_kernel, "fp16", {"HAS_ORDER": True, "BLOCK_B": 1}, csr._SPMM_CONFIGS[2])
compile_sm90(csr._sddmm_kernel, "bf16", {}, csr._SDDMM_CONFIGS[0])
for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
    meta = bsr._block_meta(64, 64, torch_dtype, True)
    compile_sm90(bsr._bsr_dsd_kernel, dtype, meta, bsr._DSD_CONFIGS[3])
    meta = bsr._block_meta(16, 1, torch_dtype, False)
    compile_sm90(bsr._bsr_sddmm_kernel, dtype, meta, bsr._SDDMM_CONFIGS[1])
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90() -> None:
    """Without a GPU the interpreter cannot catch compile errors: compile every kernel (CSR
    and BSR) ahead of time for an H100 (sm_90) in a process without TRITON_INTERPRET."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend")
    run = run_uninterpreted(_COMPILE_SCRIPT)
    assert run.returncode == 0, run.stderr[-3000:]
