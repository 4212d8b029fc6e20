"""`overlap-sampler` command line: `demo`, `info`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="overlap-sampler", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="sample a crowded synthetic batch with every negative strategy")
    demo.add_argument("--images", type=int, default=8)
    demo.add_argument("--proposals", type=int, default=2000)
    demo.add_argument("--gt", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    commands.add_parser("info", help="how the native library was built")
    args = parser.parse_args(argv)

    if args.command == "info":
        from . import build_info

        print(json.dumps(build_info, indent=2))
    elif args.command == "demo":
        from .demo import run_demo

        print(run_demo(args.images, args.proposals, args.gt, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
