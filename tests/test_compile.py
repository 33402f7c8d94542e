"""torch.compile(fullgraph=True) and torch.export of sparsified models (CSR and BSR, Linear and
Conv2d; inference and a training step) against eager and the dense reference on fresh random
inputs, and the fake kernels of the C++ helpers that the layers call outside the public ops."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

from sparsecore import has_cpu_ext
from sparsecore.formats import CHWN_CHANNEL_TILE, CSRWeight
from sparsecore.nn import SparseLinear, SparsifyConfig, densify, sparse_linear, sparsify
from sparsecore.testing import assert_error_within

pytestmark = pytest.mark.usefixtures("one_thread")

# (layout, layer kind, sparsity): CSR at 0.95 runs the sparse kernels, at 0.3 the dense
# fallback (the CPU crossover lies between), except the second conv, whose 4x4 output runs
# the batch-last kernels at both on the CPU; BSR in 8x8 blocks.
CASES = [
    ("csr", "linear", 0.95),
    ("csr", "linear", 0.3),
    ("csr", "conv", 0.95),
    ("csr", "conv", 0.3),
    ("bsr", "linear", 0.75),
    ("bsr", "conv", 0.75),
]
IDS = [f"{layout}-{kind}-{s}" for layout, kind, s in CASES]


@pytest.fixture(autouse=True)
def _fresh_compiler() -> None:
    """Every test compiles from scratch: the models of all tests share their forward code, and
    their graphs would count against one recompile limit."""
    torch.compiler.reset()


def sparse_model(layout: str, kind: str, sparsity: float) -> tuple[nn.Module, tuple[int, ...]]:
    """A two-layer model with both layers swapped by sparsify(), and its input shape."""
    if kind == "linear":
        model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32))
        shape: tuple[int, ...] = (16, 48)
    else:
        model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(16, 8, 3, stride=2))
        shape = (2, 8, 10, 10)
    config = SparsifyConfig(layout=layout, sparsity=sparsity, min_sparsity=0.0, block_size=8)
    report = sparsify(model, config)
    assert len(report.swapped) == 2, str(report)
    return model, shape


def dense_twins(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The model's dense twin (same function) in float32 and float64."""
    dense = copy.deepcopy(model)
    densify(dense, masked=False)
    return dense, copy.deepcopy(dense).double()


def check_against_dense(out: torch.Tensor, x: torch.Tensor, dense: tuple[nn.Module, nn.Module],
                        what: str) -> None:
    with torch.no_grad():
        assert_error_within(out, dense[1](x.double()), dense[0](x), what=what)


def input_grad(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(y, dL/dx) for L = <model(x), dy>."""
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(dy)
    return y.detach(), x.grad


@pytest.mark.parametrize(("layout", "kind", "sparsity"), CASES, ids=IDS)
def test_compile_inference(layout: str, kind: str, sparsity: float) -> None:
    model, shape = sparse_model(layout, kind, sparsity)
    model.eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        # A second batch size recompiles with a symbolic batch.
        for batch in (shape[0], shape[0] + 3):
            x = torch.randn(batch, *shape[1:])
            out = compiled(x)
            torch.testing.assert_close(out, model(x))
            check_against_dense(out, x, dense_twins(model), f"compiled, batch {batch}")
        # Weights changed in place are read again: no cache survives into the traced graph.
        for p in model.parameters():
            p.mul_(-0.5)
        x = torch.randn(shape)
        out = compiled(x)
        torch.testing.assert_close(out, model(x))
        check_against_dense(out, x, dense_twins(model), "compiled, new weights")


def training_step(layout: str, kind: str, sparsity: float, backend: str) -> None:
    """Forward + backward + an SGD step of the compiled model against eager, twice."""
    model, shape = sparse_model(layout, kind, sparsity)
    model.train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    for step in range(2):
        x = torch.randn(shape)
        dy = torch.randn_like(eager(x))
        dense = dense_twins(eager)
        y, dx = input_grad(compiled, x, dy)
        y_eager, dx_eager = input_grad(eager, x, dy)
        torch.testing.assert_close(y, y_eager)
        torch.testing.assert_close(dx, dx_eager)
        check_against_dense(y, x, dense, f"step {step}: output")
        _, dx_dense = input_grad(dense[0], x, dy)
        _, dx64 = input_grad(dense[1], x.double(), dy.double())
        assert_error_within(dx, dx64, dx_dense, what=f"step {step}: input gradient")
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=f"step {step}: gradient of {name}")
        for opt in opts:
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize(("layout", "kind", "sparsity"), CASES, ids=IDS)
def test_compile_training_step(layout: str, kind: str, sparsity: float) -> None:
    training_step(layout, kind, sparsity, "aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor needs a C++ compiler (g++)")
def test_compile_inductor_training_step() -> None:
    training_step("csr", "conv", 0.95, "inductor")


@pytest.mark.parametrize(("layout", "kind", "sparsity"), CASES, ids=IDS)
def test_export(layout: str, kind: str, sparsity: float) -> None:
    model, shape = sparse_model(layout, kind, sparsity)
    model.eval()
    program = torch.export.export(model, (torch.randn(shape),))
    # The C++ tilings are buffers built with the layers, not work inside the graph.
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("_csr_tiling_cpu" in t for t in targets), targets
    x = torch.randn(shape)
    out = program.module()(x)
    with torch.no_grad():  # exporting left the layers as they were
        torch.testing.assert_close(out, model(x))
    check_against_dense(out, x, dense_twins(model), "exported")


def test_export_after_load_state_dict() -> None:
    """A layer filled by load_state_dict has its tilings ready for export too."""
    src = SparseLinear.from_dense(nn.Linear(48, 32), sparsity=0.9)
    model = nn.Sequential(SparseLinear(48, 32))
    model[0].load_state_dict(src.state_dict())
    model.eval()
    assert (model[0].tiling is not None) == has_cpu_ext()
    program = torch.export.export(model, (torch.randn(16, 48),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("_csr_tiling_cpu" in t for t in targets), targets
    x = torch.randn(16, 48)
    torch.testing.assert_close(program.module()(x), src(x).detach())


def test_functional_weight_without_tilings() -> None:
    """sparse_linear on a CSRWeight without tilings: the traced call builds them in the graph
    (fake kernel with a data-dependent size) and leaves the weight untouched."""
    dense = torch.randn(32, 48) * (torch.rand(32, 48) < 0.1)
    w, b = CSRWeight.from_dense(dense), torch.randn(32)

    class Model(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return sparse_linear(x, w, b)

    program = torch.export.export(Model(), (torch.randn(16, 48),))
    compiled = torch.compile(Model(), fullgraph=True, backend="aot_eager")
    x = torch.randn(16, 48)
    ref64 = x.double() @ dense.double().t() + b.double()
    for out in (program.module()(x), compiled(x)):
        assert_error_within(out, ref64, x @ dense.t() + b)
    assert w.tiling is None and w.t_tiling is None


@pytest.mark.skipif(not has_cpu_ext(), reason="needs the C++ extension")
def test_opcheck_cpp_helpers() -> None:
    """The fake kernels of the C++ helpers agree with the kernels (shapes, dtypes, strides)."""
    dense = torch.randn(24, 40) * (torch.rand(24, 40) < 0.3)
    w = CSRWeight.from_dense(dense)
    tiling, _ = w.cpu_tilings()
    ops = torch.ops.sparsecore
    torch.library.opcheck(ops._csr_tiling_cpu, (w.col_idx, w.row_ptr, w.n_cols))
    torch.library.opcheck(ops._csr_tile_values_cpu,
                          (w.values, w.col_idx, w.row_ptr, tiling, w.n_cols))
    torch.library.opcheck(ops._csr_transpose_values_cpu,
                          (w.values, w.col_idx, w.row_ptr, w.t_row_ptr))
    torch.library.opcheck(ops._csr_to_dense_cpu, (w.values, w.col_idx, w.row_ptr, w.n_cols))


@pytest.mark.skipif(not has_cpu_ext(), reason="needs the C++ extension")
@pytest.mark.parametrize("stride", [1, 2])
def test_opcheck_batch_last_conv(stride: int) -> None:
    """The fakes of the batch-last conv kernel and of its weight gradient, which the sparse
    conv layers call for small outputs, agree with the kernels."""
    dense = torch.randn(9, 11, 3, 3) * (torch.rand(9, 11, 3, 3) < 0.3)
    w = CSRWeight.from_dense(dense)
    layout = w.cpu_conv_chwn()
    geom = ([stride, stride], [1, 1], [1, 1])
    x = torch.randn(5, 11, 7, 6)
    ops = torch.ops.sparsecore
    args = (x, w.values[layout.perm.long()], layout.ci, layout.tap_ptr, CHWN_CHANNEL_TILE,
            list(w.shape), *geom)
    torch.library.opcheck(ops._csr_conv2d_chwn_cpu, (*args, None, None, False, False))
    dy = torch.randn_like(ops._csr_conv2d_chwn_cpu(*args, None, None, False, False))
    torch.library.opcheck(ops._csr_conv2d_chwn_dw_cpu,
                          (dy, x, layout.ci, layout.tap_ptr, CHWN_CHANNEL_TILE, list(w.shape),
                           *geom))


@pytest.mark.skipif(not has_cpu_ext(), reason="needs the C++ extension")
@pytest.mark.parametrize("kernel", ["csr_direct", "csr_chwn"])
def test_compile_optimized_fused_convs(kernel: str) -> None:
    """optimize()'s fused conv kernels trace (their fakes state the real output layout):
    the compiled and the exported model equal the eager one, which equals the masked
    model."""
    import sparsecore
    from sparsecore import prune

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    prune.prune(model, "magnitude", sparsity=0.7, scope="layerwise")
    x = torch.randn(5, 3, 8, 8)
    optimized = sparsecore.optimize(model, x, choose=kernel, cache=False)
    compiled = torch.compile(optimized, fullgraph=True)
    with torch.no_grad():
        eager = optimized(x)
        assert torch.equal(compiled(x), eager)
        ref = model(x)
        assert (eager - ref).abs().max() <= 1e-5 * ref.abs().max()
        # torch.export too (csr_direct's kept plan is not built while tracing)
        assert torch.equal(torch.export.export(optimized, (x,)).module()(x), eager)
