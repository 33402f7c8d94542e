"""compare(): a similarity metric between every requested pair of layers of two models.

The CCA family factors each layer once (centering, thin QR, SVD of R; SVCCA's reduction
applied there), so that every pair costs one GEMM, U_a^T U_b, and a small SVD; the GEMMs
of all pairs are one GEMM over the concatenated layers, and the small SVDs of equal shapes
run as one batched call. Linear CKA and Procrustes need only cross-Gram matrices, which
`StreamingCompare` computes in one pass. Everything stays on the activations' device.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from sparsecore.similarity._allpairs import (
    CCA_METRICS,
    Pairs,
    SimilarityMatrix,
    cca_values,
    check_options,
    check_points,
    cross_blocks,
    reduction_of,
    resolve_pairs,
    to_matrix,
    warn_layers,
)
from sparsecore.similarity._common import (
    as_activations,
    center,
    compute_dtype,
    dead_channels,
    rescale,
    warn_few_points,
)
from sparsecore.similarity.cca import Factor, factor
from sparsecore.similarity.cka import check_threshold, gram_cka, rbf_gram
from sparsecore.similarity.conv import ConvMode, num_points, to_points
from sparsecore.similarity.streaming import STREAMING_METRICS, StreamingCompare

METRICS: dict[str, tuple[str, ...]] = {
    **STREAMING_METRICS,
    "rbf_cka": ("threshold", "debiased"),
}


@contextlib.contextmanager
def _phase(timings: dict[str, float] | None, name: str, device: torch.device) -> Iterator[None]:
    """Add the wall time of the block to timings[name] (synchronizing CUDA around it)."""
    if timings is None:
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def compare(
    acts_a: Mapping[str, Tensor],
    acts_b: Mapping[str, Tensor],
    metric: str = "svcca",
    pairs: Pairs = "diagonal",
    *,
    conv: ConvMode = "positions",
    dtype: torch.dtype | None = None,
    timings: dict[str, float] | None = None,
    **options: bool | int | float,
) -> SimilarityMatrix:
    """Compare layer activations of two models (dicts name -> (n, p) or (N, C, H, W)).

    metric: "svcca" (options keep / variance / spectrum as in `svcca`; variance=0.99 by
    default), "cca" (mean canonical correlation; the same options reduce first), "pwcca",
    "linear_cka" / "rbf_cka" (options debiased, threshold), or "procrustes" (a distance in
    [0, 2]). pairs: "diagonal" (layer i with layer i, by position: it warns when the names
    differ), "all", or a list of (name_a, name_b); `StreamingCompare` has the same default.
    conv: how conv activations become data points (see `sparsecore.similarity.conv`).
    dtype: float64 on CPU, float32 on GPU by default. timings: if given, filled with
    seconds per phase (factor, cross, small).
    """
    check_options(metric, options, METRICS)
    names_a, names_b = list(acts_a), list(acts_b)
    if not names_a or not names_b:
        raise ValueError("compare needs at least one layer on each side")
    pair_list = resolve_pairs(names_a, names_b, pairs)
    check_points(
        names_a,
        names_b,
        [num_points(torch.as_tensor(acts_a[k]).shape, conv) for k in names_a],
        [num_points(torch.as_tensor(acts_b[k]).shape, conv) for k in names_b],
        pair_list,
    )
    if metric in CCA_METRICS:
        return _compare_cca(acts_a, acts_b, metric, pair_list, conv, dtype, timings, options)
    if metric == "rbf_cka":
        return _compare_rbf(acts_a, acts_b, pair_list, conv, dtype, options)
    first = torch.as_tensor(next(iter(acts_a.values())))
    with _phase(timings, "cross", first.device):
        acc = StreamingCompare(
            [(names_a[i], names_b[j]) for i, j in pair_list],
            conv=conv,
            dtype=compute_dtype(first, dtype),
        )
        acc.update(acts_a, acts_b)
        return acc.result(metric, **options)


def _points(
    acts: Mapping[str, Tensor], name: str, conv: ConvMode, dtype: torch.dtype | None
) -> Tensor:
    return rescale(as_activations(to_points(torch.as_tensor(acts[name]), conv), name, dtype))


def _compare_cca(
    acts_a: Mapping[str, Tensor],
    acts_b: Mapping[str, Tensor],
    metric: str,
    pairs: list[tuple[int, int]],
    conv: ConvMode,
    dtype: torch.dtype | None,
    timings: dict[str, float] | None,
    options: dict,
) -> SimilarityMatrix:
    reduce = reduction_of(metric, options)
    names_a, names_b = list(acts_a), list(acts_b)
    device = torch.as_tensor(next(iter(acts_a.values()))).device
    fa: list[Factor | None] = [None] * len(names_a)
    fb: list[Factor | None] = [None] * len(names_b)
    with _phase(timings, "factor", device):
        # Each layer is factored once, then its float64 copy is freed before the next one.
        for i in sorted({i for i, _ in pairs}):
            fa[i] = factor(_points(acts_a, names_a[i], conv, dtype), reduce=reduce)
        for j in sorted({j for _, j in pairs}):
            fb[j] = factor(_points(acts_b, names_b[j], conv, dtype), reduce=reduce)
    named = [(f"{nm} (first set)", f) for nm, f in zip(names_a, fa) if f] + [
        (f"{nm} (second set)", f) for nm, f in zip(names_b, fb) if f
    ]
    warn_layers(
        [nm for nm, f in named if bool(f.dead.all())],
        {nm: int(f.count) for nm, f in named if bool(f.rank_limited)},
        reduce,
        f"compare ({metric})",
        level=4,
    )
    crowded = [(i, j) for i, j in pairs if fa[i].n <= int(fa[i].count) + int(fb[j].count)]
    if crowded:
        i, j = crowded[0]
        warn_few_points(
            fa[i].n,
            int(fa[i].count),
            int(fb[j].count),
            f"compare ({len(crowded)} layer pairs, e.g. {names_a[i]} vs {names_b[j]})",
            widths=(fa[i].dead.shape[-1], fb[j].dead.shape[-1]),
        )
    with _phase(timings, "cross", device):
        blocks = cross_blocks(
            [f.u if f else None for f in fa], [f.u if f else None for f in fb], pairs
        )
    with _phase(timings, "small", device):
        values = cca_values(metric, pairs, blocks, fa, fb)
        like = next(f.s for f in fa if f is not None)
        matrix = to_matrix(values, len(names_a), len(names_b), like)
    return SimilarityMatrix(
        metric,
        names_a,
        names_b,
        matrix,
        {names_a[i]: int(f.dead.sum()) for i, f in enumerate(fa) if f is not None},
        {names_b[j]: int(f.dead.sum()) for j, f in enumerate(fb) if f is not None},
    )


def _compare_rbf(
    acts_a: Mapping[str, Tensor],
    acts_b: Mapping[str, Tensor],
    pairs: list[tuple[int, int]],
    conv: ConvMode,
    dtype: torch.dtype | None,
    options: dict,
) -> SimilarityMatrix:
    """RBF CKA: one n x n Gram per layer (the second set's are kept; memory O(L n^2))."""
    threshold = check_threshold(options.get("threshold", 1.0))
    debiased = bool(options.get("debiased", False))
    names_a, names_b = list(acts_a), list(acts_b)
    dead_a: dict[str, int] = {}
    dead_b: dict[str, int] = {}

    def gram(acts: Mapping[str, Tensor], name: str, dead: dict[str, int]) -> Tensor:
        x = _points(acts, name, conv, dtype)
        norm = torch.linalg.vector_norm(center(x), dim=-2)
        dead[name] = int(dead_channels(norm, x.abs().amax(dim=-2), x.shape[-2]).sum())
        return rbf_gram(x, threshold, name, "compare (rbf_cka)")

    grams_b = {j: gram(acts_b, names_b[j], dead_b) for j in sorted({j for _, j in pairs})}
    values = {}
    for i in sorted({i for i, _ in pairs}):
        ka = gram(acts_a, names_a[i], dead_a)
        for j in [j for a, j in pairs if a == i]:
            values[(i, j)] = gram_cka(ka, grams_b[j], debiased=debiased)
    like = next(iter(values.values()))
    return SimilarityMatrix(
        "rbf_cka",
        names_a,
        names_b,
        to_matrix(values, len(names_a), len(names_b), like),
        dead_a,
        dead_b,
    )
