"""bench/gpu_check.py (`make gpu-check`) without a GPU: its plan, the benches' flags it passes,
the per-phase time limit, and the runs that stop before the first phase needing CUDA with a
clear message, installing nothing."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
CUDA_PHASES = ["tests", "bench-layers", "bench-layers-bsr", "bench-linalg"]


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/gpu_check.py as a module (bench/ is not installed: imported from the tree)."""
    monkeypatch.syspath_prepend(str(ROOT))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_plan(gpu_check: ModuleType, tmp_path: Path) -> None:
    phases = gpu_check.plan("python3", str(tmp_path))
    assert [p.name for p in phases] == ["install", *CUDA_PHASES]
    install = phases[0]
    assert install.command == ("python3", "-m", "pip", "install", "--no-build-isolation",
                               "--no-deps", "-e", ".")
    assert not install.needs_cuda and all(p.needs_cuda for p in phases[1:])
    assert phases[1].command[1:6] == ("-m", "pytest", "-m", "gpu", "-q")
    assert sum(p.budget_s for p in phases) <= gpu_check.TOTAL_S <= 8 * 60 - 10
    skipped = gpu_check.plan("python3", str(tmp_path), skip_install=True, budgets={"tests": 9})
    assert [p.name for p in skipped] == CUDA_PHASES and skipped[0].budget_s == 9
    with pytest.raises(ValueError, match="no phase named"):
        gpu_check.plan("python3", str(tmp_path), budgets={"test": 9})


def test_bench_flags_select_cuda_rows_on_a_reduced_grid(gpu_check: ModuleType,
                                                       tmp_path: Path) -> None:
    """Each bench accepts the flags the check passes (parsed, nothing timed): CUDA rows only
    and a handful of cases."""
    benches = {p.name: p for p in gpu_check.plan("python3", str(tmp_path))[2:]}
    parsed = {}
    for name, phase in benches.items():
        module = importlib.import_module(phase.command[2])
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        parsed[name] = args = parser.parse_args(list(phase.command[3:]))
        assert args.device == "cuda" and args.tag == "check"
    from bench import layers, layers_bsr

    assert len(list(layers.cases(parsed["bench-layers"]))) == 2
    assert len(list(layers_bsr._cases(parsed["bench-layers-bsr"]))) == len(layers_bsr.QUICK)
    assert parsed["bench-linalg"].quick


def test_phase_time_limit(gpu_check: ModuleType, tmp_path: Path) -> None:
    """A phase past its limit is stopped (its whole process group) and reported."""
    log = gpu_check.Log(str(tmp_path / "log"))
    sleeper = gpu_check.Phase("sleep", (sys.executable, "-c", "import time; time.sleep(60)"), 1,
                              False)
    try:
        result = gpu_check.run_phase(sleeper, 1, log)
    finally:
        log.close()
    assert result["status"] == "timeout" and result["seconds"] < 30


def _run(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path / "out")}
    run = subprocess.run([sys.executable, str(SCRIPT), *flags, "--results", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in run.stdout + run.stderr
    summary = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert (tmp_path / "out" / "gpu-check.log").read_text() == run.stdout.split("copied to")[0]
    return run, summary


def test_dry_run_stops_before_the_first_cuda_phase(tmp_path: Path) -> None:
    run, summary = _run(tmp_path, "--dry-run", "--skip-install")
    assert run.returncode == 2
    listed = [run.stdout.index(f". {name} (CUDA") for name in CUDA_PHASES]
    assert listed == sorted(listed)
    assert "device: none" in run.stdout and "torch " in run.stdout
    assert "\nno CUDA device: stopping before tests\n" in run.stdout
    assert summary["stopped"] == "no CUDA device: stopping before tests"
    assert summary["phases"] == [] and summary["dry_run"]


def test_without_cuda_fails_fast(tmp_path: Path) -> None:
    """Not a dry run: stops before the install, at once."""
    run, summary = _run(tmp_path)
    assert run.returncode == 2
    assert "no CUDA device: stopping before install" in run.stdout
    assert summary["phases"] == []


def test_run_with_a_device(gpu_check: ModuleType, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The bookkeeping of a run on a GPU, with stand-in phases: an install whose C++ build
    fails is retried without the extension, the phases after it still run, and what they
    wrote lands in OUT with the log and the summary."""
    made = tmp_path / "bench-check-gpu.json"
    py = sys.executable
    install = ("import os, sys; "
               "sys.exit(0 if os.environ.get('SPARSECORE_BUILD_EXT') == '0' else 1)")
    phases = [
        gpu_check.Phase("install", (py, "-c", install), 20, False),
        gpu_check.Phase("tests", (py, "-c", "print('1 passed')"), 20, True),
        gpu_check.Phase("bench", (py, "-c", f"open({str(made)!r}, 'w').write('{{}}')"), 20,
                        True, (str(made),)),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda *a, **k: phases)
    info = {**gpu_check.environment(), "cuda_available": True, "device": "stand-in",
            "capability": "9.0", "memory_gib": 80.0, "device_count": 1}
    info.pop("torch_error", None)
    monkeypatch.setattr(gpu_check, "environment", lambda: info)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert gpu_check.main(["--results", str(tmp_path)]) == 1  # the install failed
    summary = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert [(r["name"], r["status"]) for r in summary["phases"]] == [
        ("install", "failed"), ("install-no-ext", "ok"), ("tests", "ok"), ("bench", "ok")]
    assert summary["stopped"] is None
    assert (tmp_path / "out" / made.name).exists()
    assert "1 passed" in (tmp_path / "out" / "gpu-check.log").read_text()
