"""VGG-11 / 16 / 19, CIFAR style with BatchNorm (the variant of the lottery-ticket and
OpenLTH code): 3x3 convolutions without bias, each followed by BatchNorm and ReLU, max-pools
between stages, global average pooling, and one Linear(512, classes) classifier (no
4096-wide FC layers). VGG-16 of this kind has 14.72M parameters on CIFAR-10.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from sparsecore.models import register, scaled

# Stage widths; "M" is a 2x2 max-pool.
_PLANS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """x: (N, in_channels, input_size, input_size) -> logits (N, num_classes)."""

    def __init__(self, depth: int, num_classes: int, in_channels: int, input_size: int,
                 width: float = 1.0) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c_in, size, k, p = in_channels, input_size, 0, 0
        for item in _PLANS[depth]:
            if item == "M":
                if size >= 2:
                    p += 1
                    layers[f"pool{p}"] = nn.MaxPool2d(2)
                    size //= 2
                continue
            k += 1
            c_out = scaled(int(item), width)
            layers[f"conv{k}"] = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
            layers[f"bn{k}"] = nn.BatchNorm2d(c_out)
            layers[f"relu{k}"] = nn.ReLU()
            c_in = c_out
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self.feature_layers = [f"features.relu{i}" for i in range(1, k + 1)] + ["fc"]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _builder(depth: int):
    def build(num_classes: int, in_channels: int, input_size: int, width: float) -> VGG:
        return VGG(depth, num_classes, in_channels, input_size, width)

    build.__doc__ = f"VGG-{depth}, CIFAR style with BatchNorm."
    return build


for _depth in _PLANS:
    register(f"vgg{_depth}")(_builder(_depth))
