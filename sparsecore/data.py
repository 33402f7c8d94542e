"""Datasets that need no download, and a tensor loader that shards for DDP.

- `digits`: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes, shipped
  with scikit-learn), optionally upsampled (bilinear) to 16x16 or 32x32 and replicated to
  3 channels so that CIFAR-shaped models run on them.
- `cifar10`: CIFAR-10 from a local directory in its standard python format (the
  `cifar-10-batches-py` folder of the official archive: pickles `data_batch_1..5` and
  `test_batch`, each a dict with `b"data"`, uint8 (10000, 3072) in CHW order, and
  `b"labels"`); training batches get random-crop (pad 4) and horizontal-flip augmentation.
- `text`: English text from CPython's own `pydoc_data.topics` (the help pages, ~465k
  characters) for character-level language modelling: non-overlapping windows of
  `block_size + 1` characters, target = input shifted by one.
- `synthetic`: Gaussian class prototypes plus noise, in image shape; any size, instantly.

Splits are deterministic given `seed` (stratified by class for digits; a held-out
`val_fraction` of the training set when asked). Every split lives in memory as tensors.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

DATASETS = ("digits", "cifar10", "text", "synthetic")

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = "test_batch"
# Resized images are held in memory as float32: a larger --image-size is refused up front
# rather than filling the machine's memory.
MAX_IMAGE_BYTES = 2 * 2**30


@dataclass
class Split:
    """x: (N, C, H, W) float32 or uint8 images, or (N, T) int64 tokens; y: (N,) or (N, T)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class Splits:
    """A dataset's splits and the shape facts a model needs.

    `mean`/`std` (per channel) are applied by the loader to uint8 images after scaling to
    [0, 1]; float images are stored normalised already. `augment` turns on random crop and
    flip for training batches.
    """

    name: str
    train: Split
    test: Split
    val: Split | None
    num_classes: int
    in_channels: int
    input_size: int
    task: str = "classification"  # or "lm"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: bool = False
    crop_pad: int = 4  # augmentation: random crop after zero padding by this many pixels
    flip: bool = True  # augmentation: random horizontal flips
    vocab: str | None = None  # characters, for "lm"

    def model_kwargs(self) -> dict[str, int]:
        """The keyword arguments `sparsecore.models.create` takes from the data."""
        return {"num_classes": self.num_classes, "in_channels": self.in_channels,
                "input_size": self.input_size}

    @property
    def heldout(self) -> Split:
        """Data no model was trained on: the validation split if there is one, else test."""
        return self.val if self.val is not None else self.test


def load(
    name: str,
    *,
    root: str | None = None,
    seed: int = 0,
    image_size: int | None = None,
    channels: int | None = None,
    val_fraction: float = 0.0,
    limit_train: int | None = None,
    block_size: int = 64,
    synthetic_size: int = 2000,
) -> Splits:
    """Load dataset `name` (one of DATASETS).

    root: the CIFAR-10 directory (required for cifar10, unused otherwise).
    image_size / channels: resize (bilinear) / replicate grayscale images (digits, synthetic).
    val_fraction: part of the training split held out as `val`.
    limit_train: keep only the first n training examples (after the seeded shuffle).
    block_size: context length for `text`. synthetic_size: examples in `synthetic`.
    """
    if name == "digits":
        splits = _digits(seed, image_size or 8, channels or 1)
    elif name == "cifar10":
        if image_size not in (None, 32) or channels not in (None, 3):
            raise ValueError("cifar10 images are 32x32x3; leave image_size/channels unset")
        splits = _cifar10(root)
    elif name == "text":
        splits = _text(seed, block_size)
    elif name == "synthetic":
        splits = _synthetic(seed, synthetic_size, image_size or 8, channels or 1)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(splits.train), generator=gen)
    train = Split(splits.train.x[perm], splits.train.y[perm])
    n_val = int(round(val_fraction * len(train)))
    if n_val:
        splits.val = Split(train.x[:n_val], train.y[:n_val])
        train = Split(train.x[n_val:], train.y[n_val:])
    if limit_train is not None:
        train = Split(train.x[:limit_train], train.y[:limit_train])
    splits.train = train
    return splits


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Indices (train, test) with each class split in the same proportion."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _images(x: torch.Tensor, image_size: int, channels: int) -> torch.Tensor:
    """(N, 1, h, w) float -> (N, channels, image_size, image_size)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    size = x.shape[0] * channels * image_size**2 * 4
    if size > MAX_IMAGE_BYTES:
        raise ValueError(f"image size {image_size}: the {x.shape[0]} images would take "
                         f"{size / 2**30:.1f} GiB of memory as float32 (at most "
                         f"{MAX_IMAGE_BYTES / 2**30:g} GiB); use a smaller image size "
                         f"(these images are {x.shape[-1]}x{x.shape[-1]})")
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.expand(-1, channels, -1, -1).contiguous()


def _digits(seed: int, image_size: int, channels: int) -> Splits:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = _stratified_split(d.target, 0.2, seed)
    mean, std = x[tr].mean(), x[tr].std()  # statistics of the training split only
    x = _images((x - mean) / std, image_size, channels)
    return Splits("digits", Split(x[tr], y[tr]), Split(x[te], y[te]), None, 10, channels,
                  image_size)


# What a CIFAR-10 python batch holds: dicts, lists, bytes, ints and numpy arrays. Those
# are the only globals its unpickler resolves; anything else (os.system, eval, a class with
# a __reduce__ payload) is refused before it can run.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that admits only what the CIFAR-10 python format holds."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch "
                                         "holds only dicts, lists, bytes and numpy arrays")
        return super().find_class(module, name)


def _read_cifar_batch(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError) as exc:
        raise ValueError(f"{path} is not a CIFAR-10 python batch ({exc})") from exc
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        keys = list(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: expected a dict with b'data' and b'labels', got {keys}")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: b'data' must be uint8 (N, 3072), got {data.dtype} "
                         f"{data.shape}")
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ValueError(f"{path}: b'labels' must be N = {data.shape[0]} ints in 0..9")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def cifar10_dir(root: str | None) -> str:
    """The folder holding the CIFAR-10 pickles: `root` or `root/cifar-10-batches-py`."""
    hint = ("extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) "
            "and pass the folder with --data PATH")
    if not root:
        raise FileNotFoundError(f"cifar10 needs a local directory: {hint}")
    for folder in (root, os.path.join(root, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(folder, _CIFAR_TEST)):
            missing = [f for f in _CIFAR_TRAIN if not os.path.isfile(os.path.join(folder, f))]
            if missing:
                raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}; {hint}")
            return folder
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} does not exist; {hint}")
    raise FileNotFoundError(f"no {_CIFAR_TEST} in {root} or {root}/cifar-10-batches-py; {hint}")


def _cifar10(root: str | None) -> Splits:
    folder = cifar10_dir(root)
    parts = [_read_cifar_batch(os.path.join(folder, f)) for f in _CIFAR_TRAIN]
    train = Split(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    test = Split(*_read_cifar_batch(os.path.join(folder, _CIFAR_TEST)))
    return Splits("cifar10", train, test, None, 10, 3, 32, mean=CIFAR_MEAN, std=CIFAR_STD,
                  augment=True)


def write_cifar10(folder: str, train: tuple[np.ndarray, np.ndarray],
                  test: tuple[np.ndarray, np.ndarray]) -> None:
    """Write (data uint8 (N, 3072), labels (N,)) pairs in the CIFAR-10 python format (the
    training set spread over the five batch files). Used by the tests; handy for subsets."""
    os.makedirs(folder, exist_ok=True)
    chunks = np.array_split(np.arange(len(train[1])), len(_CIFAR_TRAIN))
    files = [(f, train[0][c], train[1][c]) for f, c in zip(_CIFAR_TRAIN, chunks)]
    for fname, data, labels in [*files, (_CIFAR_TEST, *test)]:
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump({b"batch_label": fname.encode(), b"data": np.ascontiguousarray(data),
                         b"labels": [int(v) for v in labels]}, f)


def english_text() -> str:
    """CPython's help topics (`pydoc_data.topics`), joined in sorted-key order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def _text(seed: int, block_size: int) -> Splits:
    text = english_text()
    vocab = "".join(sorted(set(text)))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([lookup[ch] for ch in text], dtype=torch.int64)
    n = (len(ids) - 1) // (block_size + 1)
    if block_size < 1 or n < 2:
        raise ValueError(f"block size {block_size}: the text ({len(text)} characters) needs at "
                         "least two windows of block_size + 1 characters, one to train on and "
                         "one to test; use a smaller block size")
    chunks = ids[: n * (block_size + 1)].view(n, block_size + 1)
    chunks = chunks[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    n_test = max(1, n // 10)
    test, train = chunks[:n_test], chunks[n_test:]
    return Splits("text", Split(train[:, :-1], train[:, 1:]), Split(test[:, :-1], test[:, 1:]),
                  None, len(vocab), 1, block_size, task="lm", vocab=vocab)


def _synthetic(seed: int, n: int, image_size: int, channels: int, classes: int = 10) -> Splits:
    gen = torch.Generator().manual_seed(10_000 + seed)
    protos = torch.randn(classes, 1, 8, 8, generator=gen)
    y = torch.randint(classes, (n,), generator=gen)
    x = protos[y] + 0.8 * torch.randn(n, 1, 8, 8, generator=gen)
    x = _images(x, image_size, channels)
    k = n // 5
    return Splits("synthetic", Split(x[k:], y[k:]), Split(x[:k], y[:k]), None, classes,
                  channels, image_size)


class Loader:
    """Mini-batches of a `Split`, shuffled by (seed, epoch), sharded over DDP ranks.

    With `world > 1` each rank sees a disjoint 1/world of every epoch (padded by wrapping
    around so that all ranks take the same number of steps when `pad`) and `batch_size` is
    the global batch: each rank takes batch_size / world. Batches are moved to `device`,
    uint8 images are scaled and normalised, and training batches get crop/flip when
    `augment`. Yields (x, y).
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 augment: bool = False, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None, device: str | torch.device = "cpu",
                 rank: int = 0, world: int = 1, pad: bool = True, crop_pad: int = 4,
                 flip: bool = True) -> None:
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")
        self.split, self.shuffle, self.seed, self.augment = split, shuffle, seed, augment
        self.crop_pad, self.flip = crop_pad, flip
        self.batch_size, self.rank, self.world, self.pad = batch_size // world, rank, world, pad
        self.device = torch.device(device)
        self.mean = None if mean is None else torch.tensor(mean).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(1, -1, 1, 1)
        self.epoch = 0

    @classmethod
    def for_split(cls, splits: Splits, which: str, batch_size: int, *, train: bool = False,
                  **kw) -> Loader:
        """A loader over `splits.<which>` with the dataset's normalisation; `train` turns on
        shuffling and the dataset's augmentation."""
        split = getattr(splits, which) if which != "heldout" else splits.heldout
        if split is None:
            raise ValueError(f"dataset {splits.name} has no {which} split")
        return cls(split, batch_size, shuffle=train, augment=train and splits.augment,
                   crop_pad=splits.crop_pad, flip=splits.flip, mean=splits.mean, std=splits.std,
                   pad=train, **kw)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch` (same order on every rank, as DistributedSampler)."""
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.split)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            idx = torch.randperm(n, generator=gen)
        else:
            idx = torch.arange(n)
        if self.world > 1:
            if self.pad:
                total = math.ceil(n / self.world) * self.world
                idx = torch.cat([idx, idx[: total - n]])
            idx = idx[self.rank :: self.world]
        return idx

    def __len__(self) -> int:
        n = len(self._indices())
        return math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch + 1)
        for start in range(0, len(idx), self.batch_size):
            b = idx[start : start + self.batch_size]
            x, y = self.split.x[b], self.split.y[b]
            if self.augment:
                x = _crop_flip(x, gen, self.crop_pad, self.flip)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:
                x = x.float().div_(255.0)
            if self.mean is not None:
                x = (x - self.mean.to(x.device)) / self.std.to(x.device)
            yield x, y


def _crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Random crop after zero padding by `pad` and (if `flip`) random horizontal flip, per
    image. (N, C, H, W) -> (N, C, H, W)."""
    n, c, h, w = x.shape
    # pad with the darkest value: black for raw CIFAR bytes, the background for digits
    padded = F.pad(x, (pad, pad, pad, pad), value=x.min().item())
    di = torch.randint(2 * pad + 1, (n,), generator=gen)
    dj = torch.randint(2 * pad + 1, (n,), generator=gen)
    rows = (di[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dj[:, None] + torch.arange(w))[:, None, None, :]
    if flip:
        flips = torch.rand(n, generator=gen) < 0.5
        cols = torch.where(flips[:, None, None, None], cols.flip(-1), cols)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows, cols]
