"""Loads the compiled C++ CPU kernels: one extension module per instruction set.

The build makes `sparsecore._C` (portable), `sparsecore._C_avx2` and `sparsecore._C_avx512`
from the same sources (setup.py); all register the same ops, so exactly one is imported: the
best the running CPU has, as torch reports it (`torch.backends.cpu.get_cpu_capability()`),
never what the build machine had. `SPARSECORE_ISA=scalar|avx2|avx512` picks a lower one (for
tests and comparisons); one the CPU lacks is refused with a warning.

Import never crashes and never initialises CUDA: a missing or broken extension gives a
single warning, and every op then runs on its pure-PyTorch reference.
"""

from __future__ import annotations

import importlib
import os
import warnings

# Best first; each entry: (name, module, torch capabilities that can run it).
ISAS = (
    ("avx512", "sparsecore._C_avx512", ("AVX512",)),
    ("avx2", "sparsecore._C_avx2", ("AVX512", "AVX2")),
    ("scalar", "sparsecore._C", None),  # any CPU
)

_cpu_error: str | None = None
_cpu_isa: str | None = None
_warned = False


def _warn(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def cpu_capability() -> str:
    """What torch says this CPU runs ("AVX512", "AVX2", "DEFAULT", ...)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def runnable_isas() -> list[str]:
    """The variants this CPU can run, best first."""
    cap = cpu_capability()
    return [name for name, _, caps in ISAS if caps is None or cap in caps]


def _load_cpu() -> None:
    global _cpu_isa, _cpu_error
    if os.environ.get("SPARSECORE_DISABLE_EXT", "0") == "1":
        _cpu_error = "ImportError: disabled by SPARSECORE_DISABLE_EXT=1"
        _warn(f"sparsecore: the C++ extension is not loaded ({_cpu_error}); ops run on "
              "their pure-PyTorch reference.")
        return
    try:
        import torch  # noqa: F401  (loads libtorch, which the extension links against)

        order = runnable_isas()
    except Exception as exc:  # pragma: no cover - torch itself is broken
        _cpu_error = f"{type(exc).__name__}: {exc}"
        return
    forced = os.environ.get("SPARSECORE_ISA", "").strip().lower()
    if forced:
        known = [name for name, _, _ in ISAS]
        if forced not in known:
            _warn(f"sparsecore: SPARSECORE_ISA={forced!r} is not one of {known}; ignored")
        elif forced not in order:
            _warn(f"sparsecore: SPARSECORE_ISA={forced} needs a CPU this one is not "
                  f"({cpu_capability()}); using the best it runs instead")
        else:
            order = order[order.index(forced):]
    errors = []
    for name in order:
        module = dict((n, m) for n, m, _ in ISAS)[name]
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or an undefined symbol from a stale build
            errors.append(f"{module}: {type(exc).__name__}: {exc}")
            continue
        _cpu_isa = name
        if errors and name == "scalar" and order[0] != "scalar":
            _warn("sparsecore: the SIMD builds of the C++ extension could not be loaded ("
                  + "; ".join(errors) + "); running its portable build")
        return
    _cpu_error = "; ".join(errors) or "no build of the extension found"
    _warn("sparsecore: the C++ extension could not be loaded "
          f"({_cpu_error}); ops run on their pure-PyTorch reference. "
          "Build it with `pip install --no-build-isolation -e .` or `make ext`.")


def has_cpu_ext() -> bool:
    """True when one build of the C++ CPU kernels is loaded."""
    return _cpu_isa is not None


def cpu_ext_error() -> str | None:
    """Why the CPU extension is not loaded (None when it is)."""
    return _cpu_error


def cpu_isa() -> str | None:
    """The instruction set of the loaded kernels ("avx512", "avx2", "scalar"), or None."""
    return _cpu_isa


_load_cpu()
