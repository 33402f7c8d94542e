"""Import must never touch CUDA, and must work (with one warning) without the extension."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_import_does_not_initialise_cuda() -> None:
    r = _run(
        "import torch, sparsecore, sparsecore.ops, sparsecore.nn\n"
        "assert not torch.cuda.is_initialized(), 'import initialised CUDA'\n"
        "print('ok')"
    )
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_import_without_extension_warns_once() -> None:
    r = _run(
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import sparsecore, sparsecore.ops, sparsecore.nn\n"
        "msgs = [str(x.message) for x in w if 'sparsecore' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert not sparsecore.has_cpu_ext()\n"
        "print('ok')",
        {"SPARSECORE_DISABLE_EXT": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_extension_loaded_in_test_env() -> None:
    """The test environment builds the extension; a silent fallback would hide the kernels."""
    import sparsecore

    assert sparsecore.has_cpu_ext(), sparsecore._ext.cpu_ext_error()
