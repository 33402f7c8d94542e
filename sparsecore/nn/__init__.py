from sparsecore.nn.blocksparse import BlockSparseConv2d, BlockSparseLinear  # noqa: F401  (BSR layers)
