"""The arena behind the C++ inference kernels' outputs: a freed output's block serves the next
output of its size, a live output's block never does, the values are the kernel's own on fresh
inputs, and the cap and empty_cache() bound what it keeps."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import sparsecore
from sparsecore import _ext

pytestmark = pytest.mark.skipif(not _ext.has_cpu_ext(), reason="needs the C++ extension")


def _conv_case(n: int = 3, c: int = 4, hw: int = 9, c_out: int = 6):
    w = torch.randn(c_out, c, 3, 3)
    w = w * (torch.rand_like(w) < 0.4)
    w[0, 0, 0, 0] = 1.0
    m = w.reshape(c_out, -1) != 0
    rows, cols = m.nonzero(as_tuple=True)
    row_ptr = torch.zeros(c_out + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=c_out), 0)
    values = w.reshape(c_out, -1)[rows, cols].contiguous()
    col = cols.to(torch.int32)

    def run(x):
        return torch.ops.sparsecore._csr_conv2d_fused_cpu(
            x, values, col, row_ptr, list(w.shape), [1, 1], [1, 1], None, None, True, False,
            [1, 1], None)

    def ref(x):
        return F.conv2d(x.double(), w.double(), padding=1).relu()

    return run, ref, (n, c, hw, hw)


def _close(got, ref) -> None:
    assert (got.double() - ref).abs().max().item() <= 2e-5 * (ref.abs().max().item() + 1e-30)


def test_a_freed_block_serves_the_next_output_of_its_size() -> None:
    run, ref, shape = _conv_case()
    x = torch.randn(shape)
    first = run(x)
    _close(first, ref(x))
    ptr, nbytes = first.data_ptr(), first.numel() * first.element_size()
    cached = torch.ops.sparsecore._arena_cached_cpu()
    del first
    assert torch.ops.sparsecore._arena_cached_cpu() >= cached + nbytes
    x2 = torch.randn(shape)  # fresh input: the reused block holds the new result, not the old
    second = run(x2)
    assert second.data_ptr() == ptr
    _close(second, ref(x2))


def test_live_outputs_never_share_a_block() -> None:
    run, ref, shape = _conv_case()
    xs = [torch.randn(shape) for _ in range(4)]
    outs = [run(x) for x in xs]
    assert len({o.data_ptr() for o in outs}) == len(outs)
    for x, o in zip(xs, outs):
        _close(o, ref(x))
    assert all(o.data_ptr() % 64 == 0 for o in outs)


def test_empty_cache_frees_what_is_kept() -> None:
    run, _, shape = _conv_case(n=5)
    out = run(torch.randn(shape))
    nbytes = out.numel() * out.element_size()
    del out
    kept = torch.ops.sparsecore._arena_cached_cpu()
    assert kept >= nbytes
    assert sparsecore.empty_cache() == kept
    assert torch.ops.sparsecore._arena_cached_cpu() == 0
    assert sparsecore.empty_cache() == 0


def test_outputs_freed_on_other_threads() -> None:
    """Blocks handed out on one thread and given back on others, while the first keeps
    allocating: every output still holds its own result."""
    run, ref, shape = _conv_case(n=2, c=3, hw=7, c_out=5)
    errors: list[BaseException] = []

    def drop(tensors):
        try:
            for t in tensors:
                del t
            tensors.clear()
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    for _ in range(20):
        xs = [torch.randn(shape) for _ in range(6)]
        outs = [run(x) for x in xs]
        for x, o in zip(xs, outs):
            _close(o, ref(x))
        th = threading.Thread(target=drop, args=(outs,))
        th.start()
        more = [run(x) for x in xs]
        th.join()
        for x, o in zip(xs, more):
            _close(o, ref(x))
    assert not errors


@pytest.mark.parametrize("cap,keeps", [("0", False), ("1", True), ("lots", True)])
def test_cap_from_the_environment(cap, keeps) -> None:
    """SPARSECORE_CPU_ARENA_MB caps the bytes kept (0: none); a value that is not a whole
    number warns and keeps the default."""
    code = (
        "import torch, sparsecore, warnings\n"
        "from sparsecore import _ext\n"
        "assert _ext.has_cpu_ext()\n"
        "w = torch.ones(2, 1, 1, 1)\n"
        "vals, col, rp = torch.ones(2), torch.zeros(2, dtype=torch.int32), "
        "torch.tensor([0, 1, 2], dtype=torch.int32)\n"
        "x = torch.randn(4, 1, 8, 8)\n"
        "y = torch.ops.sparsecore._csr_conv2d_fused_cpu(x, vals, col, rp, [2, 1, 1, 1], [0, 0],"
        " [1, 1], None, None, False, False, [1, 1], None)\n"
        "assert torch.equal(y, x.expand(4, 2, 8, 8))\n"
        "del y\n"
        "print(torch.ops.sparsecore._arena_cached_cpu())\n"
    )
    env = dict(os.environ, SPARSECORE_CPU_ARENA_MB=cap)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    kept = int(proc.stdout.split()[-1])
    assert (kept > 0) == keeps
    assert ("not a whole number" in proc.stderr) == (cap == "lots")
