"""The `genfast` command: `genfast info`, `genfast bench`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genfast", description="Fused kernels for generative models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, the compiled extension, the GPU, and which backends serve each op")
    bench = sub.add_parser("bench", help="run the benchmark suite (the same as `make bench`)")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for benchmarks/run.py (see --help)")
    args = parser.parse_args(argv)

    if args.command == "info":
        from genfast import info

        info(file=sys.stdout)
        return 0
    if args.command == "bench":
        try:
            from benchmarks.run import main as bench_main
        except ImportError:
            parser.error("the benchmark suite lives in the repository's benchmarks/ folder: run from a checkout")
        return bench_main(args.rest)
    return 2
