"""Conv-2 / Conv-4 / Conv-6 of the lottery-ticket papers (Frankle & Carbin, ICLR 2019, Fig. 2).

Pairs of 3x3 convolutions (64, 128, 256 channels; ReLU) each followed by a 2x2 max-pool,
then fully connected layers 256, 256 and the classifier. On CIFAR-10 (32x32x3) the
parameter counts are 4.30M (Conv-2), 2.43M (Conv-4) and 2.26M (Conv-6; the paper's
table says 1.7M, which its own architecture description does not give).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from sparsecore.models import register, scaled

_STAGES = (64, 128, 256)


class ConvNet(nn.Module):
    """`stages` pairs of conv layers, then FC 256-256-classes.

    x: (N, in_channels, input_size, input_size) -> logits (N, num_classes).
    """

    def __init__(self, stages: int, num_classes: int, in_channels: int, input_size: int,
                 width: float = 1.0, hidden: int = 256) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c_in, size, k = in_channels, input_size, 0
        for s in range(stages):
            c_out = scaled(_STAGES[s], width)
            for _ in range(2):
                k += 1
                layers[f"conv{k}"] = nn.Conv2d(c_in, c_out, 3, padding=1)
                layers[f"relu{k}"] = nn.ReLU()
                c_in = c_out
            if size >= 2:  # small inputs (8x8 digits) run out of pixels before stages do
                layers[f"pool{s + 1}"] = nn.MaxPool2d(2)
                size //= 2
        self.features = nn.Sequential(layers)
        h = scaled(hidden, width)
        self.classifier = nn.Sequential(OrderedDict(
            fc1=nn.Linear(c_in * size * size, h), relu1=nn.ReLU(),
            fc2=nn.Linear(h, h), relu2=nn.ReLU(),
            fc3=nn.Linear(h, num_classes),
        ))
        self.feature_layers = (
            [f"features.relu{i}" for i in range(1, k + 1)]
            + ["classifier.relu1", "classifier.relu2", "classifier.fc3"]
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _builder(stages: int):
    def build(num_classes: int, in_channels: int, input_size: int, width: float,
              hidden: int = 256) -> ConvNet:
        return ConvNet(stages, num_classes, in_channels, input_size, width, hidden)

    build.__doc__ = f"Conv-{2 * stages} (Frankle & Carbin 2019)."
    return build


for _stages in (1, 2, 3):
    register(f"conv{2 * _stages}")(_builder(_stages))
