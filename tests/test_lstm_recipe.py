"""`genfast train|sample lstm`: the run folder, load-back, sampling, one-line usage errors, and the validation
figures (streamed bits per character, the unigram baseline). Tiny configs, a few steps."""

import math

import pytest
import torch

import genfast
from genfast.models.lstm import LSTMLM, LSTMConfig
from genfast.recipes import lstm as recipe

TEXT = "def add(a, b):\n    return a + b\n\n\nclass Box:\n    pass\n" * 30
TINY = ["--config", "tiny", "--batch-size", "4", "--seq-len", "16", "--eval-tokens", "256", "--sample-tokens", "0",
        "--warmup", "1", "--device", "cpu", "--quiet"]


def code_of(call, argv) -> int:
    try:
        return call(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lstm")
    data = root / "code.py"
    data.write_text(TEXT)
    out = root / "run"
    assert recipe.train_main([*TINY, "--data", str(data), "--steps", "3", "--out", str(out)]) == 0
    return out, data


def test_run_folder_loads_back(run):
    out, _ = run
    files = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert {"config.json", "model.safetensors", "trainer.pt"} <= set(files)
    model = genfast.models.load(out)
    assert isinstance(model, LSTMLM) and not model.training
    assert model.config.n_hidden == LSTMConfig.PRESETS["tiny"]["n_hidden"]


def test_sample_prints_a_continuation(run, capsys):
    out, _ = run
    assert recipe.sample_main(["--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "20", "--device", "cpu"]) \
        == 0
    text = capsys.readouterr().out
    assert text.startswith("def ") and len(text.rstrip("\n")) == 24
    assert recipe.sample_main(["--ckpt", str(out), "--prompt", "class", "--max-new-tokens", "5", "--stream",
                               "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("class")


@pytest.mark.parametrize("which,argv,message", [
    ("train", ["--seq-len", "0"], "--seq-len"),
    ("train", ["--batch-size", str(10**12)], f"--batch-size {10**12} with --seq-len 16 needs"),
    ("train", ["--data", "/nonexistent/file.txt"], "no file at"),
    ("train", ["--seq-len", "5000"], "too few for a block size of 5000"),
    ("train", ["--tokenizer", "bpe", "--vocab-size", "10"], "--vocab-size 10"),
    ("sample", ["--prompt", ""], "--prompt must hold at least one token"),
    ("sample", ["--prompt", "a", "--max-new-tokens", str(10**15)], "max_new_tokens=1000000000000000 needs"),
    ("sample", ["--prompt", "a", "--top-p", "0"], "--top-p"),
    ("sample", ["--ckpt", "/nonexistent", "--prompt", "a"], "--ckpt"),
])
def test_usage_errors_are_one_line(run, tmp_path, capsys, which, argv, message):
    out, data = run
    if which == "train":
        argv = [*TINY, "--data", str(data), "--out", str(tmp_path / "new"), *argv]
        call = recipe.train_main
    else:
        argv = ["--ckpt", str(out), "--device", "cpu", *argv]
        call = recipe.sample_main
    assert code_of(call, argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if "--batch-size" in message:
        assert not (tmp_path / "new").exists()  # refused before --out was made


def test_streamed_bits_carry_the_state_across_windows():
    torch.manual_seed(0)
    model = LSTMLM(LSTMConfig.preset("tiny", vocab_size=11)).eval()
    pieces = torch.randint(0, 11, (3, 25), generator=torch.Generator().manual_seed(1))
    one_window = recipe.stream_bits(model, pieces, 100, torch.device("cpu"))
    many_windows = recipe.stream_bits(model, pieces, 4, torch.device("cpu"))
    with torch.no_grad():
        logits, _ = model(pieces[:, :-1])
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), pieces[:, 1:].flatten(), reduction="sum")
    assert math.isclose(one_window, float(want) / math.log(2), rel_tol=1e-5)
    assert math.isclose(many_windows, one_window, rel_tol=1e-5)


def test_unigram_bits():
    train = torch.tensor([0, 0, 1, 1])  # with add-one smoothing over 4 tokens: p = 3/8, 3/8, 1/8, 1/8
    assert math.isclose(recipe.unigram_bits(train, torch.tensor([0, 3]), 4), -math.log2(3 / 8) - math.log2(1 / 8))
    pieces = recipe.eval_pieces(torch.arange(11), 4)
    assert pieces.shape == (4, 2) and pieces[1].tolist() == [2, 3]
