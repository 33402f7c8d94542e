"""Hyperparameters of a training run: dataclasses whose fields carry their help text and the
values they accept; `add_arguments` turns one into command-line flags (each value checked as
it is parsed) and `from_args` reads it back (as OpenLTH does). Constructing a dataclass with
a value out of range raises ValueError, so that every command and the Python API refuse it
before any work."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsecore import data as data_lib
from sparsecore import models

Check = Callable[[Any], str | None]  # value -> what is wrong with it, None when fine


def number(lo: float, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Check:
    """A check for a finite number from lo (to hi), the ends included unless *_open."""
    if hi is not None:
        want = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    else:
        want = f"{'>' if lo_open else '>='} {lo:g}"

    def check(v: float) -> str | None:
        ok = (math.isfinite(v) and (v > lo if lo_open else v >= lo)
              and (hi is None or (v < hi if hi_open else v <= hi)))
        if ok:
            return None
        return f"must be {want}" if math.isfinite(v) else f"must be a finite number {want}"

    return check


POSITIVE = number(0, lo_open=True)
NON_NEGATIVE = number(0)
FRACTION = number(0, 1, hi_open=True)  # sparsity, label smoothing, momentum


def hfield(default: Any, help: str, choices: tuple[Any, ...] | None = None,
           check: Check | None = None) -> Any:
    """A dataclass field with its command-line help text, allowed values (`choices`) or a
    `check` of its value (None always passes)."""
    return field(default=default, metadata={"help": help, "choices": choices, "check": check})


def validate(obj: Any) -> None:
    """Raise ValueError naming the first field of dataclass `obj` that is out of range."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is None:
            continue
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices is not None and v not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(map(str, choices))}, "
                             f"got {v!r}")
        msg = check(v) if check is not None else None
        if msg:
            raise ValueError(f"{f.name} {msg}, got {v!r}")


@dataclass
class DataHparams:
    dataset: str = hfield("digits", "dataset", data_lib.DATASETS)
    data: str | None = hfield(None, "directory of a local dataset (cifar10: the extracted "
                                "cifar-10-batches-py folder)")
    image_size: int | None = hfield(None, "resize images to this side (digits: 8, 16 or 32); "
                                    "the resized dataset must fit in "
                                    f"{data_lib.MAX_IMAGE_BYTES / 2**30:g} GiB",
                                    check=number(1))
    channels: int | None = hfield(None, "replicate grayscale images to this many channels",
                                  (1, 3))
    data_seed: int = hfield(0, "seed of the train/test split (kept fixed across model seeds)")
    limit_train: int | None = hfield(None, "use only the first N training examples",
                                     check=number(1))
    block_size: int = hfield(64, "context length in characters (text)", check=number(1))

    def __post_init__(self) -> None:
        validate(self)

    def load(self) -> data_lib.Splits:
        return data_lib.load(self.dataset, root=self.data, seed=self.data_seed,
                             image_size=self.image_size, channels=self.channels,
                             limit_train=self.limit_train, block_size=self.block_size)


@dataclass
class ModelHparams:
    model: str = hfield("conv4", "model name (see sparsecore.models.names())")
    width: float = hfield(1.0, "width multiplier on every hidden layer", check=POSITIVE)

    def __post_init__(self) -> None:
        validate(self)

    def build(self, splits: data_lib.Splits, seed: int) -> nn.Module:
        """The model for `splits`, initialised from `seed`."""
        torch.manual_seed(seed)
        return models.create(self.model, width=self.width, **splits.model_kwargs())


def _milestones(s: str) -> str | None:
    try:
        ok = all(int(m) >= 0 for m in s.split(",") if m.strip())
    except ValueError:
        ok = False
    return None if ok else "must be comma-separated epochs (integers >= 0), e.g. 80,120"


@dataclass
class TrainHparams:
    epochs: int = hfield(10, "training epochs", check=number(1))
    batch_size: int = hfield(64, "global batch size (split over DDP processes)",
                             check=number(1))
    optimizer: str = hfield("sgd", "optimizer", ("sgd", "adam"))
    lr: float = hfield(0.05, "peak learning rate", check=POSITIVE)
    momentum: float = hfield(0.9, "SGD momentum (Nesterov off)", check=FRACTION)
    weight_decay: float = hfield(5e-4, "L2 weight decay", check=NON_NEGATIVE)
    schedule: str = hfield("cosine", "learning-rate schedule", ("cosine", "step", "constant"))
    milestones: str = hfield("", "step schedule: comma-separated epochs where the LR drops",
                             check=_milestones)
    gamma: float = hfield(0.1, "step schedule: LR factor at each milestone", check=POSITIVE)
    warmup_epochs: float = hfield(0.0, "linear LR warm-up, in epochs", check=NON_NEGATIVE)
    label_smoothing: float = hfield(0.0, "label smoothing of the cross-entropy",
                                    check=FRACTION)
    seed: int = hfield(0, "seed of the model init, data order and augmentation")
    kernels: str = hfield("dense", "run layers on dense torch kernels or, after sparsify(), on "
                               "sparsecore's sparse kernels", ("dense", "sparse"))
    eval_batch_size: int = hfield(500, "batch size for evaluation", check=number(1))

    def __post_init__(self) -> None:
        validate(self)


def arg_type(conv: Callable[[str], Any], check: Check | None) -> Callable[[str], Any]:
    """An argparse `type`: conv(text), then check(value); argparse turns a failure into
    `argument --flag: ...` and exit status 2."""
    if check is None:
        return conv

    def parse(text: str) -> Any:
        v = conv(text)
        msg = check(v)
        if msg:
            raise argparse.ArgumentTypeError(f"{msg}, got {text!r}")
        return v

    parse.__name__ = conv.__name__  # argparse's "invalid int value" for unparsable text
    return parse


def path_arg(text: str) -> str:
    """An argparse `type` for a file or directory to write: not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a path, got ''")
    return text


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                  defaults: Any | None = None) -> None:
    """Add one `--flag` per field of dataclass `cls` (help text and checks from the field)."""
    group = parser.add_argument_group(cls.__name__.replace("Hparams", " hyperparameters"))
    base = defaults if defaults is not None else cls()
    for f in dataclasses.fields(cls):
        default = getattr(base, f.name)
        flag = "--" + prefix + f.name.replace("_", "-")
        kind = str(f.type)
        conv: Any = float if "float" in kind else int if "int" in kind else str
        choices = f.metadata.get("choices")
        help_text = f.metadata.get("help", "") + f" (default: {default})"
        group.add_argument(flag, dest=prefix.replace("-", "_") + f.name,
                           type=arg_type(conv, f.metadata.get("check")), default=default,
                           choices=choices, help=help_text)


def from_args(cls: type, args: argparse.Namespace, prefix: str = "") -> Any:
    """Read dataclass `cls` back from parsed arguments (see add_arguments)."""
    p = prefix.replace("-", "_")
    return cls(**{f.name: getattr(args, p + f.name) for f in dataclasses.fields(cls)})
