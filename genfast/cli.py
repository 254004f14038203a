"""The `genfast` command: `genfast info | bench | train <model> | sample <model> | translate`.

Every bad argument is a usage error: exit status 2 and one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

SIGPIPE_EXIT = 141  # what a shell reports for a process that SIGPIPE ended (128 + 13): the reader stopped reading


def _models_help() -> str:
    from genfast.recipes import RECIPES

    return "\n".join(f"  {name:<11} {text}" for name, (_, text) in RECIPES.items())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (genfast --help lists the commands)\n")


# The checkout this genfast was imported from (its benchmarks/ sits beside the package); a wheel has none.
_CHECKOUT = Path(__file__).resolve().parents[1]


def _benchmarks_root() -> Path | None:
    """The folder holding benchmarks/run.py: the current directory first (where ``python -m`` looks first), then
    the checkout of this genfast; None for an installed genfast run outside a checkout."""
    for root in (Path.cwd(), _CHECKOUT):
        if (root / "benchmarks" / "run.py").is_file():
            return root
    return None


def _bench(parser: argparse.ArgumentParser, rest: list[str]) -> int:
    """``python -m benchmarks.run`` in a child process: the suite sits above the library (it imports genfast, and
    the package does not import it back) and is not part of the installed package."""
    root = _benchmarks_root()
    if root is None:
        parser.error("bench: the benchmark suite lives in the repository's benchmarks/ folder, which an installed "
                     "genfast does not include; run `genfast bench` (or `make bench`) inside a checkout of the "
                     "repository")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    with subprocess.Popen([sys.executable, "-m", "benchmarks.run", *rest], env=env) as child:
        try:
            code = child.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the child too (one process group): let it stop and report
            code = child.wait()
    return code if code >= 0 else 128 - code  # killed by signal N: the shell's 128 + N


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
    bench = sub.add_parser("bench", help="run the benchmark suite, as `make bench` (needs a checkout; "
                                         "genfast bench --help for its options)", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
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
    if argv[:1] in (["translate"], ["bench"]):  # argparse's REMAINDER drops leading options (--ckpt, --family):
        argv = [argv[0], "--", *argv[1:]]        # hand them over as they are
    args = parser.parse_args(argv)

    if args.command == "info":
        from genfast import info

        info(file=sys.stdout)
        return 0
    if args.command == "bench":
        return _bench(parser, args.rest[1:] if args.rest[:1] == ["--"] else args.rest)
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
