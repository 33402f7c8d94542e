"""Where the study's stages run: an Executor takes the stages still to do (in dependency
order) and runs each one, once its inputs are finished, through runner.run_stage into the
run directory.

- LocalExecutor (the default): this machine, the stages one after another in this process,
  or a pool of `--jobs` worker processes.
- DaskExecutor (`--executor dask [--address tcp://HOST:8786]`, needs the `distributed`
  extra): a Dask distributed cluster; each stage is a task that depends on its inputs'
  tasks. Every worker must import the same sparsecore and reach the run directory under the
  same path (a shared file system). A stage writes its result.json last and atomically,
  and a task whose stage is finished reads it instead of running it again: a task that the
  scheduler retries after a worker was lost redoes no finished stage, and a training stage
  that was cut off continues from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sparsecore import train as T
from sparsecore.study.config import EXECUTORS, StudyConfig
from sparsecore.study.stages import Stage


class StageLog(Protocol):
    def write(self, msg: str) -> None: ...

    def done(self, stage: Stage, res: dict[str, Any]) -> None: ...


class Executor(Protocol):
    def run(self, cfg: StudyConfig, out: str, stages: list[Stage], device: str,
            log: StageLog, progress: bool) -> list[str]:
        """Run `stages` (in dependency order; an input not among them is finished) of
        `cfg`'s study in run directory `out` on `device`; log.done(stage, result) as each
        one finishes; return their keys in the order they finished."""
        ...


@dataclass
class LocalExecutor:
    """This machine: with one job (cfg.jobs; default: CPU cores up to 4, 1 on a GPU) the
    stages one after another in this process, else a pool of worker processes."""

    def run(self, cfg: StudyConfig, out: str, stages: list[Stage], device: str,
            log: StageLog, progress: bool) -> list[str]:
        from sparsecore.study import runner  # it imports this module

        jobs = min(runner._jobs(cfg, device), max(1, len(stages)))
        if jobs > 1:
            return runner._run_parallel(cfg, out, stages, device, jobs, log)
        executed = []
        for s in stages:
            res = runner.run_stage(cfg, out, s, device, progress=progress)
            executed.append(s.key)
            log.done(s, res)
        return executed


def _stage_task(cfg_dict: dict[str, Any], out: str, stage: Stage, threads: int | None,
                *inputs: dict[str, Any]) -> dict[str, Any]:
    """One stage on a Dask worker, on the worker's own device (cfg.device resolved there).
    inputs: the results of its input stages, passed so that the scheduler runs it after
    them. threads: torch CPU threads (None: the worker's setting)."""
    from sparsecore.study import runner

    if threads:
        torch.set_num_threads(threads)
    cfg = StudyConfig.from_dict(cfg_dict)
    return runner.run_stage(cfg, out, stage, T.resolve_device(cfg.device))


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ValueError("--executor dask needs Dask distributed: pip install "
                         "'sparsecore[distributed]' (or 'dask[distributed]')") from None
    return distributed


@dataclass
class DaskExecutor:
    """A Dask distributed cluster: the scheduler at `address`, or (None) a local cluster of
    cfg.jobs worker processes (default: CPU cores up to 4), one task at a time each."""

    address: str | None = None

    def __post_init__(self) -> None:
        _import_distributed()  # fail before any work

    def run(self, cfg: StudyConfig, out: str, stages: list[Stage], device: str,
            log: StageLog, progress: bool) -> list[str]:
        distributed = _import_distributed()
        with contextlib.ExitStack() as stack:
            threads = None
            if self.address is None:
                from sparsecore.study import runner

                workers = min(runner._jobs(cfg, device), max(1, len(stages)))
                threads = max(1, (os.cpu_count() or 1) // workers)
                # no dashboard; the scheduler's HTTP server on a free port
                cluster = stack.enter_context(distributed.LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True,
                    dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"}))
                client = stack.enter_context(distributed.Client(cluster))
            else:
                client = stack.enter_context(distributed.Client(self.address))
            return _submit(distributed, client, cfg, os.path.abspath(out), stages, threads,
                           log)


def _submit(distributed: Any, client: Any, cfg: StudyConfig, out: str, stages: list[Stage],
            threads: int | None, log: StageLog) -> list[str]:
    """Hand the stage graph to the scheduler; log each stage as its task finishes."""
    token = uuid.uuid4().hex[:8]  # this run's task keys: a cluster may serve several runs
    cfg_dict = cfg.to_dict()
    futures: dict[str, Any] = {}
    stage_of: dict[str, Stage] = {}
    for s in stages:
        inputs = [futures[d] for d in s.deps if d in futures]
        fut = client.submit(_stage_task, cfg_dict, out, s, threads, *inputs,
                            key=f"{s.key}-{token}")
        futures[s.key] = fut
        stage_of[fut.key] = s
    executed: list[str] = []
    try:
        for fut in distributed.as_completed(list(futures.values())):
            s = stage_of[fut.key]
            log.done(s, fut.result())  # a stage's exception is raised here
            executed.append(s.key)
    except BaseException:
        client.cancel(list(futures.values()))
        raise
    return executed


def make_executor(name: str, address: str | None = None) -> Executor:
    """The executor of `--executor NAME [--address ADDR]`."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")
    if name == "local":
        if address:
            raise ValueError("--address is the scheduler of --executor dask")
        return LocalExecutor()
    return DaskExecutor(address)
