"""`sparsecore.optimize(model, example_input)`: an inference copy of a (pruned) model that
runs each layer on the fastest kernel measured for it.

1. Fold: every eval-mode BatchNorm that follows a Conv2d / Linear (in an nn.Sequential, or
   inside sparsecore.models.resnet's residual blocks) is folded into that layer: each output
   row of the (masked or sparse) weight is scaled and the bias shifted. The sparsity pattern
   is unchanged.
2. Fuse: the layer, its bias, a following ReLU and max-pool (and, in a residual block, the
   shortcut add and the ReLU after it) become one FusedConv2d / FusedLinear /
   FusedResidual (sparsecore.nn.fused): the kernel, then one epilogue pass. In the blocks of
   sparsecore.models.transformer, the q / k / v projections become one layer, the MLP's
   GELU and both residual adds go into the epilogues (FusedTransformerBlock). The modules
   folded away are left as nn.Identity, so module names stay valid (a ReLU whose max-pool
   was fused in now passes on the pooled activation).
3. Choose: each fused layer runs the example input's activation at that layer (one forward
   pass of `example_input`) on every candidate kernel ("dense", "csr", "csr_direct",
   "csr_chwn", "csr_unfold", "bsr"; median of a few runs). Convs next to a "csr_chwn"
   candidate, whose output is batch-last, are timed on both activation layouts, and the
   kernels are chosen for the whole model: each layer's time on the layout its producer
   returns plus its readers' best times on the layout it returns (exact on the tree of
   producer -> reader links, one pass back from the last layer), dense at each layer unless
   a sparse kernel beats it by DENSE_TIE. Then the whole model is timed against its
   all-dense twin (same folding and fusion), which is returned instead unless the chosen
   kernels are faster together. The times are cached per machine (CPU model, ISA,
   threads) and layer (shape, density bucket, input shape and layout, epilogue) in
   `kernels.json` under ~/.cache/sparsecore/ (or $SPARSECORE_CACHE_DIR, or the file named by
   `cache_file`), so a second optimize() of the same shapes, at about the same densities,
   times nothing.

Layers that can take a sparse kernel: nn.Conv2d (groups=1, zero padding) and nn.Linear,
masked by sparsecore.prune's parametrization or not (the weight's zeros are then the mask),
and the layers of sparsecore.nn (SparseConv2d / SparseLinear / BlockSparseConv2d /
BlockSparseLinear). Subclasses of nn.Linear (e.g. nn.MultiheadAttention's projection, read
directly by its owner) and unsupported convolutions are left as they are.

The result is a plain nn.Module in eval mode, for inference only: its weights are buffers,
and its outputs equal the masked model's in eval mode up to float rounding.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparsecore import ops
from sparsecore._dispatch import NotSupportedError, cpp_reasons, triton_reasons
from sparsecore._io import atomic_write_text
from sparsecore._timing import time_interleaved
from sparsecore.formats import block_mask_from_mask, expand_block_mask
from sparsecore.nn.blocksparse import BlockSparseConv2d, BlockSparseLinear
from sparsecore.nn.conv import SparseConv2d, _explicit_padding, conv_unsupported
from sparsecore.nn.fused import (
    EPILOGUE_KERNELS,
    KERNELS,
    FusedConv2d,
    FusedLinear,
    FusedResidual,
    FusedTransformerBlock,
    _Fused,
)
from sparsecore.nn.linear import SparseLinear, module_mask
from sparsecore.nn.sparsify import _base_class
from sparsecore.ops._common import TRITON_DTYPES

__all__ = ["LAYOUTS", "LayerInfo", "cache_path", "fused_layers", "machine_key", "optimize"]

# The weight layouts optimize() may use, and the kernels of each.
LAYOUTS = ("dense", "csr", "bsr")
_LAYOUT_OF = {"dense": "dense", "csr": "csr", "csr_direct": "csr", "csr_chwn": "csr",
              "csr_unfold": "csr", "bsr": "bsr"}
# Block sizes tried, largest first, when a mask is checked for block alignment.
BSR_BLOCKS = ((64, 64), (32, 32), (16, 16), (8, 8))
# Sparse kernels are timed only from this density down: above it no sparse kernel of the
# package reached dense speed (the least sparse crossover of ops.CSR_DENSE_BELOW).
SPARSE_MAX_DENSITY = 1.0 - min(ops.CSR_DENSE_BELOW.values())
# The batch-folded im2col kernel is timed only for small outputs (where the per-sample conv
# kernel's vectors are short) and when its im2col matrix stays this small.
UNFOLD_MAX_PIXELS = 16
UNFOLD_MAX_BYTES = 256 << 20
# Timing: one warm-up call of each candidate, then rounds of one call of each, at least this
# many rounds and this long (sparsecore._timing.time_interleaved); optimize()'s defaults.
_ROUNDS, _MIN_TIME = 5, 0.05
# The cache files a layer's density under the nearest 2^(k / _DENSITY_STEPS): a sparse
# kernel's time grows smoothly with the weight's nonzeros, so layers whose densities differ
# by a few percent (other seeds, other pruning methods at the same sparsity) share one
# entry. Steps of a fixed ratio, not a fixed difference, keep the error in nonzeros the same
# fraction (within 2^(1/32) of the bucket's density) at every density, low ones included.
_DENSITY_STEPS = 16
# A sparse kernel replaces dense only when it is this much faster: within timing noise the
# dense kernel (what the model ran before) is kept.
DENSE_TIE = 0.05

Chooser = str | Callable[["LayerInfo"], str]


@dataclass
class LayerInfo:
    """What optimize() saw of one fused layer and what it chose (kept as the layer's `info`).

    flops: multiply-adds x 2 of the dense product on the example input; times: seconds per
    timed candidate kernel (median; from the cache when `cached`); decided_by: "time",
    "cache", "fixed", "callable", or why the layer stayed dense (WHOLE_MODEL_DENSE: the
    chosen kernels together were not faster than dense ones).
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    density: float
    block_size: tuple[int, int] | None
    candidates: tuple[str, ...]
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    flops: int | None = None
    times: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    choice: str = "dense"
    decided_by: str = ""

    @property
    def kept_flops(self) -> float | None:
        """flops at the kept weights only."""
        return None if self.flops is None else self.flops * self.density


# ---- what a layer holds -------------------------------------------------------------------
@dataclass
class _Source:
    """A layer's function as dense tensors: weight (zeros where pruned), mask (bool, the
    weight's shape), bias; block_size when the mask is block-aligned; conv geometry."""

    kind: str
    weight: Tensor
    mask: Tensor
    bias: Tensor | None
    block_size: tuple[int, int] | None = None
    geom: tuple[list[int], list[int], list[int]] | None = None
    features_2d: bool = False


def _source(module: nn.Module) -> _Source | str | None:
    """The layer's _Source; a string saying why a Conv2d / Linear is left as it is; None for
    any other module."""
    geom = None
    if isinstance(module, (SparseConv2d, SparseLinear)):
        weight, mask = module.dense_weight(), module.mask()
        block_size = None
    elif isinstance(module, (BlockSparseConv2d, BlockSparseLinear)):
        block_size = module.block_size
        full = module.weight_bsr().to_dense().detach()
        mask = expand_block_mask(module.block_mask(), block_size)
        shape = ((module.out_features, module.in_features) if isinstance(module, BlockSparseLinear)
                 else (module.out_channels, module.in_channels, *module.kernel_size))
        weight, mask = full.reshape(shape), mask.reshape(shape)
    elif isinstance(module, (nn.Conv2d, nn.Linear)):
        base = _base_class(module)
        if base not in (nn.Conv2d, nn.Linear):
            return f"{base.__name__} subclasses {base.__mro__[1].__name__} (its owner may read " \
                   ".weight directly)"
        if base is nn.Conv2d and (why := conv_unsupported(module)) is not None:
            return why
        weight = module.weight.detach()
        mask = module_mask(module)
        mask = weight != 0 if mask is None else mask.detach().to(torch.bool)
        weight = weight * mask
        block_size = None
    else:
        return None
    if weight.dim() == 4:
        padding = module.padding if isinstance(module, (SparseConv2d, BlockSparseConv2d)) \
            else _explicit_padding(module)
        geom = (list(module.stride), list(padding), list(module.dilation))
    bias = None if module.bias is None else module.bias.detach()
    return _Source("conv" if weight.dim() == 4 else "linear", weight.clone(), mask.clone(),
                   None if bias is None else bias.clone(), block_size, geom)


def _foldable(module: nn.Module | None, kind: str) -> bool:
    """An eval-mode BatchNorm over the layer's output channels (one that uses running
    statistics)."""
    cls = nn.BatchNorm2d if kind == "conv" else nn.BatchNorm1d
    return type(module) is cls and module.running_mean is not None


@torch.no_grad()
def _fold_bn(src: _Source, bn: nn.modules.batchnorm._BatchNorm) -> _Source:
    """src followed by bn (eval) as one layer: W' = W * s (per output row), b' = (b - mean) *
    s + beta, s = gamma / sqrt(var + eps), computed in float64."""
    n = src.weight.shape[0]
    if bn.num_features != n:
        raise ValueError(f"BatchNorm over {bn.num_features} features after a layer with {n} "
                         "outputs")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double() + bn.bias.double()
    view = (-1,) + (1,) * (src.weight.dim() - 1)
    weight = (src.weight.double() * scale.view(view)).to(src.weight.dtype)
    bias = shift if src.bias is None else src.bias.double() * scale + shift
    return _Source(src.kind, weight * src.mask, src.mask, bias.to(src.weight.dtype),
                   src.block_size, src.geom, features_2d=src.kind == "linear")


def _build(src: _Source, layouts: Sequence[str], *, relu: bool = False,
           pool: nn.MaxPool2d | None = None, gelu: bool = False) -> _Fused:
    block_size = src.block_size
    if block_size is None and "bsr" in layouts:
        block_size = _aligned_block(src.mask)
    if src.kind == "conv":
        return FusedConv2d(src.weight, src.mask, src.bias, *src.geom, relu=relu, pool=pool,
                           block_size=block_size)
    return FusedLinear(src.weight, src.mask, src.bias, relu=relu, gelu=gelu,
                       block_size=block_size, features_2d=src.features_2d)


def _aligned_block(mask: Tensor) -> tuple[int, int] | None:
    """The largest of BSR_BLOCKS that the mask's matrix view is aligned to, or None."""
    m = mask.reshape(mask.shape[0], -1)
    for bs in BSR_BLOCKS:
        if m.shape[0] % bs[0] or m.shape[1] % bs[1]:
            continue
        try:
            block_mask_from_mask(m, bs)
        except ValueError:
            continue
        return bs
    return None


# ---- rewriting the module tree ------------------------------------------------------------
def _fuse_sequential(seq: nn.Sequential, layouts: Sequence[str]) -> None:
    """Layer [BatchNorm] [ReLU] [MaxPool2d] runs of `seq` (ReLU and pool in either order)
    -> one fused layer; the modules taken in become nn.Identity."""
    items = list(seq._modules.items())
    i = 0
    while i < len(items):
        name, module = items[i]
        src = _source(module) if module is not None else None
        if not isinstance(src, _Source):
            i += 1
            continue
        j = i + 1
        if j < len(items) and _foldable(items[j][1], src.kind):
            src = _fold_bn(src, items[j][1])
            j += 1
        relu, pool = False, None
        while j < len(items):
            nxt = items[j][1]
            if not relu and type(nxt) is nn.ReLU:
                relu = True
            elif (pool is None and src.kind == "conv" and type(nxt) is nn.MaxPool2d
                  and not nxt.return_indices):
                pool = nxt
            else:
                break
            j += 1
        seq._modules[name] = _build(src, layouts, relu=relu, pool=pool)
        for k in range(i + 1, j):
            seq._modules[items[k][0]] = nn.Identity()
        i = j


def _fuse_residual(block: nn.Module, layouts: Sequence[str]) -> FusedResidual | None:
    """A residual block of sparsecore.models.resnet (conv{i}-bn{i} with a ReLU after each
    but the last; the last's output plus the shortcut, then ReLU; the shortcut empty or
    (1x1 conv, BatchNorm)) as a FusedResidual, or None when it is not one."""
    from sparsecore.models import resnet

    shortcut = getattr(block, "shortcut", None)
    if type(block).__module__ != resnet.__name__ or not isinstance(shortcut, nn.Sequential):
        return None
    sources: dict[str, _Source] = {}
    i = 1
    while hasattr(block, f"conv{i}"):
        src, bn = _source(getattr(block, f"conv{i}")), getattr(block, f"bn{i}", None)
        if not isinstance(src, _Source) or src.kind != "conv" or not _foldable(bn, "conv"):
            return None
        sources[f"conv{i}"] = _fold_bn(src, bn)
        i += 1
    if not sources:
        return None
    short_src = None
    if len(shortcut):
        src = _source(shortcut[0])
        if len(shortcut) != 2 or not isinstance(src, _Source) or not _foldable(shortcut[1],
                                                                              "conv"):
            return None
        short_src = _fold_bn(src, shortcut[1])
        # One bias for both branches: the shortcut's product adds it (the dense kernel for
        # free), and the block's last epilogue is then residual add + ReLU in one pass.
        last = sources[list(sources)[-1]]
        short_src.bias = last.bias if short_src.bias is None else short_src.bias + last.bias
        last.bias = None
    layers = {name: _build(src, layouts, relu=True) for name, src in sources.items()}
    return FusedResidual(layers, None if short_src is None else _build(short_src, layouts))


def _stacked(sources: Sequence[_Source]) -> _Source:
    """Linear layers on the same input as one layer: their outputs side by side."""
    biases = [s.bias if s.bias is not None else s.weight.new_zeros(s.weight.shape[0])
              for s in sources]
    any_bias = any(s.bias is not None for s in sources)
    return _Source("linear", torch.cat([s.weight for s in sources]),
                   torch.cat([s.mask for s in sources]),
                   torch.cat(biases) if any_bias else None)


def _fuse_transformer_block(block: nn.Module, layouts: Sequence[str]
                            ) -> FusedTransformerBlock | None:
    """A block of sparsecore.models.transformer (pre-LayerNorm causal self-attention and a
    GELU MLP, each added to the block's input) as a FusedTransformerBlock: the q, k and v
    projections as one layer (one pass over the input), the attention output projection and
    the second MLP layer adding the residual in their epilogue, the first MLP layer's GELU
    in its epilogue; or None when it is not one."""
    from sparsecore.models import transformer

    if type(block) is not transformer.Block or type(block.attn) is not \
            transformer.CausalSelfAttention:
        return None
    attn = block.attn
    srcs = {name: _source(m) for name, m in (("q", attn.q), ("k", attn.k), ("v", attn.v),
                                              ("proj", attn.proj), ("fc1", block.fc1),
                                              ("fc2", block.fc2))}
    if not all(isinstance(s, _Source) and s.kind == "linear" for s in srcs.values()):
        return None
    qkv = _stacked([srcs["q"], srcs["k"], srcs["v"]])
    return FusedTransformerBlock(
        block.ln1, _build(qkv, layouts), attn.heads, _build(srcs["proj"], layouts),
        block.ln2, _build(srcs["fc1"], layouts, gelu=True), _build(srcs["fc2"], layouts))


def _rewrite(module: nn.Module, layouts: Sequence[str]) -> nn.Module:
    """module with every fusable part replaced (in place where it is a child; the returned
    module replaces `module` itself)."""
    block = _fuse_residual(module, layouts) or _fuse_transformer_block(module, layouts)
    if block is not None:
        return block
    src = _source(module)
    if isinstance(src, _Source):
        return _build(src, layouts)
    if isinstance(module, nn.Sequential):
        _fuse_sequential(module, layouts)
    for name, child in list(module.named_children()):
        if isinstance(child, (_Fused, FusedResidual, FusedTransformerBlock)):
            continue
        new = _rewrite(child, layouts)
        if new is not child:
            setattr(module, name, new)
    return module


def fused_layers(model: nn.Module) -> list[tuple[str, _Fused]]:
    """(name, layer) of every fused layer of an optimize() result, in module order."""
    return [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, _Fused)]


# ---- the timing cache ---------------------------------------------------------------------
def cache_path() -> str:
    """The kernel timing cache: $SPARSECORE_CACHE_DIR/kernels.json, by default under
    ~/.cache/sparsecore/."""
    folder = os.environ.get("SPARSECORE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "sparsecore")
    return os.path.join(folder, "kernels.json")


def machine_key(device: torch.device) -> str:
    """What a kernel time depends on besides the layer: the CPU model, the SIMD level torch
    uses, torch's thread count (on CUDA: the GPU)."""
    if device.type == "cuda":
        return f"cuda|{torch.cuda.get_device_name(device)}"
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f
                        if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}|{torch.backends.cpu.get_cpu_capability()}|threads={torch.get_num_threads()}"


class _TimingCache:
    """kernels.json: {"version": 2, "machines": {machine: {layer key: {kernel: seconds}}}}.
    Read once; the new entries are merged into the file as it is on disk when saved."""

    VERSION = 2  # 2: densities in buckets (_density_bucket)

    def __init__(self, enabled: bool, path: str) -> None:
        self.enabled = enabled
        self.path = path
        self.entries = self._read() if enabled else {}
        self.new: dict[str, dict[str, dict[str, float]]] = {}

    def _read(self) -> dict[str, dict[str, dict[str, float]]]:
        try:
            with open(self.path) as f:
                blob = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(blob, dict) or blob.get("version") != self.VERSION:
            return {}
        machines = blob.get("machines")
        return machines if isinstance(machines, dict) else {}

    def get(self, machine: str, key: str) -> dict[str, float]:
        found = self.entries.get(machine, {}).get(key, {})
        return {k: float(v) for k, v in found.items() if isinstance(v, (int, float))}

    def put(self, machine: str, key: str, times: dict[str, float]) -> None:
        if not self.enabled or not times:
            return
        self.entries.setdefault(machine, {}).setdefault(key, {}).update(times)
        self.new.setdefault(machine, {}).setdefault(key, {}).update(times)

    def save(self) -> None:
        if not self.new:
            return
        merged = self._read()
        for machine, layers in self.new.items():
            for key, times in layers.items():
                merged.setdefault(machine, {}).setdefault(key, {}).update(times)
        text = json.dumps({"version": self.VERSION, "machines": merged}, indent=1,
                          sort_keys=True)
        try:
            atomic_write_text(self.path, text)
        except OSError as exc:
            warnings.warn(f"sparsecore.optimize: could not write the timing cache {self.path} "
                          f"({exc}); layers will be timed again next time", stacklevel=3)
        self.new = {}


def _density_bucket(density: float) -> float:
    """The density the timing cache files `density` under: the nearest 2^(k / 16) (0 for an
    empty weight)."""
    if density <= 0:
        return 0.0
    return 2.0 ** (round(math.log2(density) * _DENSITY_STEPS) / _DENSITY_STEPS)


def _layer_key(layer: _Fused, x: Tensor, residual: Tensor | None, density: float) -> str:
    """The cache key of a layer's timings: everything besides the machine they depend on
    (the density by its bucket)."""
    memory = ("contiguous" if x.is_contiguous() else "channels_last"
              if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
              else "batch_last" if _activation_layout(x) == "batch_last" else "strided")
    parts = [layer.kind, "w=" + "x".join(map(str, layer.weight_shape)),
             f"density~{_density_bucket(density):.4g}", "x=" + "x".join(map(str, x.shape)),
             str(x.dtype).replace("torch.", ""), memory,
             f"bias={layer.bias is not None}", f"relu={layer.relu}",
             f"residual={residual is not None}"]
    if isinstance(layer, FusedLinear) and layer.gelu:
        parts.append("gelu")
    if isinstance(layer, FusedConv2d):
        parts.append(f"geom={layer.stride}{layer.padding}{layer.dilation}")
        if layer.pool is not None:
            p = layer.pool
            parts.append(f"pool={p.kernel_size},{p.stride},{p.padding},{p.dilation},"
                         f"{p.ceil_mode}")
    bs = layer.source["block_size"]
    if bs is not None:
        parts.append(f"block={bs[0]}x{bs[1]}")
    return "|".join(parts)


# ---- choosing the kernels -----------------------------------------------------------------
def _sparse_runs(t: Tensor) -> bool:
    """Whether a sparse kernel (not the dense reference) takes tensors like t."""
    if t.device.type == "cpu":
        return not cpp_reasons([t])
    return not triton_reasons([t], TRITON_DTYPES)


def _candidates(layer: _Fused, layouts: Sequence[str]) -> tuple[str, ...]:
    """The kernels that can run this layer, within `layouts`; "dense" when none can."""
    weight, block_size = layer.source["weight"], layer.source["block_size"]
    sparse = _sparse_runs(weight)
    out = []
    for k in KERNELS:
        if _LAYOUT_OF[k] not in layouts or (k != "dense" and not sparse):
            continue
        if k == "csr_unfold" and layer.kind != "conv" or k == "bsr" and block_size is None:
            continue
        if k in EPILOGUE_KERNELS and (not isinstance(layer, FusedConv2d)
                                      or not layer.epilogue_fusable(k)
                                      or weight.device.type != "cpu"):
            continue
        out.append(k)
    return tuple(out) or ("dense",)


def _worth_timing(layer: _Fused, kernel: str, x: Tensor, density: float) -> bool:
    """Whether `kernel` could beat the others on x (the rest are not timed)."""
    if kernel == "dense":
        return True
    if density > SPARSE_MAX_DENSITY:
        return False
    if kernel == "csr_unfold":
        n, _, ho, wo = layer.out_shape(x)
        cols = n * ho * wo * (layer.weight_shape[1] * layer.weight_shape[2]
                              * layer.weight_shape[3])
        return ho * wo <= UNFOLD_MAX_PIXELS and cols * x.element_size() <= UNFOLD_MAX_BYTES
    return True


# Activation layouts between fused layers: "csr_chwn" returns its output batch-last (what
# the next csr_chwn layer reads in place), every other kernel NCHW (or a layout it makes
# contiguous itself). A layer's kernel times depend on the layout it is fed, so conv layers
# next to a csr_chwn candidate are timed on both, and the choice weighs each layer's time
# with what its layout costs the layers that read its output.
_OUT_LAYOUT = {"csr_chwn": "batch_last"}


def _activation_layout(x: Tensor) -> str:
    n = x.shape[0] if x.dim() == 4 else 0
    bl = x.dim() == 4 and x.stride(0) == 1 and x.stride(3) == n and n > 1
    return "batch_last" if bl else "nchw"


def _as_layout(x: Tensor, layout: str) -> Tensor:
    """x (N, C, H, W) in `layout`: NCHW-contiguous, or batch-last as csr_chwn lays it out."""
    if layout == "nchw":
        return x.contiguous()
    n, c, h, w = x.shape
    plane = h * w * n + 64 // x.element_size()
    out = x.new_empty(c * plane).as_strided((n, c, h, w), (1, plane, w * n, n))
    return out.copy_(x)


@dataclass
class _Timed:
    """A layer timed during calibration, its kernel still to be set."""

    layer: _Fused
    info: LayerInfo
    built: dict[str, nn.Module]
    times: dict[str, dict[str, float]]  # input layout -> kernel -> seconds
    layout: str  # the layout of the example's activation at this layer
    producer: str | None  # the timed layer whose output this layer reads


class _Picker:
    """Chooses each fused layer's kernel when the example input reaches it (timed layers:
    after the whole pass, by finish())."""

    def __init__(self, layouts: Sequence[str], choose: Chooser, cache: _TimingCache,
                 rounds: int, min_time: float) -> None:
        self.layouts, self.choose, self.cache = layouts, choose, cache
        self.rounds, self.min_time = rounds, min_time
        self.timed: dict[str, _Timed] = {}

    def __call__(self, name: str, layer: _Fused, x: Tensor | None,
                 residual: Tensor | None, producer: str | None = None) -> None:
        mask = layer.source["mask"]
        density = float(mask.sum()) / max(mask.numel(), 1)
        info = LayerInfo(name, layer.kind, layer.weight_shape, density,
                         layer.source["block_size"], _candidates(layer, self.layouts))
        if x is not None:
            info.input_shape = tuple(x.shape)
            info.output_shape = layer.out_shape(x)
            info.flops = layer.flops(x)
        built: dict[str, nn.Module] = {}
        layer.info = info
        if callable(self.choose):
            info.choice, info.decided_by = self.choose(info), "callable"
            if info.choice not in info.candidates:
                raise ValueError(f"optimize: choose returned {info.choice!r} for {name}; its "
                                 f"candidates are {info.candidates}")
        elif self.choose != "time":
            info.decided_by = "fixed"
            info.choice = self.choose if self.choose in info.candidates else "dense"
        elif x is None:
            info.decided_by = "dense: the example input does not reach this layer"
        else:
            self._time_layouts(name, layer, info, x, residual, density, built, producer)
            return  # the kernel is set by finish(); until then the greedy choice runs
        layer.set_kernel(built.get(info.choice) or layer.make_kernel(info.choice))

    def _time_layouts(self, name: str, layer: _Fused, info: LayerInfo, x: Tensor,
                      residual: Tensor | None, density: float, built: dict[str, nn.Module],
                      producer: str | None) -> None:
        here = _activation_layout(x) if x.dim() == 4 else "nchw"
        layouts = [here]
        prod = self.timed.get(producer) if producer else None
        both = isinstance(layer, FusedConv2d) and x.dim() == 4 and x.shape[0] > 1 and (
            "csr_chwn" in info.candidates or (prod is not None
                                              and "csr_chwn" in prod.info.candidates))
        if both:
            layouts = ["nchw", "batch_last"]
        timed = {lay: self._time(layer, info, _as_layout(x, lay) if both else x, residual,
                                 density, built) for lay in layouts}
        times = {lay: t for lay, (t, _) in timed.items()}
        info.cached = all(hit for _, hit in timed.values())
        info.times = times[here] if here in times else times[layouts[0]]
        info.choice = _fastest(info.times)
        info.decided_by = "cache" if info.cached else "time"
        self.timed[name] = _Timed(layer, info, built, times, here,
                                  producer if producer in self.timed else None)
        # greedy for the rest of the calibration pass (the source stays for finish())
        layer.kernel = built.get(info.choice) or layer.make_kernel(info.choice)

    def _time(self, layer: _Fused, info: LayerInfo, x: Tensor, residual: Tensor | None,
              density: float, built: dict[str, nn.Module]) -> tuple[dict[str, float], bool]:
        """Seconds of each candidate worth timing on x (cached ones read), and whether all
        came from the cache."""
        machine = machine_key(x.device)
        key = _layer_key(layer, x, residual, density)
        wanted = [k for k in info.candidates if _worth_timing(layer, k, x, density)]
        cached = self.cache.get(machine, key)
        times = {k: cached[k] for k in wanted if k in cached}
        hit = len(times) == len(wanted)
        runs: dict[str, Callable[[], Tensor]] = {}
        for k in wanted:
            if k in times:
                continue
            kernel = built[k] = built.get(k) or layer.make_kernel(k)
            runs[k] = lambda kernel=kernel: layer.run(kernel, x, residual)
        new = _time_candidates(runs, x.device, self.rounds, self.min_time)
        self.cache.put(machine, key, new)
        return {**times, **new}, hit

    def finish(self) -> None:
        """Each timed layer's kernel, chosen for the whole model: a layer's cost is its own
        time on the layout its producer's kernel returns plus the best costs of its readers
        on the layout it returns itself. Each layer reads one producer's output, so the
        layers form a tree and one pass from the last layer back (then forward, choosing)
        minimises the sum; at each layer dense is kept unless the best saves DENSE_TIE of the
        layer's dense time."""
        readers: dict[str, list[str]] = {name: [] for name in self.timed}
        for name, t in self.timed.items():
            if t.producer is not None:
                readers[t.producer].append(name)

        def cost(name: str, kernel: str, layout: str) -> float:
            times = self.timed[name].times
            row = times.get(layout) or next(iter(times.values()))
            return row.get(kernel, math.inf)

        best: dict[str, dict[str, tuple[float, str]]] = {}  # name -> layout -> (cost, kernel)
        for name in reversed(list(self.timed)):
            t = self.timed[name]
            kernels = sorted({k for row in t.times.values() for k in row})
            best[name] = {}
            for layout in ("nchw", "batch_last"):
                totals = {k: cost(name, k, layout) + sum(
                    best[r][_OUT_LAYOUT.get(k, "nchw")][0] for r in readers[name])
                    for k in kernels}
                if not totals:
                    best[name][layout] = (0.0, "dense")
                    continue
                k = min(totals, key=totals.get)
                # the tie is a share of this layer's own dense time, not of the totals, which
                # carry the rest of the model
                if "dense" in totals and totals[k] > totals["dense"] - DENSE_TIE * cost(
                        name, "dense", layout):
                    k = "dense"
                best[name][layout] = (totals[k], k)
        fed: dict[str, str] = {}
        for name, t in self.timed.items():  # execution order: producers first
            layout = t.layout if t.producer is None else fed[name]
            kernel = best[name][layout][1]
            for r in readers[name]:
                fed[r] = _OUT_LAYOUT.get(kernel, "nchw")
            t.info.choice = kernel
            row = t.times.get(layout) or next(iter(t.times.values()))
            t.info.times = dict(row)
            t.layer.set_kernel(t.built.get(kernel) or t.layer.make_kernel(kernel))


def _fastest(times: dict[str, float]) -> str:
    """The fastest kernel of `times`, dense unless another beats it by DENSE_TIE."""
    if not times:
        return "dense"
    best = min(times, key=times.get)
    if "dense" in times and times[best] > (1 - DENSE_TIE) * times["dense"]:
        return "dense"
    return best


def _time_candidates(runs: dict[str, Callable[[], Any]], device: torch.device, rounds: int,
                     min_time: float) -> dict[str, float]:
    """Median seconds of each run; a run that no backend takes (NotSupportedError on its
    warm-up call) is left out."""
    for name, fn in list(runs.items()):
        try:
            fn()
        except NotSupportedError:
            del runs[name]
    if not runs:
        return {}
    return time_interleaved(runs, device.type, warmup=0, rounds=rounds, min_time=min_time)


def _calibrate(model: nn.Module, inputs: tuple[Any, ...], picker: _Picker) -> None:
    """One forward pass of `inputs`: each fused layer is timed (or given its fixed kernel) on
    its own input, noting which fused layer produced that input; then picker.finish()."""
    layers = fused_layers(model)
    handles = []
    made_by: dict[int, str] = {}  # data_ptr of a fused layer's output -> its name

    def pre_hook(module: nn.Module, args: tuple[Any, ...], name: str) -> None:
        if module.kernel is None:
            residual = args[1] if len(args) > 1 else None
            x = args[0]
            producer = made_by.get(x.data_ptr()) if isinstance(x, Tensor) else None
            picker(name, module, x, residual, producer)

    def post_hook(module: nn.Module, args: tuple[Any, ...], out: Any, name: str) -> None:
        if isinstance(out, Tensor):
            made_by[out.data_ptr()] = name

    for name, layer in layers:
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, name=name: pre_hook(m, a, name)))
        handles.append(layer.register_forward_hook(
            lambda m, a, o, name=name: post_hook(m, a, o, name)))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    picker.finish()
    for name, layer in layers:
        if layer.kernel is None:
            picker(name, layer, None, None)


def optimize(model: nn.Module, example_input: Tensor | Sequence[Any], *,
             layouts: Sequence[str] = LAYOUTS, cache: bool = True,
             cache_file: str | os.PathLike[str] | None = None, choose: Chooser = "time",
             rounds: int = _ROUNDS, min_time: float = _MIN_TIME) -> nn.Module:
    """An inference-optimized copy of `model` (eval mode; `model` is not changed): BatchNorm
    folded, bias / ReLU / max-pool / residual add fused after each layer's kernel, and each
    layer's kernel chosen by timing it on example_input's activation at that layer.

    example_input: a batch like those the model will see (a tensor, or a tuple of forward's
    arguments); the choice is made for its shape and batch size. layouts: the weight layouts
    to consider ("dense"; "csr": the CSR kernels "csr" (per-sample im2col conv / Linear),
    "csr_direct" (conv from per-sample shifted copies), "csr_chwn" (batch-last conv) and
    "csr_unfold" (batch-folded im2col); "bsr": block-sparse, for block-aligned masks).
    cache: read and write the timing cache; cache_file: its file (default: cache_path()).
    choose: "time" (measure), a kernel name (one of KERNELS: used wherever the layer can run
    it, else "dense"), or a callable LayerInfo -> kernel name (one of
    info.candidates). rounds, min_time: each layer's candidates are timed in at least
    `rounds` rounds of one call each and at least `min_time` seconds (fewer for a quicker,
    noisier choice). Each fused layer keeps its LayerInfo as `.info` (see fused_layers()).
    With choose="time", the model is then timed whole against its all-dense twin, which is
    returned if the chosen kernels are not faster together (never slower than dense).
    """
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        raise ValueError(f"optimize: unknown layouts {unknown}; choose from {LAYOUTS}")
    if isinstance(choose, str) and choose != "time" and choose not in KERNELS:
        raise ValueError(f"optimize: choose must be 'time', one of {KERNELS} or a callable, "
                         f"got {choose!r}")
    if rounds < 1 or not min_time >= 0:
        raise ValueError(f"optimize: rounds must be >= 1 and min_time >= 0, got {rounds}, "
                         f"{min_time}")
    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    source = model
    model = _rewrite(copy.deepcopy(source).eval(), tuple(layouts))
    path = cache_path() if cache_file is None else os.fspath(cache_file)
    timing_cache = _TimingCache(cache and choose == "time", path)
    _calibrate(model, inputs, _Picker(tuple(layouts), choose, timing_cache, rounds, min_time))
    if choose == "time":
        model = _never_slower(model, source, inputs, tuple(layouts), timing_cache)
    timing_cache.save()
    return model.eval()


WHOLE_MODEL_DENSE = "dense: the chosen kernels together were not faster than dense ones"


def _model_key(layers: list[tuple[str, _Fused]]) -> str:
    """The timing cache's key of a whole model's kernel choice (its layers, their inputs and
    choices)."""
    text = "\n".join(f"{name}|{m.info.choice}|{m.info.input_shape}|{m.weight_shape}|"
                     f"{_density_bucket(m.info.density):.4g}" for name, m in layers)
    return "model|" + hashlib.sha1(text.encode()).hexdigest()


def _dense_twin(source: nn.Module, inputs: tuple[Any, ...], layouts: tuple[str, ...]
                ) -> nn.Module:
    """source folded and fused as optimize() does, every layer on the dense kernel."""
    dense = _rewrite(copy.deepcopy(source).eval(), layouts)
    _calibrate(dense, inputs, _Picker(layouts, "dense", _TimingCache(False, ""), 1, 0.0))
    return dense


@torch.no_grad()
def _never_slower(chosen: nn.Module, source: nn.Module, inputs: tuple[Any, ...],
                  layouts: tuple[str, ...], cache: _TimingCache) -> nn.Module:
    """`chosen`, or its all-dense twin (same folding and fusion) if the whole model does not
    run faster with the chosen kernels (timed, or read from the cache): each layer was timed
    alone, and a noisy machine or the layers' effects on each other's caches can make the
    sum mislead."""
    layers = fused_layers(chosen)
    if all(layer.info.choice == "dense" for _, layer in layers):
        return chosen
    first = next((t for t in inputs if isinstance(t, Tensor)), None)
    device = first.device if first is not None else torch.device("cpu")
    machine, key = machine_key(device), _model_key(layers)
    times = cache.get(machine, key)
    dense = None
    if set(times) != {"chosen", "dense"}:
        dense = _dense_twin(source, inputs, layouts)
        times = time_interleaved({"chosen": lambda: chosen(*inputs),
                                  "dense": lambda: dense(*inputs)},
                                 device.type, warmup=1, rounds=3, min_time=0.3)
        cache.put(machine, key, times)
    if times["chosen"] < times["dense"]:
        return chosen
    if dense is None:  # the cache said so: the twin is built only now
        dense = _dense_twin(source, inputs, layouts)
    for (_, mine), (_, twin) in zip(layers, fused_layers(dense), strict=True):
        twin.info = mine.info
        if twin.info.choice != "dense":
            twin.info.choice, twin.info.decided_by = "dense", WHOLE_MODEL_DENSE
    return dense
