"""Models: output shapes for every registered model and parameter counts against the
published ones."""

from __future__ import annotations

import pytest
import torch

from sparsecore import models

pytestmark = pytest.mark.usefixtures("one_thread")

# Published counts (CIFAR-10 shapes): He et al. 2016 Table 6 (ResNet-20/32/56: 0.27M,
# 0.46M, 0.85M); Frankle & Carbin 2019 Fig. 2 (Conv-2 4.3M, Conv-4 2.4M, VGG-19 20.0M);
# VGG-16 with BatchNorm and a single Linear(512, 10) classifier: 14.7M; CIFAR ResNet-18
# 11.17M. Conv-6 is checked against its architecture (the paper's 1.7M does not match it).
PUBLISHED = {
    "resnet20": 0.27e6, "resnet32": 0.46e6, "resnet56": 0.85e6, "resnet18": 11.17e6,
    "conv2": 4.3e6, "conv4": 2.4e6, "vgg16": 14.7e6, "vgg19": 20.0e6,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published(name: str) -> None:
    n = models.count_parameters(models.create(name, num_classes=10, in_channels=3, input_size=32))
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.02, n


def test_exact_counts_of_the_stated_variants() -> None:
    exact = {"resnet20": 272_474, "vgg16": 14_724_042, "conv6": 2_262_602,
             "resnet18": 11_173_962}
    for name, n in exact.items():
        assert models.count_parameters(models.create(name)) == n


def test_resnet50_is_the_imagenet_net() -> None:
    # torchvision's resnet50 (v1.5) has 25,557,032 parameters with 1000 classes.
    net = models.create("resnet50", num_classes=1000, input_size=224).eval()
    assert models.count_parameters(net) == 25_557_032
    assert net.stem[0].kernel_size == (7, 7) and isinstance(net.stem[3], torch.nn.MaxPool2d)
    with torch.no_grad():
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_resnet18_has_the_cifar_stem_at_32() -> None:
    net = models.create("resnet18", num_classes=10, input_size=32).eval()
    conv = net.stem[0]
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and len(net.stem) == 3
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", [n for n in models.names() if n != "transformer"])
@pytest.mark.parametrize("size,channels", [(8, 1), (16, 3)])
def test_image_models_shapes_and_feature_layers(name: str, size: int, channels: int) -> None:
    net = models.create(name, num_classes=7, in_channels=channels, input_size=size, width=0.25)
    x = torch.randn(3, channels, size, size)
    assert net(x).shape == (3, 7)
    seen: list[str] = []
    mods = dict(net.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: seen.append(n))
             for n in net.feature_layers]
    net(x)
    for h in hooks:
        h.remove()
    assert seen == net.feature_layers  # listed in forward order, each called once


def test_width_multiplier_scales_channels() -> None:
    small = models.count_parameters(models.create("resnet20", width=0.5))
    full = models.count_parameters(models.create("resnet20"))
    assert 0.2 < small / full < 0.3  # conv params scale with width^2


def test_transformer_is_causal() -> None:
    net = models.create("transformer", num_classes=30, input_size=16, width=0.25, depth=2,
                        heads=2).eval()
    idx = torch.randint(30, (2, 16))
    out = net(idx)
    assert out.shape == (2, 16, 30)
    idx2 = idx.clone()
    idx2[:, 10:] = (idx2[:, 10:] + 1) % 30  # change the future only
    torch.testing.assert_close(net(idx2)[:, :10], out[:, :10])
    assert not torch.allclose(net(idx2)[:, 10:], out[:, 10:])


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(ValueError, match="resnet20"):
        models.create("resnet21")
