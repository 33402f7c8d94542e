"""Atomic file writes: a kill leaves either the old file or the new one, never half of one
(checkpoints, model files, a study's results and report, bench results)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch


def _atomic_write(path: str, mode: str, write: Any) -> None:
    """write(f) into a temporary file in the same folder, fsync, then rename over `path`:
    a kill leaves either the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make results private to one user
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """torch.save, atomically."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    """Write text, atomically."""
    _atomic_write(path, "w", lambda f: f.write(text))
