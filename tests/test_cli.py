"""The `genfast` command itself: usage errors are one line with exit status 2, in a real process (no traceback)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genfast.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "genfast", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_unknown_commands_and_models(capsys):
    _usage_error(capsys, ["train", "nosuchmodel"], "unknown model 'nosuchmodel'; known: gpt")
    _usage_error(capsys, ["sample", "nosuchmodel"], "unknown model")
    _usage_error(capsys, ["train"], "name a model")
    _usage_error(capsys, ["frobnicate"], "invalid choice")
    assert main(["train", "--help"]) == 0
    assert "dcgan" in capsys.readouterr().out


def test_bench_without_a_checkout_says_so(tmp_path, monkeypatch, capsys):
    from genfast import cli

    monkeypatch.setattr(cli, "_CHECKOUT", tmp_path)  # an installed genfast: no benchmarks/ beside the package
    monkeypatch.chdir(tmp_path)
    _usage_error(capsys, ["bench"], "checkout of the repository")


def test_bench_runs_the_suite_in_a_child_process_with_its_options(tmp_path):
    """From outside the checkout, options reach benchmarks/run.py as typed (its own --help, not genfast's)."""
    done = _run("bench", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--family FAMILY" in done.stdout and "--replaced" in done.stdout, done.stdout
    done = _run("bench", "--family", "sampling", "--no-such-option", cwd=tmp_path)
    assert done.returncode == 2 and "unrecognized arguments: --no-such-option" in done.stderr, done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
def test_device_cuda_on_cpu_torch_is_one_line_in_a_real_process(tmp_path):
    done = _run("train", "dcgan", "--device", "cuda", "--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--device cuda" in done.stderr
    assert not (tmp_path / "x" / "checkpoint").exists()


def test_missing_ckpt_in_a_real_process(tmp_path):
    done = _run("sample", "vae", "--out", str(tmp_path / "v.png"))
    assert done.returncode == 2 and "--ckpt" in done.stderr and "Traceback" not in done.stderr


def test_import_genfast_loads_the_kernel_library_only():
    code = ("import sys, genfast\n"
            "late = [m for m in sys.modules if m.split('.')[:2][-1] in ('models', 'recipes', 'training', 'data')"
            " and m.startswith('genfast.')]\n"
            "assert not late, late\n"
            "assert genfast.models.GPT.__name__ == 'GPT' and 'genfast.models.gpt' in sys.modules\n"
            # The doors into other stacks: attributes on first use, importing their library only then.
            "assert 'genfast.integrations' not in sys.modules and 'transformers' not in sys.modules\n"
            "assert 'integrations' in genfast.__all__\n"
            "assert genfast.integrations.__all__ == ['transformers', 'diffusers']\n"
            "assert 'transformers' not in sys.modules\n"
            "assert 'UnsupportedAttentionError' in genfast.integrations.transformers.__all__\n"
            "assert genfast.integrations.diffusers.GenfastAttnProcessor.__name__ == 'GenfastAttnProcessor'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]


def test_library_layers_do_not_import_applications():
    """models never import training or recipes; the diffusion pipeline does not import training; the benchmarks
    do not import recipes."""
    import re

    for folder, banned in (("genfast/models", r"genfast\.(training|recipes)"),
                           ("genfast/diffusion", r"genfast\.(training|recipes)"), ("benchmarks", r"genfast\.recipes")):
        for path in (ROOT / folder).rglob("*.py"):
            assert not re.search(rf"^\s*(from|import) {banned}", path.read_text(), re.M), path


def test_info_into_a_closed_pipe_is_no_traceback():
    """`python -m genfast info | head -3`: the reader goes away; genfast stops quietly (141, as SIGPIPE would)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "genfast", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=ROOT)
    proc.stdout.close()  # before genfast has imported, let alone written: every write meets EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_help_says_what_data_each_model_trains_on_by_default(capsys):
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "between two image folders" not in out and "(TSV sentence pairs)" not in out
    assert "cyclegan CycleGAN between two image domains (default data: built-in circles and squares" in out
    assert "translation (default data: built-in English -> French number phrases" in out
