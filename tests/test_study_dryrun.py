"""The `wacv2020` preset's dry run on a small synthetic folder in the CIFAR-10 python format:
the real preset (its CIFAR-10 plans, the --data check) prints its plan and an estimate."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sparsecore import cli, study
from sparsecore import data as data_lib
from sparsecore.study import dryrun

pytestmark = pytest.mark.usefixtures("one_thread")


def test_wacv2020_dry_run_on_a_synthetic_cifar_folder(tmp_path, capsys) -> None:
    """The real wacv2020 preset (its CIFAR-10 plans, four sparsities, the --data check) on a
    small folder in the CIFAR-10 python format, at reduced width: the plan of every stage
    and an estimate; nothing written."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"

    def part(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)

    data_lib.write_cifar10(str(folder), part(150), part(40))
    out = tmp_path / "run"
    args = ["study", "--preset", "wacv2020", "--data", str(tmp_path), "--dry-run",
            "--models", "resnet20:0.125,vgg16:0.125,conv4:0.125", "--device", "cpu",
            "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    stages = re.findall(r"^(\S+/s0/\S+)\s+(\d+)\s", text, re.M)
    assert len(stages) == 3 * 24  # per model: 2 dense, 4 x (magnitude, rewind, reinit,
    # random), anchor, 4 patterns, analysis
    epochs = {key: int(e) for key, e in stages}
    assert epochs["resnet20-w0.125/s0/dense"] == 160
    assert epochs["resnet20-w0.125/s0/anchor"] == 5
    assert epochs["resnet20-w0.125/s0/rewind-95"] == 155
    assert epochs["conv4-w0.125/s0/magnitude-50"] == 20
    assert sum(e for k, e in epochs.items() if k.startswith("resnet20")) == \
        2 * 160 + 4 * 40 + 5 + 4 * 155 + 4 * 40 + 8 * 160
    assert re.search(r"^estimate: .* of compute", text, re.M)
    assert "cifar10 (150 training examples)" in text
    cfg = study.preset_config("wacv2020", data=str(folder), models=["resnet20:0.125"])
    est = dryrun.estimate(cfg, "cpu", steps=1)
    c = est["models"]["resnet20-w0.125"]
    assert c.steps_per_epoch == 2 and c.eval_batches == 1  # 150 / 128, 40 / 1000
    assert c.step_s > 0 and c.activation_bytes > 0 and c.device_peak_bytes is None
    assert est["total_s"] == pytest.approx(sum(sec for *_, sec in est["stages"]))
