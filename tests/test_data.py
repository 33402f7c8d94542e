"""Data: deterministic splits, the CIFAR-10 python format, clear errors, the loader."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from sparsecore import data

pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_splits_are_deterministic_disjoint_and_stratified() -> None:
    a = data.load("digits", seed=3)
    b = data.load("digits", seed=3)
    c = data.load("digits", seed=4)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.test.x, c.test.x)
    assert len(a.train) + len(a.test) == 1797
    assert a.train.x.shape[1:] == (1, 8, 8)
    counts = torch.bincount(a.test.y, minlength=10)
    assert counts.min() >= 35  # ~20% of every class (each has ~180)
    tr = set(map(bytes, a.train.x.flatten(1).numpy().view(np.uint8)))
    te = set(map(bytes, a.test.x.flatten(1).numpy().view(np.uint8)))
    assert len(tr & te) <= 5  # the digits set has a few exact duplicate images


def test_digits_upsampled_to_three_channels() -> None:
    s = data.load("digits", image_size=32, channels=3, val_fraction=0.1)
    assert s.train.x.shape[1:] == (3, 32, 32)
    assert s.model_kwargs() == {"num_classes": 10, "in_channels": 3, "input_size": 32}
    assert s.val is not None and s.heldout is s.val
    assert abs(s.train.x.mean().item()) < 0.2


def _fake_cifar(folder: str, n_train: int = 50, n_test: int = 20) -> None:
    rng = np.random.default_rng(0)

    def mk(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)

    data.write_cifar10(folder, mk(n_train), mk(n_test))


def test_cifar10_python_format_roundtrip(tmp_path) -> None:
    folder = os.path.join(tmp_path, "cifar-10-batches-py")
    _fake_cifar(folder)
    with open(os.path.join(folder, "test_batch"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    s = data.load("cifar10", root=str(tmp_path))  # parent folder works too
    assert len(s.train) == 50 and len(s.test) == 20
    assert s.train.x.dtype == torch.uint8 and s.train.x.shape[1:] == (3, 32, 32)
    # CHW order: the first 1024 bytes of a row are the red plane
    assert torch.equal(s.test.x[0, 0].flatten(), torch.from_numpy(raw[b"data"][0, :1024]))
    assert s.test.y.tolist() == list(raw[b"labels"])
    x, y = next(iter(data.Loader.for_split(s, "train", 16, train=True)))
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32) and y.shape == (16,)


def test_cifar10_errors_say_what_to_do(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="--data"):
        data.load("cifar10")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load("cifar10", root=str(tmp_path / "nope"))
    _fake_cifar(str(tmp_path))
    os.unlink(tmp_path / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.load("cifar10", root=str(tmp_path))
    with open(tmp_path / "data_batch_3", "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        data.load("cifar10", root=str(tmp_path))
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(ValueError, match="3072"):
        data.load("cifar10", root=str(tmp_path))


def test_text_windows_shift_by_one() -> None:
    s = data.load("text", block_size=32)
    assert s.task == "lm" and s.num_classes == len(s.vocab) > 50
    assert s.train.x.shape[1] == 32
    assert torch.equal(s.train.x[:, 1:], s.train.y[:, :-1])
    decoded = "".join(s.vocab[i] for i in s.test.x[0].tolist())
    assert decoded in data.english_text()


def test_synthetic_and_unknown() -> None:
    s = data.load("synthetic", synthetic_size=100, seed=1)
    assert torch.equal(s.train.x, data.load("synthetic", synthetic_size=100, seed=1).train.x)
    with pytest.raises(ValueError, match="digits"):
        data.load("mnist")


def test_loader_shards_ranks_disjointly_and_covers_epoch() -> None:
    split = data.Split(torch.arange(10).float().view(10, 1, 1, 1), torch.arange(10))
    seen = []
    for rank in range(2):
        ld = data.Loader(split, 4, shuffle=True, seed=5, rank=rank, world=2)
        ld.set_epoch(2)
        seen.append(torch.cat([y for _, y in ld]))
        assert len(ld) == 3  # 5 examples per rank, 2 per step
    assert sorted(torch.cat(seen).tolist()) == list(range(10))
    ld = data.Loader(split, 4, shuffle=True, seed=5)
    ld.set_epoch(0)
    a = torch.cat([y for _, y in ld])
    ld.set_epoch(1)
    assert not torch.equal(a, torch.cat([y for _, y in ld]))


class _Payload:
    """Unpickling this would create the file `target` (a stand-in for arbitrary code)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_batch_never_runs_code(tmp_path, protocol: int) -> None:
    _fake_cifar(str(tmp_path))
    target = tmp_path / "pwned"
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Payload(str(target)), b"labels": [0]}, f, protocol=protocol)
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch.*refusing to load"):
        data.load("cifar10", root=str(tmp_path))
    assert not target.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_batch_any_protocol_loads(tmp_path, protocol: int) -> None:
    # Batches re-pickled by other tools (protocol 2 stores bytes through _codecs.encode)
    _fake_cifar(str(tmp_path))
    path = tmp_path / "test_batch"
    with open(path, "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    with open(path, "wb") as f:
        pickle.dump(raw, f, protocol=protocol)
    s = data.load("cifar10", root=str(tmp_path))
    assert torch.equal(s.test.x.flatten(1), torch.from_numpy(raw[b"data"]))
