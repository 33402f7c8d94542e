"""Validated weight containers for the sparse kernels, one per layout.

Each container checks its fields on construction and raises a ValueError that names the
field and the expected shape / dtype; `from_dense` builds one from a weight (a Linear weight,
or a conv weight viewed as (C_out, C_in*kh*kw)) and `to_dense` gives the weight back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------
# BSR: block-sparse weights
# ---------------------------------------------------------------------------------------
# A dimension that the block does not divide is refused (ValueError), not padded: padding
# would change the layer's shape contract (to_dense() must give the original weight back)
# and waste a partial block of work on every call; `sparsify()` skips such layers and says
# why. Conv weights are blocked over their matrix view (C_out, C_in * kh * kw), the layout
# that sparsecore.prune.structured's block masks use.

BlockSize = tuple[int, int]


def _block_size(block_size: int | Sequence[int]) -> BlockSize:
    """(bs_r, bs_c) from an int (square) or a pair; both positive."""
    bs = (int(block_size), int(block_size)) if isinstance(block_size, int) else tuple(block_size)
    if len(bs) != 2 or min(bs) < 1:
        raise ValueError(f"block_size must be a positive int or a pair of them, got {block_size!r}")
    return int(bs[0]), int(bs[1])


def _block_grid(shape: Sequence[int], block_size: BlockSize) -> tuple[int, int]:
    """(R, C) blocks of a (n_out, n_in) matrix; ValueError when the block does not divide it."""
    (n, k), (br, bc) = shape, block_size
    if n % br or k % bc:
        raise ValueError(
            f"block size {br}x{bc} does not divide the weight matrix {n}x{k} "
            f"(rows % {br} = {n % br}, cols % {bc} = {k % bc}); sparsecore refuses rather "
            "than pads: choose a block size that divides both dimensions"
        )
    return n // br, k // bc


def _matrix_view(weight: Tensor) -> Tensor:
    """The 2-D view (out, in * kernel...) of a Linear or Conv weight."""
    if weight.dim() < 2:
        raise ValueError(
            f"weight must have 2+ dims (Linear or Conv), got shape {tuple(weight.shape)}"
        )
    return weight.reshape(weight.shape[0], -1)


def block_scores(weight: Tensor, block_size: int | Sequence[int], p: float = 2.0) -> Tensor:
    """p-norm of each (bs_r, bs_c) block of the weight's matrix view: (R, C), float."""
    bs = _block_size(block_size)
    w = _matrix_view(weight.detach())
    r, c = _block_grid(w.shape, bs)
    blocks = w.reshape(r, bs[0], c, bs[1]).transpose(1, 2).float()
    return torch.linalg.vector_norm(blocks, ord=p, dim=(2, 3))


def block_mask_from_scores(scores: Tensor, density: float, *, per_row: bool = False) -> Tensor:
    """Keep the highest-scoring blocks: a bool (R, C) block mask with exactly
    round(density * R * C) blocks (per_row=False), or round(density * C) in every block row
    (per_row=True: equal work per row, which balances the kernels' threads). Ties go to the
    lower index, so the result is deterministic."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D (R, C) block grid, got shape {tuple(scores.shape)}")
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    r, c = scores.shape
    mask = torch.zeros(r, c, dtype=torch.bool, device=scores.device)
    flat = scores.detach().float().reshape(r if per_row else 1, -1)
    keep = round(float(density) * flat.shape[1])
    if keep:
        # stable sort of -score: equal scores keep index order
        idx = torch.sort(-flat, dim=1, stable=True).indices[:, :keep]
        mask.view(flat.shape).scatter_(1, idx, True)
    return mask


def block_mask_from_mask(mask: Tensor, block_size: int | Sequence[int]) -> Tensor:
    """The (R, C) block mask of an element mask of the weight's shape (2-D, or a conv
    weight's 4-D shape); ValueError when the mask is not constant inside every block."""
    bs = _block_size(block_size)
    m = _matrix_view(mask) != 0
    r, c = _block_grid(m.shape, bs)
    tiles = m.reshape(r, bs[0], c, bs[1])
    anyb, allb = tiles.any(dim=(1, 3)), tiles.all(dim=(1, 3))
    if not torch.equal(anyb, allb):
        bad = (anyb & ~allb).nonzero()[0].tolist()
        raise ValueError(
            f"mask is not aligned to {bs[0]}x{bs[1]} blocks: block (row {bad[0]}, col {bad[1]}) "
            f"is partly kept ({int(anyb.ne(allb).sum())} mixed blocks in all); build it with "
            "block_mask_from_scores or sparsecore.prune.structured.block_mask"
        )
    return anyb


def expand_block_mask(block_mask: Tensor, block_size: int | Sequence[int]) -> Tensor:
    """Element mask (R * bs_r, C * bs_c) of a bool (R, C) block mask."""
    br, bc = _block_size(block_size)
    return block_mask.repeat_interleave(br, 0).repeat_interleave(bc, 1)


def bsr_structure(block_mask: Tensor) -> dict[str, Tensor]:
    """Index arrays (int32, on block_mask's device) of the BSR with this (R, C) block mask:
    col_idx, row_ptr, block_row (blocks in row-major order), and the transpose's t_perm
    (which stored block sits at each position of W^T's block-row order), t_col_idx (its
    block column = W's block row) and t_row_ptr."""
    if block_mask.dim() != 2 or block_mask.dtype != torch.bool:
        raise ValueError(
            f"block_mask must be a 2-D bool (R, C) tensor, got {block_mask.dtype} "
            f"of shape {tuple(block_mask.shape)}"
        )
    r, c = block_mask.shape
    rows, cols = block_mask.nonzero(as_tuple=True)  # row-major
    t_perm = torch.argsort(cols * r + rows)
    i32 = torch.int32

    def ptr(counts: Tensor) -> Tensor:
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(i32)

    return {
        "col_idx": cols.to(i32),
        "row_ptr": ptr(torch.bincount(rows, minlength=r)),
        "block_row": rows.to(i32),
        "t_perm": t_perm.to(i32),
        "t_col_idx": rows[t_perm].to(i32),
        "t_row_ptr": ptr(torch.bincount(cols, minlength=c)),
    }


@dataclass
class BSRWeight:
    """A (n_out, n_in) weight in block-sparse row format with (bs_r, bs_c) blocks.

    blocks: (nnzb, bs_r, bs_c), the kept blocks in row-major block order; col_idx, block_row:
    int32 (nnzb,); row_ptr: int32 (R + 1,) with R = n_out / bs_r; the transpose (for the
    input gradient dX = dY W) without copying blocks: t_perm, t_col_idx: int32 (nnzb,),
    t_row_ptr: int32 (C + 1,) with C = n_in / bs_c. Square blocks (8..128) and rectangular
    ones (1x16, 16x1, ...) alike; the block must divide both dimensions.
    """

    shape: tuple[int, int]
    block_size: BlockSize
    blocks: Tensor
    col_idx: Tensor
    row_ptr: Tensor
    block_row: Tensor
    t_perm: Tensor
    t_col_idx: Tensor
    t_row_ptr: Tensor

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.block_size = _block_size(self.block_size)
        self.validate()

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        block_mask: Tensor | None = None,
        *,
        block_size: int | Sequence[int] = 32,
        density: float | None = None,
    ) -> BSRWeight:
        """BSR of a Linear weight (n_out, n_in) or a conv weight (viewed as (C_out, C_in*kh*kw)).

        block_mask: bool (R, C) block mask, or an element mask of the weight's shape that is
        constant inside every block; or density: keep that fraction of blocks by L2 norm; or
        neither: keep every block that holds a nonzero.
        """
        bs = _block_size(block_size)
        w = _matrix_view(weight.detach())
        r, c = _block_grid(w.shape, bs)
        if block_mask is not None and density is not None:
            raise ValueError("give block_mask= or density=, not both")
        if density is not None:
            bm = block_mask_from_scores(block_scores(w, bs), density)
        elif block_mask is None:
            bm = (w.reshape(r, bs[0], c, bs[1]) != 0).any(dim=(1, 3))
        elif tuple(block_mask.shape) == (r, c):
            bm = block_mask.to(torch.bool)
        elif block_mask.numel() == w.numel() and block_mask.shape[0] == w.shape[0]:
            bm = block_mask_from_mask(block_mask, bs)
        else:
            raise ValueError(
                f"block_mask must be the ({r}, {c}) block grid of the {w.shape[0]}x{w.shape[1]} "
                f"weight with {bs[0]}x{bs[1]} blocks, or an element mask of shape "
                f"{tuple(weight.shape)}; got {tuple(block_mask.shape)}"
            )
        bm = bm.to(w.device)
        st = bsr_structure(bm)
        rows, cols = st["block_row"].long(), st["col_idx"].long()
        blocks = w.reshape(r, bs[0], c, bs[1]).transpose(1, 2)[rows, cols].contiguous()
        return cls(tuple(w.shape), bs, blocks, **st)

    @property
    def nnzb(self) -> int:
        return int(self.col_idx.numel())

    @property
    def grid(self) -> tuple[int, int]:
        """(R, C): block rows and block columns."""
        return self.shape[0] // self.block_size[0], self.shape[1] // self.block_size[1]

    @property
    def density(self) -> float:
        r, c = self.grid
        return self.nnzb / (r * c) if r * c else 0.0

    def block_mask(self) -> Tensor:
        """bool (R, C): which blocks are kept."""
        m = torch.zeros(self.grid, dtype=torch.bool, device=self.blocks.device)
        m[self.block_row.long(), self.col_idx.long()] = True
        return m

    def to_dense(self) -> Tensor:
        """The (n_out, n_in) dense weight (zeros outside the kept blocks)."""
        (r, c), (br, bc) = self.grid, self.block_size
        out = self.blocks.new_zeros(r, c, br, bc)
        out[self.block_row.long(), self.col_idx.long()] = self.blocks
        return out.transpose(1, 2).reshape(self.shape)

    def validate(self) -> None:
        """ValueError naming the field when shapes, dtypes, devices or indices disagree."""
        r, c = _block_grid(self.shape, self.block_size)
        br, bc = self.block_size
        b = self.blocks
        if b.dim() != 3 or tuple(b.shape[1:]) != (br, bc):
            raise ValueError(f"blocks must have shape (nnzb, {br}, {bc}), got {tuple(b.shape)}")
        if not b.is_floating_point():
            raise ValueError(f"blocks must be floating point, got {b.dtype}")
        nnzb = b.shape[0]
        if nnzb > r * c:
            raise ValueError(f"{nnzb} blocks exceed the {r}x{c} block grid")
        expect = {
            "col_idx": nnzb, "row_ptr": r + 1, "block_row": nnzb,
            "t_perm": nnzb, "t_col_idx": nnzb, "t_row_ptr": c + 1,
        }  # fmt: skip
        for name, n in expect.items():
            t = getattr(self, name)
            if t.dtype != torch.int32 or t.dim() != 1 or t.numel() != n:
                raise ValueError(
                    f"{name} must be int32 of shape ({n},), got {t.dtype} of shape {tuple(t.shape)}"
                )
            if t.device != b.device:
                raise ValueError(f"{name} is on {t.device} but blocks are on {b.device}")
        for name, ptr in (("row_ptr", self.row_ptr), ("t_row_ptr", self.t_row_ptr)):
            if int(ptr[0]) != 0 or int(ptr[-1]) != nnzb or bool((ptr[1:] < ptr[:-1]).any()):
                raise ValueError(f"{name} must rise monotonically from 0 to nnzb={nnzb}")
        for name, idx, hi in (("col_idx", self.col_idx, c), ("block_row", self.block_row, r),
                              ("t_perm", self.t_perm, nnzb), ("t_col_idx", self.t_col_idx, r)):
            if nnzb and (int(idx.min()) < 0 or int(idx.max()) >= hi):
                raise ValueError(f"{name} has entries outside [0, {hi})")
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(r, device=b.device), counts)
        if not torch.equal(rows, self.block_row.long()):
            raise ValueError("block_row does not match row_ptr")
        key = rows * c + self.col_idx.long()
        if bool((key[1:] <= key[:-1]).any()):
            raise ValueError("col_idx must increase strictly inside every block row")
        st = bsr_structure(self.block_mask())
        for name in ("t_perm", "t_col_idx", "t_row_ptr"):
            if not torch.equal(getattr(self, name), st[name]):
                raise ValueError(f"{name} is not the transpose of (row_ptr, col_idx)")


# ---------------------------------------------------------------------------------------
# CSR: unstructured sparse weights
# ---------------------------------------------------------------------------------------
# The weight's matrix view W (n_rows, n_cols) (a Linear weight, or a conv weight viewed as
# (C_out, C_in*kh*kw)) keeps nonzeros k in [row_ptr[r], row_ptr[r+1]) at col_idx[k],
# strictly increasing inside a row. Besides values / col_idx / row_ptr it carries what the
# kernels need, all int32: row_idx (the row of every nonzero, for the SDDMM), row_order (rows
# by decreasing length: the GPU kernels' schedule, for load balance; the C++ kernels walk rows
# in order, which streams memory and measured faster there), the transpose for
# the input gradient dX = dY W (values[t_perm] is W^T's values in CSR order, with t_col_idx /
# t_row_ptr / t_row_order), and, built on first use on the CPU, the C++ kernels' tile-major
# layouts of W and W^T (see csrc/cpu/csr.cpp) and, for a conv weight, the CSR structure of
# the transposed-flipped weight that the direct kernel takes for a stride-1 input gradient
# (conv_flip_structure) and the batch-last kernel's tap-major layouts of W and of that
# transposed-flipped weight (conv_tap_major_structure); these depend only on the sparsity
# pattern.

_CSR_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_MAX = 2**31 - 1
# The int32 index arrays derived from (col_idx, row_ptr); a CSRWeight and the layers that
# store one keep exactly these.
CSR_INDEX_FIELDS = ("col_idx", "row_ptr", "row_idx", "row_order",
                    "t_perm", "t_col_idx", "t_row_ptr", "t_row_order")  # fmt: skip
# The int32 arrays of conv_flip_structure.
CSR_FLIP_FIELDS = ("f_perm", "f_col_idx", "f_row_ptr")
# Input channels per tile of the batch-last ("CHWN") conv kernel (csrc/cpu/conv_chwn.cpp): a
# tile's input rows (3 rows x W pixels x this many channels x 64 samples) stay in L2 while all
# the output channels of a work item pass over them.
CHWN_CHANNEL_TILE = 128


class TapMajor(NamedTuple):
    """A conv weight's nonzeros in the batch-last kernel's (row, channel tile, tap, channel)
    order (conv_tap_major_structure), all int32: perm (nnz,) such that values[perm] are the
    values in that order, ci (nnz,) their input channels, and tap_ptr (rows * n_tiles * kh*kw
    + 1,), where the nonzeros of each (row, tile, tap) start."""

    perm: Tensor
    ci: Tensor
    tap_ptr: Tensor


def _length_order(ptr: Tensor) -> Tensor:
    """Rows of a CSR by decreasing length (stable: ties keep index order), int32."""
    return torch.argsort(ptr[1:] - ptr[:-1], descending=True, stable=True).to(torch.int32)


def csr_structure(col_idx: Tensor, row_ptr: Tensor, n_cols: int) -> dict[str, Tensor]:
    """Every index array of CSR_INDEX_FIELDS (int32) from a valid (col_idx, row_ptr)."""
    i32 = torch.int32
    n_rows = row_ptr.numel() - 1
    lengths = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = torch.repeat_interleave(
        torch.arange(n_rows, device=row_ptr.device), lengths, output_size=col_idx.numel()
    )
    cols = col_idx.long()
    # CSC order: by column, then by row (stable, and rows already ascend in CSR order).
    t_perm = torch.argsort(cols, stable=True)
    counts = torch.bincount(cols, minlength=n_cols)
    t_row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(i32)
    return {
        "col_idx": col_idx.to(i32),
        "row_ptr": row_ptr.to(i32),
        "row_idx": rows.to(i32),
        "row_order": _length_order(row_ptr),
        "t_perm": t_perm.to(i32),
        "t_col_idx": rows[t_perm].to(i32),
        "t_row_ptr": t_row_ptr,
        "t_row_order": _length_order(t_row_ptr),
    }


def _conv_dims(shape: Sequence[int], what: str) -> tuple[int, int, int]:
    """(C_out, C_in, kh*kw) of a 4-D conv weight shape; `what` names the caller's layout in
    the error."""
    if len(shape) != 4:
        raise ValueError(f"{what} needs a 4-D conv weight shape, got {tuple(shape)}")
    c_out, c_in, kh, kw = (int(s) for s in shape)
    return c_out, c_in, kh * kw


def conv_flip_structure(row_idx: Tensor, col_idx: Tensor,
                        shape: Sequence[int]) -> dict[str, Tensor]:
    """The CSR structure (int32) of the transposed-flipped weight W' (C_in, C_out, kh, kw),
    W'[i, o, u, v] = W[o, i, kh-1-u, kw-1-v], of a conv weight W of this shape whose matrix
    view has its nonzeros at (row_idx, col_idx), as a CSR over W''s matrix view
    (C_in, C_out*kh*kw): f_perm (nnz,) such that values[f_perm] are W''s values in CSR order,
    f_col_idx (nnz,) and f_row_ptr (C_in + 1,). Output shapes follow the input's alone (a
    sort and a search, no bincount), so a traced call can build it too."""
    c_out, c_in, taps = _conv_dims(shape, "the transposed-flipped structure")
    cols = col_idx.long()
    in_ch = cols // taps
    f_cols = row_idx.long() * taps + (taps - 1 - cols % taps)
    f_perm = torch.argsort(in_ch * (c_out * taps) + f_cols)  # keys are unique
    bounds = torch.arange(c_in + 1, device=col_idx.device)
    i32 = torch.int32
    return {
        "f_perm": f_perm.to(i32),
        "f_col_idx": f_cols[f_perm].to(i32),
        "f_row_ptr": torch.searchsorted(in_ch[f_perm], bounds).to(i32),
    }


def conv_tap_major_structure(row_idx: Tensor, col_idx: Tensor, shape: Sequence[int],
                             channel_tile: int = CHWN_CHANNEL_TILE, *,
                             flipped: bool = False) -> TapMajor:
    """The batch-last conv kernel's layout (TapMajor) of a conv weight W (C_out, C_in, kh, kw)
    whose matrix view has its nonzeros at (row_idx, col_idx), a channel tile being
    `channel_tile` input channels; with `flipped`, of its transposed-flipped weight W'
    (C_in, C_out, kh, kw), W'[i, o, u, v] = W[o, i, kh-1-u, kw-1-v], whose values[perm] are
    then W''s. Output shapes follow the input's alone (a sort and a search), so a traced call
    can build it too."""
    c_out, c_in, taps = _conv_dims(shape, "the tap-major layout")
    cols = col_idx.long()
    rows, chans, tap = row_idx.long(), cols // taps, cols % taps
    n_rows, n_chans = c_out, c_in
    if flipped:
        rows, chans, tap = chans, rows, taps - 1 - tap
        n_rows, n_chans = c_in, c_out
    n_tiles = -(-n_chans // channel_tile)
    seg = (rows * n_tiles + chans // channel_tile) * taps + tap
    perm = torch.argsort(seg * channel_tile + chans % channel_tile)  # keys are unique
    bounds = torch.arange(n_rows * n_tiles * taps + 1, device=col_idx.device)
    i32 = torch.int32
    return TapMajor(perm.to(i32), chans[perm].to(i32),
                    torch.searchsorted(seg[perm], bounds).to(i32))


def _check_int32_sizes(nnz: int, n_rows: int, n_cols: int) -> None:
    """ValueError unless nnz, rows and columns all fit the int32 index arrays."""
    if max(nnz, n_cols, n_rows) > _INT32_MAX:
        raise ValueError(f"nnz, rows and columns must fit int32 (at most {_INT32_MAX}), got "
                         f"{nnz}, {n_rows} and {n_cols}")


def _check_csr(values: Tensor, col_idx: Tensor, row_ptr: Tensor, shape: tuple[int, ...]) -> None:
    """ValueError naming the field when values / col_idx / row_ptr do not form a CSR matrix."""
    for name, t in (("values", values), ("col_idx", col_idx), ("row_ptr", row_ptr)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if values.dtype not in _CSR_VALUE_DTYPES:
        raise ValueError(f"values must be float16/bfloat16/float32/float64, got {values.dtype}")
    for name, t in (("col_idx", col_idx), ("row_ptr", row_ptr)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.device != values.device:
            raise ValueError(f"{name} is on {t.device} but values are on {values.device}")
    if len(shape) < 2 or min(shape) < 0:
        raise ValueError(f"shape must have 2+ non-negative dims, got {shape}")
    n_rows, n_cols, nnz = shape[0], math.prod(shape[1:]), values.numel()
    _check_int32_sizes(nnz, n_rows, n_cols)
    if col_idx.numel() != nnz:
        raise ValueError(f"col_idx has {col_idx.numel()} entries but values has {nnz}")
    if row_ptr.numel() != n_rows + 1:
        raise ValueError(f"row_ptr must have n_rows + 1 = {n_rows + 1} entries, "
                         f"got {row_ptr.numel()}")
    ptr = row_ptr.long()
    if int(ptr[0]) != 0 or int(ptr[-1]) != nnz:
        raise ValueError(f"row_ptr must start at 0 and end at nnz = {nnz}, "
                         f"got {int(ptr[0])} .. {int(ptr[-1])}")
    if bool((ptr[1:] < ptr[:-1]).any()):
        r = int((ptr[1:] < ptr[:-1]).nonzero()[0])
        raise ValueError(f"row_ptr must be non-decreasing (row_ptr[{r + 1}] < row_ptr[{r}])")
    if nnz:
        cols = col_idx.long()
        if int(cols.min()) < 0 or int(cols.max()) >= n_cols:
            raise ValueError(f"col_idx has entries outside [0, {n_cols})")
        rows = torch.repeat_interleave(torch.arange(n_rows, device=ptr.device), ptr.diff())
        if bool(((rows[1:] == rows[:-1]) & (cols[1:] <= cols[:-1])).any()):
            raise ValueError("col_idx must increase strictly inside every row "
                             "(sorted, no duplicates)")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("values contain NaN or Inf")


class CSRWeight:
    """A weight whose matrix view (n_rows, n_cols) is stored in CSR (see the section notes).

    shape: the weight's own shape, (out, in) for Linear or (C_out, C_in, kh, kw) for a conv
    (n_rows = shape[0], n_cols = the product of the rest). values: (nnz,) float; col_idx,
    row_ptr: int32 (int64 accepted and converted); the other index arrays are derived. The
    constructor validates (ValueError naming the field); `check=False` skips that for arrays
    already validated (the layers' buffers). `tilings`, `flip` and `chwn`, when given, are the
    pattern-only layouts of cpu_tilings() / cpu_conv_flip() / cpu_conv_chwn() (W's, then the
    transposed-flipped weight's) already built for these arrays.
    """

    def __init__(self, values: Tensor, col_idx: Tensor, row_ptr: Tensor, shape: Sequence[int],
                 *, check: bool = True, derived: dict[str, Tensor] | None = None,
                 tilings: tuple[Tensor | None, Tensor | None] = (None, None),
                 flip: dict[str, Tensor] | None = None,
                 chwn: tuple[TapMajor | None, TapMajor | None] = (None, None)) -> None:
        self.shape = tuple(int(s) for s in shape)
        if check:
            _check_csr(values, col_idx, row_ptr, self.shape)
        self.values = values
        fields = derived if derived is not None else csr_structure(col_idx, row_ptr, self.n_cols)
        for name in CSR_INDEX_FIELDS:
            setattr(self, name, fields[name])
        self.tiling, self.t_tiling = tilings
        self.flip = flip
        self.chwn, self.chwn_flip = chwn

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor | None = None) -> CSRWeight:
        """CSR of a Linear weight (out, in) or a conv weight (C_out, C_in, kh, kw).

        mask: bool (or 0/1) of the weight's shape; the kept positions are stored even where
        the weight is 0 (they keep training). Without a mask the nonzeros are kept. Raises
        ValueError for a mask of another shape or device, for NaN/Inf kept weights, and when
        nnz, rows or columns do not fit the int32 index arrays.
        """
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            raise ValueError(f"weight must be a floating-point tensor, got {type(weight).__name__}"
                             + (f" of {weight.dtype}" if isinstance(weight, Tensor) else ""))
        w = _matrix_view(weight.detach())
        if mask is None:
            keep = w != 0
        else:
            if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(weight.shape):
                got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"mask shape {got} does not match weight shape "
                                 f"{tuple(weight.shape)}")
            if mask.device != weight.device:
                raise ValueError(f"mask is on {mask.device} but the weight is on {weight.device}")
            if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError("mask must be bool or hold only 0 and 1")
            keep = mask.reshape(w.shape) != 0
        counts = keep.sum(1)
        _check_int32_sizes(int(counts.sum()), *w.shape)  # before the int32 casts below
        values = w[keep]
        if not bool(torch.isfinite(values).all()):
            raise ValueError("weight has NaN or Inf at kept positions")
        row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        col_idx = keep.nonzero()[:, 1].to(torch.int32)  # row-major: columns ascend per row
        return cls(values.contiguous(), col_idx, row_ptr, weight.shape, check=False)

    @property
    def n_rows(self) -> int:
        return self.shape[0]

    @property
    def n_cols(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        total = self.n_rows * self.n_cols
        return self.nnz / total if total else 0.0

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def mask(self) -> Tensor:
        """bool, the weight's shape: the kept positions."""
        m = torch.zeros(self.n_rows, self.n_cols, dtype=torch.bool, device=self.device)
        m[self.row_idx.long(), self.col_idx.long()] = True
        return m.view(self.shape)

    def to_dense(self, values: Tensor | None = None) -> Tensor:
        """The dense weight (the original shape, zeros where pruned); differentiable in
        `values` (this weight's values when not given)."""
        v = self.values if values is None else values
        w = v.new_zeros(self.n_rows, self.n_cols)
        return w.index_put((self.row_idx.long(), self.col_idx.long()), v).view(self.shape)

    def transposed_values(self, values: Tensor | None = None) -> Tensor:
        """W^T's values in its CSR order: values[t_perm]. On the CPU (float32/float64, no
        autograd) the C++ helper streams them per column instead of gathering through
        t_perm, which costs a cache miss per nonzero (see bench/RESULTS.md (layers))."""
        v = self.values if values is None else values
        from sparsecore import _ext

        if (v.device.type == "cpu" and v.dtype in (torch.float32, torch.float64)
                and _ext.has_cpu_ext() and not (v.requires_grad and torch.is_grad_enabled())):
            return torch.ops.sparsecore._csr_transpose_values_cpu(
                v.contiguous(), self.col_idx, self.row_ptr, self.t_row_ptr)
        return v.index_select(0, self.t_perm)

    def cpu_tilings(self) -> tuple[Tensor | None, Tensor | None]:
        """The C++ kernels' tile-major layouts of W and W^T, built once (None off the CPU or
        without the extension). A traced call (torch.compile / export) builds them without
        keeping them: tracing must not store its placeholder tensors on this object."""
        if self.tiling is None and self.device.type == "cpu":
            from sparsecore import _ext

            if _ext.has_cpu_ext():
                tile = torch.ops.sparsecore._csr_tiling_cpu
                tilings = (tile(self.col_idx, self.row_ptr, self.n_cols),
                           tile(self.t_col_idx, self.t_row_ptr, self.n_rows))
                if torch.compiler.is_compiling():
                    return tilings
                self.tiling, self.t_tiling = tilings
        return self.tiling, self.t_tiling

    def cpu_conv_flip(self) -> dict[str, Tensor] | None:
        """The CSR structure of the transposed-flipped conv weight (conv_flip_structure), which
        the C++ direct kernel takes for a stride-1 input gradient, built once (None off the
        CPU or without the extension). A traced call builds it without keeping it, as
        cpu_tilings does. ValueError for a weight that is not 4-D."""
        if len(self.shape) != 4:
            raise ValueError(f"cpu_conv_flip needs a conv weight (4-D), this one has shape "
                             f"{self.shape}")
        if self.flip is None and self.device.type == "cpu":
            from sparsecore import _ext

            if _ext.has_cpu_ext():
                flip = conv_flip_structure(self.row_idx, self.col_idx, self.shape)
                if torch.compiler.is_compiling():
                    return flip
                self.flip = flip
        return self.flip

    def cpu_conv_chwn(self, flipped: bool = False) -> TapMajor | None:
        """The batch-last conv kernel's tap-major layout of this conv weight, or with `flipped`
        of its transposed-flipped weight (conv_tap_major_structure, channel tiles of
        CHWN_CHANNEL_TILE), built once (None off the CPU or without the extension). A traced
        call builds it without keeping it, as cpu_tilings does. ValueError for a weight that
        is not 4-D."""
        if len(self.shape) != 4:
            raise ValueError(f"cpu_conv_chwn needs a conv weight (4-D), this one has shape "
                             f"{self.shape}")
        kept = self.chwn_flip if flipped else self.chwn
        if kept is None and self.device.type == "cpu":
            from sparsecore import _ext

            if _ext.has_cpu_ext():
                kept = conv_tap_major_structure(self.row_idx, self.col_idx, self.shape,
                                                flipped=flipped)
                if torch.compiler.is_compiling():
                    return kept
                if flipped:
                    self.chwn_flip = kept
                else:
                    self.chwn = kept
        return kept

    def with_values(self, values: Tensor) -> CSRWeight:
        """The same structure with other values (e.g. a layer's Parameter); no copy, no check."""
        if values.shape != self.values.shape:
            raise ValueError(f"values must have shape ({self.nnz},), got {tuple(values.shape)}")
        fields = {n: getattr(self, n) for n in CSR_INDEX_FIELDS}
        return CSRWeight(values, self.col_idx, self.row_ptr, self.shape, check=False,
                         derived=fields, tilings=(self.tiling, self.t_tiling), flip=self.flip,
                         chwn=(self.chwn, self.chwn_flip))

    def to(self, *args: object, **kwargs: object) -> CSRWeight:
        """Like Tensor.to: a device moves every array, a dtype converts the values only."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype not in _CSR_VALUE_DTYPES:
            raise ValueError(f"values must stay floating point, got dtype {dtype}")
        values = self.values.to(device=device, dtype=dtype, non_blocking=non_blocking)
        fields = {n: getattr(self, n).to(device=device, non_blocking=non_blocking)
                  for n in CSR_INDEX_FIELDS}
        moved = device is not None and torch.device(device) != self.device
        # The tilings and the conv layouts are CPU-only: rebuilt on first use there.
        tilings = (None, None) if moved else (self.tiling, self.t_tiling)
        chwn = (None, None) if moved else (self.chwn, self.chwn_flip)
        return CSRWeight(values, fields["col_idx"], fields["row_ptr"], self.shape, check=False,
                         derived=fields, tilings=tilings, flip=None if moved else self.flip,
                         chwn=chwn)

    def __repr__(self) -> str:
        return (f"CSRWeight(shape={self.shape}, nnz={self.nnz}, density={self.density:.4f}, "
                f"dtype={self.dtype}, device={self.device})")
