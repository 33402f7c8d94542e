"""SparseLinear / SparseConv2d and sparsify(): outputs and every gradient against dense layers,
gradcheck, fixed masks under training, state_dict round trips, and the errors bad use gets."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sparsecore import has_cpu_ext, use_backend
from sparsecore.nn import (
    SparseConv2d,
    SparseLinear,
    SparsifyConfig,
    magnitude_mask,
    sparsify,
)
from sparsecore.testing import assert_error_within

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["reference"] + (["dense", "cpp"] if has_cpu_ext() else [])
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]


def grads(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and the gradients of input, weight (as a dense tensor) and bias."""
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
    assert set(a.state_dict()) == {"values", "bias", "col_idx", "row_ptr"}
    torch.testing.assert_close(a.to_dense()(x), a(x))
    with torch.no_grad():  # fills the inference cache of a below-crossover layer
        dense_ish = type(a).from_dense(a.to_dense(), sparsity=0.3)
        y = dense_ish(x)
    buf = io.BytesIO()
    torch.save(dense_ish, buf)  # the whole module pickles
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)
    assert torch.equal(copy.deepcopy(dense_ish)(x), y)
    with torch.no_grad():
        dense_ish.values.mul_(2)  # an in-place change invalidates the cache
        torch.testing.assert_close(dense_ish(x) - dense_ish.bias.view(-1, *[1] * (y.dim() - 2)),
                                   2 * (y - dense_ish.bias.view(-1, *[1] * (y.dim() - 2))))
    bad = a.state_dict()
    bad["col_idx"] = bad["col_idx"].flip(0)
    with pytest.raises(RuntimeError, match="inconsistent CSR state"):
        b.load_state_dict(bad)


@pytest.mark.parametrize("sparsity", [0.3, 0.9])
def test_inference_caches_follow_values(sparsity: float) -> None:
    """Inference keeps the densified (below the crossover) or re-laid-out (kernel) weight
    between calls; an in-place change of the values, or another values tensor, is seen."""
    dense = nn.Linear(40, 24)
    sparse = SparseLinear.from_dense(dense, sparsity=sparsity)
    x = torch.randn(16, 40)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(sparse(x), sparse.to_dense()(x))
        sparse.values.mul_(-3)
        torch.testing.assert_close(sparse(x), sparse.to_dense()(x))
        sparse.values = nn.Parameter(torch.randn_like(sparse.values))
        torch.testing.assert_close(sparse(x), sparse.to_dense()(x))


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
