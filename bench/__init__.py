"""Benchmarks: `python -m bench <family>` from the repository root (not installed)."""
