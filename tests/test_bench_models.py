"""bench models: the ONNX runner's protocol (with stand-in engines, and with the real ones
where their venvs exist), the whole bench path up to its JSON, and that the exported ONNX
model keeps the pruned zeros. No timing is asserted."""

from __future__ import annotations

import argparse
import ast
import copy
import itertools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from bench import common
from bench import models as bm
from sparsecore import prune

pytestmark = pytest.mark.usefixtures("one_thread")

# Stand-in engines, importable as onnxruntime / deepsparse by the runner under this Python:
# they evaluate the model with onnx's reference evaluator, or with FAKE_ENGINE_TWICE set
# return twice the first input (the protocol alone, no model file needed).
_FAKE_COMMON = '''
import os

def evaluate(path, inputs):
    if os.environ.get("FAKE_ENGINE_TWICE"):
        return [2 * inputs[0]]
    from onnx.reference import ReferenceEvaluator

    ref = ReferenceEvaluator(path)
    return ref.run(None, dict(zip(ref.input_names, inputs)))
'''
_FAKE_ORT = '''
import types
from _fake_common import evaluate

__version__ = "fake-ort"

class SessionOptions:
    pass

class ExecutionMode:
    ORT_SEQUENTIAL = 0

class GraphOptimizationLevel:
    ORT_ENABLE_ALL = 99

class InferenceSession:
    def __init__(self, path, opts, providers):
        assert opts.intra_op_num_threads >= 1 and providers == ["CPUExecutionProvider"]
        self.path = path

    def get_inputs(self):
        return [types.SimpleNamespace(name="input")]

    def run(self, names, feeds):
        return evaluate(self.path, list(feeds.values()))
'''
_FAKE_DEEPSPARSE = '''
from _fake_common import evaluate

__version__ = "fake-deepsparse"

class _Engine:
    cpu_avx_type = "fake"
    fraction_of_supported_ops = 1.0

    def __init__(self, path, batch_size, num_cores):
        self.path, self.batch_size = path, batch_size

    def run(self, inputs, val_inp=True):
        assert inputs[0].shape[0] == self.batch_size
        return evaluate(self.path, inputs)

def compile_model(path, batch_size=1, num_cores=None):
    assert num_cores >= 1
    return _Engine(path, batch_size, num_cores)
'''


@pytest.fixture
def fake_engines(tmp_path, monkeypatch) -> str:
    """A directory of stand-in engine modules, put on the runner's PYTHONPATH."""
    d = tmp_path / "fake"
    d.mkdir()
    for name, text in [("_fake_common", _FAKE_COMMON), ("onnxruntime", _FAKE_ORT),
                       ("deepsparse", _FAKE_DEEPSPARSE)]:
        (d / f"{name}.py").write_text(textwrap.dedent(text))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(d)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return str(d)


def test_runner_imports_only_numpy_and_the_engines() -> None:
    tree = ast.parse(open(bm.RUNNER).read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    third_party = names - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"numpy", "onnxruntime", "deepsparse"}


@pytest.mark.parametrize("engine", bm.ENGINES)
def test_runner_protocol(engine: str, fake_engines: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_ENGINE_TWICE", "1")
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "m.onnx").write_bytes(b"not a model")  # the stand-ins do not read it
    out = tmp_path / "out.npy"
    res = bm.run_onnx(sys.executable, engine, str(tmp_path / "m.onnx"), [str(tmp_path / "x.npy")],
                      2, output=str(out), warmup=1, reps=3, min_time=0.0)
    assert res["engine"] == engine and res["threads"] == 2 and res["reps"] == 3
    assert res["version"] == f"fake-{engine}"
    assert res["p10_ms"] <= res["median_ms"] <= res["p90_ms"]
    np.testing.assert_array_equal(np.load(out), 2 * x)


@pytest.mark.parametrize("engine", bm.ENGINES)
def test_runner_rounds(engine: str, fake_engines: str, tmp_path, monkeypatch) -> None:
    """--rounds: built once, one round per request, the summary over every round's runs."""
    monkeypatch.setenv("FAKE_ENGINE_TWICE", "1")
    x = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.npy"
    worker = bm.OnnxWorker(sys.executable, engine, "m.onnx", [str(tmp_path / "x.npy")], 1,
                           output=str(out), warmup=0, reps=2, min_time=0.0, rounds=3)
    try:
        got = [worker.round() for _ in range(3)]
        res = worker.finish()
    finally:
        worker.close()
    assert [len(r) for r in got] == [2, 2, 2] and all(t > 0 for r in got for t in r)
    assert res["reps"] == 6 and len(res["round_median_ms"]) == 3
    ms = sorted(1e3 * t for r in got for t in r)
    assert res["median_ms"] == pytest.approx((ms[2] + ms[3]) / 2)
    np.testing.assert_array_equal(np.load(out), 2 * x)


def test_runner_stops_when_its_input_ends(fake_engines: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_ENGINE_TWICE", "1")
    np.save(tmp_path / "x.npy", np.zeros((2, 2), np.float32))
    proc = subprocess.run(
        [sys.executable, bm.RUNNER, "--engine", "ort", "--model", "m.onnx", "--input",
         str(tmp_path / "x.npy"), "--threads", "1", "--reps", "1", "--min-time", "0",
         "--rounds", "3"], input="go\n", capture_output=True, text=True, check=False)
    assert proc.returncode == 3
    assert "standard input ended before round 2 of 3" in proc.stderr
    assert '"round": 0' in proc.stdout and "median_ms" not in proc.stdout


class _Worker:
    def __init__(self, name: str, log: list[str], fail_at: int | None = None) -> None:
        self.name, self.log, self.fail_at, self.closed = name, log, fail_at, False

    def round(self) -> list[float]:
        if self.fail_at is not None and self.log.count(self.name) == self.fail_at:
            raise RuntimeError("runner exited with 1: gone")
        self.log.append(self.name)
        return [0.001]

    def close(self) -> None:
        self.closed = True


def test_rounds_interleave_the_engines(monkeypatch) -> None:
    """Every round runs each engine once, in turn; a worker that fails mid-way is noted,
    closed and dropped, and the others go on."""
    monkeypatch.setattr(bm, "PAUSE", 0.0)
    log: list[str] = []
    fns = {"torch": lambda: log.append("torch"), "sparsecore": lambda: log.append("sparsecore")}
    workers = {"ort": _Worker("ort", log), "deepsparse": _Worker("deepsparse", log, fail_at=1)}
    failing = workers["deepsparse"]
    notes: list[str] = []
    args = argparse.Namespace(rounds=3, device="cpu", warmup=0, reps=1)
    samples = bm._time_rounds(fns, workers, args, notes)
    runs = [name for name, _ in itertools.groupby(log)]  # a round's timed runs: one entry
    assert runs == ["torch", "sparsecore", "ort", "deepsparse",
                   "torch", "sparsecore", "ort",
                   "torch", "sparsecore", "ort"]
    assert set(samples) == {"torch", "sparsecore", "ort"} and set(workers) == {"ort"}
    assert all(len(v) == 3 for v in samples.values())
    assert failing.closed and notes == ["deepsparse: RuntimeError: runner exited with 1: gone"]


def test_runner_failure_is_reported(tmp_path) -> None:
    np.save(tmp_path / "x.npy", np.zeros(2, np.float32))
    stub = tmp_path / "stub.py"
    stub.write_text("import sys\nprint('engine exploded', file=sys.stderr)\nsys.exit(3)\n")
    with pytest.raises(RuntimeError, match="exited with 3: engine exploded"):
        bm.run_onnx(sys.executable, "ort", "m.onnx", [str(tmp_path / "x.npy")], 1,
                    output=str(tmp_path / "o.npy"), runner=str(stub))


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                         nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_export_keeps_the_pruned_zeros(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    net = _tiny()
    bn = net[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)  # nonzero scales: folding keeps exactly the zeros
    net.eval()
    masks = prune.prune(net, "magnitude", sparsity=0.8)
    dense = copy.deepcopy(net)
    prune.remove(dense)
    for name, mask in masks.items():
        w = dense.get_parameter(name)
        assert torch.equal(w == 0, ~mask)  # prune.remove bakes the zeros in
    x = torch.randn(2, 3, 8, 8)
    path = str(tmp_path / "m.onnx")
    bm.export_onnx(dense, x, path)
    graph = onnx.load(path).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    weights = [inits[n.input[1]] for n in graph.node
               if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits]
    zeros = sorted(int((w == 0).sum()) for w in weights)
    assert zeros == sorted(int((~m).sum()) for m in masks.values())
    # and the sparsecore engine runs the same function
    sc, note = bm.sparsecore_model(net, x)
    assert note.startswith("optimize:")
    with torch.no_grad():
        torch.testing.assert_close(sc(x), dense(x), atol=1e-5, rtol=1e-4)


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bm.add_arguments(p)
    return p.parse_args(list(argv))


def test_bench_writes_rows_with_every_engine(fake_engines: str, tmp_path, monkeypatch) -> None:
    pytest.importorskip("onnx")
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setitem(bm.SPECS, "resnet8", bm.ModelSpec(
        {"num_classes": 10, "in_channels": 3, "input_size": 8, "width": 0.25}, bm._images(8)))
    args = _args("--quick", "--pruning", "global,every-layer", "--ort-python", sys.executable,
                 "--deepsparse-python", sys.executable, "--reps", "1", "--warmup", "0",
                 "--rounds", "2")
    assert bm.main(args) == 0
    payload = json.loads((tmp_path / "models-quick-cpu.json").read_text())
    assert payload["isa"] == torch.backends.cpu.get_cpu_capability()
    rows = payload["rows"]
    assert [(r["model"], r["pruning"], r["batch"], r["threads"]) for r in rows] == [
        ("resnet8", "global", 1, 1), ("resnet8", "every-layer", 1, 1)]
    for r in rows:
        assert r["note"] is None, r["note"]
        assert abs(r["achieved_sparsity"] - 0.9) < 1e-3
        for engine in ("torch", "ort", "deepsparse", "sparsecore"):
            assert r[f"{engine}_ms"] > 0 and len(r[f"{engine}_rounds_ms"]) == 2
        for engine in ("ort", "deepsparse", "sparsecore"):
            assert r[f"{engine}_diff"] < 1e-4
        assert r["deepsparse_version"] == "fake-deepsparse"


def test_bench_goes_on_without_baselines(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setitem(bm.SPECS, "resnet8", bm.ModelSpec(
        {"num_classes": 10, "in_channels": 3, "input_size": 8, "width": 0.25}, bm._images(8)))
    args = _args("--quick", "--no-ort", "--deepsparse-python", str(tmp_path / "missing"),
                 "--reps", "1", "--warmup", "0", "--tag", "t")
    assert bm.main(args) == 0
    (row,) = json.loads((tmp_path / "models-t-cpu.json").read_text())["rows"]
    assert "ort_ms" not in row and "deepsparse_ms" not in row
    assert row["torch_ms"] > 0 and row["sparsecore_ms"] > 0 and row["note"] is None


@pytest.mark.parametrize("engine", bm.ENGINES)
def test_real_engine_matches_torch(engine: str, tmp_path) -> None:
    python = bm.DEFAULT_PYTHON[engine]
    if not os.path.exists(python):
        pytest.skip(f"no {python} (make bench-baselines)")
    pytest.importorskip("onnx")
    net = _tiny().eval()
    prune.prune(net, "magnitude", sparsity=0.9)
    prune.remove(net)
    x = torch.randn(4, 3, 8, 8)
    path, x_path, out = (str(tmp_path / n) for n in ("m.onnx", "x.npy", "o.npy"))
    bm.export_onnx(net, x, path)
    np.save(x_path, x.numpy())
    res = bm.run_onnx(python, engine, path, [x_path], 1, output=out, warmup=1, reps=2,
                      min_time=0.0)
    assert res["engine"] == engine and res["median_ms"] > 0
    with torch.no_grad():
        assert bm.max_abs_diff(net(x), np.load(out)) < 1e-4
