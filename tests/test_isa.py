"""Every instruction-set build of the C++ kernels that this CPU can run computes the same
results as the dense float64 reference, and the loader picks by the running CPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from sparsecore import _ext

# Run inside a subprocess with SPARSECORE_ISA set: every op family on the C++ backend, forward
# and backward, against float64 dense references on fresh random data.
CHECK = r"""
import sys
import torch
from torch import nn
import sparsecore
from sparsecore import _ext, linalg, use_backend
from sparsecore.nn import BlockSparseConv2d, BlockSparseLinear, SparseConv2d, SparseLinear

want = sys.argv[1]
assert _ext.cpu_isa() == want, (_ext.cpu_isa(), _ext.cpu_ext_error())
torch.manual_seed(int(sys.argv[2]))


def close(got, ref, what):
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item() + 1e-12
    assert err <= 1e-4 * scale, f"{want} {what}: error {err:.3g} of {scale:.3g}"


def check(sparse, dense, x):
    x1 = x.clone().requires_grad_(True)
    x2 = x.double().clone().requires_grad_(True)
    y = sparse(x1)
    ref = dense.double()(x2)
    close(y, ref, f"{type(sparse).__name__} forward")
    g = torch.randn_like(ref)
    y.backward(g.float())
    ref.backward(g)
    close(x1.grad, x2.grad, f"{type(sparse).__name__} input gradient")


with use_backend("cpp"):
    for batch in (3, 37):  # the batch-1..7 gather kernel and the tiled kernel
        lin = nn.Linear(67, 45)
        sl = SparseLinear.from_dense(lin, sparsity=0.8)
        check(sl, sl.to_dense(), torch.randn(batch, 67))
    conv = nn.Conv2d(5, 7, 3, padding=1, stride=(1, 2))
    sc = SparseConv2d.from_dense(conv, sparsity=0.7)
    check(sc, sc.to_dense(), torch.randn(4, 5, 9, 11))
    bl = BlockSparseLinear.from_dense(nn.Linear(64, 48), block_size=16, density=0.5)
    check(bl, bl.to_dense(), torch.randn(19, 64))
    bc = BlockSparseConv2d.from_dense(nn.Conv2d(16, 32, 3, padding=1), block_size=(16, 16),
                                      density=0.5)
    check(bc, bc.to_dense(), torch.randn(2, 16, 7, 6))
    # optimize()'s fused conv kernels: conv -> 2x2 max-pool -> + bias + residual -> ReLU
    from sparsecore.nn.fused import CSRChwnConv, CSRDirectConv
    w = torch.randn(12, 5, 3, 3) * (torch.rand(12, 5, 3, 3) < 0.4)
    b, xc = torch.randn(12), torch.randn(32, 5, 9, 8)
    for stride in (1, 2):
        for kern in (CSRDirectConv(w, w != 0, (stride, stride), (1, 1), (1, 1)),
                     CSRChwnConv(w, w != 0, (stride, stride), (1, 1), (1, 1))):
            ref = nn.functional.conv2d(xc.double(), w.double(), stride=stride, padding=1)
            ref = nn.functional.max_pool2d(ref, 2)
            res = torch.randn(ref.shape)
            ref = (ref + b.double().view(1, -1, 1, 1) + res.double()).relu()
            close(kern(xc, b, res, True, True), ref, f"{kern.name} forward, stride {stride}")
    # the Linear epilogues: x -> W2 GELU(W1 x + b1) + b2 + residual, fused (the MLP op)
    from sparsecore.nn.fused import CSRLinear
    w1 = torch.randn(70, 33) * (torch.rand(70, 33) < 0.3)
    w2 = torch.randn(33, 70) * (torch.rand(33, 70) < 0.3)
    k1, k2 = CSRLinear(w1, w1 != 0), CSRLinear(w2, w2 != 0)
    b1, b2 = torch.randn(70), torch.randn(33)
    for batch in (3, 37):
        xl, res = torch.randn(batch, 33) * 3, torch.randn(batch, 33)
        h = nn.functional.gelu(xl.double() @ w1.double().T + b1.double())
        ref = h @ w2.double().T + b2.double() + res.double()
        close(k2(k1(xl, b1, gelu=True), b2, res), ref, f"CSR Linear epilogues, batch {batch}")
        got = torch.ops.sparsecore._csr_mlp_cpu(
            xl, k1.values, k1.col_idx, k1.row_ptr, k1.tiling, k1.tiled_values, b1, 2,
            k2.values, k2.col_idx, k2.row_ptr, k2.tiling, k2.tiled_values, b2, res, 0)
        close(got, ref, f"CSR MLP, batch {batch}")
    # the fused Transformer block's attention: softmax(q k^T / sqrt(D)) v, causal and not
    for causal in (True, False):
        q, k, v = (torch.randn(2, 37, 3, 20) * s for s in (2, 2, 1))
        ref = nn.functional.scaled_dot_product_attention(
            q.double().transpose(1, 2), k.double().transpose(1, 2), v.double().transpose(1, 2),
            is_causal=causal).transpose(1, 2)
        close(torch.ops.sparsecore._attention_cpu(q, k, v, causal), ref,
              f"attention, causal {causal}")
    for shape in ((40, 16, 16), (6, 37, 23)):  # Jacobi and the bidiagonal kernel
        A = torch.randn(*shape)
        close(linalg.svdvals(A), torch.linalg.svdvals(A.double()), f"svdvals {shape}")
print("ok", want)
"""


def _run(isa: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPARSECORE_ISA": isa, **(extra or {})}
    seed = str(int.from_bytes(os.urandom(4), "little"))
    return subprocess.run([sys.executable, "-c", CHECK, isa, seed], capture_output=True,
                          text=True, env=env, timeout=600)


def test_every_runnable_build_is_installed() -> None:
    """The test environment builds every variant; a missing one would go untested."""
    for name, module, _ in _ext.ISAS:
        if name in _ext.runnable_isas():
            assert importlib.util.find_spec(module) is not None, f"{module} not built"


def test_loader_picks_the_best_build_the_cpu_runs() -> None:
    assert _ext.cpu_isa() == _ext.runnable_isas()[0]


@pytest.mark.parametrize("isa", [name for name, _, _ in _ext.ISAS])
def test_build_matches_reference(isa: str) -> None:
    if isa not in _ext.runnable_isas():
        pytest.skip(f"this CPU ({_ext.cpu_capability()}) cannot run the {isa} build")
    r = _run(isa)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"ok {isa}" in r.stdout


def test_forcing_a_build_the_cpu_lacks_falls_back_with_a_warning() -> None:
    # torch reports a lesser CPU when ATEN_CPU_CAPABILITY says so; the loader must follow it.
    if "avx2" not in _ext.runnable_isas():
        pytest.skip("needs an AVX2 CPU")
    code = ("import warnings\nwarnings.simplefilter('always')\n"
            "import sparsecore\nfrom sparsecore import _ext\nprint(_ext.cpu_isa())")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "SPARSECORE_ISA": "avx512"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "avx2"
    assert "SPARSECORE_ISA=avx512 needs a CPU" in r.stderr
