"""The `genfast` command: `genfast info | bench | train <model> | sample <model> | translate`.

Every bad argument is a usage error: exit status 2 and one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

SIGPIPE_EXIT = 141  # what a shell reports for a process that SIGPIPE ended (128 + 13): the reader stopped reading


def _models_help() -> str:
    from genfast.recipes import RECIPES

    return "\n".join(f"  {name:<11} {text}" for name, (_, text) in RECIPES.items())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (genfast --help lists the commands)\n")


def _bench(parser: argparse.ArgumentParser, rest: list[str]) -> int:
    """benchmarks/run.py of a source checkout: the suite is not part of the installed package."""
    try:
        from benchmarks.run import main as bench_main
    except ImportError:
        parser.error("bench: the benchmark suite lives in the repository's benchmarks/ folder, which an installed "
                     "genfast does not include; run `genfast bench` (or `make bench`) inside a checkout of the "
                     "repository")
    return bench_main(rest)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `genfast info | head -3`: the reader closed the pipe. Stop quietly, as cat does, and point stdout at
        # /dev/null so that Python's flush at exit does not raise (and print a traceback) a second time.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout is not a file (replaced in-process)
            pass
        return SIGPIPE_EXIT


def _main(argv: list[str] | None) -> int:
    parser = _Parser(prog="genfast", description="Fused kernels for generative models.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="models for train / sample:\n" + _models_help())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, the compiled extension, the GPU, and which backends serve each op")
    bench = sub.add_parser("bench", help="run the benchmark suite (the same as `make bench`; needs a checkout)")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for benchmarks/run.py (see --help)")
    for command, text in (("train", "train a model (genfast train <model> --help for its options)"),
                          ("sample", "sample from a trained model (genfast sample <model> --help)")):
        p = sub.add_parser(command, help=text, add_help=False)
        p.add_argument("model", help="one of the models listed below")
        p.add_argument("rest", nargs=argparse.REMAINDER)
    translate = sub.add_parser("translate", help="translate text with a trained translator", add_help=False)
    translate.add_argument("rest", nargs=argparse.REMAINDER)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["train"], ["sample"]) and (len(argv) == 1 or argv[1] in ("-h", "--help")):
        if len(argv) == 1:
            parser.exit(2, f"genfast {argv[0]}: error: name a model: genfast {argv[0]} <model> [options] "
                           f"({', '.join(_model_names())})\n")
        print(f"usage: genfast {argv[0]} <model> [options]   (genfast {argv[0]} <model> --help for the options)\n\n"
              f"models:\n{_models_help()}")
        return 0
    if argv[:1] == ["translate"]:  # argparse's REMAINDER drops leading options (--ckpt): hand them over as they are
        argv = ["translate", "--", *argv[1:]]
    args = parser.parse_args(argv)

    if args.command == "info":
        from genfast import info

        info(file=sys.stdout)
        return 0
    if args.command == "bench":
        return _bench(parser, args.rest)
    if args.command in ("train", "sample"):
        from genfast.recipes import load_recipe

        try:
            recipe = load_recipe(args.model)
        except ValueError as exc:
            parser.error(f"{args.command}: {exc}")
        entry = getattr(recipe, f"{args.command}_main", None)
        if entry is None:
            parser.error(f"the {args.model} recipe cannot {args.command}")
        return entry(args.rest)
    if args.command == "translate":
        from genfast.recipes import load_recipe

        return load_recipe("translator").translate_main(args.rest[1:] if args.rest[:1] == ["--"] else args.rest)
    return 2


def _model_names() -> list[str]:
    from genfast.recipes import RECIPES

    return list(RECIPES)
