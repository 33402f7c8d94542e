"""Whole-model training on sparsify()'s layers against the masked dense model, in float64:
SGD steps (momentum, weight decay) of a small VGG and a small ResNet pruned 90 % (every layer,
and global), with BatchNorm in train mode, residual adds with strided 1x1 shortcuts, stride-2
convs, a Linear head, 7x7 and 12x12 inputs and channel counts that are not multiples of 8.
After every step the loss, the logits, every trained parameter and BatchNorm's running
statistics match, the masks are unchanged and the pruned weights are exactly zero; on the
C++ backend, exactly the convs with small outputs ran on the batch-last kernels."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsecore import has_cpu_ext, models, ops, prune, use_backend
from sparsecore.nn import SparseConv2d, SparseLinear, SparsifyConfig, sparsify

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, BATCH, STEPS = 7, 8, 3
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
# Small nets with the shapes the real ones have (see the module docstring): VGG-11 at 0.1
# width has 6, 13, 26 and 51 channels; ResNet-8 at 0.7 width 11, 22 and 45, its second and
# third stages entered by stride-2 convs (7x7 -> 4x4 -> 2x2) with 1x1 stride-2 shortcuts.
NETS: dict[str, Callable[[int], nn.Module]] = {
    "vgg": lambda side: models.create("vgg11", num_classes=CLASSES, input_size=side, width=0.1),
    "resnet": lambda side: models.create("resnet8", num_classes=CLASSES, input_size=side,
                                         width=0.7),
}
# Input sides: at 7 every conv output has at most CSR_BATCH_LAST_MAX_PIXELS pixels (the
# batch-last kernels run every conv on the CPU with the extension); at 12 the first stage's
# 12x12 maps take the other paths (the dense fallback, or the direct kernels when forced)
# and feed, and take gradients from, batch-last layers.
SIDES = [7, 12]
# None: each op's automatic choice; "cpp": the C++ sparse kernels forced for every layer.
BACKENDS = [None] + (["cpp"] if has_cpu_ext() else [])
TOL = {"rtol": 1e-9, "atol": 1e-11}


def _pruned_pair(net: str, scope: str, side: int
                 ) -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    """(masked model, its sparsify()'d copy, layer name -> kept positions), float64, train
    mode; every masked layer is a sparse one."""
    masked = NETS[net](side).double()
    prune.prune(masked, "magnitude", sparsity=0.9, scope=scope)
    sparse = copy.deepcopy(masked)
    report = sparsify(sparse, SparsifyConfig(min_sparsity=0.0))
    assert not report.skipped and len(report.swapped) == len(prune.masks(masked))
    assert {kind for _, kind, _ in report.swapped} == {"SparseConv2d", "SparseLinear"}
    masks = {name: sparse.get_submodule(name).mask() for name, _, _ in report.swapped}
    return masked.train(), sparse.train(), masks


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
          y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step; the logits and the loss it computed."""
    opt.zero_grad()
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    opt.step()
    return logits.detach(), loss.detach()


def _check_same_state(masked: nn.Module, sparse: nn.Module,
                      masks: dict[str, torch.Tensor]) -> None:
    """Every sparse layer holds the masked layer's weight and bias, on its original mask with
    zeros elsewhere; every BatchNorm the same parameters and running statistics."""
    seen = 0
    for name, module in sparse.named_modules():
        ref = masked.get_submodule(name)
        if isinstance(module, (SparseConv2d, SparseLinear)):
            seen += 1
            mask = masks[name]
            assert torch.equal(module.mask(), mask), name
            assert module.values.numel() == int(mask.sum())
            weight = module.dense_weight()
            assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask])), name
            assert torch.equal(ref.weight[~mask], torch.zeros_like(weight[~mask])), name
            torch.testing.assert_close(weight, ref.weight.detach(), **TOL, msg=name)
            if module.bias is not None:
                torch.testing.assert_close(module.bias, ref.bias, **TOL, msg=f"{name}.bias")
        elif isinstance(module, nn.BatchNorm2d):
            for attr in ("weight", "bias", "running_mean", "running_var"):
                torch.testing.assert_close(getattr(module, attr), getattr(ref, attr), **TOL,
                                           msg=f"{name}.{attr}")
    assert seen == len(masks)


def _expected_chwn_calls(sparse: nn.Module, side: int) -> list[tuple]:
    """The batch-last kernel calls of one step, as the chwn_calls fixture records them, in
    any order: each conv with an output of at most CSR_BATCH_LAST_MAX_PIXELS pixels runs its
    forward, its weight gradient and, where the geometry allows, its input gradient there
    (the first conv's input needs no gradient)."""
    outputs: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda m, args, y, name=name: outputs.update({name: y.shape}))
             for name, m in sparse.named_modules() if isinstance(m, SparseConv2d)]
    with torch.no_grad(), use_backend("reference"):
        sparse.eval()(torch.zeros(1, 3, side, side, dtype=torch.float64))
    sparse.train()
    for hook in hooks:
        hook.remove()
    calls = []
    for i, (name, shape) in enumerate(outputs.items()):
        layer = sparse.get_submodule(name)
        if shape[2] * shape[3] > ops.CSR_BATCH_LAST_MAX_PIXELS:
            continue
        c_out, c_in, kh, kw = weight = tuple(layer.weight_shape)
        calls += [("conv", weight, layer.stride), ("dw", weight, layer.stride)]
        if i > 0 and layer._uses_flip():
            calls.append(("conv", (c_in, c_out, kh, kw), (1, 1)))
    return sorted(calls)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("scope", ["layerwise", "global"])
@pytest.mark.parametrize("net", list(NETS))
def test_sgd_steps_match_the_masked_model(net: str, scope: str, side: int, backend: str | None,
                                          chwn_calls: list) -> None:
    masked, sparse, masks = _pruned_pair(net, scope, side)
    expected_calls = _expected_chwn_calls(sparse, side) if has_cpu_ext() else []
    opt_m = torch.optim.SGD(masked.parameters(), **SGD)
    opt_s = torch.optim.SGD(sparse.parameters(), **SGD)
    before = sparse.fc.dense_weight()
    with use_backend(backend) if backend else contextlib.nullcontext():
        for step in range(STEPS):
            chwn_calls.clear()
            x = torch.randn(BATCH, 3, side, side, dtype=torch.float64)
            y = torch.randint(CLASSES, (BATCH,))
            logits_m, loss_m = _step(masked, opt_m, x, y)
            logits_s, loss_s = _step(sparse, opt_s, x, y)
            torch.testing.assert_close(logits_s, logits_m, **TOL, msg=f"logits, step {step}")
            torch.testing.assert_close(loss_s, loss_m, **TOL, msg=f"loss, step {step}")
            _check_same_state(masked, sparse, masks)
            assert sorted(chwn_calls) == expected_calls, f"step {step}"
    # the steps moved the weights: what matched above is trained, not initial, state
    assert not torch.equal(sparse.fc.dense_weight(), before)
