"""Build script: decides `ext_modules` only; metadata lives in pyproject.toml.

The C++ CPU kernels are built once per instruction set, as separate extension modules that
register the same ops: `sparsecore._C` (portable: the scalar paths, whatever the compiler
vectorises for the baseline x86-64), `sparsecore._C_avx2` (AVX2 / FMA / F16C) and
`sparsecore._C_avx512` (AVX-512 F / BW / VL / DQ on top). sparsecore/_ext.py imports exactly
one of them at run time, the best the running CPU has, so a build made on one machine runs
on any other. What the build machine's own CPU has does not matter; a variant is left out
only when the compiler refuses its flags.

- `SPARSECORE_BUILD_EXT=0` builds none (the package then runs on its reference ops).
- `SPARSECORE_ISAS=scalar,avx2` builds only the variants named (quicker development builds).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# variant -> (module name, extra compiler flags); the names are those sparsecore/_ext.py loads.
ISA_VARIANTS = {
    "scalar": ("sparsecore._C", []),
    "avx2": ("sparsecore._C_avx2", ["-mavx2", "-mfma", "-mf16c"]),
    "avx512": ("sparsecore._C_avx512", ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw",
                                        "-mavx512vl", "-mavx512dq"]),
}


def _compiler_accepts(flags: list[str]) -> bool:
    """True when the C++ compiler builds a trivial file with these flags."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        cmd = [cxx, *flags, src, "-o", os.path.join(tmp, "t")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def _variant_sources(variant: str, sources: list[str]) -> list[str]:
    """Sources for one variant. The portable one compiles csrc/ itself; the others compile
    one-line wrappers under build/isa/<variant>/ that include it, so that every variant gets
    object files of its own (setuptools names objects after their sources)."""
    if variant == "scalar":
        return sources
    out = []
    folder = os.path.join("build", "isa", variant)
    os.makedirs(folder, exist_ok=True)
    for src in sources:
        wrapper = os.path.join(folder, os.path.basename(src))
        rel = os.path.relpath(os.path.join(ROOT, src), os.path.join(ROOT, folder))
        text = f'#include "{rel}"\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:
            with open(wrapper, "w") as f:
                f.write(text)
        out.append(wrapper)
    return out


def _ext_modules() -> tuple[list, dict]:
    if os.environ.get("SPARSECORE_BUILD_EXT", "1") == "0":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    base_flags = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG"]
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # Headers (csrc/cpu/*.h): with ninja, BuildExtension rebuilds every time and
    # ninja's depfiles recompile the objects whose includes changed; `depends` covers the
    # fallback without ninja, where setuptools skips an extension newer than these files.
    headers = sorted(glob.glob("csrc/**/*.h", recursive=True))
    wanted = os.environ.get("SPARSECORE_ISAS", ",".join(ISA_VARIANTS)).split(",")
    unknown = sorted(set(wanted) - set(ISA_VARIANTS))
    if unknown:
        raise SystemExit(f"SPARSECORE_ISAS: unknown {unknown}; choose from {list(ISA_VARIANTS)}")
    exts = []
    for variant, (name, flags) in ISA_VARIANTS.items():
        if variant not in wanted or (flags and not _compiler_accepts(flags)):
            continue
        exts.append(CppExtension(
            name,
            _variant_sources(variant, sources),
            depends=headers + sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": base_flags + flags},
            extra_link_args=["-fopenmp"],
        ))
    use_ninja = shutil.which("ninja") is not None

    class Build(BuildExtension.with_options(use_ninja=use_ninja)):
        def finalize_options(self) -> None:
            super().finalize_options()
            # One extension at a time: torch writes every extension's build.ninja to the same
            # path, so `build_ext -j N` would build them over each other (ninja itself
            # compiles each extension's sources in parallel).
            self.parallel = None

    return exts, {"build_ext": Build}


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
