"""The build's lock lives inside the repository, never at a shared path in /tmp."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_build_lock_is_inside_the_repository() -> None:
    # `make -n` prints the recipe without running it; the stamp is made to look fresh so only
    # the ext recipe is printed.
    out = subprocess.run(["make", "-n", "-W", "pyproject.toml", "ext"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    flock = [line for line in out.splitlines() if line.strip().startswith("flock")]
    assert flock, out
    for line in flock:
        assert "/tmp" not in line
        lock = line.split()[[i for i, w in enumerate(line.split()) if w.endswith(".lock")][0]]
        assert not os.path.isabs(lock) or lock.startswith(ROOT)
        assert "-w" in line.split(), "a held lock must not block the build forever"
