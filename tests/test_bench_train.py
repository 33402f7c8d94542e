"""bench train: the first-step check between the dense and the sparse model (that it agrees
on equal weights and sees a wrong one), and the whole bench path up to its JSON. No timing is
asserted."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

from bench import common
from bench import models as bm
from bench import train as bt
from sparsecore import models, prune
from sparsecore.nn import SparsifyConfig, sparsify

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = bm.ModelSpec({"num_classes": 10, "in_channels": 3, "input_size": 8, "width": 0.25},
                    bm._images(8))


def test_first_step_check_compares_kept_gradients() -> None:
    """Sparse layers (values), a layer left masked (its original) and BatchNorm are all
    compared; equal weights agree to roundoff, changed kept weights show."""
    net = models.create("resnet8", num_classes=5, input_size=8, width=0.25).double()
    prune.prune(net, "magnitude", sparsity=0.9, scope="layerwise")
    dense = copy.deepcopy(net)
    prune.remove(dense)
    sparse = copy.deepcopy(net)
    sparsify(sparse, SparsifyConfig(min_sparsity=0.0), filter_fn=lambda m, name: name != "fc")
    dense.train(), sparse.train()
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(5, (6,))

    check = bt.first_step_check(dense, sparse, x, y)
    assert check["loss_diff"] < 1e-12 and check["grad_diff"] < 1e-12
    assert check["grad_max_abs"] > 1e-3
    names = [name for name, _, _ in bt.compared_grads(dense, sparse)]
    assert "fc.parametrizations.weight.original" in names and "stem.0.values" in names
    assert "stem.1.weight" in names  # BatchNorm
    assert len(names) == sum(p.requires_grad for p in sparse.parameters())

    stem = sparse.stem[0]
    assert stem.nnz > stem.out_channels  # some channel keeps two weights: BatchNorm's
    with torch.no_grad():               # scale invariance cannot hide the change below
        stem.values.add_(torch.randn_like(stem.values))
    wrong = bt.first_step_check(dense, sparse, x, y)
    assert wrong["loss_diff"] > 1e-6 and wrong["grad_diff"] > 1e-6


def test_bench_writes_rows(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setitem(bm.SPECS, "resnet8", TINY)
    p = argparse.ArgumentParser()
    bt.add_arguments(p)
    args = p.parse_args(["--quick", "--pruning", "global,every-layer", "--reps", "1",
                         "--warmup", "0"])
    assert bt.main(args) == 0
    payload = json.loads((tmp_path / "train-quick-cpu.json").read_text())
    assert payload["optimizer"] == {"name": "SGD", **bt.SGD}
    rows = payload["rows"]
    assert [(r["model"], r["pruning"], r["batch"], r["threads"]) for r in rows] == [
        ("resnet8", "global", 8, 1), ("resnet8", "every-layer", 8, 1)]
    for r in rows:
        assert r["note"].startswith("sparsify: "), r["note"]
        assert abs(r["achieved_sparsity"] - 0.9) < 1e-3
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["speedup"] > 0
        assert r["loss_diff"] < 1e-5
        assert r["grad_diff"] < 1e-5 * max(1.0, r["grad_max_abs"])
