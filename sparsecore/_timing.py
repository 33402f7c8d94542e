"""The wall-clock timers of the package and of bench/: the study's dense-vs-sparse inference
table and every bench family measure with `time_fn`; `sparsecore.optimize` compares a
layer's candidate kernels with `time_interleaved`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def time_fn(
    fn: Callable[[], Any],
    device: str = "cpu",
    *,
    warmup: int = 3,
    reps: int = 10,
    min_time: float = 0.2,
    clock: str = "wall",
) -> float:
    """Median time of `fn()` in seconds.

    CPU: `warmup` untimed calls, then at least `reps` timed calls and at least `min_time`
    seconds in total; clock="thread" times the calling thread's CPU time instead of the wall
    clock (with one torch thread: robust to other load on a shared machine). CUDA:
    triton.testing.do_bench (ms -> s), which flushes L2 between runs; without triton (an
    optional dependency), the CPU loop with torch.cuda.synchronize after every call.
    """
    if device.startswith("cuda"):
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
        else:
            return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return statistics.median(time_samples(fn, device, warmup=warmup, reps=reps,
                                          min_time=min_time, clock=clock))


def time_samples(
    fn: Callable[[], Any],
    device: str = "cpu",
    *,
    warmup: int = 3,
    reps: int = 10,
    min_time: float = 0.2,
    clock: str = "wall",
) -> list[float]:
    """Seconds of each timed call of `fn()`: time_fn's loop (CUDA: synchronised after every
    call), every sample returned, for callers that pool samples over several rounds."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else _no_sync
    now = {"wall": time.perf_counter, "thread": time.thread_time}[clock]
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time:
        t0 = now()
        fn()
        sync()
        times.append(now() - t0)
        if len(times) >= 200:
            break
    return times


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: str = "cpu",
    *,
    warmup: int = 1,
    rounds: int = 5,
    min_time: float = 0.05,
    max_rounds: int = 50,
) -> dict[str, float]:
    """Median time in seconds of each of `fns`, timed in rounds of one call of each (wall
    clock), so that a change of load on a shared machine hits every function alike: `warmup`
    untimed calls of each, then at least `rounds` rounds and `min_time` seconds in all (at
    most `max_rounds` rounds). CUDA: synchronised around every call."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else _no_sync
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for done in range(max_rounds):
        if done >= rounds and time.perf_counter() - start >= min_time:
            break
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in samples.items() if ts}


def _no_sync() -> None:
    pass
