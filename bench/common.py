"""Shared bench machinery: timing, the result table, JSON + PNG output under bench/results/.

`time_fn` is sparsecore's own timer (sparsecore._timing), the one the study's inference
table uses too. CPU times: median of repeated runs after warm-up (wall clock, torch's own
threads). GPU times: triton.testing.do_bench (median), which flushes L2 between runs.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections.abc import Sequence
from typing import Any

import torch

import sparsecore._ext
from sparsecore._io import atomic_write_text
from sparsecore._timing import time_fn, time_samples

__all__ = ["RESULTS_DIR", "time_fn", "time_samples", "machine_info", "format_table",
           "save_results", "speedup"]

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_info() -> dict[str, Any]:
    """What ran the bench: CPU model, the SIMD level torch's CPU kernels use (isa: AVX2,
    AVX512, ...), the build of sparsecore's C++ kernels that ran (kernels_isa: avx512, avx2,
    scalar), cores, torch threads and version, UTC date, GPU name if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "kernels_isa": sparsecore._ext.cpu_isa(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width text table of `rows` restricted to `columns` (missing cells blank)."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    table = [list(columns)] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    out = []
    for k, line in enumerate(table):
        out.append("  ".join(s.rjust(w) for s, w in zip(line, widths)))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def save_results(family: str, rows: Sequence[dict[str, Any]], extra: dict | None = None,
                 tag: str | None = None) -> str:
    """Write rows + machine info to bench/results/<family>[-<tag>]-<device>.json; returns path."""
    device = "gpu" if any(str(r.get("device", "")).startswith("cuda") for r in rows) else "cpu"
    name = f"{family}{'-' + tag if tag else ''}-{device}.json"
    path = os.path.join(RESULTS_DIR, name)
    payload = {"family": family, "machine": machine_info(), "rows": list(rows), **(extra or {})}
    atomic_write_text(path, json.dumps(payload, indent=1, default=str))
    return path


def speedup(dense: float | None, other: float | None) -> float | None:
    """dense_time / other_time, or None when either is missing."""
    if dense is None or other is None or other <= 0:
        return None
    return dense / other
