"""ResNets: the CIFAR ResNet-20/32/56 of He et al. (2016, Sec. 4.2) and ResNet-18.

CIFAR ResNet-(6n+2): a 3x3 stem with 16 channels, three stages of n basic blocks with 16, 32
and 64 channels (stride 2 at the start of stages 2 and 3), global average pooling and one
Linear. Shortcuts that change shape are 1x1 convolutions with BatchNorm (He et al.'s option
B, as in OpenLTH), which gives ResNet-20 0.272M parameters (option A's zero padding: 0.270M).

ResNet-18: four stages of two basic blocks (64..512 channels), 11.17M parameters with 10
classes. Inputs up to 64 pixels get the CIFAR stem (3x3 conv, no max-pool); larger inputs
get the ImageNet stem (7x7 stride-2 conv and a max-pool).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sparsecore.models import register, scaled


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU. (N, c_in, H, W) ->
    (N, c_out, H / stride, W / stride)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """x: (N, in_channels, input_size, input_size) -> logits (N, num_classes).

    stages: (channels, blocks, first stride) per stage.
    """

    def __init__(self, stages: list[tuple[int, int, int]], num_classes: int, in_channels: int,
                 input_size: int, width: float = 1.0) -> None:
        super().__init__()
        c = scaled(stages[0][0], width)
        if input_size > 64:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, c, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(c),
                nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
            )
        blocks: list[nn.Module] = []
        for channels, n, stride in stages:
            c_out = scaled(channels, width)
            for i in range(n):
                blocks.append(BasicBlock(c, c_out, stride if i == 0 else 1))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        self.feature_layers = ["stem"] + [f"blocks.{i}" for i in range(len(blocks))] + ["fc"]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def _cifar(depth: int):
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6

    def build(num_classes: int, in_channels: int, input_size: int, width: float) -> ResNet:
        return ResNet([(16, n, 1), (32, n, 2), (64, n, 2)], num_classes, in_channels,
                      input_size, width)

    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016)."
    return build


for _depth in (8, 14, 20, 32, 56):
    register(f"resnet{_depth}")(_cifar(_depth))


@register("resnet18")
def resnet18(num_classes: int, in_channels: int, input_size: int, width: float) -> ResNet:
    """ResNet-18 (two basic blocks per stage, 64..512 channels)."""
    return ResNet([(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)], num_classes,
                  in_channels, input_size, width)
