"""The GPU check in one command: `make gpu-check` or `python bench/gpu_check.py`.

On a machine with a CUDA device, from the repository root and with that machine's own
python (never .venv): report the device and the python / torch / triton / CUDA versions;
install the package into this python (`pip install --no-build-isolation --no-deps -e .`,
the C++ extension built against its torch); run every `gpu`-marked test (each op, forward
and backward, against a float64 dense reference); then the GPU rows of the layers,
layers-bsr and linalg benches on a reduced grid. Each phase runs under a time limit: its
budget plus what earlier phases left unused, never the budgets of the phases after it; all
of them together under TOTAL_S (eight minutes with the environment report and the copies).
A phase past its limit gets SIGINT (pytest then reports what it ran), then SIGKILL.

Results go to bench/results/: the benches' JSON (`*-check-gpu.json`), gpu-check.json (the
environment and what each phase did), gpu-check-pytest.xml and gpu-check.log (everything
printed). With the environment variable OUT set they are copied there too.

Without a CUDA device the check stops before the first phase it cannot run, printing
"no CUDA device: stopping before <phase>" and exiting with status 2: at once, or with
--dry-run after the phases that need no device (the install; --skip-install leaves it
out). Exit status 1: a phase failed or ran out of time; 0: every phase passed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_RESULTS = os.path.join(ROOT, "bench", "results")
# Whole run under eight minutes: the phases' budgets add up to at most TOTAL_S.
TOTAL_S = 470
# The install's second try, without the C++ extension, after the first one failed.
INSTALL_NO_EXT_S = 60
# Seconds a timed-out phase gets after SIGINT (pytest then prints what it ran) before SIGKILL.
GRACE_S = 10
# What a phase needs besides torch; reported (with versions) before anything runs.
PACKAGES = ("torch", "triton", "pytest", "numpy", "scipy", "matplotlib", "scikit-learn",
            "tqdm", "setuptools", "ninja")
# Bench flags: only CUDA rows, a reduced grid, results tagged "check" (<family>-check-gpu.json).
BENCHES = {
    "bench-layers": ("bench.layers", "layers", 40,
                     ["--device", "cuda", "--shape", "4096x4096,128@16", "--batch", "64",
                      "--sparsity", "0.9,0.98", "--no-plot"]),
    "bench-layers-bsr": ("bench.layers_bsr", "layers-bsr", 55,
                         ["--device", "cuda", "--quick", "--no-plot"]),
    "bench-linalg": ("bench.linalg", "linalg", 40, ["--device", "cuda", "--quick"]),
}


@dataclass(frozen=True)
class Phase:
    """One step of the check: a command run from the repository root."""

    name: str
    command: tuple[str, ...]
    budget_s: int
    needs_cuda: bool
    outputs: tuple[str, ...] = ()  # files it writes, copied to OUT
    env: dict[str, str] = field(default_factory=dict)


def plan(python: str, results: str, skip_install: bool = False,
         budgets: dict[str, int] | None = None) -> list[Phase]:
    """The phases in order. python: the interpreter that installs and runs everything;
    results: where the pytest report goes; budgets: seconds per phase name, overriding."""
    budgets = budgets or {}
    phases = []
    if not skip_install:
        # No network on the GPU machines: no index, no version check; a system python that
        # is marked externally managed still takes the editable install.
        pip_env = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                   "PIP_BREAK_SYSTEM_PACKAGES": "1"}
        phases.append(Phase("install", (python, "-m", "pip", "install", "--no-build-isolation",
                                        "--no-deps", "-e", "."), 150, False, env=pip_env))
    xml = os.path.join(results, "gpu-check-pytest.xml")
    phases.append(Phase("tests", (python, "-m", "pytest", "-m", "gpu", "-q", "-p",
                                  "no:cacheprovider", "--continue-on-collection-errors",
                                  "--durations=15", f"--junitxml={xml}"), 180, True, (xml,)))
    for name, (module, family, budget, flags) in BENCHES.items():
        out = os.path.join(BENCH_RESULTS, f"{family}-check-gpu.json")
        phases.append(Phase(name, (python, "-m", module, *flags, "--tag", "check"), budget,
                            True, (out,)))
    unknown = set(budgets) - {p.name for p in phases}
    if unknown:
        raise ValueError(f"no phase named {sorted(unknown)}; phases: {[p.name for p in phases]}")
    return [replace(p, budget_s=budgets.get(p.name, p.budget_s)) for p in phases]


class Log:
    """Prints to stdout and appends to the log file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: TextIO = open(path, "w", encoding="utf-8")

    def __call__(self, text: str = "") -> None:
        self.write(text + "\n")

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.file.write(text)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _output_line(command: list[str], containing: str = "") -> str | None:
    """The first line of the command's output that holds `containing` (None if it fails)."""
    if shutil.which(command[0]) is None:
        return None
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.strip() for line in out.splitlines() if containing in line and line.strip()),
                None)


def environment() -> dict[str, Any]:
    """This python, the packages the phases need, the CUDA toolchain and the device."""
    info: dict[str, Any] = {
        "python": sys.executable, "python_version": platform.python_version(),
        "packages": {p: _version(p) for p in PACKAGES},
        "nvcc": _output_line(["nvcc", "--version"], "release"),
        "driver": _output_line(["nvidia-smi", "--query-gpu=driver_version",
                                "--format=csv,noheader"]),
        "cuda_available": False,
    }
    try:
        import torch
    except Exception as exc:  # no torch, or a broken one: nothing can run
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
        return info
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info["device"] = props.name
        info["capability"] = f"{props.major}.{props.minor}"
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        info["device_count"] = torch.cuda.device_count()
    return info


def describe(info: dict[str, Any]) -> list[str]:
    """The environment as report lines."""
    pk = info["packages"]
    device = (f"{info['device']} (sm_{info['capability'].replace('.', '')}, "
              f"{info['memory_gib']} GiB, {info['device_count']} visible)"
              if info["cuda_available"] else "none")
    lines = [f"device: {device}",
             f"python {info['python_version']} ({info['python']})",
             f"torch {pk['torch'] or 'missing'} (CUDA {info.get('torch_cuda')}), "
             f"triton {pk['triton'] or 'missing'}, nvcc: {info['nvcc'] or 'not found'}, "
             f"driver: {info['driver'] or 'unknown'}"]
    if "torch_error" in info:
        lines.append(f"torch is not importable: {info['torch_error']}")
    missing = [p for p, v in pk.items() if v is None]
    others = ", ".join(f"{p} {v}" for p, v in pk.items() if v and p not in ("torch", "triton"))
    lines.append(f"also: {others}" + (f"; missing: {', '.join(missing)}" if missing else ""))
    return lines


def run_phase(phase: Phase, timeout: float, log: Log) -> dict[str, Any]:
    """Run one phase with its output streamed to the log; SIGINT then SIGKILL to its whole
    process group past `timeout` seconds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONUNBUFFERED="1", **phase.env)
    start = time.monotonic()
    proc = subprocess.Popen(phase.command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)

    def copy() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed")
    return {"name": phase.name, "command": " ".join(phase.command), "budget_s": phase.budget_s,
            "status": status, "returncode": proc.returncode,
            "seconds": round(time.monotonic() - start, 1)}


def run_phases(phases: list[Phase], args: argparse.Namespace, info: dict[str, Any], log: Log,
               start: float) -> tuple[list[dict[str, Any]], str | None]:
    """Run `phases` in order until one cannot run; returns each run's result and why the run
    stopped early (None when every phase ran)."""
    done: list[dict[str, Any]] = []
    first = time.monotonic()
    for i, phase in enumerate(phases):
        no_torch = "torch_error" in info  # nothing installs or runs without it
        if no_torch or (not info["cuda_available"] and (phase.needs_cuda or not args.dry_run)):
            why = f" (torch is not importable: {info['torch_error']})" if no_torch else ""
            return done, f"no CUDA device: stopping before {phase.name}{why}"
        if args.dry_run and phase.needs_cuda:
            return done, (f"dry run: stopping before {phase.name} (a CUDA device is present: "
                          "run without --dry-run)")
        left = args.total - (time.monotonic() - start)
        if left < 5:
            return done, f"out of time: stopping before {phase.name}"
        # Its budget plus what the phases before it left unused; never past TOTAL_S.
        unused = sum(p.budget_s for p in phases[:i]) - (time.monotonic() - first)
        limit = min(phase.budget_s + max(unused, 0), left)
        log(f"\n== {phase.name}: {' '.join(phase.command)} (limit {limit:.0f} s)")
        result = run_phase(phase, limit, log)
        done.append(result)
        log(f"== {phase.name}: {result['status']} (exit {result['returncode']}) in "
            f"{result['seconds']} s")
        if phase.name == "install" and result["status"] != "ok":
            # The Triton kernels need no C++ extension: install without it so that the GPU
            # phases still run (the check still fails, on the install).
            bare = Phase("install-no-ext", phase.command, INSTALL_NO_EXT_S, False,
                         env={**phase.env, "SPARSECORE_BUILD_EXT": "0"})
            left = args.total - (time.monotonic() - start)
            log(f"\n== {bare.name}: SPARSECORE_BUILD_EXT=0 {' '.join(bare.command)}")
            result = run_phase(bare, min(bare.budget_s, left), log)
            done.append(result)
            log(f"== {bare.name}: {result['status']} in {result['seconds']} s")
            if result["status"] != "ok":
                return done, "install failed: stopping before the phases that import the package"
    return done, None


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="run the phases that need no CUDA device, stop before the first one "
                        "that does")
    p.add_argument("--skip-install", action="store_true",
                   help="use the package as installed (a rerun on the same machine)")
    p.add_argument("--budget", action="append", default=[], metavar="PHASE=SECONDS",
                   help="another time limit for one phase (repeatable)")
    p.add_argument("--total", type=int, default=TOTAL_S,
                   help=f"time limit of all phases together, seconds (default {TOTAL_S})")
    p.add_argument("--results", default=BENCH_RESULTS,
                   help="folder of gpu-check.json / .log / -pytest.xml (default bench/results)")
    args = p.parse_args(argv)
    try:
        args.budgets = {k: int(v) for k, v in (b.split("=", 1) for b in args.budget)}
    except ValueError:
        p.error(f"--budget takes PHASE=SECONDS, got {args.budget}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    results = os.path.abspath(args.results)
    os.makedirs(results, exist_ok=True)
    start, wall_start = time.monotonic(), time.time()
    try:
        phases = plan(sys.executable, results, args.skip_install, args.budgets)
    except ValueError as exc:  # a --budget for a phase that does not exist
        raise SystemExit(f"gpu-check: {exc}") from None
    log = Log(os.path.join(results, "gpu-check.log"))
    summary_path = os.path.join(results, "gpu-check.json")
    log(f"gpu-check{' (dry run)' if args.dry_run else ''}: {len(phases)} phases, at most "
        f"{args.total} s in all")
    for i, phase in enumerate(phases, 1):
        needs = "CUDA" if phase.needs_cuda else "no device"
        log(f"  {i}. {phase.name} ({needs}, {phase.budget_s} s): {' '.join(phase.command)}")
    info = environment()
    for line in describe(info):
        log(line)

    done, stopped = run_phases(phases, args, info, log, start)
    ran = {r["name"] for r in done}
    if stopped:
        log(f"\n{stopped}")
        rest = [p.name for p in phases if p.name not in ran]
        if rest:
            log(f"not run: {', '.join(rest)}")
    if done:
        log("\nphase               status    seconds  budget")
    for r in done:
        log(f"{r['name']:<20}{r['status']:<10}{r['seconds']:>7}  {r['budget_s']:>6}")
    failed = [r["name"] for r in done if r["status"] != "ok"]
    if failed:
        log(f"failed: {', '.join(failed)}")
    summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall_start)),
               "dry_run": args.dry_run, "environment": info, "phases": done,
               "stopped": stopped, "seconds": round(time.monotonic() - start, 1)}
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    log.close()

    out = os.environ.get("OUT")
    if out:
        produced = [summary_path, log.path] + [
            path for p in phases if p.name in ran for path in p.outputs
            if os.path.exists(path) and os.path.getmtime(path) >= wall_start - 1]
        os.makedirs(out, exist_ok=True)
        for path in produced:
            shutil.copy2(path, out)
        print(f"copied to {out}: {', '.join(os.path.basename(p) for p in produced)}")
    if stopped and stopped.startswith("no CUDA device"):
        return 2
    if failed or (stopped and not stopped.startswith("dry run")):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
