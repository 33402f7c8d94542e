"""SparseLinear / SparseConv2d and sparsify(): outputs and every gradient against dense layers
(the stride-1 conv's direct kernels included), gradcheck, fixed masks under training,
state_dict round trips (a new pattern rebuilds what the layer derives from it), and the
errors bad use gets."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sparsecore import has_cpu_ext, ops, use_backend
from sparsecore.nn import (
    SparseConv2d,
    SparseLinear,
    SparsifyConfig,
    magnitude_mask,
    sparsify,
)
from sparsecore.testing import assert_error_within, kernel_threads

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["reference"] + (["dense", "cpp"] if has_cpu_ext() else [])
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]


def grads(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and the gradients of input, weight (as a dense tensor) and bias, of this call
    alone."""
    module.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    if isinstance(module, (SparseLinear, SparseConv2d)):
        w = module.weight_csr()
        dw = torch.zeros(w.n_rows, w.n_cols, dtype=x.dtype)
        dw[w.row_idx.long(), w.col_idx.long()] = module.values.grad
        dw = dw.view(w.shape)
    else:
        dw = module.weight.grad
    return {"y": y.detach(), "dx": x.grad, "dw": dw, "db": module.bias.grad}


def check_layer(sparse: nn.Module, dense: nn.Module, x: torch.Tensor) -> None:
    """sparse (float32) against the masked dense twin in float32 and float64."""
    mask = sparse.mask()
    dy = torch.randn_like(dense(x))
    got = grads(sparse, x, dy)
    ref64 = grads(copy.deepcopy(dense).double(), x.double(), dy.double())
    ref32 = grads(copy.deepcopy(dense).float(), x, dy)
    for key in got:
        if key == "dw":  # the dense layer's gradient at pruned positions is not ours
            ref64[key], ref32[key] = ref64[key] * mask, ref32[key] * mask
        assert_error_within(got[key], ref64[key], ref32[key], what=key)


def masked_twin(dense: nn.Module, sparse: nn.Module) -> nn.Module:
    with torch.no_grad():
        dense.weight.copy_(sparse.dense_weight())
    return dense


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5), (67,)])
def test_linear_matches_dense(backend: str, sparsity: float, lead: tuple[int, ...]) -> None:
    dense = nn.Linear(53, 37)
    sparse = SparseLinear.from_dense(dense, sparsity=sparsity)
    masked_twin(dense, sparse)
    with use_backend(backend):
        check_layer(sparse, dense, torch.randn(*lead, 53))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize(
    "geom",
    [dict(stride=1, padding=1), dict(stride=2, padding=0, dilation=2),
     dict(stride=(1, 2), padding=(2, 1)), dict(padding="same"), dict(padding="valid")],
)
def test_conv_matches_dense(backend: str, sparsity: float, geom: dict) -> None:
    dense = nn.Conv2d(5, 7, (3, 2) if geom.get("padding") == "valid" else 3, **geom)
    sparse = SparseConv2d.from_dense(dense, sparsity=sparsity)
    masked_twin(dense, sparse)
    with use_backend(backend):
        check_layer(sparse, dense, torch.randn(3, 5, 11, 10))


def test_conv_unbatched_and_noncontiguous() -> None:
    dense = nn.Conv2d(4, 6, 3, padding=1)
    sparse = SparseConv2d.from_dense(dense, sparsity=0.7)
    masked_twin(dense, sparse)
    x = torch.randn(4, 9, 8)
    torch.testing.assert_close(sparse(x), dense(x))
    xc = torch.randn(2, 9, 8, 4).permute(0, 3, 1, 2)  # channels-last strides
    torch.testing.assert_close(sparse(xc), dense(xc))


def test_linear_noncontiguous_input() -> None:
    dense = nn.Linear(20, 9)
    sparse = SparseLinear.from_dense(dense, sparsity=0.8)
    masked_twin(dense, sparse)
    x = torch.randn(20, 33).t()
    torch.testing.assert_close(sparse(x), dense(x))
    x3 = torch.randn(4, 20, 6).transpose(1, 2)
    torch.testing.assert_close(sparse(x3), dense(x3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend: str) -> None:
    lin = SparseLinear.from_dense(nn.Linear(7, 5).double(), sparsity=0.5)
    conv = SparseConv2d.from_dense(nn.Conv2d(3, 4, 3, stride=2, padding=1).double(),
                                   sparsity=0.5)
    with use_backend(backend):
        x = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
        torch.autograd.gradcheck(lambda x, v, b: _with(lin, v, b)(x), (x, lin.values, lin.bias))
        xc = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
        torch.autograd.gradcheck(lambda x, v, b: _with(conv, v, b)(x),
                                 (xc, conv.values, conv.bias))


def _with(module: nn.Module, values: torch.Tensor, bias: torch.Tensor):
    """module's function with other values / bias (leaves for gradcheck)."""
    from sparsecore.nn.functional import sparse_conv2d, sparse_linear

    w = module.weight_csr().with_values(values)
    if isinstance(module, SparseLinear):
        return lambda x: sparse_linear(x, w, bias)
    return lambda x: sparse_conv2d(x, w, bias, module.stride, module.padding, module.dilation)


DIRECT_GEOMS = [
    # (C_in, C_out, kernel, padding, dilation, (H, W)) at stride 1: the C++ backend runs the
    # forward and dX as direct convs (dX on the transposed-flipped weight), except where the
    # padding passes the dilated kernel (the last one: dX on the transposed product)
    (3, 5, 1, 0, 1, (7, 10)),
    (7, 11, 3, 1, 1, (9, 6)),
    (13, 6, 3, (0, 2), 1, (8, 11)),
    (5, 9, 5, 2, 1, (12, 9)),
    (9, 10, 3, 2, 2, (11, 8)),
    (6, 3, (5, 3), (2, 0), (1, 2), (10, 13)),
    (4, 12, 1, 1, 1, (6, 7)),
]


@pytest.mark.parametrize("backend", [*BACKENDS, None])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("geom", DIRECT_GEOMS)
def test_conv_stride1_matches_masked_dense(backend: str | None, batch: int,
                                           geom: tuple) -> None:
    """A stride-1 SparseConv2d (float64, 90% sparse) against its masked dense twin: output,
    input gradient, the kept weights' gradient and the bias gradient."""
    c_in, c_out, kernel, padding, dilation, hw = geom
    dense = nn.Conv2d(c_in, c_out, kernel, padding=padding, dilation=dilation).double()
    sparse = SparseConv2d.from_dense(dense, sparsity=0.9)
    masked_twin(dense, sparse)
    direct = sparse._uses_flip()
    assert direct == (geom is not DIRECT_GEOMS[-1])
    assert (sparse.f_perm is not None) == (direct and has_cpu_ext())
    x = torch.randn(batch, c_in, *hw, dtype=torch.float64)
    dy = torch.randn_like(dense(x))
    with use_backend(backend):
        got = grads(sparse, x, dy)
    ref = grads(dense, x, dy)
    ref["dw"] = ref["dw"] * sparse.mask()
    for key in got:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-10,
                                   msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geom", [dict(kernel_size=3, padding=1),
                                  dict(kernel_size=(3, 2), padding=(2, 0), dilation=(2, 1))])
def test_gradcheck_stride1(backend: str, geom: dict) -> None:
    conv = SparseConv2d.from_dense(nn.Conv2d(3, 5, **geom).double(), sparsity=0.5)
    with use_backend(backend):
        x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
        torch.autograd.gradcheck(lambda x, v, b: _with(conv, v, b)(x),
                                 (x, conv.values, conv.bias))


def _repruned(how: str, names: tuple[str, ...] | list[str], nhw: tuple[int, int, int]
              ) -> tuple[nn.Conv2d, SparseConv2d, torch.Tensor, dict[str, torch.Tensor],
                         torch.Tensor]:
    """A 6 -> 7 3x3 sparse conv that took a step on one pattern, then was re-pruned (by
    `how`: load_state_dict or from_dense) to another with the same nnz, so that stale arrays
    would still fit. Returns the retrained dense conv, the layer, the new mask, the layer's
    arrays `names` as they were on the old pattern, and the input x (N, 6, H, W) of nhw."""
    dense = nn.Conv2d(6, 7, 3, padding=1).double()
    old_mask = torch.rand(7, 6, 3, 3) < 0.3
    new_mask = torch.zeros_like(old_mask).view(-1)
    new_mask[torch.randperm(new_mask.numel())[:int(old_mask.sum())]] = True
    new_mask = new_mask.view(old_mask.shape)
    layer = SparseConv2d.from_dense(dense, old_mask)
    stale = {n: getattr(layer, n) for n in names}
    n, h, w = nhw
    x = torch.randn(n, 6, h, w, dtype=torch.float64)
    grads(layer, x, torch.randn(n, 7, h, w, dtype=torch.float64))  # a step on the old pattern
    with torch.no_grad():
        dense.weight.mul_(torch.rand_like(dense.weight) + 0.5)  # retrained weights
    repruned = SparseConv2d.from_dense(dense, new_mask)
    if how == "load_state_dict":
        layer.load_state_dict(repruned.state_dict())
    else:
        layer = repruned
    assert torch.equal(layer.mask(), new_mask)
    return dense, layer, new_mask, stale, x


@pytest.mark.skipif(not has_cpu_ext(), reason="the flipped structure feeds the C++ kernel")
@pytest.mark.parametrize("how", ["load_state_dict", "from_dense"])
def test_new_pattern_rebuilds_the_flipped_structure(how: str) -> None:
    """A layer re-pruned to another pattern with the same nnz (so that stale arrays would
    still fit) rebuilds its transposed-flipped structure: its input gradient is the new
    pattern's, which the old structure would get wrong."""
    dense, layer, new_mask, stale, x = _repruned(how, ("f_perm", "f_col_idx", "f_row_ptr"),
                                                  (3, 8, 9))
    assert not torch.equal(layer.f_col_idx, stale["f_col_idx"])
    masked_twin(dense, layer)
    dy = torch.randn(3, 7, 8, 9, dtype=torch.float64)
    ref = grads(dense, x, dy)
    with use_backend("cpp"):
        got = grads(layer, x, dy)
        torch.testing.assert_close(got["dx"], ref["dx"], rtol=1e-10, atol=1e-10)
        for name, t in stale.items():  # the old structure, kept, would give a wrong dX
            setattr(layer, name, t)
        wrong = grads(layer, x, dy)
    assert not torch.allclose(wrong["dx"], ref["dx"])


# (C_in, C_out, kernel, stride, padding, dilation, (H, W)): outputs of at most
# CSR_BATCH_LAST_MAX_PIXELS pixels, which the layers run on the batch-last kernels on the CPU,
# the input gradient too at stride 1 with padding <= dilation * (kernel - 1)
BATCH_LAST_GEOMS = [
    (13, 7, 3, 1, 1, 1, (4, 4)),
    (10, 9, 3, 1, 1, 1, (2, 2)),
    (6, 11, 3, 1, 1, 1, (7, 5)),
    (12, 6, 3, 1, 0, 1, (6, 9)),  # 4x7
    (9, 5, 1, 1, 0, 1, (4, 4)),
    (5, 12, 3, 1, 2, 2, (4, 4)),
    (11, 6, 3, 2, 1, 1, (8, 8)),  # 4x4; dX by csr_conv2d_dx
    (7, 13, 1, 2, 0, 1, (7, 5)),  # a strided 1x1 shortcut: 4x3; dX by csr_conv2d_dx
    (4, 10, 1, 1, 1, 1, (2, 3)),  # padding past a 1x1 kernel: 4x5; dX by csr_conv2d_dx
    (130, 9, 3, 1, 1, 1, (2, 2)),  # two channel tiles in the forward's weight
    (9, 130, 3, 1, 1, 1, (2, 2)),  # two in the input gradient's
]


def expected_chwn_calls(layer: SparseConv2d) -> list[tuple]:
    """The batch-last kernel calls of one forward and backward of a small-output layer."""
    shape, stride = tuple(layer.weight_shape), tuple(layer.stride)
    c_out, c_in, kh, kw = shape
    flipped = [("conv", (c_in, c_out, kh, kw), (1, 1))] if layer._uses_flip() else []
    return [("conv", shape, stride), *flipped, ("dw", shape, stride)]


@pytest.mark.skipif(not has_cpu_ext(), reason="the batch-last kernels are C++")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("backend", [None, "cpp"])
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("geom", BATCH_LAST_GEOMS)
def test_conv_small_output_runs_batch_last(backend: str | None, batch: int, geom: tuple,
                                           threads: int, chwn_calls: list) -> None:
    """A small-output SparseConv2d (float64, 90% sparse) runs its forward, its weight gradient
    and (where the geometry allows) its input gradient on the batch-last kernels, whatever the
    dense crossover says, and matches its masked dense twin: output, input gradient, the kept
    weights' gradient and the bias gradient; on one thread and on two (every threaded path
    taken)."""
    c_in, c_out, kernel, stride, padding, dilation, hw = geom
    dense = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation).double()
    sparse = SparseConv2d.from_dense(dense, sparsity=0.9)
    masked_twin(dense, sparse)
    x = torch.randn(batch, c_in, *hw, dtype=torch.float64)
    dy = torch.randn_like(dense(x))
    assert dy.shape[2] * dy.shape[3] <= ops.CSR_BATCH_LAST_MAX_PIXELS
    with use_backend(backend), kernel_threads(threads):
        got = grads(sparse, x, dy)
    assert chwn_calls == expected_chwn_calls(sparse)
    assert got["y"].stride()[::3] == (1, batch)  # laid out batch-last
    ref = grads(dense, x, dy)
    ref["dw"] = ref["dw"] * sparse.mask()
    for key in got:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-10,
                                   msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.skipif(not has_cpu_ext(), reason="the batch-last kernels are C++")
@pytest.mark.parametrize("geom", [BATCH_LAST_GEOMS[0], BATCH_LAST_GEOMS[6]])
def test_conv_small_output_float32(geom: tuple, chwn_calls: list) -> None:
    """In float32 the batch-last path's error stays within twice dense float32's."""
    c_in, c_out, kernel, stride, padding, dilation, hw = geom
    dense = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation)
    sparse = SparseConv2d.from_dense(dense, sparsity=0.9)
    masked_twin(dense, sparse)
    check_layer(sparse, dense, torch.randn(64, c_in, *hw))
    assert chwn_calls == expected_chwn_calls(sparse)


def test_conv_small_output_empty_batch() -> None:
    dense = nn.Conv2d(5, 6, 3, padding=1)
    sparse = SparseConv2d.from_dense(dense, sparsity=0.8)
    x = torch.randn(0, 5, 4, 4, requires_grad=True)
    y = sparse(x)
    y.sum().backward()
    assert y.shape == (0, 6, 4, 4) and x.grad.shape == x.shape
    assert torch.equal(sparse.values.grad, torch.zeros_like(sparse.values))


@pytest.mark.skipif(not has_cpu_ext(), reason="the batch-last kernels are C++")
@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_forced_backend_overrules_batch_last(backend: str, chwn_calls: list) -> None:
    dense = nn.Conv2d(13, 7, 3, padding=1).double()
    sparse = SparseConv2d.from_dense(dense, sparsity=0.9)
    masked_twin(dense, sparse)
    x = torch.randn(5, 13, 4, 4, dtype=torch.float64)
    dy = torch.randn(5, 7, 4, 4, dtype=torch.float64)
    with use_backend(backend):
        got = grads(sparse, x, dy)
    assert chwn_calls == []
    ref = grads(dense, x, dy)
    torch.testing.assert_close(got["dx"], ref["dx"], rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not has_cpu_ext(), reason="the batch-last kernels are C++")
def test_small_output_layers_train_like_the_masked_model(chwn_calls: list) -> None:
    """SGD steps (momentum, weight decay) of a model whose sparse convs all run batch-last (a
    stride-1 conv on 5x5 maps, a stride-2 one down to 3x3, both with bias) against the masked
    dense model, float64: after every step the loss, every parameter, and the pruned weights'
    zeros match."""
    from sparsecore import prune

    masked = nn.Sequential(nn.Conv2d(6, 10, 3, padding=1), nn.ReLU(),
                           nn.Conv2d(10, 12, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                           nn.Linear(12 * 3 * 3, 4)).double()
    prune.prune(masked, "magnitude", sparsity=0.8, scope="layerwise")
    model = copy.deepcopy(masked)
    report = sparsify(model, SparsifyConfig(min_sparsity=0.0))
    assert len(report.swapped) == 3
    masks = [model[i].mask() for i in (0, 2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
            for m in (masked, model)]
    for step in range(4):
        x = torch.randn(5, 6, 5, 5, dtype=torch.float64)
        target = torch.randint(0, 4, (5,))
        losses = []
        for m, opt in zip((masked, model), opts):
            opt.zero_grad()
            loss = F.cross_entropy(m(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=1e-12)
        for i, mask in zip((0, 2), masks):
            weight = model[i].dense_weight()
            assert torch.equal(model[i].mask(), mask)
            assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask]))
            torch.testing.assert_close(weight, masked[i].weight.detach(), rtol=1e-10,
                                       atol=1e-12, msg=f"layer {i}, step {step}")
            torch.testing.assert_close(model[i].bias, masked[i].bias, rtol=1e-10, atol=1e-12)
    # per step: both forwards, then both weight gradients (the model's input needs none, and
    # the stride-2 layer's input gradient is not batch-last)
    first, second = ((tuple(model[i].weight_shape), tuple(model[i].stride)) for i in (0, 2))
    step_calls = [("conv", *first), ("conv", *second), ("dw", *second), ("dw", *first)]
    assert chwn_calls == 4 * step_calls


@pytest.mark.skipif(not has_cpu_ext(), reason="the batch-last kernels are C++")
@pytest.mark.parametrize("how", ["load_state_dict", "from_dense"])
def test_new_pattern_rebuilds_the_tap_major_layouts(how: str, chwn_calls: list) -> None:
    """A small-output layer re-pruned to another pattern with the same nnz (so that stale
    arrays would still fit) rebuilds its tap-major layouts: its output and gradients are the
    new pattern's; the old weight layout, kept, would get the output and the weight gradient
    wrong, the old transposed-flipped one the input gradient."""
    of_weight, of_flipped = ([p + f for f in ("perm", "ci", "tap_ptr")]
                             for p in ("chwn_", "chwn_f_"))
    names = of_weight + of_flipped
    dense, layer, new_mask, stale, x = _repruned(how, names, (5, 4, 4))
    assert not torch.equal(layer.chwn_ci, stale["chwn_ci"])
    assert not torch.equal(layer.chwn_f_ci, stale["chwn_f_ci"])
    masked_twin(dense, layer)
    dy = torch.randn(5, 7, 4, 4, dtype=torch.float64)
    ref = grads(dense, x, dy)
    ref["dw"] = ref["dw"] * new_mask
    chwn_calls.clear()
    got = grads(layer, x, dy)
    assert chwn_calls == expected_chwn_calls(layer)
    for key in got:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-10,
                                   msg=lambda m, key=key: f"{key}: {m}")
    fresh = {n: getattr(layer, n) for n in names}
    for kept, spoiled in ((of_weight, ("y", "dw")), (of_flipped, ("dx",))):
        for n in names:  # the old layout of one of the two weights, kept
            setattr(layer, n, stale[n] if n in kept else fresh[n])
        wrong = grads(layer, x, dy)
        for key in got:
            assert torch.allclose(wrong[key], ref[key]) == (key not in spoiled), (kept, key)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
])
def test_mask_fixed_under_training(make_opt) -> None:
    model = nn.Sequential(SparseConv2d.from_dense(nn.Conv2d(3, 8, 3, padding=1), sparsity=0.8),
                          nn.ReLU(), nn.Flatten(),
                          SparseLinear.from_dense(nn.Linear(8 * 6 * 6, 10), sparsity=0.9))
    masks = [model[0].mask(), model[3].mask()]
    opt = make_opt(model.parameters())
    x, target = torch.randn(16, 3, 6, 6), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for layer, mask in zip((model[0], model[3]), masks):
        assert torch.equal(layer.mask(), mask)
        assert (layer.dense_weight()[~mask] == 0).all()
        assert layer.values.numel() == int(mask.sum())


@pytest.mark.parametrize("cls", ["linear", "conv"])
def test_state_dict_round_trip(cls: str) -> None:
    if cls == "linear":
        a = SparseLinear.from_dense(nn.Linear(30, 20), sparsity=0.7)
        b = SparseLinear(30, 20)  # empty: another nnz
        x = torch.randn(4, 30)
    else:
        a = SparseConv2d.from_dense(nn.Conv2d(3, 5, 3, stride=2, padding=1), sparsity=0.7)
        b = SparseConv2d(3, 5, 3, stride=2, padding=1)
        x = torch.randn(2, 3, 7, 7)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert torch.equal(a(x), b(x)) and torch.equal(a.mask(), b.mask())
    assert set(a.state_dict()) == {"values", "bias", "col_idx", "row_ptr", "weight_shape"}
    assert a.state_dict()["weight_shape"].tolist() == list(a.weight_shape)
    torch.testing.assert_close(a.to_dense()(x), a(x))
    with torch.no_grad():  # a below-crossover layer (the dense path)
        dense_ish = type(a).from_dense(a.to_dense(), sparsity=0.3)
        y = dense_ish(x)
    buf = io.BytesIO()
    torch.save(dense_ish, buf)  # the whole module pickles
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)
    assert torch.equal(copy.deepcopy(dense_ish)(x), y)
    with torch.no_grad():
        dense_ish.values.mul_(2)  # an in-place change is seen
        torch.testing.assert_close(dense_ish(x) - dense_ish.bias.view(-1, *[1] * (y.dim() - 2)),
                                   2 * (y - dense_ish.bias.view(-1, *[1] * (y.dim() - 2))))
    bad = a.state_dict()
    bad["col_idx"] = bad["col_idx"].flip(0)
    with pytest.raises(RuntimeError, match="inconsistent CSR state"):
        b.load_state_dict(bad)


@pytest.mark.parametrize("cls", ["linear", "conv"])
@pytest.mark.parametrize("corrupt", ["col_idx", "row_ptr", "values", "bias", "weight_shape"])
def test_failed_load_leaves_the_layer_unchanged(cls: str, corrupt: str) -> None:
    """load_state_dict is all or nothing: a state it refuses changes no tensor of the layer
    (the incoming state has another nnz, so a partial load would resize some)."""
    if cls == "linear":
        a = SparseLinear.from_dense(nn.Linear(30, 20), sparsity=0.7)
        b = SparseLinear.from_dense(nn.Linear(30, 20), sparsity=0.9)
        x = torch.randn(4, 30)
    else:
        a = SparseConv2d.from_dense(nn.Conv2d(3, 5, 3, padding=1), sparsity=0.7)
        b = SparseConv2d.from_dense(nn.Conv2d(3, 5, 3, padding=1), sparsity=0.9)
        x = torch.randn(2, 3, 6, 7)
    bad = a.state_dict()
    if corrupt == "col_idx":
        bad["col_idx"] = bad["col_idx"].flip(0)
    elif corrupt == "row_ptr":
        bad["row_ptr"] = bad["row_ptr"].flip(0)
    elif corrupt == "values":
        bad["values"] = bad["values"][:-1]
    elif corrupt == "bias":
        bad["bias"] = torch.randn(21)
    else:
        bad["weight_shape"] = torch.tensor([20, 31] if cls == "linear" else [5, 3, 3, 4])
    before = {k: v.clone() for k, v in b.state_dict().items()}
    y = b(x)
    with pytest.raises(RuntimeError, match="CSR state|bias has shape|holds a weight of shape"):
        b.load_state_dict(bad)
    after = b.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(b(x), y)


def test_state_dict_of_another_shape_is_refused() -> None:
    """The state dict carries the weight's shape: a wider layer whose kept columns all fall
    inside this one's, or a conv of another kernel with the same matrix view, is refused."""
    wide = nn.Linear(60, 20)
    mask = torch.zeros(20, 60, dtype=torch.bool)
    mask[:, :30] = torch.rand(20, 30) > 0.5  # every kept column < 30
    state = SparseLinear.from_dense(wide, mask).state_dict()
    with pytest.raises(RuntimeError, match=r"shape \(20, 60\), this layer's is \(20, 30\)"):
        SparseLinear(30, 20).load_state_dict(state)
    conv = SparseConv2d.from_dense(nn.Conv2d(4, 8, 3), sparsity=0.5)  # matrix view 8 x 36
    with pytest.raises(RuntimeError, match="holds a weight of shape"):
        SparseConv2d(9, 8, 2).load_state_dict(conv.state_dict())  # 8 x 36 as well
    # without the key: strict loading reports it missing; non-strict checks the CSR alone
    lin = SparseLinear.from_dense(nn.Linear(30, 20), sparsity=0.5)
    old = {k: v for k, v in lin.state_dict().items() if k != "weight_shape"}
    with pytest.raises(RuntimeError, match="Missing key.*weight_shape"):
        SparseLinear(30, 20).load_state_dict(old)
    fresh = SparseLinear(30, 20)
    fresh.load_state_dict(old, strict=False)
    assert torch.equal(fresh.mask(), lin.mask())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace itself
def test_jit_trace_is_refused_clearly() -> None:
    lin = SparseLinear.from_dense(nn.Linear(12, 5), sparsity=0.5)
    conv = SparseConv2d.from_dense(nn.Conv2d(2, 3, 3), sparsity=0.5)
    for layer, x in ((lin, torch.randn(9, 12)), (conv, torch.randn(1, 2, 5, 5))):
        with pytest.raises(RuntimeError, match="torch.jit.trace"):
            torch.jit.trace(layer, x)


def _layer(kind: str, sparsity: float, dtype: torch.dtype = torch.float32) -> nn.Module:
    if kind == "linear":
        return SparseLinear.from_dense(nn.Linear(150, 24).to(dtype), sparsity=sparsity)
    return SparseConv2d.from_dense(nn.Conv2d(6, 10, 3, padding=(1, 0), stride=(1, 2)).to(dtype),
                                   sparsity=sparsity)


def _input(kind: str, batch: int = 16, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 150, dtype=dtype) if kind == "linear" else \
        torch.randn(batch, 6, 9, 11, dtype=dtype)


def _dense_forward(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense layer with the sparse layer's current weights, in `dtype`."""
    w, b = layer.dense_weight().to(dtype), layer.bias.detach().to(dtype)
    if isinstance(layer, SparseLinear):
        return F.linear(x.to(dtype), w, b)
    return F.conv2d(x.to(dtype), w, b, layer.stride, layer.padding, layer.dilation)


def assert_current_weights(layer: nn.Module, x: torch.Tensor) -> None:
    """layer(x), with and without autograd, equals the dense layer with its current values
    (float64 reference, the dense float32 computation's error allowed twice)."""
    ref64, dense = _dense_forward(layer, x, torch.float64), _dense_forward(layer, x, x.dtype)
    assert_error_within(layer(x), ref64, dense, what="y (autograd)")
    with torch.no_grad():
        assert_error_within(layer(x), ref64, dense, what="y (no_grad)")


EDITS = {
    # optimizers and edits that change the values without bumping their version counter
    "adam_fused": lambda p: torch.optim.Adam([p], lr=0.1, fused=True),
    "adamw_fused": lambda p: torch.optim.AdamW([p], lr=0.1, weight_decay=0.1, fused=True),
    "data_copy": lambda p: p.data.copy_(torch.randn_like(p)),
    "data_mul": lambda p: p.data.mul_(-3),
    "copy_": lambda p: p.detach().copy_(torch.randn_like(p)),
    "data_assign": lambda p: setattr(p, "data", torch.randn_like(p)),
}


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("sparsity", [0.3, 0.95])  # the dense path and the kernel's
@pytest.mark.parametrize("edit", list(EDITS))
def test_forward_reads_the_current_values(kind: str, sparsity: float, edit: str) -> None:
    """Training steps (fused Adam / AdamW) and in-place edits of the values that leave
    autograd's version counter alone are all seen by the next forward, in training and in
    inference alike (nothing derived from the values outlives a call)."""
    layer, x = _layer(kind, sparsity), _input(kind)
    assert_current_weights(layer, x)  # a forward before the change
    if edit.endswith("_fused"):
        opt = EDITS[edit](layer.values)
        target = torch.randn_like(layer(x))
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(layer(x), target).backward()
            opt.step()
            assert_current_weights(layer, x)
    else:
        with torch.no_grad():
            EDITS[edit](layer.values)
    assert_current_weights(layer, x)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fused_adam_training_loss_is_the_real_one(kind: str) -> None:
    """Each step's loss equals the dense loss at the weights that step started from."""
    layer, x = _layer(kind, 0.9), _input(kind)
    target = torch.randn_like(layer(x))
    opt = torch.optim.Adam(layer.parameters(), lr=0.05, fused=True)
    for _ in range(5):
        ref = F.mse_loss(_dense_forward(layer, x, torch.float64), target.double()).item()
        opt.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        assert loss.item() == pytest.approx(ref, rel=1e-4)


def _dense_grads(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Output, input gradient and kept-weight gradient of the dense twin in `dtype`."""
    w = layer.dense_weight().to(dtype).requires_grad_()
    xd = x.detach().to(dtype).requires_grad_()
    if isinstance(layer, SparseLinear):
        y = F.linear(xd, w)
    else:
        y = F.conv2d(xd, w, None, layer.stride, layer.padding, layer.dilation)
    y.backward(dy.to(dtype))
    return {"y": y.detach(), "dx": xd.grad, "dw": w.grad[layer.mask()]}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_half_precision_on_cpu(dtype: torch.dtype, kind: str, backend: str | None) -> None:
    """float16 / bfloat16 layers run on the CPU (on the reference backend: the C++ kernels
    take float32/float64), in inference and in training, against the float64 dense layer."""
    layer, x = _layer(kind, 0.9, dtype), _input(kind, 16, dtype)
    layer.bias = None
    with use_backend(backend) if backend else contextlib.nullcontext():
        with torch.no_grad():
            y = layer(x)
        xg = x.clone().requires_grad_()
        yg = layer(xg)
        dy = torch.randn_like(yg)
        yg.backward(dy)
    got = {"y": y, "dx": xg.grad, "dw": layer.values.grad}
    assert y.dtype == dtype and torch.equal(y, yg.detach())
    ref64, dense = _dense_grads(layer, x, dy, torch.float64), _dense_grads(layer, x, dy, dtype)
    for key in got:
        assert_error_within(got[key], ref64[key], dense[key], what=key)


def test_repr_and_constructor() -> None:
    lin = SparseLinear.from_dense(nn.Linear(10, 4), sparsity=0.75)
    assert "density=0.250" in repr(lin)
    empty = SparseLinear(10, 4, bias=False, dtype=torch.float64)
    assert empty.nnz == 0 and empty.bias is None
    assert torch.equal(empty(torch.randn(3, 10, dtype=torch.float64)), torch.zeros(3, 4,
                                                                                    dtype=torch.float64))
    conv = SparseConv2d.from_dense(nn.Conv2d(2, 3, 3), sparsity=0.5)
    assert "density=0.500" in repr(conv) and "kernel_size=(3, 3)" in repr(conv)


def test_errors() -> None:
    with pytest.raises(ValueError, match="groups=1"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="groups=1"):
        SparseConv2d(4, 4, 3, groups=4)
    with pytest.raises(ValueError, match="mask= or sparsity="):
        SparseLinear.from_dense(nn.Linear(3, 2), torch.ones(2, 3), sparsity=0.5)
    with pytest.raises(ValueError, match="mask shape"):
        SparseLinear.from_dense(nn.Linear(3, 2), torch.ones(3, 2))
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(1, 1, 1))
    lin = SparseLinear.from_dense(nn.Linear(6, 3), sparsity=0.5)
    with pytest.raises(ValueError, match=r"expected input \(\.\.\., 6\)"):
        lin(torch.randn(2, 5))
    with pytest.raises(ValueError, match="float64"):
        lin(torch.randn(2, 6, dtype=torch.float64))
    conv = SparseConv2d.from_dense(nn.Conv2d(2, 3, 5), sparsity=0.5)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        conv(torch.randn(1, 2, 3, 3))
    with pytest.raises(ValueError, match="channels|expected input"):
        conv(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="sparsity must lie"):
        magnitude_mask(torch.randn(3, 3), 1.5)


def test_magnitude_mask_is_exact() -> None:
    w = torch.randn(10, 13)
    for s in (0.0, 0.3, 0.9, 1.0):
        m = magnitude_mask(w, s)
        assert int(m.sum()) == round((1 - s) * w.numel())
        if 0 < m.sum() < w.numel():
            assert w.abs()[m].min() >= w.abs()[~m].max()


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def small_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def test_sparsify_matches_dense() -> None:
    model = small_model().eval()
    # layer 4: a prune parametrization; layer 7: zeros in the weight; layer 9: left dense
    parametrize.register_parametrization(model[4], "weight",
                                         _Mask(torch.rand(16, 8, 3, 3) > 0.9))
    with torch.no_grad():
        model[7].weight.mul_(torch.rand(32, 256) > 0.8)
        model[0].weight.mul_(torch.rand(8, 3, 3, 3) > 0.7)
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    report = sparsify(model)
    swapped = {name: kind for name, kind, _ in report.swapped}
    skipped = dict(report.skipped)
    assert swapped == {"0": "SparseConv2d", "4": "SparseConv2d", "7": "SparseLinear"}
    assert "groups=2" in skipped["2"] and "below" in skipped["9"]
    assert isinstance(model[4], SparseConv2d) and not parametrize.is_parametrized(model[4])
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert "swapped 3 layer(s)" in str(report)


def test_sparsify_config_and_filter() -> None:
    model = small_model()
    report = sparsify(model, SparsifyConfig(sparsity=0.9, conv=False),
                      filter_fn=lambda m, name: name != "9")
    assert [n for n, *_ in report.swapped] == ["7"]
    assert all(kind == "SparseLinear" for _, kind, _ in report.swapped)
    assert dict(report.skipped)["9"] == "filter_fn returned False"
    assert model[7].density == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ValueError, match="layout"):
        SparsifyConfig(layout="coo")
    report = sparsify(nn.Linear(4, 4), SparsifyConfig(min_sparsity=0.0))
    assert "root" in report.skipped[0][1]
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    report = sparsify(mha, SparsifyConfig(sparsity=0.9))
    assert "MultiheadAttention" in dict(report.skipped)["0.out_proj"]
