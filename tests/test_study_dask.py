"""The study on a Dask distributed cluster that the test starts on this machine (two worker
processes, one thread each): the same numbers as the local runner, and a worker killed in
the middle of a stage loses nothing finished (its stage is retried elsewhere)."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from sparsecore import study
from sparsecore.study import cache
from sparsecore.study.executors import DaskExecutor, make_executor

distributed = pytest.importorskip(
    "distributed", reason="needs Dask distributed (pip install 'sparsecore[distributed]'; "
                          "make test installs it)")


def _numbers(results: dict) -> dict:
    return {label: {seed: {k: a[k] for k in ("accuracy", "similarity", "heatmap")}
                    for seed, a in m["seeds"].items()}
            for label, m in results["models"].items()}


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == pytest.approx(b, abs=1e-6)


@pytest.fixture(scope="module")
def cfg() -> study.StudyConfig:
    return study.preset_config("test", device="cpu")


@pytest.fixture(scope="module")
def local(cfg, tmp_path_factory) -> dict:
    """results.json of the local runner (one thread, as each worker has)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return study.run(cfg, str(tmp_path_factory.mktemp("local")), progress=False).results
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None,
                                  scheduler_kwargs={"dashboard_address": ":0"}) as c:
        yield c


@pytest.mark.slow
def test_dask_executor_matches_the_local_runner(cfg, local, cluster, tmp_path) -> None:
    out = tmp_path / "dask"
    summary = study.run(cfg, str(out), progress=False,
                        executor=DaskExecutor(cluster.scheduler_address))
    stages = [s.key for s in study.plan_stages(cfg)]
    assert sorted(summary.executed) == sorted(stages) and not summary.skipped
    assert _close(_numbers(summary.results), _numbers(local))
    assert (out / "report.md").stat().st_size > 0
    again = study.run(cfg, str(out), progress=False,
                      executor=DaskExecutor(cluster.scheduler_address))
    assert again.executed == [] and sorted(again.skipped) == sorted(stages)


@pytest.mark.slow
def test_killed_worker_stage_is_retried_and_finished_stages_are_kept(cfg, local, cluster,
                                                                      tmp_path) -> None:
    out = tmp_path / "dask"
    marker = str(tmp_path / "held")

    def hold_first(kind: str, marker: str) -> None:
        """On a worker (a closure: the workers get it by value): the first stage of `kind`
        that any worker starts writes that worker's pid to `marker` and sleeps, until the
        test kills the worker; the retried task runs it."""
        from sparsecore.study import runner

        real = runner.run_stage

        def held(cfg, run, stage, device, progress=False):
            if stage.kind == kind:
                try:  # the claim stays: only the first one holds
                    os.close(os.open(marker + ".claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    pass
                else:
                    with open(marker + ".tmp", "w") as f:
                        f.write(str(os.getpid()))
                    os.rename(marker + ".tmp", marker)
                    time.sleep(600)
            return real(cfg, run, stage, device, progress)

        runner.run_stage = held

    with distributed.Client(cluster.scheduler_address) as client:
        client.run(hold_first, "reinit", marker)
        done: list = []
        thread = threading.Thread(target=lambda: done.append(study.run(
            cfg, str(out), progress=False, executor=DaskExecutor(cluster.scheduler_address))))
        thread.start()
        deadline = time.monotonic() + 300
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert os.path.exists(marker), "no worker started a reinit stage"
        finished = {p: p.stat().st_mtime_ns for p in Path(out, "stages").rglob("result.json")}
        assert len(finished) >= 2  # dense and magnitude-50 at least
        with open(marker) as f:
            os.kill(int(f.read()), signal.SIGKILL)
        thread.join(timeout=300)
        assert not thread.is_alive() and done, "the run did not finish after the kill"
    summary = done[0]
    keys = cache.stage_keys(cfg)
    assert sorted(summary.executed) == sorted(keys)
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was written again"
    assert all(Path(out, "stages", k.path, "result.json").exists() for k in keys.values())
    assert _close(_numbers(summary.results), _numbers(local))


@pytest.mark.slow
def test_cli_executor_dask_starts_its_own_cluster(cfg, tmp_path, capsys) -> None:
    """--executor dask without --address: a local cluster of --jobs workers, for this run."""
    from sparsecore import cli

    out = tmp_path / "run"
    assert cli.main(["study", "--preset", "test", "--device", "cpu", "--executor", "dask",
                     "--jobs", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    keys = cache.stage_keys(cfg)
    assert all(f"{k}: " in printed for k in keys)
    assert all(Path(out, "stages", k.path, "result.json").exists() for k in keys.values())
    assert (out / "report.md").stat().st_size > 0
    assert cli.main(["study", "--preset", "test", "--address", "tcp://127.0.0.1:1",
                     "--out", str(out)]) == 2
    assert "--address is the scheduler of --executor dask" in capsys.readouterr().err


def test_executor_choice_is_checked_up_front() -> None:
    assert isinstance(make_executor("dask", "tcp://127.0.0.1:1"), DaskExecutor)
    with pytest.raises(ValueError, match="--address"):
        make_executor("local", "tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="unknown executor 'ray'"):
        make_executor("ray")
