"""Running the study: the run directory (its lock, resume, --fresh), its stages through an
executor (in order, in parallel worker processes, or on a cluster: study.executors),
progress lines, and results.json."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import json
import multiprocessing
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sparsecore import train as T
from sparsecore._io import atomic_write_text, check_writable, remove_stale_tmp
from sparsecore.study import cache, lm, pai, regimes
from sparsecore.study._common import _read_json
from sparsecore.study.analysis import analyse
from sparsecore.study.config import _RUNTIME_FIELDS, StudyConfig
from sparsecore.study.inference import KERNEL_CACHE, timing
from sparsecore.study.report import write_report
from sparsecore.study.stages import Stage, _done, _stage_dir, _train_stage, plan_stages

if TYPE_CHECKING:
    from sparsecore.study.executors import Executor


def run_stage(cfg: StudyConfig, run: str, stage: Stage, device: str,
              progress: bool = False) -> dict[str, Any]:
    """Run one stage (resuming its own checkpoint) and write its result.json, last and
    atomically: a stage directory without one is unfinished. A stage that is finished
    already (e.g. by a worker that was lost after it) is read, not redone."""
    t0 = time.perf_counter()
    sdir = _stage_dir(run, stage.key)
    with cache.claimed(sdir):
        if _done(run, stage.key):
            return _read_json(os.path.join(sdir, "result.json"))
        cache.write_record(sdir, cache.run_keys(run)[stage.key])
        if stage.kind == "analysis":
            result = analyse(cfg, run, stage, device)
        elif stage.kind in regimes.KINDS:
            result = regimes.train_stage(cfg, run, stage, sdir, device, progress)
        elif stage.kind.startswith("lm-"):
            result = lm.run_stage(cfg, run, stage, sdir, device, progress)
        elif stage.kind.startswith(pai.KIND):
            result = pai.run_stage(cfg, run, stage, device, progress)
        else:
            result = _train_stage(cfg, run, stage, sdir, device, progress)
        result["stage_seconds"] = time.perf_counter() - t0
        atomic_write_text(os.path.join(sdir, "result.json"), json.dumps(result, indent=1))
    return result


def _worker_init(threads: int) -> None:
    """Stage worker: its own thread count, and death with the parent (a killed study must
    not leave orphans writing into the run directory)."""
    torch.set_num_threads(threads)
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(cfg_dict: dict, run: str, stage: Stage, device: str) -> dict[str, Any]:
    return run_stage(StudyConfig.from_dict(cfg_dict), run, stage, device)


def _jobs(cfg: StudyConfig, device: str) -> int:
    if cfg.jobs > 0:
        return cfg.jobs
    if device.startswith("cuda"):
        return 1
    return max(1, min(os.cpu_count() or 1, 4))


LOCK = ".study.lock"  # held (flock) by the study running in a run directory


def _check_foreign(out: str) -> None:
    """Refuse a directory that holds files but no study (an empty one is fine)."""
    if os.path.exists(os.path.join(out, "study.json")) or not os.path.isdir(out):
        return
    if [n for n in os.listdir(out) if n != LOCK]:
        raise ValueError(f"{out} exists and is not a study run directory (no study.json); "
                         "pick another --out")


@contextlib.contextmanager
def _locked(out: str) -> Iterator[None]:
    """Hold the run directory's lock: a second study on the same directory fails at once
    instead of overwriting the first one's files. The kernel drops the lock when the
    process dies, so a killed study never leaves a stale one."""
    fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise ValueError(f"{out} is in use by another study (process {holder}); wait for "
                             "it to finish, or pick another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _prepare(cfg: StudyConfig, out: str, fresh: bool) -> None:
    """Make `out` hold `cfg`'s study: continue the one there (with other settings too: the
    stages they do not affect keep their fingerprints and are reused), or delete it and
    start over with `fresh`."""
    _check_foreign(out)
    path = os.path.join(out, "study.json")
    if os.path.exists(path):
        old = _read_json(path)
        new = cfg.to_dict()
        diff = [k for k in new if k not in _RUNTIME_FIELDS and old.get(k) != new[k]]
        if not fresh:
            if diff:
                print(f"{out}: settings changed ({', '.join(diff)}): the stages they affect "
                      "run again, the others are reused")
            for folder, _, _ in os.walk(out):
                remove_stale_tmp(folder)
        else:
            print(f"{out}: --fresh: deleting the study that is there and starting over")
            for name in ("stages", "results.json", "report.md", KERNEL_CACHE):
                target = os.path.join(out, name)
                if os.path.isdir(target):
                    shutil.rmtree(target)
                elif os.path.exists(target):
                    os.unlink(target)
    remove_stale_tmp(out)
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=1))


@contextlib.contextmanager
def open_run_dir(cfg: StudyConfig, out: str, fresh: bool = False) -> Iterator[None]:
    """Create (or check) the run directory, hold its lock and prepare it for `cfg` (see
    _prepare); the lock is held until the block ends."""
    _check_foreign(out)
    check_writable(out)
    with _locked(out):
        _prepare(cfg, out, fresh)
        yield


@dataclass
class RunSummary:
    run: str
    executed: list[str]  # stages run (or finished) by this call
    skipped: list[str]  # stages found finished
    seconds: float
    results: dict[str, Any]


def run(cfg: StudyConfig, out: str, *, fresh: bool = False, progress: bool = True,
        timing_threads: int | None = None, executor: Executor | None = None) -> RunSummary:
    """Run the study into directory `out`, or continue the one there: a stage whose
    fingerprint (its hyperparameters and inputs, see study.cache) has a finished directory
    is not redone, whatever study ran it; returns what was done. fresh: delete the study in
    `out` and start over. A directory that holds other files is refused (ValueError), as is
    one that another study is using.

    timing_threads: torch CPU threads for the dense-vs-sparse inference timing (default:
    torch's, all cores; 1 times the timing thread's CPU time, which other processes on a
    shared machine do not count).
    executor: where the stages run (default: study.executors.LocalExecutor, this machine)."""
    from sparsecore.study.executors import LocalExecutor

    t0 = time.perf_counter()
    device = T.resolve_device(cfg.device)
    with open_run_dir(cfg, out, fresh):
        return _run(cfg, out, device, progress, timing_threads, t0,
                    executor or LocalExecutor())


def _run(cfg: StudyConfig, out: str, device: str, progress: bool,
         timing_threads: int | None, t0: float, executor: Executor) -> RunSummary:
    stages = plan_stages(cfg)
    skipped = [s.key for s in stages if _done(out, s.key)]
    todo = [s for s in stages if s.key not in skipped]
    log = _Log(len(stages), len(skipped), progress)
    if skipped:
        log.write(f"reusing: {len(skipped)} of {len(stages)} stages already done")
    executed: list[str] = []
    try:
        if todo:
            executed = executor.run(cfg, out, todo, device, log, progress)
    finally:
        log.close()
    path = os.path.join(out, "report.md")
    results_path = os.path.join(out, "results.json")
    # results.json and the report follow the current settings, also when all stages were
    # finished before (e.g. only the accuracy tolerance changed)
    if (executed or not os.path.exists(path) or not os.path.exists(results_path)
            or _read_json(results_path).get("config") != cfg.to_dict()):
        results = _aggregate(cfg, out, device, timing_threads)
        results["wall_seconds"] = time.perf_counter() - t0
        results["stages_resumed"] = len(skipped)
        atomic_write_text(results_path, json.dumps(results, indent=1))
        write_report(out)
    else:
        results = _read_json(results_path)
    log.write(f"{path} ({time.perf_counter() - t0:.0f} s)")
    return RunSummary(out, executed, skipped, time.perf_counter() - t0, results)


def _run_parallel(cfg: StudyConfig, out: str, todo: list[Stage], device: str, jobs: int,
                  log: _Log) -> list[str]:
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending = list(todo)
    running: dict[cf.Future, Stage] = {}
    executed: list[str] = []
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                initargs=(threads,)) as pool:
        try:
            while pending or running:
                for s in [s for s in pending if all(_done(out, d) for d in s.deps)]:
                    if len(running) >= jobs:
                        break
                    pending.remove(s)
                    running[pool.submit(_worker, cfg.to_dict(), out, s, device)] = s
                if not running:
                    raise RuntimeError(f"stages wait on unfinished dependencies: "
                                       f"{[s.key for s in pending]}")
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    s = running.pop(fut)
                    log.done(s, fut.result())
                    executed.append(s.key)
        except BaseException:
            for fut in running:
                fut.cancel()
            raise
    return executed


class _Log:
    """One line per finished stage (and a bar over all stages when progress is on)."""

    def __init__(self, total: int, done: int, progress: bool) -> None:
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc="study", unit="stage",
                            dynamic_ncols=True)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def done(self, stage: Stage, res: dict[str, Any]) -> None:
        acc = f"acc {res['acc']:.4f}, " if "acc" in res else ""
        acc += f"bpc {res['bpc']:.3f}, " if "bpc" in res else ""
        self.write(f"{stage.key}: {acc}{res['stage_seconds']:.1f} s")
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


TIMING_BATCH = 256  # held-out examples per timed forward pass


def _aggregate(cfg: StudyConfig, out: str, device: str,
               timing_threads: int | None) -> dict[str, Any]:
    """results.json: the analysis of every model and seed, timings, stage run times."""
    if cfg.preset == pai.PRESET:
        return {**pai.aggregate(cfg, out), "machine": _machine()}
    if cfg.lm is not None:
        return {**lm.aggregate(cfg, out, device, timing_threads), "machine": _machine()}
    per_model: dict[str, Any] = {}
    stage_seconds: dict[str, float] = {}
    for s in plan_stages(cfg):
        res = _read_json(os.path.join(_stage_dir(out, s.key), "result.json"))
        stage_seconds[s.key] = res["stage_seconds"]
        if s.kind == "analysis":
            per_model.setdefault(s.label, {"seeds": {}})["seeds"][str(s.seed)] = {
                k: v for k, v in res.items() if k != "stage_seconds"}
    for plan in cfg.models:
        threads = timing_threads or torch.get_num_threads()
        for seed in cfg.seeds:
            key = cache.timing_key(cfg, plan.label, device, threads, TIMING_BATCH, seed,
                                   speed="optimize")
            tdir = os.path.join(out, "stages", key.path)
            tpath = os.path.join(tdir, "result.json")
            if not os.path.exists(tpath):
                res = timing(cfg, out, plan.label, device, TIMING_BATCH, threads=timing_threads,
                             seed=seed)
                cache.write_record(tdir, key)
                atomic_write_text(tpath, json.dumps(res, indent=1))
            res = _read_json(tpath)
            per_model[plan.label]["seeds"][str(seed)]["timing"] = res.pop("rows")
            per_model[plan.label]["timing"] = res  # device and threads
    return {"config": cfg.to_dict(), "machine": _machine(), "models": per_model,
            "stage_seconds": stage_seconds,
            "compute_seconds": sum(stage_seconds.values())}
