"""Shared test set-up: Triton runs under its interpreter when there is no GPU (set before
anything imports triton); `gpu` tests skip cleanly without CUDA."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed() -> int:
    """Every test draws fresh random data: torch's global RNG gets a new seed per test,
    printed so that a failure can be replayed with SPARSECORE_TEST_SEED=<seed>."""
    seed = int(os.environ.get("SPARSECORE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    print(f"torch seed: {seed} (replay with SPARSECORE_TEST_SEED={seed})")
    return seed


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory: pytest.TempPathFactory,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    """sparsecore.optimize's kernel timing cache goes to the session's temporary folder,
    never to the user's ~/.cache."""
    monkeypatch.setenv("SPARSECORE_CACHE_DIR",
                       str(tmp_path_factory.getbasetemp() / "kernel-cache"))


@pytest.fixture
def gen(_fresh_seed: int) -> torch.Generator:
    """A generator seeded with the test's fresh seed, for data drawn apart from the global
    RNG."""
    return torch.Generator().manual_seed(_fresh_seed)


@pytest.fixture
def one_thread():
    """One torch thread for the test (use with `pytestmark =
    pytest.mark.usefixtures("one_thread")`): under `pytest -n 2` on a shared 2-core machine,
    OpenMP threads that wait on each other make small ops far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


Call = tuple[str, tuple[int, ...], tuple[int, ...]]


@pytest.fixture
def chwn_calls(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Records every call of the batch-last conv kernels (the sparse conv layers' path for
    small outputs) as (kind, weight_shape, stride), kind "conv" (a forward, or a stride-1
    input gradient on the transposed-flipped weight) or "dw" (a weight gradient). Without the
    extension there is nothing to record."""
    from sparsecore import has_cpu_ext

    calls: list[Call] = []
    if not has_cpu_ext():
        return calls
    ns = torch.ops.sparsecore

    def recorder(kind: str, op: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def record(*args: object) -> torch.Tensor:
            calls.append((kind, tuple(args[5]), tuple(args[6])))  # weight_shape, stride
            return op(*args)

        return record

    for kind, name in (("conv", "_csr_conv2d_chwn_cpu"), ("dw", "_csr_conv2d_chwn_dw_cpu")):
        monkeypatch.setattr(ns, name, recorder(kind, getattr(ns, name)))
    return calls


class _Payload:
    """Pickles as a call of open(path, "w"): a full unpickler creates the file, which is how
    a crafted checkpoint would run code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def write_payload():
    """write_payload(path, marker): a checkpoint-shaped file whose loading with
    weights_only=False would create `marker`."""

    def write(path, marker) -> None:
        torch.save({"epoch": 1, "model": {"w": torch.zeros(2)}, "state_dict": {},
                    "model_hparams": _Payload(str(marker))}, path)

    return write
