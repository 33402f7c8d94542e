"""Backend selection shared by every op family (xformers' `not_supported_reasons` pattern).

An op has an ordered list of `Backend`s and a record type of its arguments (a frozen
dataclass): a call's arguments become one record, and each backend's `check(args)` and
`run(args)` read its fields by name, so adding an argument to an op cannot silently shift what
a backend reads. `check` returns the reasons the backend cannot run these inputs (an empty
list means it can). `Dispatcher.select` picks the first backend with no reasons, or the one
the user forced with `use_backend(...)` or the environment variable SPARSECORE_BACKEND; when
nothing can run, `NotSupportedError` lists every backend's reasons.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from sparsecore import _ext

_state = threading.local()
A = TypeVar("A")
# The dtypes every C++ CPU kernel takes.
CPP_DTYPES = (torch.float32, torch.float64)


class NotSupportedError(RuntimeError):
    """No backend can run an op on the given inputs; the message lists each one's reasons."""


@dataclass(frozen=True)
class Backend(Generic[A]):
    """One implementation of an op: `check(args)` returns reasons it cannot run the call whose
    arguments are the record `args`; `run(args)` runs it."""

    name: str
    check: Callable[[A], list[str]]
    run: Callable[[A], Any]


def forced_backend() -> str | None:
    """The backend name forced by `use_backend` (innermost) or SPARSECORE_BACKEND, if any."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("SPARSECORE_BACKEND", "").strip()
    return env or None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend by name inside the block: "cpp" (the C++ CPU kernels), "dense" (the
    CSR ops' dense product on the CPU, below their crossover sparsity), "triton" (GPU, or
    CPU under TRITON_INTERPRET=1) or "reference" (plain torch). An op without a backend of
    that name chooses automatically.

    `None` restores automatic selection inside the block.
    """
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


class Dispatcher(Generic[A]):
    """Chooses among `backends` (in priority order) for the op called `op_name`, whose
    arguments `args(*call_args, **call_kwargs)` gathers into one record."""

    def __init__(self, op_name: str, args: Callable[..., A], backends: Sequence[Backend[A]]
                 ) -> None:
        self.op_name = op_name
        self.args = args
        self.backends = list(backends)

    def reasons(self, *args: Any, **kwargs: Any) -> dict[str, list[str]]:
        """Every backend's reasons for refusing these inputs ([] = would run)."""
        record = self.args(*args, **kwargs)
        return {b.name: b.check(record) for b in self.backends}

    def select(self, *args: Any, **kwargs: Any) -> Backend[A]:
        """The backend that will run these inputs; raises NotSupportedError with reasons."""
        return self._select(self.args(*args, **kwargs))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        record = self.args(*args, **kwargs)
        return self._select(record).run(record)

    def _select(self, record: A) -> Backend[A]:
        forced = forced_backend()
        names = [b.name for b in self.backends]
        if forced is not None and forced not in names:
            # A forced name that this op does not know (e.g. "triton" for a CPU-only op)
            # falls through to automatic choice rather than failing unrelated ops.
            forced = None
        collected: dict[str, list[str]] = {}
        for b in self.backends:
            if forced is not None and b.name != forced:
                continue
            why = b.check(record)
            if not why:
                return b
            collected[b.name] = why
        lines = [f"sparsecore.{self.op_name}: no backend can run these inputs"]
        if forced is not None:
            lines[0] += f" (backend forced to {forced!r})"
        for name, why in collected.items():
            lines.append(f"  {name}: " + "; ".join(why))
        raise NotSupportedError("\n".join(lines))


def tensor_reasons(
    tensors: Sequence[torch.Tensor],
    *,
    devices: Sequence[str],
    dtypes: Sequence[torch.dtype],
) -> list[str]:
    """Common checks: every tensor on one of `devices` and (floating ones) of `dtypes`."""
    why: list[str] = []
    for t in tensors:
        if t.device.type not in devices:
            why.append(f"device {t.device.type} not in {list(devices)}")
            break
    for t in tensors:
        if t.is_floating_point() and t.dtype not in dtypes:
            names = [str(d).replace("torch.", "") for d in dtypes]
            why.append(f"dtype {str(t.dtype).replace('torch.', '')} not in {names}")
            break
    return why


def cpp_reasons(tensors: Sequence[torch.Tensor]) -> list[str]:
    """Why a C++ CPU kernel cannot run: the extension not loaded, or tensors not on the CPU
    or (floating ones) not of CPP_DTYPES."""
    why = [] if _ext.has_cpu_ext() else [f"C++ extension not loaded ({_ext.cpu_ext_error()})"]
    return why + tensor_reasons(tensors, devices=("cpu",), dtypes=CPP_DTYPES)


def triton_reasons(tensors: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype]) -> list[str]:
    """Why a Triton kernel cannot run: triton missing, or tensors not on CUDA.

    CPU tensors are accepted only under TRITON_INTERPRET=1 and only when the Triton backend
    is forced by name (the interpreter is for tests, never an automatic choice).
    """
    why: list[str] = []
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return [f"triton is not importable ({type(exc).__name__})"]
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    on_cpu = any(t.device.type == "cpu" for t in tensors)
    if on_cpu and not (interpret and forced_backend() == "triton"):
        why.append("tensors are on cpu (Triton runs on CUDA, or on CPU under TRITON_INTERPRET=1 "
                   "when forced with use_backend('triton'))")
    why += [r for r in tensor_reasons(tensors, devices=("cuda", "cpu"), dtypes=dtypes)]
    return why
