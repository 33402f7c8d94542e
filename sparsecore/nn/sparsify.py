"""`sparsify(model, config, filter_fn)`: swap a pruned model's nn.Linear / nn.Conv2d layers for
kernel-backed sparse ones, in place (torchao's `sparsify_` style), and report what was swapped
and what was skipped, and why.

A layer's mask is its prune parametrization's (`weight = original * mask`, a parametrization
with a `mask` buffer, as sparsecore.prune registers), or else the zeros of its weight; with
`config.sparsity` each layer is first magnitude-pruned to that sparsity.

Layouts: "csr" (SparseLinear / SparseConv2d, any mask) or "bsr" (BlockSparseLinear /
BlockSparseConv2d with `config.block_size` blocks over the weight's (C_out, C_in*kh*kw)
matrix view; the mask must be constant inside blocks, as sparsecore.prune.structured's block
masks are, or `config.sparsity` keeps that fraction of blocks by L2 norm).

`densify(model)` is the inverse: it puts nn.Linear / nn.Conv2d back, each with
sparsecore.prune's mask parametrization, so the model has the masked dense form (and
state_dict keys) that sparsify() started from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsecore import ops
from sparsecore.formats import (
    _block_size,
    block_mask_from_mask,
    block_mask_from_scores,
    block_scores,
    expand_block_mask,
)
from sparsecore.nn.blocksparse import BlockSparseConv2d, BlockSparseLinear
from sparsecore.nn.conv import SparseConv2d, conv_unsupported
from sparsecore.nn.linear import SparseLinear, magnitude_mask, module_mask

__all__ = ["SPARSE_LAYERS", "SparsifyConfig", "SparsifyReport", "densify", "sparsify"]

# What sparsify() swaps in and densify() swaps back out.
SPARSE_LAYERS = (SparseLinear, SparseConv2d, BlockSparseLinear, BlockSparseConv2d)

LAYOUTS = ("csr", "bsr")

# Below this sparsity sparsify() leaves a layer on dense kernels by default. CSR: the measured
# CPU crossovers in ops.CSR_DENSE_BELOW. BSR: 0.5, the least sparse point of the block bench
# (python -m bench layers-bsr), where block-sparse Linear already beats dense; less sparse
# was not measured, so not claimed. See bench/RESULTS.md (layers-bsr).
BSR_DENSE_BELOW = 0.5


@dataclass
class SparsifyConfig:
    """What sparsify() swaps, and into what."""

    layout: str = field(default="csr", metadata={"help": f"sparse layout: {', '.join(LAYOUTS)}"})
    block_size: int | tuple[int, int] = field(default=32, metadata={
        "help": "bsr: block (rows, cols) over the weight's (C_out, C_in*kh*kw) view; an int is "
                "square. Layers it does not divide are skipped (reported)"})
    sparsity: float | None = field(default=None, metadata={
        "help": "magnitude-prune every eligible layer to this sparsity first (None: keep each "
                "layer's own mask or zeros)"})
    min_sparsity: float | None = field(default=None, metadata={
        "help": "skip layers less sparse than this (None: the measured CPU crossover of the "
                "layer kind, ops.CSR_DENSE_BELOW; bsr: BSR_DENSE_BELOW, below which dense "
                "kernels are faster or unmeasured)"})
    linear: bool = field(default=True, metadata={"help": "swap nn.Linear layers"})
    conv: bool = field(default=True, metadata={"help": "swap nn.Conv2d layers"})
    verbose: bool = field(default=False, metadata={"help": "print the report"})

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        for name in ("sparsity", "min_sparsity"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")


@dataclass
class SparsifyReport:
    """swapped: (name, new class, sparsity); skipped: (name, reason)."""

    swapped: list[tuple[str, str, float]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"sparsify: swapped {len(self.swapped)} layer(s), skipped {len(self.skipped)}"]
        lines += [f"  swapped {name}: {kind} (sparsity {s:.3f})" for name, kind, s in self.swapped]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _base_class(module: nn.Module) -> type:
    """The module's class before torch's parametrization injected a subclass."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def sparsify(model: nn.Module, config: SparsifyConfig | None = None,
             filter_fn: Callable[[nn.Module, str], bool] | None = None) -> SparsifyReport:
    """Replace every eligible nn.Linear / nn.Conv2d submodule of `model` by SparseLinear /
    SparseConv2d with the same weights at the kept positions (in place; the parametrization,
    if any, goes away with the old module, and so do hooks registered on it). filter_fn(module,
    name) -> bool picks the layers to consider. Re-create optimisers afterwards: the swapped
    layers hold new Parameters. Returns the report (also printed with config.verbose)."""
    config = config or SparsifyConfig()
    report = SparsifyReport()
    for name, module in list(model.named_modules()):
        base = _base_class(module)
        kind = ("linear" if issubclass(base, nn.Linear)
                else "conv" if issubclass(base, nn.Conv2d) else None)
        if kind is None:
            continue
        label = name or "<root>"
        why = _why_not(module, base, kind, name, config, filter_fn)
        if why is not None:
            report.skipped.append((label, why))
            continue
        if config.layout == "bsr":
            mask = _block_element_mask(module, config)
            if isinstance(mask, str):
                report.skipped.append((label, mask))
                continue
        else:
            mask = (magnitude_mask(module.weight, config.sparsity)
                    if config.sparsity is not None else module_mask(module))
            mask = mask if mask is not None else module.weight.detach() != 0
        sparsity = 1.0 - float(mask.sum()) / max(mask.numel(), 1)
        floor = config.min_sparsity
        if floor is None:
            floor = BSR_DENSE_BELOW if config.layout == "bsr" else ops.CSR_DENSE_BELOW[kind]
        if sparsity < floor:
            report.skipped.append((label, f"sparsity {sparsity:.3f} below {floor:.2f} "
                                          "(dense kernels are faster there)"))
            continue
        if config.layout == "bsr":
            cls = BlockSparseLinear if kind == "linear" else BlockSparseConv2d
            new = cls.from_dense(module, mask, block_size=config.block_size)
        else:
            cls = SparseLinear if kind == "linear" else SparseConv2d
            new = cls.from_dense(module, mask)
        new.train(module.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)
        report.swapped.append((label, cls.__name__, sparsity))
    if config.verbose:
        print(report)
    return report


def _why_not(module: nn.Module, base: type, kind: str, name: str, config: SparsifyConfig,
             filter_fn: Callable[[nn.Module, str], bool] | None) -> str | None:
    """Why this Linear/Conv2d is not swapped (None when it is eligible)."""
    if not name:
        return "the root module cannot be replaced in place (wrap it, e.g. nn.Sequential(layer))"
    if kind == "linear" and not config.linear or kind == "conv" and not config.conv:
        return f"config.{kind}=False"
    if base is not nn.Linear and base is not nn.Conv2d:
        return f"{base.__name__} subclasses {'nn.Linear' if kind == 'linear' else 'nn.Conv2d'} " \
               "(its owner may read .weight directly, e.g. nn.MultiheadAttention)"
    if filter_fn is not None and not filter_fn(module, name):
        return "filter_fn returned False"
    if kind == "conv":
        why = conv_unsupported(module)
        if why is not None:
            return why
    return None


def _block_element_mask(module: nn.Module, config: SparsifyConfig) -> torch.Tensor | str:
    """The block-aligned element mask (weight's shape) a BSR layer keeps, or why none."""
    weight = module.weight.detach()
    mat = weight.reshape(weight.shape[0], -1)
    br, bc = _block_size(config.block_size)
    if mat.shape[0] % br or mat.shape[1] % bc:
        return (f"block {br}x{bc} does not divide its weight matrix "
                f"{mat.shape[0]}x{mat.shape[1]}")
    if config.sparsity is not None:
        blocks = block_mask_from_scores(block_scores(weight, (br, bc)), 1.0 - config.sparsity)
        return expand_block_mask(blocks, (br, bc)).view_as(weight)
    mask = module_mask(module)
    mask = mask if mask is not None else weight != 0
    try:
        blocks = block_mask_from_mask(mask, (br, bc))
    except ValueError:
        return (f"its mask is not aligned to {br}x{bc} blocks (prune it with "
                "sparsecore.prune.structured block masks, or set config.sparsity)")
    return expand_block_mask(blocks, (br, bc)).view_as(weight)


def densify(model: nn.Module, masked: bool = True) -> list[str]:
    """Undo sparsify(), in place: every SparseLinear / SparseConv2d / BlockSparseLinear /
    BlockSparseConv2d becomes nn.Linear / nn.Conv2d with the same function (to_dense()), and
    with `masked` gets sparsecore.prune's mask parametrization over its kept positions, so
    that training it further keeps pruned weights at zero and its state_dict has the keys of
    the masked model sparsify() was given. Returns the names of the replaced layers.
    Re-create optimisers afterwards (the layers hold new Parameters)."""
    from sparsecore import prune

    swapped: list[str] = []
    masks: dict[str, torch.Tensor] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, SPARSE_LAYERS):
            continue
        if isinstance(module, (SparseLinear, SparseConv2d)):
            mask = module.mask()
        else:
            mask = expand_block_mask(module.block_mask(), module.block_size)
        if not name:
            raise ValueError("densify: the root module cannot be replaced in place")
        dense = module.to_dense()
        dense.train(module.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, dense)
        masks[f"{name}.weight"] = mask.reshape(dense.weight.shape)
        swapped.append(name)
    if masked and masks:
        prune.apply(model, masks)
    return swapped
