"""Triton kernels, installed as `sparsecore.kernels` (one module per op).

Nothing here imports triton at package import time: each op module imports it itself, and
is imported only when its backend is chosen.
"""
