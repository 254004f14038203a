"""The `genfast` command: `genfast info | bench | train <model> | sample <model> | translate`."""

from __future__ import annotations

import argparse
import sys


def _models_help() -> str:
    from genfast.recipes import RECIPES

    return "\n".join(f"  {name:<11} {text}" for name, (_, text) in RECIPES.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genfast", description="Fused kernels for generative models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="models for train / sample:\n" + _models_help())
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, the compiled extension, the GPU, and which backends serve each op")
    bench = sub.add_parser("bench", help="run the benchmark suite (the same as `make bench`)")
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
        print(f"usage: genfast {argv[0]} <model> [options]   (genfast {argv[0]} <model> --help for the options)\n\n"
              f"models:\n{_models_help()}")
        return 0 if len(argv) > 1 else 2
    if argv[:1] == ["translate"]:  # argparse's REMAINDER drops leading options (--ckpt): hand them over as they are
        argv = ["translate", "--", *argv[1:]]
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
    if args.command in ("train", "sample"):
        from genfast.recipes import load_recipe

        try:
            recipe = load_recipe(args.model)
        except ValueError as exc:
            parser.error(str(exc))
        entry = getattr(recipe, f"{args.command}_main", None)
        if entry is None:
            parser.error(f"the {args.model} recipe cannot {args.command}")
        return entry(args.rest)
    if args.command == "translate":
        from genfast.recipes import load_recipe

        try:
            recipe = load_recipe("translator")
        except ValueError as exc:
            parser.error(str(exc))
        return recipe.translate_main(args.rest[1:] if args.rest[:1] == ["--"] else args.rest)
    return 2
