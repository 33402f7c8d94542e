"""Regenerate bench/RESULTS.md, the numbers of record, from the JSON under bench/results/.

What the report reads, by where a file lies in bench/results/:

- `<family>-<device>.json` (+ `.png`): the table of record of a family on a device, the file
  that `python -m bench <family>` writes without `--tag`. Re-running a family replaces it.
- `<family>-<tag>-<device>.json` (+ `.png`) and `<family>-<tag>-<device>.txt`: a distinct
  experiment (a crossover measurement, another clock or thread count, the measurements behind
  a kernel decision), shown in full under its family. `.txt` files are kept by hand and shown
  verbatim.
- `runs/*.json`: repeated runs of rows of a table (`--tag`ged re-runs of a few shapes, moved
  there once written). They are not shown as tables of their own; they give the spread. A row
  of a table of record and a row of a run are the same measurement when the family's key
  columns (shape, sparsity, mode, dtype, ...) and the run's setting (CPU model, torch
  threads, clock, backend) agree; the table then shows the min-max of the family's speedup
  column over the record and those runs. Run rows that match no row of record (another
  setting, a shape the record lacks) get a table of their own, with their own spread.

The output is deterministic: files are read in sorted order, rows keep the order the bench
wrote them in, and nothing depends on when the report runs. It ends with one line on
whether any CUDA device has run these benches.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
RUNS_SUBDIR = "runs"
DEVICES = ("cpu", "gpu")
NOT_RECORDED = "not recorded"
MAX_LISTED_ROWS = 4  # a run with at most this many rows lists its values
GPU_NONE = "GPU: not measured yet (no CUDA device has run these benches)"


@dataclass(frozen=True)
class Table:
    """How a family's rows are shown: `columns` (those with any value), `key` (what makes
    two rows the same measurement), `spread` (the column whose min-max over runs is shown),
    and `when` (only rows that have this column; a family may write two kinds of rows)."""

    columns: tuple[str, ...]
    key: tuple[str, ...]
    spread: str | None
    when: str | None = None
    title: str = ""


# In the order of bench/__main__.FAMILIES.
TABLES: dict[str, tuple[Table, ...]] = {
    "layers": (Table(
        ("kind", "shape", "batch", "sparsity", "mode", "dense_ms", "csr_ms", "csr_x",
         "torch_csr_ms", "torch_csr_x", "path", "max_abs_diff"),
        ("kind", "shape", "batch", "sparsity", "mode", "dtype", "device"), "csr_x"),),
    "layers-bsr": (Table(
        ("layer", "shape", "rows", "block", "density", "mode", "dtype", "dense_ms", "bsr_ms",
         "speedup", "torch_bsr_ms", "torch_bsr_x", "semi24_ms", "roofline", "max_abs_diff"),
        ("layer", "shape", "rows", "block", "density", "mode", "dtype", "device"), "speedup"),),
    "models": (
        Table(("model", "pruning", "sparsity", "batch", "threads", "torch_ms", "ort_ms",
               "deepsparse_ms", "sparsecore_ms", "sparsecore_x", "sparsify_x", "ort_x",
               "deepsparse_x", "vs_deepsparse", "max_diff", "note"),
              ("model", "pruning", "sparsity", "batch", "threads", "device"), "sparsecore_x",
              when="torch_ms", title="torch dense, ONNX Runtime, DeepSparse and sparsecore"),
        Table(("model", "sparsity", "batch", "device", "dense_ms", "sparse_ms", "speedup",
               "max_abs_diff", "note"),
              ("model", "sparsity", "batch", "device"), "speedup", when="dense_ms",
              title="dense vs sparsify() (earlier bench)"),
    ),
    "train": (Table(
        ("model", "pruning", "sparsity", "batch", "threads", "dense_ms", "sparse_ms", "speedup",
         "loss_diff", "grad_diff", "grad_max_abs", "note"),
        ("model", "pruning", "sparsity", "batch", "threads", "device"), "speedup"),),
    "similarity": (Table(
        ("metric", "n", "widths", "pairs", "ours_s", "baseline_s", "baseline", "speedup",
         "max_abs_diff", "factor_s", "cross_s", "small_s", "gemm_gflops", "kept"),
        ("metric", "n", "layers", "widths", "dtype", "device"), "speedup"),),
    "linalg": (Table(
        ("op", "shape", "dtype", "backend", "kernel", "torch_ms", "sparsecore_ms", "speedup",
         "value_err", "recon_err", "orth_err"),
        ("op", "shape", "dtype", "device"), "speedup"),),
    "prune": (
        Table(("shape", "density", "ours_s", "networkx_s", "speedup", "same_eigs", "lambda1",
               "mu_hat", "imdb", "subgraphs"),
              ("shape", "density", "device"), "speedup", when="lambda1",
              title="Ramanujan-graph metrics of a conv mask vs the networkx construction"),
        Table(("method", "model", "params", "sparsity", "density", "seconds"),
              ("method", "model", "sparsity", "device"), "seconds", when="method",
              title="time of prune.prune per method"),
    ),
}

# What a column holds, for the legend under each family.
LEGEND = {
    "layers": "csr_x, torch_csr_x: dense time / sparse time (> 1: faster than dense torch on "
              "the same pruned weights); path: the backend the dispatcher chose for the forward "
              "(dense below the crossover sparsity).",
    "layers-bsr": "speedup, torch_bsr_x: dense time / block-sparse time; roofline (GPU): the "
                  "fraction of the bf16 roofline the sparse forward reaches.",
    "models": "*_x: torch dense eager's time / that engine's, one forward of a batch on the "
              "same pruned weights (sparsecore: optimize(); sparsify: sparsify() alone); "
              "vs_deepsparse: sparsecore's speed as a fraction of DeepSparse's.",
    "train": "speedup: the masked dense model's time / sparsify()'s, one training step "
             "(forward, cross-entropy, backward, SGD with momentum) of a batch from the same "
             "pruned weights; loss_diff, grad_diff: how far the first step's loss and "
             "gradients (kept positions) of the two lie apart, against grad_max_abs.",
    "similarity": "speedup: the per-pair numpy baseline's time / ours, all layer pairs.",
    "linalg": "speedup: torch.linalg's time / the C++ kernel's (forced); backend: what the "
              "automatic choice runs at that size (reference = torch.linalg); errors relative "
              "to ||A||, against float64 LAPACK.",
    "prune": "speedup: the networkx double loop's time / ours; seconds: wall time of "
             "prune.prune on VGG-16.",
}


@dataclass
class Result:
    """One JSON file of bench/common.save_results."""

    name: str  # path relative to the results folder, without .json
    data: dict[str, Any]

    @property
    def family(self) -> str:
        return str(self.data.get("family", ""))

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self.data.get("rows", []))

    @property
    def machine(self) -> dict[str, Any]:
        return dict(self.data.get("machine", {}))

    def setting(self) -> tuple:
        """What must agree for two runs of a row to be repeats of one measurement."""
        m = self.machine
        return (m.get("cpu"), m.get("gpu"), m.get("torch_threads"), self.data.get("clock"),
                self.data.get("backend"))


def _natural(path: str) -> list:
    """Sort key: numbers in names compare as numbers (run-2 before run-10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _load(path: str, root: str) -> Result:
    with open(path) as f:
        data = json.load(f)
    return Result(os.path.relpath(path, root)[: -len(".json")], data)


def _family_of(stem: str) -> str | None:
    """The family a file name belongs to: the longest family name it starts with."""
    best = None
    for family in TABLES:
        if stem.startswith(family + "-") and (best is None or len(family) > len(best)):
            best = family
    return best


def fmt(v: Any) -> str:
    """A table cell: 3 significant digits, large values whole, None blank."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v).replace("|", "\\|")


def _date(iso: str | None) -> str:
    if not iso:
        return NOT_RECORDED
    try:
        t = _dt.datetime.fromisoformat(iso).astimezone(_dt.UTC)
    except ValueError:
        return iso
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _isa(m: dict[str, Any]) -> str:
    isa = m.get("isa")
    return {"AVX512": "AVX-512", "DEFAULT": "no SIMD"}.get(isa, isa) if isa else NOT_RECORDED


def describe(r: Result) -> list[str]:
    """The machine and settings of a result file, as Markdown list items."""
    m = r.machine
    threads = m.get("torch_threads")
    lines = [
        f"- machine: {m.get('cpu', NOT_RECORDED)}; ISA {_isa(m)}; "
        f"{m.get('cores', NOT_RECORDED)} cores; "
        f"{threads if threads is not None else NOT_RECORDED} torch threads"
        + (f"; GPU {m['gpu']}" if m.get("gpu") else ""),
        f"- torch {m.get('torch', NOT_RECORDED)}, Python {m.get('python', NOT_RECORDED)}; "
        f"run {_date(m.get('date'))}",
    ]
    extra = {k: v for k, v in r.data.items() if k not in ("family", "machine", "rows")}
    if extra:
        lines.append("- " + "; ".join(f"{k}: {_compact(v)}" for k, v in sorted(extra.items())))
    return lines


def _compact(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(x, float) for x in v):
        return ", ".join(f"{x:.2f}" for x in v)
    return json.dumps(v, sort_keys=True)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str],
                   extra: dict[str, Sequence[str]] | None = None) -> list[str]:
    """A Markdown table of `rows` over the `columns` that hold a value in some row, plus
    `extra` columns given cell by cell (one string per row)."""
    cols = [c for c in columns if any(r.get(c) is not None for r in rows)]
    extra = {k: v for k, v in (extra or {}).items() if any(v)}
    head = cols + list(extra)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        cells = [fmt(r.get(c)) for c in cols] + [v[i] for v in extra.values()]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _spread(values: Sequence[float]) -> str:
    if len(values) < 2:
        return ""
    return f"{fmt(min(values))}-{fmt(max(values))} ({len(values)})"


def _key(r: Result, row: dict[str, Any], table: Table) -> tuple:
    return (r.setting(), *(row.get(k) for k in table.key))


def _fits(row: dict[str, Any], table: Table) -> bool:
    return table.when is None or row.get(table.when) is not None


def _selected(rows: Sequence[dict[str, Any]], table: Table) -> list[dict[str, Any]]:
    return [row for row in rows if _fits(row, table)]


def _value(row: dict[str, Any], table: Table) -> list[float]:
    """The row's spread value, as a list of none or one."""
    v = row.get(table.spread) if table.spread else None
    return [] if v is None else [v]


def _link(path: str, root: str) -> str:
    """`path` as RESULTS.md (next to the results folder) links to it."""
    return "/".join((os.path.basename(os.path.normpath(root)), os.path.relpath(path, root)))


def _experiment_lines(path: str, root: str) -> list[str]:
    rel = os.path.relpath(path, root)
    if path.endswith(".txt"):
        with open(path) as f:
            text = f.read().rstrip("\n")
        return [f"### {rel}", "", "```text", text, "```", ""]
    r = _load(path, root)
    lines = [f"### {rel}", "", *describe(r), ""]
    for table in TABLES[r.family]:
        rows = _selected(r.rows, table)
        if rows:
            lines += ([f"{table.title}:", ""] if table.title else [])
            lines += [*markdown_table(rows, table.columns), ""]
    png = path[: -len(".json")] + ".png"
    if os.path.exists(png):
        lines += [f"![{rel}]({_link(png, root)})", ""]
    return lines


def family_section(family: str, root: str, files: Sequence[str],
                   runs: Sequence[Result]) -> list[str]:
    """The RESULTS.md section of one family: table(s) of record with their spread, the
    repeated runs that give it, run rows at other settings, then the experiments."""
    records = [f for f in files if os.path.basename(f) in
               {f"{family}-{d}.json" for d in DEVICES}]
    experiments = [f for f in files if f not in records]
    runs = [r for r in runs if r.family == family]
    lines = [f"## {family}", ""]
    if not records:
        lines += ["No table of record yet.", ""]
    matched: set[tuple[str, int]] = set()  # (run name, row index) that fed a record's spread
    for path in records:
        rec = _load(path, root)
        lines += [f"Table of record: `{_link(path, root)}`", "", *describe(rec), ""]
        for table in TABLES[family]:
            rows = _selected(rec.rows, table)
            by_key: dict[tuple, list[float]] = {}
            for row in rows:
                by_key.setdefault(_key(rec, row, table), []).extend(_value(row, table))
            for run in runs:
                for i, row in enumerate(run.rows):
                    k = _key(run, row, table)
                    if k in by_key and _fits(row, table):
                        matched.add((run.name, i))
                        by_key[k].extend(_value(row, table))
            spread = [_spread(by_key.get(_key(rec, row, table), [])) for row in rows]
            if rows:
                lines += ([f"{table.title}:", ""] if table.title else [])
                lines += [*markdown_table(rows, table.columns,
                                          {f"{table.spread} min-max (runs)": spread}), ""]
        png = path[: -len(".json")] + ".png"
        if os.path.exists(png):
            lines += [f"![{family}]({_link(png, root)})", ""]
    if family in LEGEND:
        lines += [LEGEND[family], ""]
    if runs:
        lines += [f"Repeated runs (`{_link(os.path.join(root, RUNS_SUBDIR), root)}/`), in the "
                  "spreads above where their setting and row match a row of record:", ""]
        for run in runs:
            lines.append(f"- `{os.path.basename(run.name)}`: " + _run_summary(run, matched))
        lines.append("")
        lines += _unmatched_runs(family, runs, matched)
    for path in experiments:
        lines += _experiment_lines(path, root)
    return lines


def _run_summary(run: Result, matched: set[tuple[str, int]]) -> str:
    """Date, setting and match count of a run; its values too when it has few rows."""
    m = run.machine
    parts = [f"run {_date(m.get('date'))}",
             f"torch threads: {m.get('torch_threads', NOT_RECORDED)}"]
    parts += [f"{k}: {run.data[k]}" for k in ("clock", "backend") if k in run.data]
    n = sum(1 for i in range(len(run.rows)) if (run.name, i) in matched)
    parts.append(f"{n} of {len(run.rows)} rows match")
    text = "; ".join(parts)
    if len(run.rows) <= MAX_LISTED_ROWS:
        values = []
        for row in run.rows:
            table = next((t for t in TABLES[run.family] if _fits(row, t)), None)
            if table is not None and table.spread is not None:
                label = " ".join(fmt(row.get(k)) for k in table.key if k != "device")
                values.append(f"{label}: {table.spread} {fmt(row.get(table.spread))}")
        if values:
            text += " (" + "; ".join(values) + ")"
    return text


def _unmatched_runs(family: str, runs: Sequence[Result], matched: set) -> list[str]:
    """Run rows that repeat no row of record, grouped into repeats of one another."""
    lines: list[str] = []
    for table in TABLES[family]:
        groups: dict[tuple, list[tuple[Result, dict[str, Any]]]] = {}
        for run in runs:
            for i, row in enumerate(run.rows):
                if (run.name, i) not in matched and _fits(row, table):
                    groups.setdefault(_key(run, row, table), []).append((run, row))
        if not groups:
            continue
        rows, runs_col, spread = [], [], []
        for members in groups.values():
            run, row = members[0]
            rows.append({**{k: row.get(k) for k in table.key}, "threads":
                         run.machine.get("torch_threads"), "clock": run.data.get("clock")})
            runs_col.append(", ".join(os.path.basename(r.name) for r, _ in members))
            vals = [v for _, x in members for v in _value(x, table)]
            spread.append(_spread(vals) or (fmt(vals[0]) if vals else ""))
        lines += ["Repeated rows at another setting or shape than the record's:", ""]
        lines += [*markdown_table(rows, [*table.key, "threads", "clock"],
                                  {"runs": runs_col, f"{table.spread}, or min-max (runs)": spread}),
                  ""]
    return lines


def _gpu_line(results: Sequence[Result]) -> str:
    cuda = sorted({r.name for r in results
                   if any(str(row.get("device", "")).startswith("cuda") for row in r.rows)})
    if not cuda:
        return GPU_NONE
    gpus = sorted({str(r.machine.get("gpu")) for r in results if r.name in cuda})
    return f"GPU: measured on {', '.join(gpus)} ({', '.join(f'`{n}`' for n in cuda)})"


def render(root: str = RESULTS_DIR) -> str:
    """The text of RESULTS.md for the results folder `root`."""
    top = sorted(glob.glob(os.path.join(root, "*.json")) + glob.glob(os.path.join(root, "*.txt")),
                 key=_natural)
    runs = sorted((_load(p, root) for p in glob.glob(os.path.join(root, RUNS_SUBDIR, "*.json"))),
                  key=lambda r: (str(r.machine.get("date", "")), _natural(r.name)))
    by_family: dict[str, list[str]] = {f: [] for f in TABLES}
    for path in top:
        if path.endswith(".json"):
            family = _load(path, root).family
        else:
            family = _family_of(os.path.basename(path))
        if family in by_family:
            by_family[family].append(path)
    lines = [
        "# Bench results",
        "",
        "Generated by `python -m bench report` from `bench/results/` (see bench/report.py for "
        "how the files there are read); do not edit by hand. Times are medians of repeated "
        "runs after warm-up (wall clock unless a table's clock says otherwise). A spread "
        "column gives min-max over the table of record and the repeated runs of the same row "
        "on the same setting, with the number of runs; it is blank for rows measured once. "
        "Runs are pooled whatever code they measured: one older than a kernel change carries "
        "that change into the spread (each run's date is listed; `git log` of its file names "
        "the change it measured).",
        "",
        "Families: " + ", ".join(f"[{f}](#{f})" for f in TABLES),
        "",
    ]
    for family in TABLES:
        lines += family_section(family, root, by_family[family], runs)
    everything = [_load(p, root) for p in top if p.endswith(".json")] + runs
    lines.append(_gpu_line(everything))
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default=RESULTS_DIR, help="results folder (default: bench/results)")
    p.add_argument("--out", default=None,
                   help="where to write (default: RESULTS.md next to the results folder)")


def main(args: argparse.Namespace) -> int:
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.results)), "RESULTS.md")
    text = render(args.results)
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}")
    return 0
