"""The README's code runs as written.

- Every ```python block of README.md runs on its own, in a fresh interpreter with an empty temporary working
  directory, on whatever device is present (CPU here), within BLOCK_TIMEOUT seconds. A block that cannot (GPU only,
  needs a trained run, long) is preceded by the line ``<!-- readme-test: skip (the reason) -->``.
- Every ``genfast ...`` command in the README (in shell blocks and in inline code, also behind ``torchrun ... -m``
  or ``python -m``) parses: its subcommand, model and flags are accepted by genfast's own argument parsers. The
  command is not run: the check stops right after the recipe's parser accepted the arguments. Commands with a
  ``...`` placeholder are left out.

Each block and each command is its own test case, named after its README line, so a failure says which one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK_TIMEOUT = 300  # seconds; a block is meant to take a few, this only bounds a hang on a loaded machine
SKIP_MARK = re.compile(r"^<!--\s*readme-test:\s*skip\b(.*?)-->\s*$")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
SHELL_LANGS = ("", "bash", "sh", "shell", "console")


@dataclasses.dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason given in the skip marker, or None


def read_blocks(text: str) -> list[Block]:
    """Fenced code blocks, with the skip marker (if any) on the last non-blank line before the fence."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start, lang, body = i, opening.group(2).lower(), []
        i += 1
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i][len(opening.group(1)):] if lines[i].startswith(opening.group(1)) else lines[i])
            i += 1
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = SKIP_MARK.match(before)
        reason = None
        if mark:
            reason = mark.group(1).strip()
            reason = reason[1:-1].strip() if reason.startswith("(") and reason.endswith(")") else reason
        blocks.append(Block(start + 1, lang, "\n".join(body) + "\n", reason if mark else None))
        i += 1
    return blocks


def _outside_fences(text: str) -> str:
    """The README with fenced blocks blanked (line numbers kept), for finding inline code."""
    out, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            out.append("")
        else:
            out.append("" if inside else line)
    return "\n".join(out)


def genfast_argv(command: str) -> list[str] | None:
    """The arguments after ``genfast`` in one shell command line (None if it does not run genfast)."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word == "genfast" and (i == 0 or words[i - 1] == "-m"):
            return words[i + 1:]
    return None


def read_commands(text: str) -> list[tuple[int, str]]:
    """(line, command) for every genfast command in shell blocks and inline code."""
    found = []
    for block in read_blocks(text):
        if block.lang not in SHELL_LANGS:
            continue
        joined = block.code.replace("\\\n", " ")  # continuation lines
        for offset, line in enumerate(joined.splitlines()):
            if genfast_argv(line) is not None:
                found.append((block.line + 1 + offset, line.strip()))
    prose = _outside_fences(text)
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        span = " ".join(match.group(1).split())
        if re.match(r"^(genfast|torchrun\b.*-m genfast|python3? -m genfast)(\s|$)", span):
            found.append((prose.count("\n", 0, match.start()) + 1, span))
    return sorted(found)


TEXT = README.read_text(encoding="utf-8")
PYTHON_BLOCKS = [b for b in read_blocks(TEXT) if b.lang in ("python", "py")]
COMMANDS = read_commands(TEXT)


def _first_line(code: str) -> str:
    return next((line.strip() for line in code.splitlines() if line.strip()), "")[:40]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"L{b.line}:{_first_line(b.code)}" for b in PYTHON_BLOCKS])
def test_python_block_runs(block: Block, tmp_path):
    if block.skip is not None:
        if not block.skip:
            pytest.fail(f"README.md line {block.line}: the skip marker must give a reason: "
                        "<!-- readme-test: skip (why) -->")
        pytest.skip(f"README.md line {block.line}: {block.skip}")
    script = tmp_path / f"readme_line_{block.line}.py"
    script.write_text(block.code, encoding="utf-8")
    env = dict(os.environ, MPLBACKEND="Agg")
    try:
        proc = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md line {block.line}: the python block ran past {BLOCK_TIMEOUT} s\n{block.code}")
    if proc.returncode != 0:
        numbered = "\n".join(f"{block.line + i:5d}  {line}" for i, line in enumerate(block.code.splitlines(), 1))
        pytest.fail(f"README.md line {block.line}: the python block failed (exit {proc.returncode}); run it as "
                    f"written, or mark it <!-- readme-test: skip (reason) -->\n--- stderr (end) ---\n"
                    f"{proc.stderr[-3000:]}\n--- the block (README line numbers) ---\n{numbered}")


def test_readme_has_code_to_check():
    """The extraction itself works: a README without blocks or commands would make every check vacuous."""
    assert PYTHON_BLOCKS and COMMANDS
    assert any(b.skip is None for b in PYTHON_BLOCKS)


# ------------------------------------------------------------------------------------------ genfast commands
# Runs genfast.cli.main on each argv in one interpreter; parse_known_args is wrapped so that the first successful
# parse *after* the CLI's own (the recipe's or the benchmark runner's) stops the command before it does any work.
PARSE_ONLY = r'''
import argparse, json, sys

class Parsed(Exception):
    pass

real = argparse.ArgumentParser.parse_known_args
state = {"depth": 0, "top_level": 0}

def parse_known_args(self, *args, **kwargs):
    state["depth"] += 1
    try:
        result = real(self, *args, **kwargs)
    finally:
        state["depth"] -= 1
    if state["depth"] == 0:
        state["top_level"] += 1
        if state["top_level"] >= 2:
            raise Parsed()
    return result

argparse.ArgumentParser.parse_known_args = parse_known_args
import subprocess
from genfast import cli

class BenchmarkChild:
    # `genfast bench` runs `python -m benchmarks.run ARGS` in a child process, which this patch would not reach
    # (the child would run the whole suite): its parser runs here instead, and parsing is where it stops.
    def __init__(self, command, **kwargs):
        if command[1:3] != ["-m", "benchmarks.run"]:
            raise RuntimeError(f"unexpected child process {command!r}")
        from benchmarks import run
        state.update(depth=0, top_level=1)
        raise SystemExit(run.main(command[3:]))

cli.subprocess = type("subprocess", (), {"Popen": BenchmarkChild})

results = []
for argv in json.loads(sys.argv[1]):
    state.update(depth=0, top_level=0)
    try:
        code = cli.main(argv)
        results.append({"ok": code in (0, None), "why": f"exit {code}"})
    except Parsed:
        results.append({"ok": True, "why": "parsed"})
    except SystemExit as exc:
        results.append({"ok": exc.code in (0, None), "why": f"exit {exc.code}"})
    except Exception as exc:
        results.append({"ok": False, "why": f"{type(exc).__name__}: {exc}"})
print("RESULTS " + json.dumps(results))
'''

def _placeholder(command: str) -> bool:
    """``...`` or ``<model>``-style words stand for something the reader fills in."""
    return any(word == "..." or re.fullmatch(r"<[^>]+>", word) for word in shlex.split(command, comments=True))


# A bare `genfast` in the prose names the command; it is not one to run.
CHECKED = [(line, cmd) for line, cmd in COMMANDS if genfast_argv(cmd) and not _placeholder(cmd)]
REPO = README.parent


@pytest.fixture(scope="module")
def parse_results() -> dict[tuple[int, str], dict]:
    argvs = [genfast_argv(cmd) for _, cmd in CHECKED]
    # In the checkout, as a reader runs them (`genfast bench` needs its benchmarks/); nothing runs past parsing.
    proc = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps(argvs)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    last = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    if not last:
        pytest.fail(f"checking the README's genfast commands crashed:\n{proc.stderr[-3000:]}")
    results = json.loads(last[-1][len("RESULTS "):])
    errors = proc.stderr  # argparse's messages, in command order; attached to failures for context
    return {key: dict(result, stderr=errors) for key, result in zip(CHECKED, results)}


@pytest.mark.parametrize("line, command", CHECKED, ids=[f"L{line}:{cmd[:60]}" for line, cmd in CHECKED])
def test_genfast_command_parses(line, command, parse_results):
    result = parse_results[(line, command)]
    if not result["ok"]:
        argv = genfast_argv(command)
        pytest.fail(f"README.md line {line}: `{command}` is not accepted by genfast's parser ({result['why']}); "
                    f"try `genfast {' '.join(argv[:2])} --help`\n--- stderr of the check ---\n"
                    f"{result['stderr'][-2000:]}")
