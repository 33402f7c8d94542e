"""Masks as parametrizations: `module.weight` becomes `original * mask`, with `mask` a
registered (persistent) buffer of the `Mask` parametrization.

Because the mask is a buffer and the weight a function of it, masks survive `deepcopy`,
`state_dict` (keys `<module>.parametrizations.<name>.original` and
`<module>.parametrizations.<name>.<i>.mask`; `load` re-creates the parametrizations in a
fresh model), `DistributedDataParallel` (buffers are broadcast) and optimizer steps: the
gradient of `original` is zero where the mask is, so momentum and Adam never move a pruned
weight, and weight decay only shrinks an `original` entry that the mask zeroes anyway.

Tensors are named by their logical name ("features.0.weight") whether masked or not. A
tensor that several modules share (tied weights) is one tensor with one mask: it goes by its
first holder's name in `named_modules()` order, and every holder computes with the mask.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

_MASK_KEY = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.(\d+)\.mask$")
_ORIG_KEY = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.original$")


class Mask(nn.Module):
    """Parametrization `x -> x * mask`; `mask` is a bool buffer of x's shape."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().clone().bool())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


def _split(name: str) -> tuple[str, str]:
    mod, _, attr = name.rpartition(".")
    return mod, attr


def has_tensor(module: nn.Module, attr: str) -> bool:
    """Whether `module.<attr>` is a parameter (plain or parametrized) that is not None."""
    if parametrize.is_parametrized(module, attr):
        return True
    return isinstance(module._parameters.get(attr), nn.Parameter)


def _mask_module(module: nn.Module, attr: str) -> Mask | None:
    if not parametrize.is_parametrized(module, attr):
        return None
    for p in module.parametrizations[attr]:
        if isinstance(p, Mask):
            return p
    return None


def _stored(module: nn.Module, attr: str) -> Tensor:
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return module._parameters[attr]


def holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(stored tensor) -> every (logical name, module, attribute) that computes with it, in
    `named_modules()` order; more than one for tied weights. The first name is the tensor's
    name everywhere in this package."""
    out: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, m in model.named_modules():
        if isinstance(m, parametrize.ParametrizationList):
            continue
        attrs = [a for a, p in m._parameters.items() if p is not None]
        if parametrize.is_parametrized(m):
            attrs += list(m.parametrizations)
        for a in attrs:
            out.setdefault(id(_stored(m, a)), []).append((f"{mname}.{a}" if mname else a, m, a))
    return out


def get_tensor(model: nn.Module, name: str) -> Tensor:
    """The stored tensor behind a logical name: `original` when masked, else the parameter."""
    mod, attr = _split(name)
    return _stored(model.get_submodule(mod), attr)


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before its class is edited.

    torch injects one `Parametrized<Cls>` class per module and `deepcopy` shares it between
    the original and the copy; registering or removing a parametrization edits that class
    (adds or deletes a property), which would silently change the twin too.
    """
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def effective(model: nn.Module, name: str) -> Tensor:
    """The tensor the module computes with: original * mask when masked."""
    mod, attr = _split(name)
    return getattr(model.get_submodule(mod), attr)


def apply(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Mask the named tensors of `model` in place (name -> bool/0-1 tensor of the same shape).

    A tensor already masked gets its mask buffer overwritten; otherwise a `Mask`
    parametrization is registered. Every module that shares the tensor gets the same `Mask`
    (one buffer), so tied weights stay tied and are pruned once. The pruned entries of
    `original` are zeroed too.
    """
    shared = holders(model)
    for name, mask in masks.items():
        mod, attr = _split(name)
        m = model.get_submodule(mod)
        if not has_tensor(m, attr):
            raise KeyError(f"{name}: no such parameter")
        t = get_tensor(model, name)
        if tuple(mask.shape) != tuple(t.shape):
            raise ValueError(f"{name}: mask shape {tuple(mask.shape)} != {tuple(t.shape)}")
        mask = mask.detach().to(device=t.device).bool()
        group = [(hm, ha) for _, hm, ha in shared[id(t)]]
        found = [mk for hm, ha in group if (mk := _mask_module(hm, ha)) is not None]
        mk = found[0] if found else Mask(mask)
        mk.mask.copy_(mask)
        for hm, ha in group:
            own = _mask_module(hm, ha)
            if own is None:
                if parametrize.is_parametrized(hm):
                    _own_class(hm)
                parametrize.register_parametrization(hm, ha, mk)
            elif own is not mk:
                own.mask.copy_(mask)
            if hm.parametrizations[ha][0] is _mask_module(hm, ha):  # original feeds the mask
                with torch.no_grad():
                    hm.parametrizations[ha].original.mul_(mask)


def masks(model: nn.Module) -> dict[str, Tensor]:
    """name -> copy of the bool mask, for every masked tensor of `model` (a tensor shared by
    several modules once, under its first holder's name)."""
    out: dict[str, Tensor] = {}
    for group in holders(model).values():
        found = [mk for _, m, a in group if (mk := _mask_module(m, a)) is not None]
        if found:
            out[group[0][0]] = found[0].mask.clone()
    return out


def remove(model: nn.Module) -> None:
    """Bake the masks in: every masked tensor becomes a plain parameter holding
    original * mask (other parametrizations are left alone)."""
    for _, m in list(model.named_modules()):
        if not parametrize.is_parametrized(m):
            continue
        for attr in list(m.parametrizations):
            plist = m.parametrizations[attr]
            if not any(isinstance(p, Mask) for p in plist):
                continue
            if len(plist) != 1:
                raise ValueError(f"{attr} of {type(m).__name__} carries other parametrizations "
                                 "besides the mask; remove them first")
            _own_class(m)
            parametrize.remove_parametrizations(m, attr, leave_parametrized=True)


def load(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
    """Load a state_dict saved from a masked model into `model` (masked or fresh): the
    masks found in it are applied first, so that the keys match, then it is loaded."""
    found = {}
    for key, value in state_dict.items():
        match = _MASK_KEY.match(key)
        if match:
            mod, attr = match.group(1) or "", match.group(2)
            found[f"{mod}.{attr}" if mod else attr] = value
    apply(model, found)
    model.load_state_dict(state_dict, strict=strict)


def logical_name(key: str) -> str | None:
    """The logical name of a state_dict key ("a.parametrizations.weight.original" ->
    "a.weight"); None for mask buffers."""
    if _MASK_KEY.match(key):
        return None
    match = _ORIG_KEY.match(key)
    if match:
        mod, attr = match.group(1), match.group(2)
        return f"{mod}.{attr}" if mod else attr
    return key


def logical_state(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every parameter and buffer, masks left out, under logical names; the same
    for a model before and after masking (what IMP rewinds to)."""
    out = {}
    for key, value in model.state_dict().items():
        name = logical_name(key)
        if name is not None:
            out[name] = value.detach().clone()
    return out


def load_logical_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Write a `logical_state` back into `model` (masked or not) and re-apply its masks, so
    pruned weights stay zero."""
    current = model.state_dict()
    with torch.no_grad():
        for key, value in current.items():
            name = logical_name(key)
            if name is None:
                continue
            if name not in state:
                raise KeyError(f"{name} is missing from the saved state")
            value.copy_(state[name])
    apply(model, masks(model))


@dataclass
class Row:
    name: str
    shape: tuple[int, ...]
    numel: int
    kept: int

    @property
    def density(self) -> float:
        return self.kept / self.numel if self.numel else 0.0


@dataclass
class Summary:
    """Per-layer densities of a masked model. `rows`: one per masked tensor; `total_params`
    counts every parameter of the model (masked ones at their kept count)."""

    rows: list[Row]
    total_params: int
    kept_params: int

    @property
    def masked_density(self) -> float:
        n = sum(r.numel for r in self.rows)
        return sum(r.kept for r in self.rows) / n if n else 1.0

    @property
    def density(self) -> float:
        return self.kept_params / self.total_params if self.total_params else 1.0

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.rows] + [5])
        lines = [f"{'layer':<{w}}  {'shape':<20} {'numel':>10} {'kept':>10} {'density':>8}"]
        for r in self.rows:
            shape = "x".join(map(str, r.shape))
            lines.append(f"{r.name:<{w}}  {shape:<20} {r.numel:>10} {r.kept:>10} {r.density:>8.4f}")
        masked_n = sum(r.numel for r in self.rows)
        masked_k = sum(r.kept for r in self.rows)
        lines.append(f"{'masked':<{w}}  {'':<20} {masked_n:>10} {masked_k:>10} "
                     f"{self.masked_density:>8.4f}")
        lines.append(f"{'model':<{w}}  {'':<20} {self.total_params:>10} {self.kept_params:>10} "
                     f"{self.density:>8.4f}")
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """The per-layer density table of `model` (print it)."""
    ms = masks(model)
    rows = [Row(n, tuple(m.shape), m.numel(), int(m.sum())) for n, m in ms.items()]
    total = sum(p.numel() for p in model.parameters())
    pruned = sum(r.numel - r.kept for r in rows)
    return Summary(rows, total, total - pruned)
