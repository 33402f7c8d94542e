"""sparsecore: pruned networks that are really faster than their dense twins, and the
science of pruning (magnitude / re-init / random sparse init; SVCCA, PWCCA, CKA).

Importing sparsecore never initialises CUDA; a missing C++ extension gives one warning and
the ops fall back to their pure-PyTorch references.
"""

from sparsecore import _ext
from sparsecore._dispatch import NotSupportedError, use_backend
from sparsecore._ext import has_cpu_ext

__version__ = "0.1.0"

__all__ = ["NotSupportedError", "use_backend", "has_cpu_ext", "optimize", "explain", "_ext",
           "__version__"]


def __getattr__(name: str) -> object:
    # optimize / explain import the layers and ops on first use, not with the package.
    if name == "optimize":
        from sparsecore.nn.optimize import optimize

        return optimize
    if name == "explain":
        from sparsecore.nn.explain import explain

        return explain
    raise AttributeError(f"module 'sparsecore' has no attribute {name!r}")
