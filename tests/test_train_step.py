"""Whole-model training on sparsify()'s layers against the masked dense model, in float64:
SGD steps (momentum, weight decay) of a small VGG and a small ResNet pruned 90 % (every layer,
and global), with BatchNorm in train mode, residual adds with strided 1x1 shortcuts, stride-2
convs, a Linear head, a 7x7 input and channel counts that are not multiples of 8. After every
step the loss, the logits, every trained parameter and BatchNorm's running statistics match,
the masks are unchanged and the pruned weights are exactly zero."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsecore import has_cpu_ext, models, prune, use_backend
from sparsecore.nn import SparseConv2d, SparseLinear, SparsifyConfig, sparsify

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, SIDE, BATCH, STEPS = 7, 7, 8, 3
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
# Small nets with the shapes the real ones have (see the module docstring): VGG-11 at 0.1
# width has 6, 13, 26 and 51 channels; ResNet-8 at 0.7 width 11, 22 and 45, its second and
# third stages entered by stride-2 convs (7x7 -> 4x4 -> 2x2) with 1x1 stride-2 shortcuts.
NETS: dict[str, Callable[[], nn.Module]] = {
    "vgg": lambda: models.create("vgg11", num_classes=CLASSES, input_size=SIDE, width=0.1),
    "resnet": lambda: models.create("resnet8", num_classes=CLASSES, input_size=SIDE, width=0.7),
}
# None: each op's automatic choice (on 7x7 maps the dense fallback for most layers);
# "cpp": the C++ sparse kernels forced for every layer.
BACKENDS = [None] + (["cpp"] if has_cpu_ext() else [])
TOL = {"rtol": 1e-9, "atol": 1e-11}


def _pruned_pair(net: str, scope: str) -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    """(masked model, its sparsify()'d copy, layer name -> kept positions), float64, train
    mode; every masked layer is a sparse one."""
    masked = NETS[net]().double()
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["layerwise", "global"])
@pytest.mark.parametrize("net", list(NETS))
def test_sgd_steps_match_the_masked_model(net: str, scope: str, backend: str | None) -> None:
    masked, sparse, masks = _pruned_pair(net, scope)
    opt_m = torch.optim.SGD(masked.parameters(), **SGD)
    opt_s = torch.optim.SGD(sparse.parameters(), **SGD)
    before = sparse.fc.dense_weight()
    with use_backend(backend) if backend else contextlib.nullcontext():
        for step in range(STEPS):
            x = torch.randn(BATCH, 3, SIDE, SIDE, dtype=torch.float64)
            y = torch.randint(CLASSES, (BATCH,))
            logits_m, loss_m = _step(masked, opt_m, x, y)
            logits_s, loss_s = _step(sparse, opt_s, x, y)
            torch.testing.assert_close(logits_s, logits_m, **TOL, msg=f"logits, step {step}")
            torch.testing.assert_close(loss_s, loss_m, **TOL, msg=f"loss, step {step}")
            _check_same_state(masked, sparse, masks)
    # the steps moved the weights: what matched above is trained, not initial, state
    assert not torch.equal(sparse.fc.dense_weight(), before)
