"""Safety checks: achieved-vs-target density (a mismatch raises) and the layer-collapse
report (a layer, or a residual branch, with no input->output path left through it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sparsecore.prune import _flow
from sparsecore.prune.masks import get_tensor
from sparsecore.prune.masks import masks as get_masks


class DensityMismatchError(RuntimeError):
    """The achieved kept count differs from the target's (or the target cannot be met)."""


def check_counts(kept: Mapping[str, int], want: Mapping[str, int], tolerance: int = 0) -> None:
    """Raise DensityMismatchError naming every entry whose kept count is off by more than
    `tolerance` weights."""
    bad = [f"{n}: kept {kept[n]}, target {want[n]}" for n in want
           if abs(kept[n] - want[n]) > tolerance]
    if bad:
        raise DensityMismatchError("achieved sparsity differs from the target: " + "; ".join(bad))


def check(model_or_masks: nn.Module | Mapping[str, Tensor], density: float | Mapping[str, float],
          scope: str = "global") -> None:
    """Check a masked model (or masks) against a target: `density` a float (global: the
    total kept count within one weight of density * total; layerwise: each layer's) or
    name -> density (each layer within one weight)."""
    ms = (get_masks(model_or_masks) if isinstance(model_or_masks, nn.Module)
          else dict(model_or_masks))
    kept = {n: int(m.sum()) for n, m in ms.items()}
    numel = {n: m.numel() for n, m in ms.items()}
    if isinstance(density, Mapping):
        check_counts(kept, {n: round(density[n] * numel[n]) for n in density}, tolerance=1)
    elif scope == "layerwise":
        check_counts(kept, {n: round(density * numel[n]) for n in ms}, tolerance=1)
    else:
        check_counts({"total": sum(kept.values())},
                     {"total": round(density * sum(numel.values()))}, tolerance=1)


@dataclass
class LayerHealth:
    """One prunable tensor: `kept` weights by its mask, `effective` of them on at least one
    input->output path (the rest are disconnected and train to no effect)."""

    name: str
    numel: int
    kept: int
    effective: int

    @property
    def density(self) -> float:
        return self.kept / self.numel

    @property
    def effective_density(self) -> float:
        return self.effective / self.numel

    @property
    def collapsed(self) -> bool:
        """Pruned to zero."""
        return self.kept == 0

    @property
    def dead(self) -> bool:
        """No input->output path goes through it (pruned to zero, or cut off elsewhere)."""
        return self.effective == 0


@dataclass
class CollapseReport:
    """`connected`: some input->output path survives. A dead layer in a connected net sits
    on a residual branch that is cut off (the net lives on through the skip connection);
    any dead layer in a disconnected net is a layer collapse."""

    layers: list[LayerHealth]
    connected: bool

    @property
    def collapsed(self) -> list[str]:
        return [h.name for h in self.layers if h.collapsed]

    @property
    def dead(self) -> list[str]:
        return [h.name for h in self.layers if h.dead]

    @property
    def dead_branches(self) -> list[str]:
        """Dead layers of a net that is still connected: residual branches pruned away."""
        return self.dead if self.connected else []

    @property
    def ok(self) -> bool:
        return self.connected and not self.dead

    def __str__(self) -> str:
        w = max([len(h.name) for h in self.layers] + [5])
        lines = [f"{'layer':<{w}} {'density':>9} {'effective':>10}  status"]
        for h in self.layers:
            status = "collapsed" if h.collapsed else "dead" if h.dead else "ok"
            lines.append(f"{h.name:<{w}} {h.density:>9.5f} {h.effective_density:>10.5f}  {status}")
        if not self.connected:
            lines.append("DISCONNECTED: no path from the input to the output survives")
        elif self.dead:
            lines.append(f"connected only through skip connections; dead branches: {self.dead}")
        else:
            lines.append("connected; every layer carries flow")
        return "\n".join(lines)


def collapse_report(model: nn.Module, example: Any, names: list[str] | None = None
                    ) -> CollapseReport:
    """Which prunable tensors still lie on an input->output path.

    example: the input shape without the batch dimension, an example batch or (x, y).
    names: tensors to report (default: the prunable ones of the default selection and
    every masked one).
    Flow is measured on a linearised float64 copy (|weights|, zero biases, BatchNorm in
    eval mode) fed all ones: exact for ReLU/max-pool/average-pool nets; LayerNorm or
    nonlinearities that are not positively homogeneous make it approximate.
    """
    from sparsecore.prune.base import prunable

    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    current = get_masks(model)
    names = names or prunable(model) + [n for n in current if n not in prunable(model)]
    lin = _flow.linearized_copy(model, zero_bias=True)
    with torch.no_grad():
        # Scale each weight to unit mean row sum so that deep nets do not overflow float64;
        # a positive scale per layer changes no path's existence.
        for n in names:
            p = lin.get_parameter(n)
            if p.dim() > 1:
                s = p.sum() / p.shape[0]
                if s > 0:
                    p.div_(s)
    x = _flow.ones_input(example, device=next(lin.parameters()).device)
    r, scores = _flow.flow(lin, names, x)
    if not torch.isfinite(r):
        raise FloatingPointError("flow overflowed float64; the report cannot be trusted")
    layers = []
    for n in names:
        t = get_tensor(model, n)
        kept = int(current[n].sum()) if n in current else int((t != 0).sum())
        layers.append(LayerHealth(n, t.numel(), kept, int((scores[n] > 0).sum())))
    return CollapseReport(layers, bool(r > 0))
