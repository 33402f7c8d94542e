"""`sparsecore.explain(model, example_input)`: what `sparsecore.optimize` does to each layer
of a model and how fast the result is.

Per fused layer: its name, weight shape, density, FLOPs (dense and at the kept weights), the
time of every candidate kernel on the example input's activation at that layer (the same
timings optimize() chose by, from the timing cache when it has them) and the kernel chosen.
For the whole model: the predicted speedup (the sum of the layers' dense times over the sum
of their chosen times) and the measured one (the optimized model against the dense model,
masks baked into plain weights and BatchNorm unfolded, timed in interleaved rounds).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparsecore._timing import time_interleaved
from sparsecore.nn.fused import KERNELS
from sparsecore.nn.optimize import (
    LAYOUTS,
    LayerInfo,
    _source,
    fused_layers,
    machine_key,
    optimize,
)

__all__ = ["Report", "explain"]


@dataclass
class Report:
    """explain()'s result. layers: one LayerInfo per fused layer, in module order; skipped:
    (name, why) of the Conv2d / Linear layers optimize() left as they were; dense_s /
    optimized_s: whole-model forward times in seconds (None when not measured)."""

    layers: list[LayerInfo]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    dense_s: float | None = None
    optimized_s: float | None = None
    machine: str = ""

    @property
    def predicted_speedup(self) -> float | None:
        """Sum of the layers' dense kernel times over the sum of their chosen kernel times
        (layers with both timed)."""
        timed = [i for i in self.layers if "dense" in i.times and i.choice in i.times]
        chosen = sum(i.times[i.choice] for i in timed)
        return sum(i.times["dense"] for i in timed) / chosen if chosen else None

    @property
    def measured_speedup(self) -> float | None:
        if self.dense_s is None or not self.optimized_s:
            return None
        return self.dense_s / self.optimized_s

    def rows(self) -> list[dict[str, Any]]:
        """The table as dicts: layer, kind, shape, density, MFLOPs dense / kept, ms per
        kernel ("-": not timed), chosen."""
        out = []
        for i in self.layers:
            row: dict[str, Any] = {
                "layer": i.name, "kind": i.kind,
                "shape": "x".join(map(str, i.weight_shape)),
                "density": f"{i.density:.3f}",
                "dense_mflop": "-" if i.flops is None else f"{i.flops / 1e6:.1f}",
                "kept_mflop": "-" if i.kept_flops is None else f"{i.kept_flops / 1e6:.1f}",
            }
            for k in KERNELS:
                row[f"{k}_ms"] = f"{1e3 * i.times[k]:.3f}" if k in i.times else "-"
            row["chosen"] = i.choice
            out.append(row)
        return out

    def __str__(self) -> str:
        rows = self.rows()
        lines = []
        if rows:
            cols = list(rows[0])
            widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
            lines.append("  ".join(c.ljust(widths[c]) if c == "layer" else c.rjust(widths[c])
                                   for c in cols))
            for r in rows:
                lines.append("  ".join(str(r[c]).ljust(widths[c]) if c == "layer"
                                       else str(r[c]).rjust(widths[c]) for c in cols))
        else:
            lines.append("no layer optimize() can fuse")
        lines += [f"left as is: {name}: {why}" for name, why in self.skipped]
        pred = self.predicted_speedup
        lines.append("predicted speedup (sum of layer times, dense / chosen): "
                     + ("-" if pred is None else f"{pred:.2f}x"))
        if self.measured_speedup is not None:
            lines.append(f"measured speedup (whole model, dense {1e3 * self.dense_s:.2f} ms / "
                         f"optimized {1e3 * self.optimized_s:.2f} ms): "
                         f"{self.measured_speedup:.2f}x")
        if self.machine:
            lines.append(f"machine: {self.machine}")
        return "\n".join(lines)


def dense_copy(model: nn.Module) -> nn.Module:
    """The model as dense kernels run it: a copy in eval mode with sparsecore.nn's sparse
    layers back as nn.Conv2d / nn.Linear and the prune masks baked into plain weights."""
    from sparsecore import prune
    from sparsecore.nn.sparsify import densify

    twin = copy.deepcopy(model)
    densify(twin, masked=False)
    prune.remove(twin)
    return twin.eval()


@torch.no_grad()
def explain(model: nn.Module, example_input: Tensor | Sequence[Any], *,
            layouts: Sequence[str] = LAYOUTS, cache: bool = True, measure: bool = True,
            min_time: float = 0.5) -> Report:
    """Run sparsecore.optimize(model, example_input, layouts=..., cache=...) and report each
    layer's candidates, times and choice; with `measure`, also time the whole optimized model
    against the dense one (interleaved rounds, at least `min_time` seconds). print() the
    Report for the table."""
    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    opt = optimize(model, inputs, layouts=layouts, cache=cache)
    report = Report([layer.info for _, layer in fused_layers(opt)])
    report.skipped = [(name or "<root>", why) for name, m in opt.named_modules()
                      if isinstance(why := _source(m), str)]
    first = next((t for t in inputs if isinstance(t, Tensor)), None)
    device = first.device if first is not None else torch.device("cpu")
    report.machine = machine_key(device)
    if measure:
        dense = dense_copy(model)
        times = time_interleaved({"dense": lambda: dense(*inputs),
                                  "optimized": lambda: opt(*inputs)},
                                 device.type, warmup=2, rounds=5, min_time=min_time)
        report.dense_s, report.optimized_s = times["dense"], times["optimized"]
    return report
