"""ResNets: the CIFAR ResNet-20/32/56 of He et al. (2016, Sec. 4.2), ResNet-18 and ResNet-50.

CIFAR ResNet-(6n+2): a 3x3 stem with 16 channels, three stages of n basic blocks with 16, 32
and 64 channels (stride 2 at the start of stages 2 and 3), global average pooling and one
Linear. Shortcuts that change shape are 1x1 convolutions with BatchNorm (He et al.'s option
B, as in OpenLTH), which gives ResNet-20 0.272M parameters (option A's zero padding: 0.270M).

ResNet-18: four stages of two basic blocks (64..512 channels), 11.17M parameters with 10
classes. ResNet-50: four stages of 3, 4, 6, 3 bottleneck blocks (widths 64..512, outputs four
times wider), stride on the 3x3 conv as torchvision's (v1.5), 25.56M parameters with 1000
classes. Inputs up to 64 pixels get the CIFAR stem (3x3 conv, no max-pool); larger inputs
get the ImageNet stem (7x7 stride-2 conv and a max-pool), so ResNet-50 at 224x224 is the
ImageNet net.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sparsecore.models import register, scaled


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """Identity, or a strided 1x1 conv with BatchNorm where the shape changes."""
    if stride == 1 and c_in == c_out:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU. (N, c_in, H, W) ->
    (N, width, H / stride, W / stride)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = _shortcut(c_in, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN, plus the shortcut, then ReLU.
    (N, c_in, H, W) -> (N, 4 * width, H / stride, W / stride)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """x: (N, in_channels, input_size, input_size) -> logits (N, num_classes).

    stages: (block width, blocks, first stride) per stage; block: BasicBlock or Bottleneck.
    """

    def __init__(self, stages: list[tuple[int, int, int]], num_classes: int, in_channels: int,
                 input_size: int, width: float = 1.0,
                 block: type[BasicBlock | Bottleneck] = BasicBlock) -> None:
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
            w = scaled(channels, width)
            for i in range(n):
                blocks.append(block(c, w, stride if i == 0 else 1))
                c = w * block.expansion
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


@register("resnet50")
def resnet50(num_classes: int, in_channels: int, input_size: int, width: float) -> ResNet:
    """ResNet-50 (3, 4, 6, 3 bottleneck blocks, widths 64..512); ImageNet: num_classes=1000,
    input_size=224."""
    return ResNet([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], num_classes,
                  in_channels, input_size, width, block=Bottleneck)
