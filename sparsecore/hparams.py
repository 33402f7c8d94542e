"""Hyperparameters of a training run: dataclasses whose fields carry their help text;
`add_arguments` turns one into command-line flags and `from_args` reads it back (as OpenLTH
does)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsecore import data as data_lib
from sparsecore import models


def hfield(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its command-line help text (and allowed values)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class DataHparams:
    dataset: str = hfield("digits", "dataset", data_lib.DATASETS)
    data: str | None = hfield(None, "directory of a local dataset (cifar10: the extracted "
                                "cifar-10-batches-py folder)")
    image_size: int | None = hfield(None, "resize images to this side (digits: 8, 16 or 32)")
    channels: int | None = hfield(None, "replicate grayscale images to this many channels (1 or 3)")
    data_seed: int = hfield(0, "seed of the train/test split (kept fixed across model seeds)")
    limit_train: int | None = hfield(None, "use only the first N training examples")
    block_size: int = hfield(64, "context length in characters (text)")

    def load(self) -> data_lib.Splits:
        return data_lib.load(self.dataset, root=self.data, seed=self.data_seed,
                             image_size=self.image_size, channels=self.channels,
                             limit_train=self.limit_train, block_size=self.block_size)


@dataclass
class ModelHparams:
    model: str = hfield("conv4", "model name (see sparsecore.models.names())")
    width: float = hfield(1.0, "width multiplier on every hidden layer")

    def build(self, splits: data_lib.Splits, seed: int) -> nn.Module:
        """The model for `splits`, initialised from `seed`."""
        torch.manual_seed(seed)
        return models.create(self.model, width=self.width, **splits.model_kwargs())


@dataclass
class TrainHparams:
    epochs: int = hfield(10, "training epochs")
    batch_size: int = hfield(64, "global batch size (split over DDP processes)")
    optimizer: str = hfield("sgd", "optimizer", ("sgd", "adam"))
    lr: float = hfield(0.05, "peak learning rate")
    momentum: float = hfield(0.9, "SGD momentum (Nesterov off)")
    weight_decay: float = hfield(5e-4, "L2 weight decay")
    schedule: str = hfield("cosine", "learning-rate schedule", ("cosine", "step", "constant"))
    milestones: str = hfield("", "step schedule: comma-separated epochs where the LR drops")
    gamma: float = hfield(0.1, "step schedule: LR factor at each milestone")
    warmup_epochs: float = hfield(0.0, "linear LR warm-up, in epochs")
    label_smoothing: float = hfield(0.0, "label smoothing of the cross-entropy")
    seed: int = hfield(0, "seed of the model init, data order and augmentation")
    kernels: str = hfield("dense", "run layers on dense torch kernels or, after sparsify(), on "
                               "sparsecore's sparse kernels", ("dense", "sparse"))
    eval_batch_size: int = hfield(500, "batch size for evaluation")


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                  defaults: Any | None = None) -> None:
    """Add one `--flag` per field of dataclass `cls` (help text from the field)."""
    group = parser.add_argument_group(cls.__name__.replace("Hparams", " hyperparameters"))
    base = defaults if defaults is not None else cls()
    for f in dataclasses.fields(cls):
        default = getattr(base, f.name)
        flag = "--" + prefix + f.name.replace("_", "-")
        kind = str(f.type)
        conv: Any = float if "float" in kind else int if "int" in kind else str
        choices = f.metadata.get("choices")
        help_text = f.metadata.get("help", "") + f" (default: {default})"
        group.add_argument(flag, dest=prefix.replace("-", "_") + f.name, type=conv,
                           default=default, choices=choices, help=help_text)


def from_args(cls: type, args: argparse.Namespace, prefix: str = "") -> Any:
    """Read dataclass `cls` back from parsed arguments (see add_arguments)."""
    p = prefix.replace("-", "_")
    return cls(**{f.name: getattr(args, p + f.name) for f in dataclasses.fields(cls)})
