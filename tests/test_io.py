"""sparsecore._io: loads run no code and name the file that is not a checkpoint, a full disk
says so, and what killed writes leave behind is cleaned up."""

from __future__ import annotations

import os

import pytest
import torch

from sparsecore import _io


def test_payload_is_refused_and_runs_no_code(tmp_path, write_payload) -> None:
    marker = tmp_path / "pwned"
    write_payload(tmp_path / "evil.pt", marker)
    with pytest.raises(_io.CheckpointError, match="not a sparsecore checkpoint") as exc:
        _io.load_checkpoint(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    assert str(tmp_path / "evil.pt") in str(exc.value) and "open" in str(exc.value)
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is real
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n", "truncated"])
def test_foreign_or_truncated_file_names_it(tmp_path, content) -> None:
    path = tmp_path / "checkpoint.pt"
    if content == "truncated":
        torch.save({"model": torch.zeros(1000)}, path)
        content = path.read_bytes()[:500]
    path.write_bytes(content)
    with pytest.raises(_io.CheckpointError, match="not a sparsecore checkpoint") as exc:
        _io.load_checkpoint(str(path), hint="; pass --fresh")
    msg = str(exc.value)
    assert str(path) in msg and msg.endswith("--fresh") and "\n" not in msg


def test_missing_keys_and_plain_data(tmp_path) -> None:
    torch.save({"a": 1, "b": [1.5, "x", (2, 3)], "t": torch.ones(3)}, tmp_path / "ok.pt")
    assert _io.load_checkpoint(str(tmp_path / "ok.pt"), keys=("a", "t"))["b"][2] == (2, 3)
    with pytest.raises(_io.CheckpointError, match="no model"):
        _io.load_checkpoint(str(tmp_path / "ok.pt"), keys=("model",))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(_io.CheckpointError, match="a list"):
        _io.load_checkpoint(str(tmp_path / "list.pt"))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("save", [
    lambda p: _io.atomic_save({"w": torch.randn(100_000)}, p),
    lambda p: _io.atomic_write_text(p, "x" * 100_000),
])
def test_full_disk_says_so_and_leaves_nothing(tmp_path, monkeypatch, save) -> None:
    """Writes land on /dev/full (every write fails with ENOSPC)."""
    real_fdopen = os.fdopen

    def full(fd, mode, *a, **k):
        os.close(fd)
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), mode, *a, **k)

    monkeypatch.setattr(_io.os, "fdopen", full)
    target = str(tmp_path / "checkpoint.pt")
    with pytest.raises(OSError, match="no space left on device writing") as exc:
        save(target)
    assert str(exc.value) == f"no space left on device writing {target}"
    assert os.listdir(tmp_path) == []


def test_stale_tmp_files_are_removed(tmp_path) -> None:
    stale = [".checkpoint.pt.ab12cd_9.tmp", ".metrics.jsonl.zzzzzzzz.tmp", "tmpq1w2e3r4.tmp"]
    keep = ["notes.tmp", "checkpoint.pt", ".hidden", "tmp.tmp"]
    for name in stale + keep:
        (tmp_path / name).write_text("x")
    assert sorted(_io.remove_stale_tmp(str(tmp_path), "metrics.jsonl")) == [
        str(tmp_path / ".metrics.jsonl.zzzzzzzz.tmp")]
    assert len(_io.remove_stale_tmp(str(tmp_path))) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_check_writable(tmp_path) -> None:
    _io.check_writable(str(tmp_path / "new" / "run"))
    assert os.listdir(tmp_path / "new" / "run") == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot write to --out .*Not a directory"):
        _io.check_writable(str(tmp_path / "file" / "run"))
    with pytest.raises(OSError, match="cannot write to --out .*too long"):
        _io.check_writable(str(tmp_path / ("a" * 300)))
