"""Loads the compiled extension `sparsecore._C` (the C++ CPU kernels).

Import never crashes and never initialises CUDA: a missing or broken extension gives a
single warning, and every op then runs on its pure-PyTorch reference.
"""

from __future__ import annotations

import importlib
import os
import warnings

_cpu_error: str | None = None
_cpu_loaded = False
_warned = False


def _load_cpu() -> None:
    global _cpu_loaded, _cpu_error, _warned
    try:
        if os.environ.get("SPARSECORE_DISABLE_EXT", "0") == "1":
            raise ImportError("disabled by SPARSECORE_DISABLE_EXT=1")
        import torch  # noqa: F401  (loads libtorch, which _C links against)

        importlib.import_module("sparsecore._C")
        _cpu_loaded = True
    except Exception as exc:  # ImportError, or an undefined symbol from a stale build
        _cpu_error = f"{type(exc).__name__}: {exc}"
        if not _warned:
            _warned = True
            warnings.warn(
                "sparsecore: the C++ extension could not be loaded "
                f"({_cpu_error}); ops run on their pure-PyTorch reference. "
                "Build it with `pip install --no-build-isolation -e .` or `make ext`.",
                RuntimeWarning,
                stacklevel=3,
            )


def has_cpu_ext() -> bool:
    """True when `sparsecore._C` (the C++ CPU kernels) is loaded."""
    return _cpu_loaded


def cpu_ext_error() -> str | None:
    """Why the CPU extension is not loaded (None when it is)."""
    return _cpu_error


_load_cpu()
