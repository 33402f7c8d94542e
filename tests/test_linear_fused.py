"""The CSR Linear kernel's fused epilogue (bias, residual, ReLU / GELU), the two-layer MLP op
whose hidden activation stays packed, and optimize() on the project's Transformer (q / k / v
stacked, GELU and residual adds fused): against float64 dense references on fresh random
data, torch's own GELU semantics (erf form) included."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import sparsecore
from sparsecore import has_cpu_ext, models, prune
from sparsecore.formats import CSRWeight
from sparsecore.nn.fused import CSRLinear, FusedLinear, FusedTransformerBlock
from sparsecore.nn.optimize import fused_layers
from sparsecore.testing import kernel_threads

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not has_cpu_ext(), reason="C++ extension not built")]

ACTS = {0: lambda y: y, 1: torch.relu, 2: F.gelu}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPARSECORE_CACHE_DIR", str(tmp_path / "cache"))


def _csr(n_out: int, n_in: int, density: float, dtype: torch.dtype
         ) -> tuple[torch.Tensor, CSRWeight, torch.Tensor, torch.Tensor]:
    """A random masked weight, its CSR, its tiling and its tile-major values."""
    mask = torch.rand(n_out, n_in) < density
    mask[torch.randint(n_out, (1,)), torch.randint(n_in, (1,))] = True
    w = torch.randn(n_out, n_in, dtype=dtype) * mask
    csr = CSRWeight.from_dense(w, mask)
    tiling = torch.ops.sparsecore._csr_tiling_cpu(csr.col_idx, csr.row_ptr, n_in)
    tiled = torch.ops.sparsecore._csr_tile_values_cpu(csr.values, csr.col_idx, csr.row_ptr,
                                                      tiling, n_in)
    return w, csr, tiling, tiled


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    tol = 2e-5 if got.dtype == torch.float32 else 1e-12
    scale = float(ref.abs().max()) + 1e-30
    err = float((got.double() - ref).abs().max())
    assert got.shape == ref.shape and err <= tol * scale, f"error {err:.3g} of {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [3, 64, 130])  # the gather kernel; packed, whole and tail
@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("operands", ["bias", "residual", "both", "none"])
def test_dsd_epilogue(dtype, batch, act, operands) -> None:
    w, csr, tiling, tiled = _csr(70, 45, 0.3, dtype)
    x = torch.randn(batch, 45, dtype=dtype) * 3  # GELU's curved part and both tails
    bias = torch.randn(70, dtype=dtype) if operands in ("bias", "both") else None
    res = torch.randn(batch, 70, dtype=dtype) if operands in ("residual", "both") else None
    ref = x.double() @ w.double().T
    ref = ref + (bias.double() if bias is not None else 0) + (res.double() if res is not None
                                                              else 0)
    for til, tv in ((tiling, tiled), (tiling, None), (None, None)):
        got = torch.ops.sparsecore._csr_dsd_cpu(x, csr.values, csr.col_idx, csr.row_ptr, til,
                                                70, tv, bias, res, act)
        _close(got, ACTS[act](ref))


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("batch", [130, 300, 800])  # rows split; chunks per thread (1, 3)
def test_epilogue_after_the_last_tile(act, residual, batch) -> None:
    """Wide K cut into several column tiles, half of the rows with nothing in the last tile
    and some rows empty: the bias and activation still reach every row, once, in the dsd op
    and in both layers of the MLP op, on one thread and on three."""
    n_out, n_in = 75, 700
    mask = torch.rand(n_out, n_in) < 0.1
    mask[::2, 520:] = False
    mask[5] = False
    w = torch.randn(n_out, n_in, dtype=torch.float64) * mask
    csr = CSRWeight.from_dense(w, mask)
    tiling = torch.ops.sparsecore._csr_tiling_cpu(csr.col_idx, csr.row_ptr, n_in)
    assert int(tiling[5]) >= 3  # the header's tile count
    x = torch.randn(batch, n_in, dtype=torch.float64)
    bias = torch.randn(n_out, dtype=torch.float64)
    res = torch.randn(batch, n_out, dtype=torch.float64) if residual else None
    ref = x @ w.T + bias + (res if residual else 0)
    for threads in (1, 3):
        with kernel_threads(threads):
            got = torch.ops.sparsecore._csr_dsd_cpu(x, csr.values, csr.col_idx, csr.row_ptr,
                                                    tiling, n_out, None, bias, res, act)
        _close(got, ACTS[act](ref))
    # the same matrix as the MLP's second layer (hidden width n_in), then as its first
    w1 = torch.randn(n_in, 40, dtype=torch.float64) * (torch.rand(n_in, 40) < 0.3)
    c1 = CSRWeight.from_dense(w1, w1 != 0)
    b1 = torch.randn(n_in, dtype=torch.float64)
    x40 = torch.randn(batch, 40, dtype=torch.float64)
    h = ACTS[act](x40 @ w1.T + b1)
    got = torch.ops.sparsecore._csr_mlp_cpu(
        x40, c1.values, c1.col_idx, c1.row_ptr, None, None, b1, act,
        csr.values, csr.col_idx, csr.row_ptr, tiling, None, bias, res, act)
    _close(got, ACTS[act](h @ w.T + bias + (res if residual else 0)))
    w2 = torch.randn(30, n_out, dtype=torch.float64) * (torch.rand(30, n_out) < 0.3)
    c2 = CSRWeight.from_dense(w2, w2 != 0)
    got = torch.ops.sparsecore._csr_mlp_cpu(
        x, csr.values, csr.col_idx, csr.row_ptr, tiling, None, bias, act,
        c2.values, c2.col_idx, c2.row_ptr, None, None, None, None, 0)
    _close(got, ACTS[act](x @ w.T + bias) @ w2.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [3, 64, 130, 300])  # 300: by chunks
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm_on_the_way_in(dtype, batch, affine) -> None:
    """ln=True: the product of F.layer_norm(x) (biased variance, eps), the input's rows
    strided too, on both Linear ops."""
    w, csr, tiling, tiled = _csr(40, 48, 0.3, dtype)
    w2, c2, t2, v2 = _csr(48, 40, 0.3, dtype)
    x = (torch.randn(batch, 60, dtype=dtype) * 3 + 5)[:, 6:54]  # row stride 60, offset mean
    gamma = torch.randn(48, dtype=dtype) if affine != "none" else None
    beta = torch.randn(48, dtype=dtype) if affine == "both" else None
    xn = F.layer_norm(x.double(), (48,), None if gamma is None else gamma.double(),
                      None if beta is None else beta.double(), eps=1e-3)
    got = torch.ops.sparsecore._csr_dsd_cpu(x, csr.values, csr.col_idx, csr.row_ptr, tiling,
                                            40, tiled, None, None, 0, True, gamma, beta, 1e-3)
    _close(got, xn @ w.double().T)
    res = torch.randn(batch, 48, dtype=dtype)
    got = torch.ops.sparsecore._csr_mlp_cpu(
        x, csr.values, csr.col_idx, csr.row_ptr, tiling, tiled, None, 2, c2.values, c2.col_idx,
        c2.row_ptr, t2, v2, None, res, 0, True, gamma, beta, 1e-3)
    _close(got, F.gelu(xn @ w.double().T) @ w2.double().T + res.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_by_chunks_on_three_threads(dtype) -> None:
    """Enough chunks of the batch for three threads to take whole chunks (LayerNorm on the
    way in, a tail chunk, a residual): both ops equal their float64 references, and the
    result does not depend on the thread count."""
    w1, c1, t1, v1 = _csr(150, 48, 0.2, dtype)
    w2, c2, t2, v2 = _csr(48, 150, 0.2, dtype)
    x = torch.randn(800, 48, dtype=dtype) * 2 + 1
    gamma, beta = torch.randn(48, dtype=dtype), torch.randn(48, dtype=dtype)
    b1, b2 = torch.randn(150, dtype=dtype), torch.randn(48, dtype=dtype)
    res = torch.randn(800, 48, dtype=dtype)
    xn = F.layer_norm(x.double(), (48,), gamma.double(), beta.double())
    outs = []
    for threads in (1, 3):
        with kernel_threads(threads):
            h = torch.ops.sparsecore._csr_dsd_cpu(x, c1.values, c1.col_idx, c1.row_ptr, t1,
                                                  150, v1, b1, None, 2, True, gamma, beta,
                                                  1e-5)
            y = torch.ops.sparsecore._csr_mlp_cpu(
                x, c1.values, c1.col_idx, c1.row_ptr, t1, v1, b1, 2, c2.values, c2.col_idx,
                c2.row_ptr, t2, v2, b2, res, 1, True, gamma, beta, 1e-5)
        ref_h = F.gelu(xn @ w1.double().T + b1.double())
        _close(h, ref_h)
        _close(y, torch.relu(ref_h @ w2.double().T + b2.double() + res.double()))
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_layer_norm_errors() -> None:
    w, csr, tiling, tiled = _csr(40, 48, 0.3, torch.float32)
    x = torch.randn(16, 48)
    args = (x, csr.values, csr.col_idx, csr.row_ptr, tiling, 40, tiled, None, None, 0)
    with pytest.raises(RuntimeError, match="ln_weight must be"):
        torch.ops.sparsecore._csr_dsd_cpu(*args, True, torch.randn(47), None, 1e-5)
    with pytest.raises(RuntimeError, match="without ln"):
        torch.ops.sparsecore._csr_dsd_cpu(*args, False, torch.randn(48), None, 1e-5)
    with pytest.raises(RuntimeError, match="unit feature stride"):
        torch.ops.sparsecore._csr_dsd_cpu(torch.randn(48, 16).t(), *args[1:], True, None,
                                          None, 1e-5)


def test_gelu_is_torchs_erf_form() -> None:
    """float32 GELU over its whole range (tails where erf saturates, 0, the curve) within a
    few float32 ulps of torch's exact GELU in float64."""
    x = torch.cat([torch.linspace(-12, 12, 20001), torch.tensor([0.0, -1e-30, 1e-30])])
    eye = torch.eye(1)
    csr = CSRWeight.from_dense(eye, eye != 0)
    got = torch.ops.sparsecore._csr_dsd_cpu(x[:, None], csr.values, csr.col_idx, csr.row_ptr,
                                            None, 1, None, None, None, 2)[:, 0]
    ref = F.gelu(x.double())
    assert float((got.double() - ref).abs().max()) < 2e-6
    big = x.abs() > 1
    assert float(((got.double() - ref).abs() / ref.abs())[big & (x > 0)].max()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [2, 64, 77, 300])  # 300: by chunks
@pytest.mark.parametrize("acts", [(2, 0), (1, 1), (0, 2)])
@pytest.mark.parametrize("tiled", [True, False])
def test_mlp_op(dtype, batch, acts, tiled) -> None:
    """_csr_mlp_cpu == act2(W2 act1(W1 x + b1) + b2 + residual) in float64, hidden width
    not a multiple of anything, with and without the tile-major values."""
    w1, c1, t1, v1 = _csr(93, 40, 0.25, dtype)
    w2, c2, t2, v2 = _csr(40, 93, 0.25, dtype)
    x = torch.randn(batch, 40, dtype=dtype) * 2
    b1, b2 = torch.randn(93, dtype=dtype), torch.randn(40, dtype=dtype)
    res = torch.randn(batch, 40, dtype=dtype)
    h = ACTS[acts[0]](x.double() @ w1.double().T + b1.double())
    ref = ACTS[acts[1]](h @ w2.double().T + b2.double() + res.double())
    got = torch.ops.sparsecore._csr_mlp_cpu(
        x, c1.values, c1.col_idx, c1.row_ptr, t1, v1 if tiled else None, b1, acts[0],
        c2.values, c2.col_idx, c2.row_ptr, t2, v2 if tiled else None, b2, res, acts[1])
    _close(got, ref)
    with kernel_threads(2):
        again = torch.ops.sparsecore._csr_mlp_cpu(
            x, c1.values, c1.col_idx, c1.row_ptr, t1, None, None, acts[0], c2.values,
            c2.col_idx, c2.row_ptr, None, None, None, None, acts[1])
    _close(again, ACTS[acts[1]](ACTS[acts[0]](x.double() @ w1.double().T) @ w2.double().T))


def test_mlp_op_errors() -> None:
    w1, c1, t1, v1 = _csr(30, 20, 0.3, torch.float32)
    w2, c2, t2, v2 = _csr(20, 31, 0.3, torch.float32)  # takes 31 features, W1 gives 30
    x = torch.randn(16, 20)
    args = [x, c1.values, c1.col_idx, c1.row_ptr, t1, v1, None, 2, c2.values, c2.col_idx,
            c2.row_ptr, t2, v2, None, None, 0]
    with pytest.raises(RuntimeError):
        torch.ops.sparsecore._csr_mlp_cpu(*args)
    _, c2, t2, v2 = _csr(20, 30, 0.3, torch.float32)
    args[8:13] = [c2.values, c2.col_idx, c2.row_ptr, t2, v2]
    torch.ops.sparsecore._csr_mlp_cpu(*args)  # the shapes agree now
    for i, bad, match in ((7, 3, "act must be"), (14, torch.randn(15, 20), "residual must"),
                          (6, torch.randn(29), "bias must"), (5, v1[:-1], "tiled_values")):
        wrong = list(args)
        wrong[i] = bad
        with pytest.raises(RuntimeError, match=match):
            torch.ops.sparsecore._csr_mlp_cpu(*wrong)
    with pytest.raises(RuntimeError, match="act must be"):
        torch.ops.sparsecore._csr_dsd_cpu(x, c1.values, c1.col_idx, c1.row_ptr, t1, 30, v1,
                                          None, None, -1)


def _transformer(dtype: torch.dtype = torch.float32, depth: int = 2) -> torch.nn.Module:
    model = models.create("transformer", num_classes=50, input_size=24, d_model=48,
                          depth=depth, heads=4).to(dtype)
    prune.prune(model, "magnitude", sparsity=0.8, scope="layerwise")
    with torch.no_grad():  # biases and LayerNorms away from their initial 0 / identity
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("choose", ["csr", "dense", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transformer_blocks_fused(choose, dtype) -> None:
    model = _transformer(dtype)
    tokens = torch.randint(50, (3, 24))
    pick = (lambda info: random.choice(info.candidates)) if choose == "random" else choose
    opt = sparsecore.optimize(model, tokens, choose=pick, cache=False)
    blocks = [m for m in opt.modules() if isinstance(m, FusedTransformerBlock)]
    assert len(blocks) == 2
    names = [name for name, _ in fused_layers(opt)]
    assert "blocks.0.qkv" in names and not any(n.endswith((".q", ".k", ".v")) for n in names)
    assert blocks[0].qkv.weight_shape == (144, 48) and blocks[0].fc1.gelu
    fresh = torch.randint(50, (5, 17))  # another batch and a shorter sequence
    with torch.no_grad():
        ref, got = model(fresh), opt(fresh)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * float(ref.abs().max()))
    if choose == "csr":
        assert all(isinstance(b.fc1.kernel, CSRLinear) for b in blocks)
        with torch.no_grad(), torch.profiler.profile() as prof:
            opt(fresh)
        ran = [e.name for e in prof.events()]
        assert "sparsecore::_csr_mlp_cpu" in ran and "aten::gelu" not in ran
        assert "sparsecore::_attention_cpu" in ran
        assert "aten::scaled_dot_product_attention" not in ran
        assert ran.count("aten::layer_norm") == 1  # the model's last; the blocks' are fused


@pytest.mark.parametrize("kernel", ["dense", "csr", "bsr"])
def test_fused_linear_gelu_residual(kernel) -> None:
    """FusedLinear's GELU and residual on every Linear kernel (3-D input)."""
    w = torch.randn(32, 24)
    mask = torch.zeros(32, 24, dtype=torch.bool)
    mask[:8, :8] = mask[16:24, 8:16] = True  # 8x8-block aligned: bsr can run it
    layer = FusedLinear(w * mask, mask, torch.randn(32), gelu=True, block_size=(8, 8))
    layer.set_kernel(layer.make_kernel(kernel))
    x, res = torch.randn(2, 5, 24), torch.randn(2, 5, 32)
    ref = F.gelu(x.double() @ (w * mask).double().T + layer.bias.double()
                 + res.double())
    _close(layer(x, res), ref)
    with pytest.raises(ValueError, match="exclusive"):
        FusedLinear(w, mask, None, relu=True, gelu=True)


def test_compile_optimized_transformer() -> None:
    model = _transformer(depth=1)
    tokens = torch.randint(50, (2, 24))
    opt = sparsecore.optimize(model, tokens, choose="csr", cache=False)
    torch.compiler.reset()
    compiled = torch.compile(opt, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), opt(tokens), rtol=1e-5, atol=1e-5)
