"""Files: atomic writes (a kill leaves either the old file or the new one, never half of one),
clean-up after killed writes, and loads of checkpoints and model files that run no code.

Checkpoints and model files hold only tensors, plain containers (dict, list, tuple) and
primitive types, so `torch.load(..., weights_only=True)` reads them; a file that needs
anything else (a pickled object whose loading would call a function) is refused.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from typing import Any

import torch

# What a killed atomic write leaves behind: `.<target name>.<8 random characters>.tmp`, and
# `tmp<8 random characters>.tmp` (the names of earlier versions).
_TMP_NAME = re.compile(r"(\.(?P<target>.+)\.|tmp)[a-z0-9_]{8}\.tmp")
_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(ValueError):
    """A file that should be a sparsecore checkpoint or model file is not one (foreign,
    truncated, or holding more than tensors and plain data)."""


def _disk_full(exc: BaseException) -> bool:
    """Whether `exc` or an exception it was raised from is "no space left on device" (torch
    reports a failed write of its zip container as "unexpected pos", with the OSError as the
    context)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _write_error(path: str, exc: BaseException) -> OSError:
    """A one-line OSError naming the file (errno kept)."""
    if _disk_full(exc):
        err = OSError(f"no space left on device writing {path}")
        err.errno = errno.ENOSPC
        return err
    assert isinstance(exc, OSError)
    err = OSError(f"cannot write {path}: {exc.strerror or exc}")
    err.errno = exc.errno
    return err


def _atomic_write(path: str, mode: str, write: Any) -> None:
    """write(f) into a temporary file in the same folder, fsync, then rename over `path`:
    a kill leaves either the old file or the new one, never half of one (and at worst a
    temporary file that `remove_stale_tmp` deletes on the next start)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)[:64]}.",
                                   suffix=".tmp")
    except OSError as exc:
        raise _write_error(path, exc) from exc
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make results private to one user
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) or _disk_full(exc):
            raise _write_error(path, exc) from exc
        raise


def atomic_save(obj: Any, path: str) -> None:
    """torch.save, atomically. `obj` must be loadable with weights_only=True (tensors,
    plain containers, primitive types)."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    """Write text, atomically."""
    _atomic_write(path, "w", lambda f: f.write(text))


def remove_stale_tmp(folder: str, target: str | None = None) -> list[str]:
    """Delete the temporary files that killed atomic writes left in `folder` (only those of
    file name `target` when given); returns their paths."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        m = _TMP_NAME.fullmatch(name)
        if m is None or (target is not None and m["target"] != target[:64]):
            continue
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


def check_writable(folder: str, what: str = "--out") -> None:
    """Create `folder` if needed and write (then delete) a file in it, so that a read-only,
    missing or too-long path fails before any work, not after it. Raises OSError."""
    try:
        os.makedirs(folder or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=".checkpoint.pt.", suffix=".tmp")
    except OSError as exc:
        err = OSError(f"cannot write to {what} {folder}: {exc.strerror or exc}")
        err.errno = exc.errno
        raise err from exc
    os.close(fd)
    os.unlink(tmp)


def _reason(exc: Exception) -> str:
    """One line on why torch.load failed."""
    text = str(exc)
    if "Weights only load failed" in text:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = f"loading it would call {m.group(1)}" if m else "it holds objects"
        return f"{what}; only tensors and plain data are loaded"
    return "truncated, or not a file written by torch.save"


def load_checkpoint(path: str, *, keys: tuple[str, ...] = (), hint: str = "",
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """torch.load(path, weights_only=True): a dict of tensors and plain data, never code.

    keys: the entries a file of this kind has. A file that is not one (foreign, truncated,
    holding objects, missing `keys`) raises CheckpointError naming it, followed by `hint`
    (what to do); a missing or unreadable file raises the OSError.
    """
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path} is not a sparsecore checkpoint: {_reason(exc)}"
                              f"{hint}") from exc
    missing = [k for k in keys if k not in obj] if isinstance(obj, dict) else list(keys)
    if not isinstance(obj, dict) or missing:
        held = f"a {type(obj).__name__}" if not isinstance(obj, dict) else \
            f"no {', '.join(missing)}"
        raise CheckpointError(f"{path} is not a sparsecore checkpoint ({held}){hint}")
    return obj
