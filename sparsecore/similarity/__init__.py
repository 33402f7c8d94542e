"""Representation similarity: does the pruned network compute what the original did?

Metrics on activations X (..., n, p) and Y (..., n, q) (n data points, p and q channels):

- `cca` (all canonical correlations), `svcca` (Raghu et al. 2017), `pwcca` (Morcos et al.
  2018): exact, through QR/SVD of the centered data.
- `linear_cka`, `rbf_cka` (Kornblith et al. 2019), biased or debiased.
- `procrustes`: the orthogonal Procrustes distance.
- `dft_cca`: per-frequency CCA of conv layers (the DFT route of Raghu et al.).

Layer by layer: `capture` collects activations of named modules, `compare` computes a
metric for every requested pair of layers (each layer factored once, every pair a GEMM
plus a batched small SVD), `StreamingCompare` does the same from moments accumulated over
chunks when the activations do not fit in memory.

Defaults and conventions: float64 on CPU; float32 on GPU, `dtype=torch.float64` for
reference numbers. The float32 accuracy check (tests/test_similarity.py): with channels on
scales six decades apart (cond 1e6) the QR route stays within 1e-5 of float64 while the
float32 covariance route is off by O(1); float32 keeps directions down to 4 sqrt(p) eps32
(~1e-5 of the largest, after scaling channels to unit norm), so for layers whose spectrum
goes below that, ask for float64. Channels are
centered; dead (constant) channels are dropped and reported; a side with no live channel
gives NaN with a warning; n <= p + q warns (the correlations become trivially 1); NaN/Inf
inputs raise ValueError. Each side is first scaled by a power of two (exact, and invisible
to every metric), so no metric overflows or underflows whatever the activations' scale.
Bounded metrics are clamped to their range: CCA-family and biased CKA to [0, 1], debiased
CKA to [-1, 1], Procrustes to [0, 2].

Rows are data points: activations laid out as (neurons, data points), as google/svcca's
code takes them, must be transposed. SVCCA's reduction is `keep=k` (a number of
directions) or `variance=f` (the fewest directions explaining that fraction of the
variance, i.e. of the squared singular values; `spectrum="singular_values"` takes the
fraction of plain singular values, as google/svcca's tutorial does). `svcca` and `pwcca`
with `return_details=True` return the `CCAResult` (directions kept, correlations, PWCCA
weights) instead of the value.
"""

from sparsecore.similarity._allpairs import SimilarityMatrix
from sparsecore.similarity.capture import capture
from sparsecore.similarity.cca import CCAResult, cca, pwcca, svcca
from sparsecore.similarity.cka import linear_cka, rbf_cka
from sparsecore.similarity.compare import METRICS, compare
from sparsecore.similarity.conv import to_points
from sparsecore.similarity.dft import dft_cca
from sparsecore.similarity.procrustes import procrustes
from sparsecore.similarity.streaming import StreamingCompare

__all__ = [
    "CCAResult",
    "METRICS",
    "SimilarityMatrix",
    "StreamingCompare",
    "capture",
    "cca",
    "compare",
    "dft_cca",
    "linear_cka",
    "pwcca",
    "procrustes",
    "rbf_cka",
    "svcca",
    "to_points",
]
