"""Samplers compared over several seeds on the built-in dataset: `overlap-sampler ablate` with this
script's defaults, the six samplers (torchvision's random first: the baseline) x seeds 0 1 2, two runs
at a time, run folders in output/ab, results in benchmarks/results/ab-<name>.md and .json. Every flag
of `overlap-sampler ablate` is accepted (see `overlap-sampler ablate --help`); runs made by earlier
versions of this script are reused.

    python benchmarks/sampler_ab.py                       # the six samplers x seeds 0 1 2
    python benchmarks/sampler_ab.py --seeds 0 1 2 3 4 --jobs 2
    python benchmarks/sampler_ab.py --variant hard="--neg-strategy hard" --variant linear="--neg-strategy linear"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from overlap_sampler.cli import main as cli_main

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    """`overlap-sampler ablate` with this script's defaults; ``--name NAME`` writes ab-NAME.md."""
    names = argparse.ArgumentParser(add_help=False)
    names.add_argument("--name", default="synthetic")
    known, rest = names.parse_known_args(argv)
    return cli_main(["ablate", "--jobs", "2", "--runs-dir", "output/ab", "--out", str(RESULTS), *rest,
                     "--name", f"ab-{known.name}"])


if __name__ == "__main__":
    sys.exit(main())
