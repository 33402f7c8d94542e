"""Models of the pruning literature, built by name.

Every builder takes the same four arguments, so that a dataset's shape picks the model's
input and output (see `sparsecore.data.Splits.model_kwargs`):

- `num_classes`: outputs (classes; the vocabulary size for the character LM),
- `in_channels`: image channels (ignored by the Transformer),
- `input_size`: image side in pixels (the context length for the Transformer),
- `width`: a multiplier on every hidden width (channels, hidden units, d_model),

plus model-specific keyword arguments. Each model lists the modules whose outputs are its
representations (`model.feature_layers`, in forward order), which is what the layer-by-layer
similarity analysis hooks.

>>> from sparsecore import models
>>> net = models.create("resnet20", num_classes=10, in_channels=3, input_size=32)
>>> models.names()[:3]
['conv2', 'conv4', 'conv6']
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}


def register(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: register a builder `(num_classes, in_channels, input_size, width, **kw)`."""

    def deco(fn: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def names() -> list[str]:
    """Registered model names, in registration order."""
    return list(_REGISTRY)


def create(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    width: float = 1.0,
    **kwargs,
) -> nn.Module:
    """Build model `name` (see `names()`); parameters are drawn from torch's global RNG."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(names())}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    model = _REGISTRY[name](
        num_classes=num_classes, in_channels=in_channels, input_size=input_size, width=width,
        **kwargs,
    )
    model.model_name = name
    return model


def scaled(channels: int, width: float) -> int:
    """A hidden width scaled by the width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Builders register themselves on import; the order here is the order of names().
from sparsecore.models import convnet, resnet, transformer, vgg  # noqa: E402,F401

__all__ = ["create", "names", "register", "scaled", "count_parameters"]
