"""`python -m sparsecore`: every flag has help text, the commands chain (train -> prune ->
train --init-from -> compare), and user errors say what to do."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from sparsecore import cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_flag_has_help() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"train", "prune", "compare", "explain", "study", "report"}
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 8, (name, action.option_strings)


def test_study_help_lists_presets() -> None:
    sub = next(a for a in cli.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["study"].format_help()
    assert "--resume" in text and "wacv2020" in text and "default" in text


def test_study_times_inference_on_all_threads_unless_told(tmp_path, monkeypatch) -> None:
    from sparsecore import study

    seen = []
    monkeypatch.setattr(study, "run", lambda cfg, **kw: seen.append(kw["timing_threads"]))
    out = str(tmp_path / "run")
    assert cli.main(["study", "--preset", "test", "--out", out]) == 0
    assert cli.main(["study", "--preset", "test", "--out", out, "--threads", "1"]) == 0
    assert seen == [None, 1]  # None: torch's thread count, all cores by default


TINY = ["--dataset", "synthetic", "--image-size", "8", "--limit-train", "200", "--model",
        "conv2", "--width", "0.125", "--epochs", "1", "--optimizer", "adam", "--lr", "3e-3",
        "--no-progress"]


def test_train_prune_finetune_compare(tmp_path, capsys) -> None:
    d = str(tmp_path)
    assert cli.main(["train", *TINY, "--out", f"{d}/dense"]) == 0
    assert cli.main(["prune", f"{d}/dense/model.pt", "--sparsity", "0.8", "--out",
                     f"{d}/p.pt"]) == 0
    masked = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("masked"))
    assert float(masked.split()[-1]) == pytest.approx(0.2, abs=1e-3)  # the density table
    assert cli.main(["train", "--init-from", f"{d}/p.pt", "--epochs", "1", "--no-progress",
                     "--out", f"{d}/ft"]) == 0
    final = json.loads((tmp_path / "ft" / "final.json").read_text())
    assert final["density"] == pytest.approx(0.2, abs=1e-3)
    capsys.readouterr()
    assert cli.main(["compare", f"{d}/dense/model.pt", f"{d}/ft/model.pt",
                     "--points", "300"]) == 0
    out = capsys.readouterr().out
    assert "svcca" in out and "classifier.fc3" in out


def test_explain(tmp_path, capsys) -> None:
    """explain prints one row per layer of the pruned model, with every column, and the
    whole-model speedups (no assertion on the times)."""
    d = str(tmp_path)
    assert cli.main(["train", *TINY, "--out", f"{d}/dense"]) == 0
    assert cli.main(["prune", f"{d}/dense/model.pt", "--sparsity", "0.9", "--out",
                     f"{d}/p.pt"]) == 0
    capsys.readouterr()
    assert cli.main(["explain", f"{d}/p.pt", "--batch", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["layer", "kind", "shape", "density"]
    assert lines[0].split()[-1] == "chosen"
    layers = ["features.conv1", "features.conv2", "classifier.fc1", "classifier.fc2",
              "classifier.fc3"]
    assert [ln.split()[0] for ln in lines[1:6]] == layers
    assert any(ln.startswith("predicted speedup") for ln in lines)
    assert any(ln.startswith("measured speedup") for ln in lines)
    assert cli.main(["explain", f"{d}/p.pt", "--input-shape", "2,3", "--no-cache"]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert cli.main(["explain", f"{d}/p.pt", "--input-shape", "a,b"]) == 2
    assert "--input-shape" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["study", "--preset", "wacv2020", "--out", "x"], "--data"),
    (["train", "--dataset", "cifar10", "--out", "x"], "--data"),
    (["compare", "nope.pt", "nope2.pt"], "sparsecore train"),
    (["report", "no-such-run"], "study"),
    (["study", "--preset", "test", "--models", "lenet", "--out", "x"], "unknown model"),
])
def test_errors_say_what_to_do(argv, needle, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err


def _run(argv: list[str]) -> int:
    """cli.main's exit status, argparse's own exit (a flag's value refused) included."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


def _no_training(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(cli.T, "train", refuse)


@pytest.mark.parametrize("extra,needle", [
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--epochs", "-1"], "--epochs: must be >= 1"),
    (["--lr", "nan"], "--lr: must be a finite number > 0"),
    (["--lr", "inf"], "--lr: must be a finite number > 0"),
    (["--threads", "0"], "--threads: must be >= 1"),
    (["--block-size", "0"], "--block-size: must be >= 1"),
    (["--label-smoothing", "2"], "--label-smoothing: must be in [0, 1)"),
    (["--image-size", "0"], "--image-size: must be >= 1"),
    (["--image-size", "1000"], "GiB of memory"),
    (["--width", "-1"], "--width: must be > 0"),
    (["--milestones", "80,x"], "--milestones: must be comma-separated epochs"),
    (["--device", "gpu0"], "unknown device"),
    (["--sparsity", "0.9"], "--sparsity needs --prune-method"),
    (["--prune-method", "magnitude"], "--prune-method needs --sparsity"),
    (["--prune-method", "magnitude", "--sparsity", "1.5"], "--sparsity: must be in [0, 1)"),
])
def test_train_refuses_bad_values_before_work(extra, needle, tmp_path, monkeypatch,
                                              capsys) -> None:
    _no_training(monkeypatch)
    assert _run(["train", *TINY, "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(("error:", "python -m sparsecore train: error"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(tmp_path, capsys) -> None:
    assert _run(["train", *TINY, "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_empty_out_is_refused(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for argv in (["train", *TINY, "--out", ""], ["prune", "m.pt", "--sparsity", "0.5",
                                                  "--out", ""], ["study", "--out", ""]):
        assert _run(argv) == 2
        assert "--out: must be a path" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # no ./model.pt


@pytest.mark.parametrize("make_out,needle", [
    (lambda d: str(d / ("a" * 300)), "too long"),
    (lambda d: (d / "f").write_text("x") and str(d / "f" / "run"), "Not a directory"),
])
def test_unwritable_out_fails_before_training(make_out, needle, tmp_path, monkeypatch,
                                              capsys) -> None:
    _no_training(monkeypatch)
    assert _run(["train", *TINY, "--out", make_out(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to --out") and needle in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_fails_before_training(tmp_path, monkeypatch, capsys) -> None:
    _no_training(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert _run(["train", *TINY, "--out", str(ro / "run")]) == 2
    assert "cannot write to --out" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["compare", "a.pt", "b.pt", "--metrics", "svcca,foo"], "unknown similarity metric 'foo'"),
    (["compare", "a.pt", "b.pt", "--points", "1"], "points must be >= 10"),
    (["compare", "a.pt", "b.pt", "--points", "0"], "points must be >= 10"),
    (["study", "--preset", "test", "--metrics", "foo"], "unknown similarity metric 'foo'"),
    (["study", "--preset", "test", "--points", "1"], "points must be >= 10"),
    (["study", "--preset", "test", "--epochs", "0"], "--epochs: must be >= 1"),
    (["study", "--preset", "test", "--sparsities", "0.5,1"], "sparsities must lie in (0, 1)"),
    (["study", "--preset", "test", "--jobs", "-1"], "--jobs: must be >= 0"),
    (["study", "--preset", "test", "--fresh", "--resume"], "not allowed with"),
    (["prune", "a.pt", "--sparsity", "2", "--out", "p.pt"], "--sparsity: must be in [0, 1)"),
])
def test_metrics_points_and_ranges_checked_up_front(argv, needle, tmp_path, monkeypatch,
                                                    capsys) -> None:
    monkeypatch.chdir(tmp_path)  # the model files do not exist: the check comes first
    assert _run(argv) == 2
    assert needle in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_payload_model_files_run_no_code(tmp_path, write_payload, capsys) -> None:
    marker = tmp_path / "pwned"
    evil = str(tmp_path / "evil.pt")
    write_payload(evil, marker)
    for argv in (["train", "--init-from", evil, "--no-progress", "--out", str(tmp_path / "r")],
                 ["prune", evil, "--sparsity", "0.5", "--out", str(tmp_path / "p.pt")],
                 ["compare", evil, evil]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {evil} is not a sparsecore checkpoint" in err, argv
    assert not marker.exists()


def test_resume_with_other_flags_is_refused(tmp_path, capsys) -> None:
    out = str(tmp_path / "run")
    assert cli.main(["train", *TINY, "--out", out]) == 0
    model = (tmp_path / "run" / "model.pt").read_bytes()
    for extra, needle in ((["--lr", "1e-2"], "lr 0.003 there, 0.01 now"),
                          (["--seed", "1"], "seed 0 there, 1 now"),
                          (["--optimizer", "sgd"], "optimizer 'adam' there, 'sgd' now"),
                          (["--limit-train", "100"], "data.limit_train 200 there, 100 now")):
        assert cli.main(["train", *TINY, *extra, "--out", out]) == 2
        err = capsys.readouterr().err
        assert needle in err and "--fresh" in err, extra
    assert (tmp_path / "run" / "model.pt").read_bytes() == model  # records the old flags
    (tmp_path / "run" / ".model.pt.abcd1234.tmp").write_bytes(b"killed write")
    assert cli.main(["train", *TINY, "--seed", "1", "--fresh", "--out", out]) == 0
    assert json.loads((tmp_path / "run" / "final.json").read_text())["resumed_from_epoch"] == 0
    assert not (tmp_path / "run" / ".model.pt.abcd1234.tmp").exists()
    assert cli.main(["train", *TINY, "--seed", "1", "--out", out]) == 0  # same flags: resumes
    assert json.loads((tmp_path / "run" / "final.json").read_text())["resumed_from_epoch"] == 1


def test_corrupt_checkpoint_says_fresh(tmp_path, capsys) -> None:
    (tmp_path / "checkpoint.pt").write_text("not a checkpoint")
    assert cli.main(["train", *TINY, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a sparsecore checkpoint" in err and "--fresh" in err
    assert cli.main(["train", *TINY, "--fresh", "--out", str(tmp_path)]) == 0
