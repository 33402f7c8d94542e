"""bench/report.py: RESULTS.md from a results folder (synthetic JSON, nothing is timed)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from bench import common, report


def _row(op: str, shape: str, speedup: float) -> dict:
    return {"op": op, "shape": shape, "dtype": "float32", "device": "cpu", "backend": "cpp",
            "kernel": "jacobi", "torch_ms": 2.0 * speedup, "sparsecore_ms": 2.0,
            "speedup": speedup, "value_err": 1e-6}


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A results folder as the bench leaves it: a linalg table of record written before the
    ISA was recorded, and one repeated run in runs/ (one row repeats the record's svd row,
    one is a shape the record lacks)."""
    root = tmp_path / "results"
    (root / "runs").mkdir(parents=True)
    monkeypatch.setattr(common, "RESULTS_DIR", str(root))
    record = common.save_results("linalg", [_row("svd", "8x4x4", 2.0),
                                            _row("eigh", "8x4x4", 1.5)])
    data = json.loads(Path(record).read_text())
    del data["machine"]["isa"]  # an old file
    Path(record).write_text(json.dumps(data))
    run = common.save_results("linalg", [_row("svd", "8x4x4", 3.0), _row("svd", "16x4x4", 4.0)],
                              tag="target-1")
    os.replace(run, root / "runs" / os.path.basename(run))
    return root


def test_machine_info_records_isa() -> None:
    info = common.machine_info()
    assert {"cpu", "isa", "cores", "torch_threads", "torch", "date"} <= set(info)


def test_report_table_spread_and_gpu_line(results: Path) -> None:
    text = report.render(str(results))
    lines = text.splitlines()
    assert "Table of record: `results/linalg-cpu.json`" in text
    assert "ISA not recorded" in text
    svd = next(ln for ln in lines if ln.startswith("| svd | 8x4x4 |"))
    assert "| 2 |" in svd and svd.endswith("| 2-3 (2) |")  # record 2.0, the run 3.0
    eigh = next(ln for ln in lines if ln.startswith("| eigh | 8x4x4 |"))
    assert eigh.endswith("|  |")  # measured once: no spread
    assert "`linalg-target-1-cpu`" in text and "1 of 2 rows match" in text
    assert any(ln.startswith("| svd | 16x4x4 |") and "linalg-target-1-cpu" in ln for ln in lines)
    assert "No table of record yet." in text  # the other families
    assert lines[-1] == report.GPU_NONE
    assert report.render(str(results)) == text  # deterministic


def test_report_main_writes_next_to_results(results: Path) -> None:
    args = argparse.Namespace(results=str(results), out=None)
    assert report.main(args) == 0
    assert (results.parent / "RESULTS.md").read_text() == report.render(str(results))


def test_report_gpu_line_names_cuda_runs(results: Path) -> None:
    path = results / "runs" / "linalg-target-1-cpu.json"
    data = json.loads(path.read_text())
    data["rows"][0]["device"] = "cuda"
    data["machine"]["gpu"] = "NVIDIA H100"
    path.write_text(json.dumps(data))
    last = report.render(str(results)).splitlines()[-1]
    assert last == "GPU: measured on NVIDIA H100 (`runs/linalg-target-1-cpu`)"
