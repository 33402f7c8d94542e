"""The one op surface: torch.library custom ops with fake (meta) kernels and pure-PyTorch
references, each dispatched among backends by sparsecore._dispatch (forced with
`use_backend(...)`; refusals list every backend's reasons).

- `sparsecore.ops.csr`: unstructured sparse (CSR) dsd, SDDMM and Conv2d with its gradients,
  the CPU dense crossover (CSR_DENSE_BELOW, csr_conv_crossover, csr_runs_dense), the
  layers' choice of the batch-last conv kernels for small outputs (CSR_BATCH_LAST_MAX_PIXELS,
  csr_conv_batch_last), and the geometry of the direct stride-1 input gradient
  (flipped_conv_padding).
- `sparsecore.ops.bsr`: block-sparse (BSR) dsd, block SDDMM and Conv2d with its gradients.

Every public name of both is importable from here. Importing the package also registers
the fake kernels of the C++ helpers that the layers call directly (sparsecore.ops._fakes),
for torch.compile and torch.export.
"""

from sparsecore.ops import _fakes  # noqa: F401  (registers fake kernels)
from sparsecore.ops.bsr import bsr_conv2d, bsr_conv2d_dw, bsr_conv2d_dx, bsr_dsd, bsr_sddmm
from sparsecore.ops.csr import (
    CSR_BATCH_LAST_MAX_PIXELS,
    CSR_DENSE_BELOW,
    csr_conv2d,
    csr_conv2d_dw,
    csr_conv2d_dx,
    csr_conv_batch_last,
    csr_conv_crossover,
    csr_dsd,
    csr_runs_dense,
    csr_sddmm,
    csr_tile_values,
    flipped_conv_padding,
)

__all__ = [
    "CSR_BATCH_LAST_MAX_PIXELS",
    "CSR_DENSE_BELOW",
    "bsr_conv2d",
    "bsr_conv2d_dw",
    "bsr_conv2d_dx",
    "bsr_dsd",
    "bsr_sddmm",
    "csr_conv2d",
    "csr_conv2d_dw",
    "csr_conv2d_dx",
    "csr_conv_batch_last",
    "csr_conv_crossover",
    "csr_dsd",
    "csr_runs_dense",
    "csr_sddmm",
    "csr_tile_values",
    "flipped_conv_padding",
]
