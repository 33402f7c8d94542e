"""Training: loss goes down, resume after a kill redoes no finished epoch and ends where an
uninterrupted run ends, and 2-process DDP (torchrun, gloo) keeps masks identical on both
ranks and matches one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sparsecore import prune
from sparsecore import train as T
from sparsecore.hparams import DataHparams, ModelHparams, TrainHparams

pytestmark = pytest.mark.usefixtures("one_thread")


DATA = DataHparams(dataset="synthetic", image_size=8, limit_train=400)
HP = TrainHparams(epochs=3, batch_size=50, optimizer="adam", lr=3e-3, weight_decay=0.0)


def _model(splits):
    return ModelHparams("conv2", 0.25).build(splits, seed=0)


def test_loss_goes_down_and_metrics_are_written(tmp_path) -> None:
    splits = DATA.load()
    r = T.train(_model(splits), splits, HP, out_dir=str(tmp_path), progress=False)
    losses = [m["train_loss"] for m in r.metrics]
    assert losses[-1] < 0.7 * losses[0]
    assert r.final["acc"] > 0.3  # 10 classes
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [1, 2, 3]


def test_penalty_is_added_to_the_training_loss() -> None:
    splits = DATA.load()
    hp = TrainHparams(epochs=1, batch_size=50, optimizer="sgd", lr=0.05, momentum=0.0,
                      weight_decay=0.0)
    plain = T.train(_model(splits), splits, hp, progress=False).model
    calls = {"n": 0}

    def l2(model: torch.nn.Module) -> torch.Tensor:
        calls["n"] += 1
        return sum(p.pow(2).sum() for p in model.parameters())

    shrunk = T.train(_model(splits), splits, hp, progress=False, penalty=l2).model
    assert calls["n"] == 8  # once per training batch: 400 examples in batches of 50
    norm = [sum(float(p.detach().pow(2).sum()) for p in m.parameters()) for m in (plain, shrunk)]
    assert norm[1] < 0.5 * norm[0]


def _die_at_second_evaluation(monkeypatch) -> dict[str, int]:
    """Patch T.evaluate to raise KeyboardInterrupt on its 2nd call (a kill at the end of
    epoch 2, before that epoch's checkpoint); returns the call counter."""
    calls = {"n": 0}
    real_evaluate = T.evaluate

    def dying_evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(T, "evaluate", dying_evaluate)
    return calls


def test_resume_after_kill_redoes_no_epoch(tmp_path, monkeypatch) -> None:
    splits = DATA.load()
    model = _model(splits)
    prune.prune(model, "magnitude", sparsity=0.5)  # masks must survive the restart too
    ref_model = _model(splits)
    prune.prune(ref_model, "magnitude", sparsity=0.5)
    ref = T.train(ref_model, splits, HP, progress=False)

    calls = _die_at_second_evaluation(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        T.train(model, splits, HP, out_dir=str(tmp_path), progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1

    calls["n"] = 10
    fresh = _model(splits)  # a new process: fresh model, masks come from the checkpoint
    r = T.train(fresh, splits, HP, out_dir=str(tmp_path), progress=False)
    assert r.resumed_from == 1 and calls["n"] == 12  # epochs 2 and 3 only
    assert [m["epoch"] for m in r.metrics] == [1, 2, 3]
    assert r.final["acc"] == pytest.approx(ref.final["acc"])
    assert T.mask_digest(r.model) == T.mask_digest(ref.model) != ""
    for (k, a), b in zip(r.model.state_dict().items(), ref.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)

    again = T.train(_model(splits), splits, HP, out_dir=str(tmp_path), progress=False)
    assert again.resumed_from == 3 and calls["n"] == 12  # finished: nothing redone


def test_lr_schedules() -> None:
    hp = TrainHparams(epochs=4, schedule="step", milestones="2,3", gamma=0.1, warmup_epochs=1)
    f = [T.lr_factor(hp, s, 10) for s in range(40)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[15] == 1.0 and f[25] == pytest.approx(0.1) and f[35] == pytest.approx(0.01)
    cos = TrainHparams(epochs=2, schedule="cosine")
    assert T.lr_factor(cos, 0, 10) == 1.0 and T.lr_factor(cos, 19, 10) < 0.01


def test_epoch_range_resumes_the_schedule_and_data_order(tmp_path) -> None:
    """train(start_epoch=k) is epochs k..T-1 of the whole run: the learning rate (and data
    order) where the whole run has them; end_epoch=k stops after epoch k. A resumed range
    with another start is refused."""
    splits = DATA.load()
    hp = TrainHparams(epochs=4, batch_size=50, optimizer="sgd", lr=0.05, weight_decay=0.0)
    whole = T.train(_model(splits), splits, hp, progress=False)
    head = T.train(_model(splits), splits, hp, end_epoch=1, progress=False)
    tail = T.train(head.model, splits, hp, start_epoch=1, out_dir=str(tmp_path),
                   progress=False)
    assert [m["epoch"] for m in head.metrics] == [1]
    assert [m["epoch"] for m in tail.metrics] == [2, 3, 4] and tail.resumed_from == 1
    lrs = [m["lr"] for m in head.metrics + tail.metrics]
    assert lrs == pytest.approx([m["lr"] for m in whole.metrics], rel=1e-6)
    assert lrs[-1] < lrs[0]
    # epoch 1 is the same run (same init, batches and learning rates)
    assert head.metrics[0]["train_loss"] == pytest.approx(whole.metrics[0]["train_loss"])
    with pytest.raises(T.ResumeError, match="epoch_range"):
        T.train(_model(splits), splits, hp, start_epoch=2, out_dir=str(tmp_path),
                progress=False)
    with pytest.raises(ValueError, match="start_epoch < end_epoch"):
        T.train(_model(splits), splits, hp, start_epoch=4, progress=False)


@pytest.mark.slow
def test_torchrun_two_processes_same_masks_and_accuracy(tmp_path) -> None:
    args = ["train", "--dataset", "synthetic", "--image-size", "8", "--limit-train", "400",
            "--model", "conv2", "--width", "0.25", "--optimizer", "adam", "--lr", "3e-3",
            "--weight-decay", "0", "--epochs", "2", "--batch-size", "50",
            "--prune-method", "magnitude", "--sparsity", "0.7", "--no-progress",
            "--threads", "1", "--device", "cpu", "--out", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sparsecore", *args]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "final.json").read_text())

    # the same run in one process (what `python -m sparsecore train` does without torchrun)
    splits = DATA.load()
    model = _model(splits)
    prune.prune(model, "magnitude", sparsity=0.7)
    one = T.train(model, splits, TrainHparams(epochs=2, batch_size=50, optimizer="adam",
                                              lr=3e-3, weight_decay=0.0), progress=False)
    assert ddp["world_size"] == 2
    assert ddp["rank_mask_digests"][0] == ddp["rank_mask_digests"][1]
    assert ddp["mask_digest"] == one.final["mask_digest"]
    assert ddp["density"] == pytest.approx(0.3, abs=1e-3)
    assert abs(ddp["acc"] - one.final["acc"]) <= 0.03  # same global batches; float order


def test_sparse_kernels_train_like_dense_and_resume(tmp_path, monkeypatch) -> None:
    """--kernels sparse: the pruned net trains on SparseConv2d/SparseLinear and ends where
    the masked dense run ends (float32 roundoff apart); checkpoints hold the masked dense
    form, so a killed sparse run resumes, and the returned model is the masked dense net."""
    splits = DATA.load()
    hp_sparse = TrainHparams(**{**HP.__dict__, "kernels": "sparse"})

    def pruned():
        model = _model(splits)
        prune.prune(model, "magnitude", sparsity=0.9, scope="layerwise")
        return model

    dense = T.train(pruned(), splits, HP, progress=False)
    seen: list[str] = []
    real_evaluate = T.evaluate

    def spy_evaluate(model, *a, **k):
        seen.extend(type(m).__name__ for m in model.modules())
        return real_evaluate(model, *a, **k)

    monkeypatch.setattr(T, "evaluate", spy_evaluate)
    sparse = T.train(pruned(), splits, hp_sparse, progress=False)
    assert "SparseConv2d" in seen and "SparseLinear" in seen  # it really ran sparse layers
    losses_d = [m["train_loss"] for m in dense.metrics]
    losses_s = [m["train_loss"] for m in sparse.metrics]
    assert losses_s == pytest.approx(losses_d, rel=1e-3)
    assert sparse.final["acc"] == pytest.approx(dense.final["acc"], abs=0.02)
    assert T.mask_digest(sparse.model) == T.mask_digest(dense.model) != ""
    assert sparse.model.state_dict().keys() == dense.model.state_dict().keys()

    calls = _die_at_second_evaluation(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        T.train(pruned(), splits, hp_sparse, out_dir=str(tmp_path), progress=False)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert any(k.endswith("parametrizations.weight.original") for k in saved)
    calls["n"] = 10
    resumed = T.train(_model(splits), splits, hp_sparse, out_dir=str(tmp_path), progress=False)
    assert resumed.resumed_from == 1
    assert [m["train_loss"] for m in resumed.metrics] == pytest.approx(losses_s, rel=1e-5)
    for (k, a), b in zip(resumed.model.state_dict().items(), sparse.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


TINY_HP = TrainHparams(epochs=1, batch_size=50, optimizer="adam", lr=3e-3, weight_decay=0.0)


def test_checkpoint_payload_runs_no_code(tmp_path, write_payload) -> None:
    marker = tmp_path / "pwned"
    write_payload(tmp_path / "checkpoint.pt", marker)
    splits = DATA.load()
    with pytest.raises(ValueError, match="not a sparsecore checkpoint.*--fresh"):
        T.train(_model(splits), splits, TINY_HP, out_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="not a sparsecore checkpoint"):
        T.load_model(str(tmp_path / "checkpoint.pt"))
    assert not marker.exists()


def test_truncated_checkpoint_says_fresh(tmp_path) -> None:
    splits = DATA.load()
    T.train(_model(splits), splits, TINY_HP, out_dir=str(tmp_path), progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    with pytest.raises(ValueError, match=f"{ckpt} is not a sparsecore checkpoint.*--fresh"):
        T.train(_model(splits), splits, TINY_HP, out_dir=str(tmp_path), progress=False)


@pytest.mark.parametrize("change", [{"lr": 1e-2}, {"seed": 1}, {"optimizer": "sgd"},
                                    {"epochs": 2}, {"kernels": "sparse"}])
def test_resume_refuses_other_hparams(tmp_path, change) -> None:
    """Another --lr / --seed would silently go on with the old ones, another optimizer died
    with KeyError: 'step'."""
    splits = DATA.load()
    T.train(_model(splits), splits, TINY_HP, out_dir=str(tmp_path), progress=False,
            settings={"data": {"limit_train": 400}})
    before = (tmp_path / "checkpoint.pt").read_bytes()
    other = TrainHparams(**{**TINY_HP.__dict__, **change})
    name = next(iter(change))
    with pytest.raises(T.ResumeError, match=f"{name} .* there, .* now.*--fresh"):
        T.train(_model(splits), splits, other, out_dir=str(tmp_path), progress=False,
                settings={"data": {"limit_train": 400}})
    with pytest.raises(T.ResumeError, match="data.limit_train 400 there, 300 now"):
        T.train(_model(splits), splits, TINY_HP, out_dir=str(tmp_path), progress=False,
                settings={"data": {"limit_train": 300}})
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    same = TrainHparams(**{**TINY_HP.__dict__, "eval_batch_size": 100})
    r = T.train(_model(splits), splits, same, out_dir=str(tmp_path), progress=False,
                settings={"data": {"limit_train": 400}})
    assert r.resumed_from == 1  # the evaluation batch size changes nothing trained


def test_hparams_refuse_values_out_of_range() -> None:
    for bad in ({"batch_size": 0}, {"epochs": 0}, {"epochs": -1}, {"lr": float("nan")},
                {"lr": float("inf")}, {"label_smoothing": 2.0}, {"optimizer": "lbfgs"},
                {"milestones": "a"}, {"eval_batch_size": 0}, {"weight_decay": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainHparams(**bad)
    for bad in ({"block_size": 0}, {"image_size": 0}, {"limit_train": 0}, {"channels": 2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DataHparams(**bad)
    with pytest.raises(ValueError, match="width"):
        ModelHparams("conv2", 0.0)


def test_huge_image_size_is_refused_before_resizing() -> None:
    with pytest.raises(ValueError, match="GiB of memory"):
        DataHparams(dataset="digits", image_size=1000).load()
    with pytest.raises(ValueError, match="block size"):
        DataHparams(dataset="text", block_size=10**7).load()


def test_stale_tmp_files_are_removed_on_start(tmp_path) -> None:
    (tmp_path / ".checkpoint.pt.abcd1234.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "tmpabcd1234.tmp").write_bytes(b"half a checkpoint")
    splits = DATA.load()
    T.train(_model(splits), splits, TINY_HP, out_dir=str(tmp_path), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "metrics.jsonl"]
