"""What the in-memory (`compare`) and streaming (`StreamingCompare`) all-pairs paths share:
the result container, pair resolution, the cross-product GEMMs, and the batched small
factorizations that turn cross products into metric values."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from sparsecore.similarity.cca import Factor, Reduction, cca_from_cross, reduction
from sparsecore.similarity.procrustes import procrustes_from_cross

Pairs = Literal["diagonal", "all"] | Sequence[tuple[str, str]]
Pair = tuple[int, int]

CCA_METRICS = ("cca", "svcca", "pwcca")
MOMENT_METRICS = ("linear_cka", "procrustes")
REDUCTION_OPTIONS = ("keep", "variance", "spectrum")


@dataclass
class SimilarityMatrix:
    """Similarity of every compared layer pair: values[i, j] compares rows[i] (first set)
    with cols[j] (second set); NaN where the pair was not compared (e.g. off the diagonal
    for pairs="diagonal"). dead_rows / dead_cols: dead channels dropped per layer."""

    metric: str
    rows: list[str]
    cols: list[str]
    values: Tensor  # (len(rows), len(cols))
    dead_rows: dict[str, int] = field(default_factory=dict)
    dead_cols: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, key: tuple[str, str]) -> float:
        a, b = key
        return float(self.values[self.rows.index(a), self.cols.index(b)])

    def diagonal(self) -> Tensor:
        """values[i, i] for i < min(len(rows), len(cols))."""
        return self.values.diagonal()

    def to_dict(self) -> dict[str, Any]:
        """Plain Python (JSON-ready; NaN stays float('nan'))."""
        return {
            "metric": self.metric,
            "rows": list(self.rows),
            "cols": list(self.cols),
            "values": self.values.detach().cpu().tolist(),
            "dead_rows": dict(self.dead_rows),
            "dead_cols": dict(self.dead_cols),
        }

    def __str__(self) -> str:
        vals = self.values.detach().cpu()
        width = max([len(c) for c in self.cols] + [6])
        head = max([len(r) for r in self.rows] + [len(self.metric)])
        lines = [self.metric.ljust(head) + " " + " ".join(c.rjust(width) for c in self.cols)]
        for i, r in enumerate(self.rows):
            cells = [
                "-".rjust(width) if torch.isnan(v) else f"{float(v):.4f}".rjust(width)
                for v in vals[i]
            ]
            lines.append(r.ljust(head) + " " + " ".join(cells))
        for side, dead in (("first", self.dead_rows), ("second", self.dead_cols)):
            dropped = {k: v for k, v in dead.items() if v}
            if dropped:
                lines.append(f"dead channels dropped ({side} set): {dropped}")
        return "\n".join(lines)


def resolve_pairs(names_a: list[str], names_b: list[str], pairs: Pairs) -> list[Pair]:
    """Index pairs for "diagonal" (i with i: equal layer counts), "all", or explicit names.

    "diagonal" pairs by position; it warns when several layers are paired and the names
    differ (layers listed in another order, or other architectures): explicit name pairs
    say what is meant and silence it.
    """
    if isinstance(pairs, str):
        if pairs == "all":
            return [(i, j) for i in range(len(names_a)) for j in range(len(names_b))]
        if pairs == "diagonal":
            if len(names_a) != len(names_b):
                raise ValueError(
                    f'pairs="diagonal" needs as many layers on both sides, got '
                    f"{len(names_a)} and {len(names_b)}"
                )
            differ = [(a, b) for a, b in zip(names_a, names_b) if a != b]
            if len(names_a) > 1 and differ:
                warnings.warn(
                    f'pairs="diagonal" pairs layers by position, and {len(differ)} of the '
                    f"{len(names_a)} pairs have different names (e.g. {differ[0][0]!r} with "
                    f"{differ[0][1]!r}); pass pairs=[(name_a, name_b), ...] to say which "
                    "layers to pair",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return [(i, i) for i in range(len(names_a))]
        raise ValueError(f'pairs must be "diagonal", "all" or a list of name pairs, got {pairs!r}')
    out = []
    for a, b in pairs:
        if a not in names_a or b not in names_b:
            raise KeyError(f"pair ({a!r}, {b!r}) names a layer not given: {names_a} / {names_b}")
        out.append((names_a.index(a), names_b.index(b)))
    return out


def check_points(
    names_a: list[str], names_b: list[str], n_a: list[int], n_b: list[int], pairs: list[Pair]
) -> None:
    """Every compared pair must hold the same number of data points."""
    bad = [(names_a[i], n_a[i], names_b[j], n_b[j]) for i, j in pairs if n_a[i] != n_b[j]]
    if bad:
        shown = ", ".join(f"{a} ({na}) vs {b} ({nb})" for a, na, b, nb in bad[:5])
        raise ValueError(
            f"{len(bad)} layer pairs have different numbers of data points: {shown}. Rows must "
            'be the same inputs; for conv layers of different spatial size use conv="pool".'
        )


def cross_blocks(
    mats_a: list[Tensor], mats_b: list[Tensor], pairs: list[Pair]
) -> dict[Pair, Tensor]:
    """mats_a[i]^H @ mats_b[j] (contracting the data-point dim -2) for every pair.

    When the pairs cover most of the grid, the layers are concatenated and one GEMM yields
    every block (small layers make memory-bound GEMMs on their own); otherwise one GEMM a
    pair. Pairs are grouped by data-point count, which must agree within a pair.
    """
    out: dict[Pair, Tensor] = {}
    by_n: dict[int, list[Pair]] = defaultdict(list)
    for i, j in pairs:
        by_n[mats_a[i].shape[-2]].append((i, j))
    for group in by_n.values():
        rows = sorted({i for i, _ in group})
        cols = sorted({j for _, j in group})
        if len(group) == 1 or 2 * len(group) < len(rows) * len(cols):
            for i, j in group:
                out[(i, j)] = mats_a[i].mH @ mats_b[j]
            continue
        big = torch.cat([mats_a[i] for i in rows], -1).mH @ torch.cat([mats_b[j] for j in cols], -1)
        off_a = _offsets([mats_a[i].shape[-1] for i in rows], rows)
        off_b = _offsets([mats_b[j].shape[-1] for j in cols], cols)
        for i, j in group:
            out[(i, j)] = big[..., off_a[i][0] : off_a[i][1], off_b[j][0] : off_b[j][1]]
    return out


def _offsets(widths: list[int], ids: list[int]) -> dict[int, tuple[int, int]]:
    out, start = {}, 0
    for k, w in zip(ids, widths):
        out[k] = (start, start + w)
        start += w
    return out


def batched_by_shape(
    pairs: list[Pair],
    key: Callable[[Pair], tuple],
    run: Callable[[list[Pair]], Tensor],
) -> dict[Pair, Tensor]:
    """Group pairs by `key` (shapes), call `run` once per group (it stacks the group's
    operands and returns one value per pair, in order), and scatter the values back."""
    groups: dict[tuple, list[Pair]] = defaultdict(list)
    for pr in pairs:
        groups[key(pr)].append(pr)
    out: dict[Pair, Tensor] = {}
    for group in groups.values():
        for pr, v in zip(group, run(group)):
            out[pr] = v
    return out


def cca_values(
    metric: str, pairs: list[Pair], blocks: dict[Pair, Tensor], fa: list[Factor], fb: list[Factor]
) -> dict[Pair, Tensor]:
    """Mean canonical correlation ("cca", "svcca") or PWCCA of every pair from its cross
    product U_a^H U_b, the small SVDs batched over pairs of equal shapes."""
    pw = metric == "pwcca"

    def key(pr: Pair) -> tuple:
        i, j = pr
        shape = tuple(blocks[pr].shape)
        return (shape, tuple(fa[i].coords.shape), tuple(fb[j].coords.shape)) if pw else shape

    def run(group: list[Pair]) -> Tensor:
        m = torch.stack([blocks[pr] for pr in group])
        cx = torch.stack([fa[i].count for i, _ in group])
        cy = torch.stack([fb[j].count for _, j in group])
        coords, bases = None, None
        if pw:
            coords = (
                torch.stack([fa[i].coords for i, _ in group]),
                torch.stack([fb[j].coords for _, j in group]),
            )
            if all(fa[i].u is not None and fb[j].u is not None for i, j in group):

                def bases(idx: tuple[int, ...]) -> tuple[Tensor, Tensor]:
                    i, j = group[idx[0]]
                    return fa[i].u, fb[j].u

        corrs, count, value, _ = cca_from_cross(m, cx, cy, coords, bases)
        return value if pw else corrs.sum(-1) / count.to(corrs.dtype)

    return batched_by_shape(pairs, key, run)


def reduction_of(metric: str, options: dict[str, Any]) -> Reduction | None:
    """SVCCA's reduction from the options of compare / StreamingCompare: "svcca" reduces to
    variance=0.99 unless told otherwise, "cca" only when told, "pwcca" never."""
    if metric not in ("cca", "svcca"):
        return None
    return reduction(
        options.get("keep"),
        options.get("variance"),
        options.get("spectrum", "variance"),
        default_variance=0.99 if metric == "svcca" else None,
    )


def warn_layers(
    empty: list[str], short: dict[str, int], reduce: Reduction | None, what: str, level: int
) -> None:
    """One warning for the layers with no live channel (empty: their similarities are NaN),
    one for those holding fewer directions than keep asked (short: name -> directions)."""
    if empty:
        warnings.warn(
            f"{what}: layers with no variance (every channel constant up to rounding: dead or "
            f"pruned channels, or a constant input): {empty}; their similarities are NaN.",
            RuntimeWarning,
            stacklevel=level,
        )
    if short and reduce is not None and reduce.count is not None:
        warnings.warn(
            f"{what}: keep={reduce.count} directions asked, but these layers hold fewer (their "
            f"numerical rank) and keep all they have: {short}",
            RuntimeWarning,
            stacklevel=level,
        )


def procrustes_values(
    pairs: list[Pair], blocks: dict[Pair, Tensor], norm_a: list[Tensor], norm_b: list[Tensor]
) -> dict[Pair, Tensor]:
    """Procrustes distance of every pair from X_c^T Y_c, the nuclear norms batched by shape."""

    def run(group: list[Pair]) -> Tensor:
        return procrustes_from_cross(
            torch.stack([blocks[pr] for pr in group]),
            torch.stack([norm_a[i] for i, _ in group]),
            torch.stack([norm_b[j] for _, j in group]),
        )

    return batched_by_shape(pairs, lambda pr: tuple(blocks[pr].shape), run)


def to_matrix(values: dict[Pair, Tensor], n_rows: int, n_cols: int, like: Tensor) -> Tensor:
    """Scatter per-pair scalars into an (n_rows, n_cols) matrix, NaN elsewhere."""
    out = torch.full((n_rows, n_cols), float("nan"), dtype=like.real.dtype, device=like.device)
    for (i, j), v in values.items():
        out[i, j] = v
    return out


def check_options(
    metric: str, options: dict[str, Any], allowed: dict[str, tuple[str, ...]]
) -> None:
    """Reject unknown metrics and options that the metric does not take."""
    if metric not in allowed:
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(allowed)}")
    extra = set(options) - set(allowed[metric])
    if extra:
        raise TypeError(
            f"metric {metric!r} takes options {allowed[metric] or '()'}, got {sorted(extra)}"
        )
