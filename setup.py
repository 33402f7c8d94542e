"""Build script: decides `ext_modules` only; metadata lives in pyproject.toml.

- `sparsecore._C`: a CppExtension, always (OpenMP, -O3, AVX2/FMA when the build machine's
  compiler and CPU support them; every kernel also has a scalar path that is always correct).
- `SPARSECORE_BUILD_EXT=0` builds none (the package then runs on its reference ops).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _compiler_accepts(flags: list[str]) -> bool:
    """True when the C++ compiler builds a trivial file with these flags."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        cmd = [cxx, *flags, src, "-o", os.path.join(tmp, "t")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def _ext_modules() -> tuple[list, dict]:
    if os.environ.get("SPARSECORE_BUILD_EXT", "1") == "0":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG"]
    # SIMD: only where this machine runs it; the portable build is the scalar path.
    if os.environ.get("SPARSECORE_NATIVE", "1") != "0" and _cpu_has("avx2") and _cpu_has("fma"):
        if _compiler_accepts(["-mavx2", "-mfma", "-mf16c"]):
            cxx_flags += ["-mavx2", "-mfma", "-mf16c"]
    cpu_sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # Headers (csrc/cpu/*.h): with ninja, BuildExtension rebuilds every time and
    # ninja's depfiles recompile the objects whose includes changed; `depends` covers the
    # fallback without ninja, where setuptools skips an extension newer than these files.
    cpu_headers = sorted(glob.glob("csrc/**/*.h", recursive=True))
    exts = [
        CppExtension(
            "sparsecore._C",
            cpu_sources,
            depends=cpu_headers,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]
    use_ninja = shutil.which("ninja") is not None
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _ext_modules()

setup(
    packages=[
        "sparsecore",
        "sparsecore.nn",
        "sparsecore.ops",
        "sparsecore.prune",
        "sparsecore.similarity",
        "sparsecore.study",
        "sparsecore.models",
        "sparsecore.kernels",
    ],
    package_dir={"sparsecore.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
