"""Sparse layers: unstructured (CSR) SparseLinear / SparseConv2d and block-sparse (BSR)
BlockSparseLinear / BlockSparseConv2d, `sparsify()` to swap a pruned model's layers for them,
and `densify()` to swap them back (masked dense layers)."""

from sparsecore.nn.blocksparse import BlockSparseConv2d, BlockSparseLinear  # noqa: F401  (BSR layers)
from sparsecore.nn.conv import SparseConv2d
from sparsecore.nn.functional import sparse_conv2d, sparse_linear
from sparsecore.nn.linear import SparseLinear, magnitude_mask
from sparsecore.nn.sparsify import SparsifyConfig, SparsifyReport, densify, sparsify

__all__ = [
    "BlockSparseConv2d",
    "BlockSparseLinear",
    "SparseConv2d",
    "SparseLinear",
    "SparsifyConfig",
    "SparsifyReport",
    "densify",
    "magnitude_mask",
    "sparse_conv2d",
    "sparse_linear",
    "sparsify",
]
