"""SparseLinear: nn.Linear with an unstructured (CSR) sparse weight, trained with a fixed mask.

Also the state shared with SparseConv2d (`_CSRModule`): the kept weights are one Parameter
`values` (nnz,); `col_idx` / `row_ptr` are saved buffers, and the state dict also carries
`weight_shape` (int64), which load_state_dict checks against the layer's; the derived index
arrays (row_idx, row_order, the transpose), the C++ kernels' tilings and, for a conv, the
batch-last kernel's tap-major layout of the weight (chwn_perm, chwn_ci, chwn_tap_ptr) and, at
stride 1, the transposed-flipped weight's structure (f_perm, f_col_idx, f_row_ptr) and
tap-major layout (chwn_f_perm, chwn_f_ci, chwn_f_tap_ptr) are unsaved buffers, rebuilt from
(col_idx, row_ptr) on construction and on load_state_dict.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sparsecore.formats import (
    CSR_FLIP_FIELDS,
    CSR_INDEX_FIELDS,
    CSRWeight,
    TapMajor,
    csr_structure,
)
from sparsecore.nn.functional import sparse_linear

__all__ = ["SparseLinear", "magnitude_mask", "module_mask"]

_SAVED = ("col_idx", "row_ptr")
_DERIVED = tuple(n for n in CSR_INDEX_FIELDS if n not in _SAVED)
# Buffer name prefixes of the tap-major layouts (TapMajor's fields) of the weight and of the
# transposed-flipped weight.
_CHWN_PREFIXES = ("chwn_", "chwn_f_")
_CONV_LAYOUTS = CSR_FLIP_FIELDS + tuple(p + f for p in _CHWN_PREFIXES for f in TapMajor._fields)


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """bool mask of weight's shape keeping the round((1 - sparsity) * numel) entries of largest
    magnitude (ties go to the lower flat index, so the result is deterministic)."""
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    flat = weight.detach().abs().flatten()
    keep = round((1.0 - float(sparsity)) * flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=weight.device)
    mask[torch.sort(flat, descending=True, stable=True).indices[:keep]] = True
    return mask.view(weight.shape)


def module_mask(module: nn.Module) -> Tensor | None:
    """The mask of a weight parametrized as `original * mask` (a parametrization of `weight`
    with a `mask` buffer, e.g. sparsecore.prune's), or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        mask = getattr(p, "mask", None)
        if isinstance(mask, Tensor):
            return mask
    return None


def _resolve_mask(module: nn.Module, mask: Tensor | None, sparsity: float | None) -> Tensor | None:
    """from_dense's mask: the one given, a magnitude mask at `sparsity`, the module's own
    parametrization mask, or None (keep the nonzeros)."""
    if mask is not None and sparsity is not None:
        raise ValueError("give mask= or sparsity=, not both")
    if sparsity is not None:
        return magnitude_mask(module.weight, sparsity)
    return mask if mask is not None else module_mask(module)


class _CSRModule(nn.Module):
    """A layer whose weight (of shape weight_shape) is a CSRWeight held as module state."""

    values: nn.Parameter
    bias: nn.Parameter | None
    weight_shape: tuple[int, ...]

    def _set_weight(self, csr: CSRWeight, bias: Tensor | None) -> None:
        self.weight_shape = csr.shape
        self.values = nn.Parameter(csr.values.detach().clone())
        for name in CSR_INDEX_FIELDS:
            self.register_buffer(name, getattr(csr, name).clone(), persistent=name in _SAVED)
        # The C++ tilings are built here and on load, not in forward, so that a traced
        # forward (torch.compile / export) reads them as plain buffers.
        tiling, t_tiling = csr.cpu_tilings()
        self.register_buffer("tiling", tiling, persistent=False)
        self.register_buffer("t_tiling", t_tiling, persistent=False)
        for name, t in self._conv_layouts(csr).items():
            self.register_buffer(name, t, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def _uses_flip(self) -> bool:
        """Whether the input gradient can run on the transposed-flipped weight (SparseConv2d
        at stride 1), so the layer keeps its structure and tap-major layout."""
        return False

    def _uses_chwn(self) -> bool:
        """Whether the forward can run the batch-last conv kernel (SparseConv2d, for small
        outputs), so the layer keeps the weight's tap-major layout."""
        return False

    def _conv_layouts(self, csr: CSRWeight) -> dict[str, Tensor | None]:
        """The pattern-only conv layouts of `csr` this layer keeps, by buffer name (None where
        the layer does not use one, off the CPU, or without the extension)."""
        flip = csr.cpu_conv_flip() if self._uses_flip() else None
        out = {n: None if flip is None else flip[n] for n in CSR_FLIP_FIELDS}
        uses = (self._uses_chwn(), self._uses_flip())
        for prefix, flipped, used in zip(_CHWN_PREFIXES, (False, True), uses):
            layout = csr.cpu_conv_chwn(flipped) if used else None
            out.update({prefix + f: None if layout is None else getattr(layout, f)
                        for f in TapMajor._fields})
        return out

    def weight_csr(self) -> CSRWeight:
        """The weight as a CSRWeight sharing this module's tensors (values is the Parameter).
        On the CPU the C++ kernels' tilings (and the conv layouts the layer uses) are buffers,
        built on construction and on load, or here when missing (a layer moved to the CPU; a
        traced forward builds them per call)."""
        flip = None if self.f_perm is None else {n: getattr(self, n) for n in CSR_FLIP_FIELDS}
        chwn = tuple(None if getattr(self, p + "perm") is None
                     else TapMajor(*(getattr(self, p + f) for f in TapMajor._fields))
                     for p in _CHWN_PREFIXES)
        w = CSRWeight(self.values, self.col_idx, self.row_ptr, self.weight_shape, check=False,
                      derived={n: getattr(self, n) for n in CSR_INDEX_FIELDS},
                      tilings=(self.tiling, self.t_tiling), flip=flip, chwn=chwn)
        if not torch.compiler.is_compiling():  # a traced forward must not set module state
            self.tiling, self.t_tiling = w.cpu_tilings()
            for name, t in self._conv_layouts(w).items():
                setattr(self, name, t)
        return w

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        """Fraction of the weight that is kept."""
        total = self.weight_shape[0] * self.col_count
        return self.nnz / total if total else 0.0

    @property
    def col_count(self) -> int:
        return int(torch.Size(self.weight_shape[1:]).numel())

    def mask(self) -> Tensor:
        """bool, weight_shape: the kept positions."""
        return self.weight_csr().mask()

    def dense_weight(self) -> Tensor:
        """The dense weight (weight_shape, zeros where pruned), detached."""
        return self.weight_csr().to_dense(self.values.detach())

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_shape"] = torch.tensor(self.weight_shape, dtype=torch.int64)

    def _state_error(self, state_dict: dict, prefix: str) -> str | None:
        """Why the incoming state (its entries, the layer's own for keys it lacks) is not a
        weight of this layer, or None."""
        shape = state_dict.get(prefix + "weight_shape")
        if shape is not None and tuple(int(s) for s in shape) != self.weight_shape:
            return (f"the state dict holds a weight of shape {tuple(int(s) for s in shape)}, "
                    f"this layer's is {self.weight_shape}")
        dev = self.values.device
        values, col_idx, row_ptr = (state_dict.get(prefix + n, getattr(self, n)).detach().to(dev)
                                    for n in ("values", *_SAVED))
        try:
            CSRWeight(values, col_idx, row_ptr, self.weight_shape)
        except ValueError as exc:
            return f"inconsistent CSR state: {exc}"
        bias = state_dict.get(prefix + "bias")
        if self.bias is not None and bias is not None and bias.shape != self.bias.shape:
            return f"bias has shape {tuple(bias.shape)}, expected {tuple(self.bias.shape)}"
        return None

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list, unexpected_keys: list,
                              error_msgs: list) -> None:
        # All or nothing: the incoming weight is checked as a whole before the layer changes.
        # (load_state_dict hands each module its own copy of the dict, which may be edited.)
        if prefix + "weight_shape" not in state_dict:
            missing_keys.append(prefix + "weight_shape")
        why = self._state_error(state_dict, prefix)
        state_dict.pop(prefix + "weight_shape", None)
        if why is not None:
            error_msgs.append(f"{prefix or type(self).__name__}: {why}")
            return
        # Another mask (another nnz) loads too: take the incoming shapes first. (A new
        # Parameter object then replaces `values`: re-create optimisers after such a load.)
        for name in ("values", *_SAVED):
            src = state_dict.get(prefix + name)
            cur = getattr(self, name)
            if isinstance(src, Tensor) and src.shape != cur.shape:
                new = torch.empty(src.shape, dtype=cur.dtype, device=cur.device)
                if name == "values":
                    self.values = nn.Parameter(new, requires_grad=cur.requires_grad)
                else:
                    setattr(self, name, new)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        derived = csr_structure(self.col_idx, self.row_ptr, self.col_count)
        for name in _DERIVED:
            setattr(self, name, derived[name])
        self.tiling = self.t_tiling = None
        for name in _CONV_LAYOUTS:
            setattr(self, name, None)
        self.weight_csr()  # the loaded pattern's tilings and conv layouts

    def _density_repr(self) -> str:
        return f"density={self.density:.3f}, nnz={self.nnz}, bias={self.bias is not None}"


class SparseLinear(_CSRModule):
    """nn.Linear with a CSR weight: y = x W^T + b. Input (..., in_features), any batch shape
    and strides; output (..., out_features).

    Build from a trained layer with `from_dense(linear, mask=... | sparsity=...)`. The
    constructor makes a layer holding `weight` (a CSRWeight of shape (out, in)) and a zero
    bias, or without `weight` an empty one (every weight pruned) that load_state_dict fills.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight: CSRWeight | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        shape = (self.out_features, self.in_features)
        if weight is None:
            weight = CSRWeight.from_dense(torch.zeros(shape, device=device, dtype=dtype))
        elif weight.shape != shape:
            raise ValueError(f"weight has shape {weight.shape}, expected {shape}")
        zeros = torch.zeros(self.out_features, device=weight.device, dtype=weight.dtype)
        self._set_weight(weight, zeros if bias else None)

    @classmethod
    def from_dense(cls, module: nn.Linear, mask: Tensor | None = None, *,
                   sparsity: float | None = None) -> SparseLinear:
        """The sparse twin of `module` with its weights at the kept positions.

        mask: bool (or 0/1) of the weight's shape; or sparsity: keep the largest-magnitude
        (1 - sparsity) fraction of this layer's weights; or neither: the module's prune
        parametrization mask if it has one, else its nonzero weights.
        """
        if not isinstance(module, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(module).__name__}")
        csr = CSRWeight.from_dense(module.weight.detach(), _resolve_mask(module, mask, sparsity))
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = module.in_features, module.out_features
        self._set_weight(csr, None if module.bias is None else module.bias.detach())
        return self

    def to_dense(self) -> nn.Linear:
        """An nn.Linear with the same function (zeros where pruned)."""
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            out.weight.copy_(self.dense_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return sparse_linear(x, self.weight_csr(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                + self._density_repr())
