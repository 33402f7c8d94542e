"""sparsecore.optimize / explain: BatchNorm folded, bias + ReLU (+ residual, + max-pool) fused,
every kernel choice equal to the masked model in eval mode on fresh inputs; the timing cache;
the explain report."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore
from sparsecore import models, prune
from sparsecore.formats import expand_block_mask
from sparsecore.models import resnet
from sparsecore.nn import SparsifyConfig, sparsify
from sparsecore.nn import optimize as opt_mod
from sparsecore.nn.fused import (
    KERNELS,
    FusedConv2d,
    FusedLinear,
    FusedResidual,
    im2col_nhwc,
    max_pool_2x2,
)
from sparsecore.nn.optimize import cache_path, fused_layers

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch) -> str:
    """Every test writes its timing cache under tmp_path, never under ~/.cache."""
    monkeypatch.setenv("SPARSECORE_CACHE_DIR", str(tmp_path / "cache"))
    return str(tmp_path / "cache")


def _random_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm running statistics and an affine map far from the identity, so
    that folding them is tested (fresh BatchNorms are the identity in eval mode)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(-1.5, 1.5)  # negative scales too
                    m.bias.uniform_(-0.3, 0.3)
    return model


def _pruned(model: nn.Module, sparsity: float = 0.8) -> nn.Module:
    prune.prune(model, "magnitude", sparsity=sparsity, scope="layerwise")
    return _random_bn(model).eval()


def _random_choice(info: opt_mod.LayerInfo) -> str:
    return random.choice(info.candidates)


def _assert_same(model: nn.Module, optimized: nn.Module, shape: tuple[int, ...]) -> None:
    """optimized == model (eval) on a fresh input of `shape`, fp32 tolerance."""
    x = torch.randn(shape)
    with torch.no_grad():
        ref, out = model.eval()(x), optimized(x)
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * scale)


def _block_masked_conv(c_in: int, c_out: int, block: tuple[int, int] = (8, 8),
                       density: float = 0.3) -> nn.Sequential:
    """Conv-BN-ReLU whose mask keeps whole blocks of the (C_out, C_in*9) matrix view."""
    seq = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())
    grid = (c_out // block[0], c_in * 9 // block[1])
    blocks = torch.rand(grid) < density
    blocks[0, 0] = True
    mask = expand_block_mask(blocks, block).view(c_out, c_in, 3, 3)
    prune.apply(seq, {"0.weight": mask})
    return _random_bn(seq).eval()


@pytest.mark.parametrize("kernel", KERNELS)
def test_conv_bn_relu_every_kernel(kernel: str) -> None:
    model = _block_masked_conv(16, 32)
    optimized = sparsecore.optimize(model, torch.randn(4, 16, 8, 8), choose=kernel)
    fused = optimized[0]
    assert isinstance(fused, FusedConv2d) and fused.relu and fused.bias is not None
    assert isinstance(optimized[1], nn.Identity) and isinstance(optimized[2], nn.Identity)
    assert fused.info.block_size == (8, 8) and fused.info.choice == kernel
    assert fused.kernel.name == kernel and fused.info.decided_by == "fixed"
    _assert_same(model, optimized, (5, 16, 8, 8))
    assert not os.path.exists(cache_path())  # a fixed choice times nothing


@pytest.mark.parametrize("kernel", KERNELS)
def test_through_the_ops(kernel: str, monkeypatch) -> None:
    """Where the C++ ops do not take the tensors (CUDA, no extension) the kernels go through
    sparsecore.ops' automatic choice: the same results."""
    from sparsecore.nn import fused

    monkeypatch.setattr(fused, "has_cpu_ext", lambda: False)
    model = nn.Sequential(_block_masked_conv(16, 16), nn.Flatten(), nn.Linear(16 * 16, 16))
    prune.apply(model, {"2.weight": expand_block_mask(torch.rand(2, 32) < 0.5, (8, 8))})
    optimized = sparsecore.optimize(model.eval(), torch.randn(4, 16, 4, 4), choose=kernel)
    assert optimized[0][0].kernel.name == kernel
    _assert_same(model, optimized, (9, 16, 4, 4))


@pytest.mark.parametrize("kernel", ["dense", "csr", "bsr"])
def test_linear_bn1d_relu(kernel: str) -> None:
    model = nn.Sequential(nn.Linear(48, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16))
    w = model[0].weight
    blocks = torch.rand(4, 6) < 0.4
    prune.apply(model, {"0.weight": expand_block_mask(blocks, (8, 8)).view_as(w),
                        "3.weight": torch.rand(16, 32) < 0.3})
    _random_bn(model).eval()
    optimized = sparsecore.optimize(model, torch.randn(16, 48), choose=kernel)
    assert isinstance(optimized[0], FusedLinear) and optimized[0].relu
    assert isinstance(optimized[3], FusedLinear) and not optimized[3].relu
    assert optimized[0].kernel.name == kernel
    _assert_same(model, optimized, (9, 48))
    with pytest.raises(ValueError, match="2-D"):  # BatchNorm1d normalised the features
        optimized(torch.randn(2, 3, 48))


@pytest.mark.parametrize("c_in,c_out,stride", [(8, 16, 2), (16, 16, 1)])
def test_basic_block(c_in: int, c_out: int, stride: int) -> None:
    block = _pruned(resnet.BasicBlock(c_in, c_out, stride))
    x = torch.randn(3, c_in, 8, 8)
    optimized = sparsecore.optimize(block, x, choose=_random_choice)
    assert isinstance(optimized, FusedResidual)
    assert (optimized.shortcut is None) == (stride == 1 and c_in == c_out)
    assert optimized.conv2.bias is None or optimized.shortcut is None  # one bias, one pass
    assert all(layer.relu for layer in (optimized.conv1, optimized.conv2))
    _assert_same(block, optimized, (2, c_in, 8, 8))


@pytest.mark.skipif(not hasattr(resnet, "Bottleneck"), reason="no Bottleneck block here")
def test_bottleneck_block() -> None:
    block = _pruned(resnet.Bottleneck(16, 8, 2))
    optimized = sparsecore.optimize(block, torch.randn(2, 16, 8, 8), choose=_random_choice)
    assert isinstance(optimized, FusedResidual) and optimized.names == ["conv1", "conv2",
                                                                       "conv3"]
    _assert_same(block, optimized, (3, 16, 8, 8))


@pytest.mark.parametrize("name,kernel", [
    ("vgg16", "csr_unfold"), ("vgg16", "csr"), ("vgg16", "dense"), ("vgg16", _random_choice),
    ("resnet18", _random_choice), ("resnet18", "csr_direct"), ("resnet20", "csr_unfold"),
    ("resnet20", _random_choice),
])
def test_whole_models(name: str, kernel) -> None:
    model = _pruned(models.create(name, num_classes=10, in_channels=3, input_size=32,
                                  width=0.125 if name != "resnet20" else 0.5), 0.9)
    optimized = sparsecore.optimize(model, torch.randn(2, 3, 32, 32), choose=kernel)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm | nn.ReLU)
                   for m in optimized.modules())
    layers = fused_layers(optimized)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(layers) == len(convs) + 1  # every conv, and the classifier
    if isinstance(kernel, str):
        convs_fused = [m for _, m in layers if isinstance(m, FusedConv2d)]
        assert {m.kernel.name for m in convs_fused} == {kernel}
    _assert_same(model, optimized, (3, 3, 32, 32))


@pytest.mark.parametrize("kernel", ["dense", "csr", "csr_unfold", "csr_direct", "csr_chwn"])
@pytest.mark.parametrize("geom", [
    dict(kernel_size=3, stride=2, padding=0),
    dict(kernel_size=(3, 1), stride=(1, 2), padding=(1, 0)),
    dict(kernel_size=3, stride=1, padding=2, dilation=2),
    dict(kernel_size=1, stride=2, padding=0),
    dict(kernel_size=2, stride=1, padding="valid"),
    dict(kernel_size=3, stride=1, padding="same"),
])
def test_odd_shapes(kernel: str, geom: dict) -> None:
    """Non-square inputs, odd channel counts, stride 2, padding 0, dilation, a conv bias,
    and a fused 2x2 max-pool over odd sizes."""
    model = nn.Sequential(nn.Conv2d(5, 7, bias=True, **geom), nn.BatchNorm2d(7), nn.MaxPool2d(2),
                          nn.ReLU(), nn.Conv2d(7, 3, 3, padding=1), nn.ReLU())
    _pruned(model, 0.6)
    optimized = sparsecore.optimize(model, torch.randn(2, 5, 13, 9), choose=kernel)
    assert optimized[0].pool is not None and optimized[0].relu
    assert isinstance(optimized[4], FusedConv2d) and optimized[4].relu
    _assert_same(model, optimized, (3, 5, 13, 9))


@pytest.mark.parametrize("kernel", ["dense", "csr"])
def test_no_batchnorm(kernel: str) -> None:
    """Conv-4 (conv biases, no BatchNorm) and Linear layers on 3-D inputs."""
    model = _pruned(models.create("conv4", num_classes=10, in_channels=3, input_size=16,
                                  width=0.25))
    optimized = sparsecore.optimize(model, torch.randn(2, 3, 16, 16), choose=kernel)
    assert [type(m) for m in optimized.features].count(FusedConv2d) == 4
    _assert_same(model, optimized, (3, 3, 16, 16))
    mlp = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 6))
    _pruned(mlp, 0.7)
    _assert_same(mlp, sparsecore.optimize(mlp, torch.randn(2, 5, 12), choose=kernel),
                 (3, 4, 12))


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_sparsified_layers(layout: str) -> None:
    """Layers already swapped by sparsify() (CSR and BSR) fold and fuse the same way."""
    model = nn.Sequential(_block_masked_conv(8, 16), _block_masked_conv(16, 16), nn.Flatten(),
                          nn.Linear(16 * 36, 10))
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ref = model(x)
    sparse = model
    sparsify(sparse, SparsifyConfig(layout=layout, block_size=8, min_sparsity=0.0,
                                    linear=False))
    sparse.eval()
    optimized = sparsecore.optimize(sparse, x, choose=_random_choice)
    assert isinstance(optimized[0][0], FusedConv2d) and optimized[0][0].info.block_size == (8, 8)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), ref, rtol=1e-4, atol=1e-4)
    _assert_same(sparse, optimized, (3, 8, 6, 6))


def test_input_model_unchanged_and_copy_in_eval() -> None:
    model = _pruned(models.create("resnet8", num_classes=4, in_channels=3, input_size=8))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimized = sparsecore.optimize(model, torch.randn(2, 3, 8, 8), choose="csr")
    assert model.training and not optimized.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in optimized.parameters())


def test_bsr_only_where_block_aligned() -> None:
    model = _pruned(nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU()), 0.9)  # unstructured mask
    optimized = sparsecore.optimize(model, torch.randn(2, 8, 6, 6), choose="bsr")
    assert "bsr" not in optimized[0].info.candidates and optimized[0].kernel.name == "dense"
    optimized = sparsecore.optimize(model, torch.randn(2, 8, 6, 6), layouts=("dense",),
                                    choose=_random_choice)
    assert optimized[0].info.candidates == ("dense",)


def test_unsupported_layers_left_as_is() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
                          nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=2),
                          nn.ReLU(), nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8))
    _pruned(model, 0.5)
    x = torch.randn(2, 4, 7, 7)
    optimized = sparsecore.optimize(model, x, choose="csr")
    kinds = [type(m).__name__ for m in optimized]
    assert kinds[:5] == ["ParametrizedConv2d", "BatchNorm2d", "ReLU", "ParametrizedConv2d",
                         "ReLU"]
    assert kinds[5:] == ["FusedConv2d", "Identity"]
    _assert_same(model, optimized, (3, 4, 7, 7))
    report = sparsecore.explain(model, x, measure=False)
    assert [name for name, _ in report.skipped] == ["0", "3"]
    assert "padding_mode" in report.skipped[0][1] and "groups" in report.skipped[1][1]


def test_argument_errors() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="layouts"):
        sparsecore.optimize(model, torch.randn(2, 4), layouts=("coo",))
    with pytest.raises(ValueError, match="choose"):
        sparsecore.optimize(model, torch.randn(2, 4), choose="fastest")
    with pytest.raises(ValueError, match="candidates"):
        sparsecore.optimize(model, torch.randn(2, 4), layouts=("dense",),
                            choose=lambda info: "csr")


def test_timing_choice_and_cache(monkeypatch) -> None:
    """choose="time" measures every candidate once, writes the cache, and a second
    optimize() of the same shapes reads it and times nothing."""
    model = _block_masked_conv(16, 32)
    x = torch.randn(8, 16, 4, 4)
    first = sparsecore.optimize(model, x)
    info = first[0].info
    assert info.decided_by == "time" and set(info.times) == {
        "dense", "csr", "csr_direct", "csr_chwn", "csr_unfold", "bsr"}
    fastest = min(info.times, key=info.times.get)
    near = info.times[fastest] > (1 - opt_mod.DENSE_TIE) * info.times["dense"]
    assert info.choice == ("dense" if near else fastest)
    blob = json.load(open(cache_path()))
    (machine, entries), = blob["machines"].items()
    assert machine == opt_mod.machine_key(x.device) and "threads=1" in machine
    layers = {k: v for k, v in entries.items() if not k.startswith("model|")}
    models = {k: v for k, v in entries.items() if k.startswith("model|")}
    # one entry per input layout: the conv has a batch-last candidate, so it was timed on
    # NCHW and on batch-last activations
    assert sorted(key.split("|")[5] for key in layers) == ["batch_last", "contiguous"]
    assert all(set(entry) == set(info.times) for entry in layers.values())
    # and the whole model against its all-dense twin, where a sparse kernel was chosen
    assert all(set(entry) == {"chosen", "dense"} for entry in models.values())
    assert len(models) == (info.choice != "dense" or info.decided_by != "time")

    def no_timing(*args, **kwargs):
        raise AssertionError("timed although the cache has every candidate")

    monkeypatch.setattr(opt_mod, "time_interleaved", no_timing)
    second = sparsecore.optimize(model, x)
    assert second[0].info.decided_by == "cache" and second[0].info.choice == info.choice
    _assert_same(model, second, (8, 16, 4, 4))
    with pytest.raises(AssertionError, match="timed"):  # another shape is not in the cache
        sparsecore.optimize(model, torch.randn(8, 16, 5, 5))
    sparsecore.optimize(model, x, cache=False, choose="dense")  # no timing, no cache


def _linear_with_nnz(nnz: int) -> nn.Module:
    """One 64 x 64 Linear whose weight has exactly `nnz` nonzeros (its zeros are the mask)."""
    layer = nn.Linear(64, 64)
    keep = torch.zeros(64 * 64, dtype=torch.bool)
    keep[torch.randperm(64 * 64)[:nnz]] = True
    with torch.no_grad():
        layer.weight.mul_(keep.view(64, 64))
    return nn.Sequential(layer).eval()


def test_cache_density_buckets_cache_file_and_rounds(tmp_path, monkeypatch) -> None:
    """A layer whose density differs within its bucket reads the entry timed for another;
    one in the next bucket is timed; cache_file moves the cache; rounds and min_time reach
    the timer."""
    n = 64 * 64
    assert opt_mod._density_bucket(1024 / n) == 0.25  # a bucket's centre
    assert opt_mod._density_bucket(1044 / n) == 0.25  # 2% more nonzeros: within 2^(1/32)
    assert opt_mod._density_bucket(1126 / n) > 0.25  # 10% more: the next bucket
    assert opt_mod._density_bucket(0.0) == 0.0
    x = torch.randn(32, 64)
    seen = []
    real = opt_mod.time_interleaved

    def recording(fns, device, **kwargs):
        seen.append(kwargs)
        times = real(fns, device, **kwargs)
        # dense made the fastest: a sparse choice would add the whole-model comparison
        # (a timing call of its own), which the per-layer measurement decides by chance here
        times["dense"] = min(times.values()) / 2
        return times

    monkeypatch.setattr(opt_mod, "time_interleaved", recording)
    path = tmp_path / "run" / "kernels.json"
    first = sparsecore.optimize(_linear_with_nnz(1024), x, cache_file=path, rounds=2,
                                min_time=0.0)
    assert seen == [{"warmup": 0, "rounds": 2, "min_time": 0.0}]
    assert first[0].info.decided_by == "time" and set(first[0].info.times) == {"dense", "csr"}
    assert path.exists() and not os.path.exists(cache_path())
    blob = json.loads(path.read_text())
    (layers,) = blob["machines"].values()
    (key,) = layers
    assert "|density~0.25|" in key

    def no_timing(*args, **kwargs):
        raise AssertionError("timed although the cache has every candidate")

    monkeypatch.setattr(opt_mod, "time_interleaved", no_timing)
    second = sparsecore.optimize(_linear_with_nnz(1044), x, cache_file=path)
    info = second[0].info
    assert info.decided_by == "cache" and info.times == first[0].info.times
    assert info.density == 1044 / n  # the layer's own density; only the key is bucketed
    with pytest.raises(AssertionError, match="timed"):
        sparsecore.optimize(_linear_with_nnz(1126), x, cache_file=path)
    with pytest.raises(ValueError, match="rounds"):
        sparsecore.optimize(_linear_with_nnz(1024), x, cache_file=path, rounds=0)


@pytest.mark.parametrize("dense_faster", [True, False])
def test_whole_model_never_slower(monkeypatch, dense_faster: bool) -> None:
    """After the per-layer choice, the whole model is timed against its all-dense twin; the
    twin (same folding and fusion, its layers' infos saying why) replaces it unless the
    chosen kernels are faster together."""
    model = _pruned(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)), 0.95)
    x = torch.randn(16, 32)
    calls = []

    def fake_times(fns, *args, **kwargs):
        if set(fns) != {"chosen", "dense"}:  # a layer's candidates: csr the fastest
            return {k: 0.1 if k == "csr" else 1.0 for k in fns}
        calls.append(set(fns))
        return {"chosen": 2.0, "dense": 1.0} if dense_faster else {"chosen": 1.0, "dense": 2.0}

    monkeypatch.setattr(opt_mod, "time_interleaved", fake_times)
    optimized = sparsecore.optimize(model, x)
    assert calls == [{"chosen", "dense"}]
    layers = fused_layers(optimized)
    if dense_faster:
        assert all(m.kernel.name == "dense" and m.info.choice == "dense"
                   and m.info.decided_by == opt_mod.WHOLE_MODEL_DENSE for _, m in layers)
    else:
        assert all(m.kernel.name == "csr" and m.info.decided_by == "time" for _, m in layers)
    assert isinstance(optimized[0], FusedLinear) and optimized[0].relu
    _assert_same(model, optimized, (5, 32))
    again = sparsecore.optimize(model, x)  # the whole-model times come from the cache too
    assert calls == [{"chosen", "dense"}]
    assert [m.kernel.name for _, m in fused_layers(again)] == [m.kernel.name for _, m in layers]


def test_unreached_layer_stays_dense() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    model = _pruned(TwoHeads(), 0.9)
    optimized = sparsecore.optimize(model, torch.randn(4, 8), layouts=("csr",))
    assert optimized.b.kernel.name == "dense" and "not reach" in optimized.b.info.decided_by


def test_max_pool_and_im2col_helpers() -> None:
    for shape in [(2, 3, 5, 7), (1, 4, 4, 4), (2, 2, 2, 3)]:
        x = torch.randn(shape)
        assert torch.equal(max_pool_2x2(x), F.max_pool2d(x, 2))
        cl = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(max_pool_2x2(cl), F.max_pool2d(x, 2))
    x = torch.randn(2, 3, 7, 6)
    cols = im2col_nhwc(x, [3, 2], [2, 1], [1, 0], [1, 2])
    ref = F.unfold(x, (3, 2), (1, 2), (1, 0), (2, 1))  # (B, C*kh*kw, L), (c, i, j) order
    ref = ref.view(2, 3, 3, 2, -1).permute(0, 4, 2, 3, 1).reshape(cols.shape)
    assert torch.equal(cols, ref)


def test_explain_report() -> None:
    model = _pruned(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(16 * 16, 10)), 0.9)
    report = sparsecore.explain(model, torch.randn(8, 3, 8, 8), min_time=0.01)
    assert [i.name for i in report.layers] == ["0", "4", "7"]
    text = str(report)
    lines = text.splitlines()
    header = lines[0].split()
    assert header[:6] == ["layer", "kind", "shape", "density", "dense_mflop", "kept_mflop"]
    assert header[-1] == "chosen" and {f"{k}_ms" for k in KERNELS} <= set(header)
    assert [ln.split()[0] for ln in lines[1:4]] == ["0", "4", "7"]
    row = report.rows()[0]
    assert row["dense_mflop"] == f"{2 * 8 * 64 * 16 * 27 / 1e6:.1f}"
    assert "predicted speedup" in text and "measured speedup" in text
    assert report.measured_speedup > 0 and report.predicted_speedup > 0


def test_choice_weighs_the_layout_a_kernel_leaves(monkeypatch) -> None:
    """A kernel that returns batch-last activations is chosen for a layer when the next
    layer's batch-last kernel gains more than it loses (greedy, layer by layer, would not),
    and the chosen model still computes the masked model."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    prune.prune(model, "magnitude", sparsity=0.8, scope="layerwise")
    fake = {  # (layer, input layout) -> kernel -> seconds
        (8, "nchw", 0): {"dense": 10.0, "csr": 11.0, "csr_direct": 8.0, "csr_chwn": 9.0},
        (8, "nchw", 1): {"dense": 10.0, "csr": 11.0, "csr_direct": 8.0, "csr_chwn": 12.0},
        (8, "batch_last", 1): {"dense": 10.0, "csr": 11.0, "csr_direct": 9.0,
                               "csr_chwn": 3.0},
    }
    seen: list[str] = []

    def fake_time(self, layer, info, x, residual, density, built):
        index = 0 if not seen else 1
        layout = opt_mod._activation_layout(x)
        times = fake.get((x.shape[1], layout, index)) or fake[(x.shape[1], "nchw", index)]
        return {k: v for k, v in times.items() if k in info.candidates}, False

    def record(name, layer, *args, **kwargs):
        original(name, layer, *args, **kwargs)
        seen.append(name)

    original = opt_mod._Picker.__call__
    monkeypatch.setattr(opt_mod._Picker, "_time", fake_time)
    monkeypatch.setattr(opt_mod._Picker, "__call__", record)
    optimized = sparsecore.optimize(model, torch.randn(16, 8, 6, 6), cache=False)
    chosen = [layer.info.choice for _, layer in fused_layers(optimized)]
    assert chosen == ["csr_chwn", "csr_chwn"]  # greedy would take csr_direct twice (16 > 12)
    assert fused_layers(optimized)[1][1].info.times["csr_chwn"] == 3.0
    _assert_same(model, optimized, (16, 8, 6, 6))


def test_dense_tie_is_a_share_of_the_layer_not_of_the_model(monkeypatch) -> None:
    """A layer 10% faster on a sparse kernel takes it, however slow the layers after it."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    prune.prune(model, "magnitude", sparsity=0.8, scope="layerwise")
    calls: list[int] = []

    def fake_time(self, layer, info, x, residual, density, built):
        first = len(calls) < 2  # the first layer is timed on both layouts first
        calls.append(1)
        times = ({"dense": 10.0, "csr_direct": 9.0} if first
                 else {"dense": 1000.0, "csr_direct": 999.0})
        return {k: v for k, v in times.items() if k in info.candidates}, False

    monkeypatch.setattr(opt_mod._Picker, "_time", fake_time)
    optimized = sparsecore.optimize(model, torch.randn(16, 8, 6, 6), cache=False)
    assert [layer.info.choice for _, layer in fused_layers(optimized)] == ["csr_direct", "dense"]
