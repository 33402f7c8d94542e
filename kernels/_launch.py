"""Checks and launch plumbing shared by the Triton launchers (csr.py, bsr.py).

Every launcher validates its inputs here before anything reaches a kernel, so a bad call
fails with a ValueError/TypeError that names the argument, never with a Triton compile
error or silent garbage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Offsets inside the kernels are int32: no element a kernel touches may lie further than
# this from its tensor's first element.
MAX_OFFSET = 2**31 - 1


def is_interpreted(kernel: Any) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (the decorator decides at
    import time, so asking the kernel object is the one answer that cannot disagree)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    check_span(name, t)


def check_span(name: str, t: torch.Tensor) -> None:
    """The largest element offset of `t` (its strides included) fits the kernels' int32."""
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    if t.numel() and span > MAX_OFFSET:
        raise ValueError(f"{name} spans {span + 1} elements; the kernels index with int32")


def check_index(
    name: str,
    t: torch.Tensor,
    numel: int | None = None,
    dtypes: Sequence[torch.dtype] = (torch.int32,),
) -> torch.Tensor:
    """A 1-D index array of one of `dtypes` (and `numel` long when given), made contiguous."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must be {allowed}, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()}")
    return t.contiguous()


def check_device(kernel: Any, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and one that this Triton build can run `kernel` on."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")
    device = next(iter(devices.values()))
    if is_interpreted(kernel):
        if device.type != "cpu":
            raise ValueError(
                f"under TRITON_INTERPRET=1 the tensors must be on the CPU, got {device}"
            )
    elif device.type != "cuda":
        raise ValueError(
            f"Triton kernels need CUDA tensors, got {device} "
            "(CPU tensors run only under TRITON_INTERPRET=1)"
        )
    return device


def same_dtype(kernel: Any, **tensors: torch.Tensor) -> torch.dtype:
    """The one float dtype of `tensors`, refusing bfloat16 under the interpreter."""
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n} is {d}" for n, d in dtypes.items())
        raise TypeError(f"float inputs must share one dtype, got {listed}")
    dtype = next(iter(dtypes.values()))
    if dtype == torch.bfloat16 and is_interpreted(kernel):
        # Triton's interpreter keeps bfloat16 as raw uint16: its tl.dot multiplies the bit
        # patterns (triton-lang/triton#11584, "not supported yet") and its float32 ->
        # bfloat16 cast truncates instead of rounding to nearest even, so a result would be
        # wrong or less accurate than on a GPU. Refused rather than returned.
        raise TypeError(
            "bfloat16 is not supported under TRITON_INTERPRET=1 (Triton's interpreter "
            "mishandles bfloat16 arithmetic); use float32/float16 there, bfloat16 on a GPU"
        )
    return dtype


def launch(
    tuned: Any,
    plain: Any,
    grid: Callable[[dict[str, Any]], tuple[int, ...]],
    args: Sequence[Any],
    meta: dict[str, Any],
    interpreter_config: triton.Config,
    device: torch.device,
) -> None:
    """Run the autotuned kernel on `device` (Triton launches on the current CUDA device, so
    it is made current). Under the interpreter autotune would run (and time) every config
    on the CPU, which is slow and measures nothing, so the plain kernel runs with
    `interpreter_config` instead."""
    if is_interpreted(plain):
        full = {**meta, **interpreter_config.kwargs}
        plain[grid(full)](*args, **full)
    else:
        with torch.cuda.device(device):
            tuned[grid](*args, **meta)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
