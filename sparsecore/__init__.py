"""sparsecore: pruned networks that are really faster than their dense twins, and the
science of pruning (magnitude / re-init / random sparse init; SVCCA, PWCCA, CKA).

Importing sparsecore never initialises CUDA; a missing C++ extension gives one warning and
the ops fall back to their pure-PyTorch references.
"""

from sparsecore import _ext
from sparsecore._dispatch import NotSupportedError, use_backend
from sparsecore._ext import has_cpu_ext

__version__ = "0.1.0"

__all__ = ["NotSupportedError", "use_backend", "has_cpu_ext", "optimize", "explain",
           "empty_cache", "_ext", "__version__"]


def empty_cache() -> int:
    """Frees the memory the C++ kernels keep for their outputs between calls, and returns
    how many bytes that was (0 without the extension).

    The outputs of the inference kernels (the layers of an optimized model) come from an
    arena: a freed output's block is kept for the next output of its size, so a model run
    again and again does not page-fault its activations in on every call. The arena keeps at
    most `SPARSECORE_CPU_ARENA_MB` MiB (default 1024; 0 keeps nothing) of freed blocks.
    """
    if not has_cpu_ext():
        return 0
    import torch

    return int(torch.ops.sparsecore._arena_release_cpu())


def __getattr__(name: str) -> object:
    # optimize / explain import the layers and ops on first use, not with the package.
    if name == "optimize":
        from sparsecore.nn.optimize import optimize

        return optimize
    if name == "explain":
        from sparsecore.nn.explain import explain

        return explain
    raise AttributeError(f"module 'sparsecore' has no attribute {name!r}")
