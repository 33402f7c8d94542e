"""`python -m bench <family> [options]`: run one bench family, print its table, write JSON
(and PNG plots) under bench/results/; `python -m bench report` regenerates bench/RESULTS.md
from them. Families register themselves in FAMILIES."""

from __future__ import annotations

import argparse
import importlib
import sys

# family name -> module in bench/ that defines add_arguments(parser) and main(args) -> int
FAMILIES = {
    "layers": "bench.layers",
    "layers-bsr": "bench.layers_bsr",
    "models": "bench.models",
    "train": "bench.train",
    "similarity": "bench.similarity",
    "linalg": "bench.linalg",
    "prune": "bench.prune",
    "report": "bench.report",  # not a bench: bench/RESULTS.md from bench/results/
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="family", required=True)
    for name, modname in FAMILIES.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue  # family not written yet
            raise
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    args = parser.parse_args(argv)
    return args._main(args)


if __name__ == "__main__":
    sys.exit(main())
