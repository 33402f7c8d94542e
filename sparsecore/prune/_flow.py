"""Synaptic flow on a linearised copy of a model (shared by SynFlow and the collapse report).

The copy has the masks baked in, every floating parameter and buffer replaced by its
absolute value, BatchNorm in eval mode, and float64 arithmetic. Fed an all-ones input, its
summed output R = 1^T (prod_l |W_l|) 1 counts weighted input->output paths; the flow
through a weight is |theta * dR/dtheta|, which is zero exactly when no path uses it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sparsecore.prune.masks import remove as remove_masks

_BIAS_BUFFERS = ("running_mean",)


def linearized_copy(model: nn.Module, *, zero_bias: bool = False,
                    dtype: torch.dtype = torch.float64) -> nn.Module:
    """A detached float64 copy with masks baked in and |.| of every floating tensor.

    zero_bias: also zero biases and BatchNorm running means, so that R depends on the input
    only through paths (used for connectivity; SynFlow itself keeps |bias|).
    """
    lin = copy.deepcopy(model)
    remove_masks(lin)
    lin.to(dtype).eval()
    with torch.no_grad():
        for key, t in lin.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            last = key.rpartition(".")[2]
            if zero_bias and (last == "bias" or last in _BIAS_BUFFERS):
                t.zero_()
            else:
                t.abs_()
    for p in lin.parameters():
        p.requires_grad_(True)
    return lin


def ones_input(example: Any, dtype: torch.dtype = torch.float64,
               device: torch.device | None = None) -> Tensor:
    """An all-ones batch of one: from a shape (without the batch dimension), an example
    tensor, an (x, y) pair or an iterable of such batches."""
    if isinstance(example, torch.Size | tuple | list) and all(isinstance(s, int) for s in example):
        return torch.ones((1, *example), dtype=dtype, device=device)
    if isinstance(example, Tensor):
        x = example
    elif isinstance(example, tuple | list) and example and isinstance(example[0], Tensor):
        x = example[0]
    elif example is not None:
        x = next(iter(example))[0]
    else:
        raise ValueError("give input_shape= (without the batch dimension) or example data")
    if not x.is_floating_point():
        raise ValueError("synaptic flow needs a floating-point input (got "
                         f"{x.dtype}); models that embed token ids are not supported")
    return torch.ones((1, *x.shape[1:]), dtype=dtype, device=device or x.device)


def flow(lin: nn.Module, names: Sequence[str], x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """(R, name -> |theta * dR/dtheta|) for the named parameters of a linearised copy."""
    params = [lin.get_parameter(n) for n in names]
    out = lin(x.to(next(lin.parameters()).device))
    if not isinstance(out, Tensor):
        out = out[0]
    r = out.sum()
    grads = torch.autograd.grad(r, params, allow_unused=True)
    scores = {}
    for n, p, g in zip(names, params, grads):
        scores[n] = torch.zeros_like(p) if g is None else (p.detach() * g).abs()
    return r.detach(), scores
