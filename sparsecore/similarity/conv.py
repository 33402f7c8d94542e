"""Convolutional activations (N, C, *spatial) as data points (n, C).

- "positions": every spatial position of every input is a data point: (N * H * W, C).
  The definition Raghu et al. use; two layers compare point by point only when their
  spatial sizes match.
- "pool": average over the spatial dims: (N, C). Compares layers of any spatial size.
- "flatten": each input is one data point with C * H * W channels: (N, C * H * W).

The DFT route (per-frequency CCA) is `sparsecore.similarity.dft_cca`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

ConvMode = Literal["positions", "pool", "flatten"]
CONV_MODES = ("positions", "pool", "flatten")


def to_points(x: Tensor, mode: ConvMode = "positions") -> Tensor:
    """Activations (N, C) pass through; (N, C, *spatial) become (n, channels) by `mode`."""
    if mode not in CONV_MODES:
        raise ValueError(f"conv mode must be one of {CONV_MODES}, got {mode!r}")
    if x.ndim == 2:
        return x
    if x.ndim < 2:
        raise ValueError(f"activations need shape (N, C) or (N, C, *spatial), got {tuple(x.shape)}")
    if mode == "positions":
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    if mode == "pool":
        return x.mean(dim=tuple(range(2, x.ndim)))
    return x.reshape(x.shape[0], -1)


def num_points(shape: torch.Size | tuple[int, ...], mode: ConvMode = "positions") -> int:
    """Rows that `to_points` makes of activations of this shape (without computing them)."""
    if len(shape) > 2 and mode == "positions":
        return shape[0] * math.prod(shape[2:])
    return shape[0]


def sample_positions(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k spatial positions per input of x (N, C, *spatial), drawn without replacement:
    (N * k, C). Positions depend only on the generator's state and the spatial size, so
    equally sized maps (in one model or two) get the same positions."""
    if x.ndim <= 2:
        return x
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    hw = flat.shape[-1]
    if k >= hw:
        return to_points(x, "positions")
    idx = torch.rand(n, hw, generator=generator).argsort(dim=-1)[:, :k].to(x.device)
    picked = flat.gather(-1, idx.unsqueeze(1).expand(n, c, k))  # (N, C, k)
    return picked.movedim(1, -1).reshape(-1, c)
