"""`python -m sparsecore`: every flag has help text, the commands chain (train -> prune ->
train --init-from -> compare), and user errors say what to do."""

from __future__ import annotations

import argparse
import json

import pytest

from sparsecore import cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_flag_has_help() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"train", "prune", "compare", "study", "report"}
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 8, (name, action.option_strings)


def test_study_help_lists_presets() -> None:
    sub = next(a for a in cli.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["study"].format_help()
    assert "--resume" in text and "wacv2020" in text and "default" in text


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
