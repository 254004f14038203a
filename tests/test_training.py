"""genfast.training: atomic checkpoints (and recovery from a crash mid-swap), safe loading, schedules, RNG
capture for exact resume, batch generators, PNG grids, and StopOnInterrupt."""

import math
import os
import random
import signal
import struct
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from genfast.training import (
    StopOnInterrupt,
    batch_generator,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    save_image_grid,
    warmup_cosine_lr,
)
from genfast.training import checkpoint as checkpoint_module
from genfast.training.images import encode_png


def _net(seed: int = 0, width: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, width), nn.LayerNorm(width))


def _weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip(tmp_path):
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "step": 7, "rng": capture_rng_state()}
    path = save_checkpoint(tmp_path / "ck", modules={"net": net}, trainer_state=state, config={"width": 4})
    # (.genfast-made: the marker that lists what genfast wrote, so that only that is ever removed)
    assert sorted(p.name for p in path.iterdir()) == [".genfast-made", "config.json", "net.safetensors", "trainer.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary or displaced directory left
    other = _net(seed=1)
    trainer, config = load_checkpoint(path, modules={"net": other})
    assert config == {"width": 4} and trainer["step"] == 7
    for k, v in _weights(net).items():
        assert torch.equal(other.state_dict()[k], v)
    opt2 = torch.optim.AdamW(other.parameters(), lr=0.1)
    opt2.load_state_dict(trainer["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_checkpoint_overwrite_keeps_tied_weights(tmp_path):
    emb = nn.Embedding(5, 4)
    head = nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    save_checkpoint(tmp_path / "ck", modules={"m": _net()})
    save_checkpoint(tmp_path / "ck", modules={"m": model})  # replaces the first one
    fresh = nn.ModuleDict({"emb": nn.Embedding(5, 4), "head": nn.Linear(4, 5, bias=False)})
    load_checkpoint(tmp_path / "ck", modules={"m": fresh})
    assert torch.equal(fresh["head"].weight, emb.weight) and torch.equal(fresh["emb"].weight, emb.weight)


def test_crash_mid_swap_keeps_a_complete_checkpoint(tmp_path, monkeypatch):
    """Kill the save between its two renames (old -> .old done, new -> place not yet): the old one is found."""
    first = _net(seed=0)
    save_checkpoint(tmp_path / "ck", modules={"net": first}, trainer_state={"step": 1})
    real_replace = os.replace
    calls = []

    def crashing_replace(src, dst):
        calls.append((src, dst))
        # The swap's second rename, the one that puts the new checkpoint in place (the renames before it: each
        # file's atomic write inside the temporary folder, then old -> .ck.genfast-old).
        if Path(dst) == tmp_path / "ck":
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path / "ck", modules={"net": _net(seed=1)}, trainer_state={"step": 2})
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    assert [Path(dst) for _, dst in calls[-2:]] == [tmp_path / ".ck.genfast-old", tmp_path / "ck"]
    assert not (tmp_path / "ck").exists() and (tmp_path / ".ck.genfast-old").is_dir()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the half-written new one was removed
    assert find_checkpoint(tmp_path / "ck") == tmp_path / ".ck.genfast-old"
    loaded = _net(seed=5)
    trainer, _ = load_checkpoint(tmp_path / "ck", modules={"net": loaded})
    assert trainer["step"] == 1
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in _weights(first).items())
    # The next save succeeds and cleans up.
    save_checkpoint(tmp_path / "ck", modules={"net": _net(seed=1)}, trainer_state={"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert load_checkpoint(tmp_path / "ck")[0]["step"] == 3


def test_crash_while_writing_leaves_old_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ck", modules={"net": _net()}, trainer_state={"step": 1})

    def failing_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "ck", modules={"net": _net()}, trainer_state={"step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert load_checkpoint(tmp_path / "ck")[0]["step"] == 1


def test_load_rejects_non_matching_weights(tmp_path):
    save_checkpoint(tmp_path / "ck", modules={"net": _net(width=4)})
    with pytest.raises(ValueError, match="does not fit the net module"):
        load_checkpoint(tmp_path / "ck", modules={"net": _net(width=5)})
    with pytest.raises(ValueError, match="does not fit the net module"):
        load_checkpoint(tmp_path / "ck", modules={"net": nn.Linear(3, 4)})
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_checkpoint(tmp_path / "ck", modules={"other": _net()})
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing")


def test_load_refuses_pickled_code(tmp_path):
    save_checkpoint(tmp_path / "ck", modules={"net": _net()})

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "ck" / "trainer.pt")
    with pytest.raises(ValueError, match="could not be loaded safely"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "net.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "ck", modules={"net": _net()})


def test_save_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one module"):
        save_checkpoint(tmp_path / "ck", modules={})
    with pytest.raises(ValueError, match="must be an identifier"):
        save_checkpoint(tmp_path / "ck", modules={"my net": _net()})
    assert not (tmp_path / "ck").exists() and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ schedule, RNG
def test_warmup_cosine_values():
    lr = lambda s: warmup_cosine_lr(s, base_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(4) == pytest.approx(0.5) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # halfway: the mean
    assert lr(109) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.99)))
    assert lr(110) == 0.1 and lr(1000) == 0.1
    assert all(lr(s) >= lr(s + 1) for s in range(10, 120))  # decreasing after warmup
    assert warmup_cosine_lr(0, base_lr=2.0, warmup_steps=0, total_steps=5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        warmup_cosine_lr(0, base_lr=1.0, warmup_steps=-1, total_steps=5)


def test_rng_capture_restore_and_batch_generator():
    state = capture_rng_state()
    a = (torch.rand(3), random.random())
    restore_rng_state(state)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    x = torch.randint(100, (5,), generator=batch_generator(3, 17))
    assert torch.equal(x, torch.randint(100, (5,), generator=batch_generator(3, 17)))
    assert not torch.equal(x, torch.randint(100, (5,), generator=batch_generator(3, 18)))
    assert not torch.equal(x, torch.randint(100, (5,), generator=batch_generator(3, 17, rank=1)))


# ------------------------------------------------------------------------------------------ images
def _png_chunks(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


def test_png_grid_is_valid(tmp_path):
    images = torch.linspace(-1, 1, 5 * 3 * 6 * 7).reshape(5, 3, 6, 7)
    path = save_image_grid(images, tmp_path / "grid.png", nrow=3, padding=1)
    chunks = _png_chunks(path.read_bytes())
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert (width, height) == (1 + 3 * (7 + 1), 1 + 2 * (6 + 1))
    PIL = pytest.importorskip("PIL.Image")
    with PIL.open(path) as img:
        assert img.size == (width, height) and img.mode == "RGB"
        # every pixel of image i (row i // 3, column i % 3) holds its value mapped from [-1, 1] to 0..255
        want = ((images + 1) / 2 * 255 + 0.5).to(torch.uint8)
        for i, (x, y) in enumerate([(0, 0), (6, 5), (3, 2), (0, 5), (6, 0)]):
            px, py = 1 + (i % 3) * 8 + x, 1 + (i // 3) * 7 + y
            assert img.getpixel((px, py)) == tuple(want[i, :, y, x].tolist()), (i, x, y)
        assert img.getpixel((0, 0)) == (0, 0, 0)  # padding
    gray = save_image_grid(torch.zeros(1, 1, 2, 2), tmp_path / "g.png", padding=0)
    with PIL.open(gray) as img:
        assert img.mode == "L" and img.size == (2, 2) and img.getpixel((0, 0)) == 128


def test_png_errors(tmp_path):
    with pytest.raises(ValueError, match=r"images: need a tensor \[N, C, H, W\]"):
        save_image_grid(torch.zeros(2, 2, 4, 4), tmp_path / "x.png")
    with pytest.raises(ValueError, match="value_range"):
        save_image_grid(torch.zeros(1, 3, 4, 4), tmp_path / "x.png", value_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="pixels: need uint8"):
        encode_png(torch.zeros(2, 2))
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ interrupts
def test_stop_on_interrupt_sets_the_flag_then_restores():
    before = signal.getsignal(signal.SIGINT)
    with StopOnInterrupt(message="test") as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread before the next bytecode
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    with StopOnInterrupt(message="test") as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested


# ------------------------------------------------------------------------------------------ the training loop
class _ToyTask:
    """A one-layer regression trained by genfast.training's loop (what a recipe contributes)."""

    def __new__(cls, run, nan_at=None, signal_at=None, on_save=None, evaluated=None):
        from genfast.training import TrainTask

        class Toy(TrainTask):
            def __init__(self):
                torch.manual_seed(run.args.seed)
                self.net = nn.Linear(3, 1)
                self.modules = {"model": self.net}
                # (momentum: a per-parameter state that a resume must restore)
                self.optimizers = {"model": torch.optim.SGD(self.net.parameters(), lr=run.args.lr, momentum=0.9)}

            def config_dict(self):
                return {"model": {"in": 3}}

            def evaluate(self, step):
                if evaluated is not None:
                    evaluated.append(step)
                return False

            def write_side_files(self, directory):
                if on_save is not None:
                    on_save(directory)

            def train_step(self, step):
                if signal_at is not None and step == signal_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                x = torch.randn(4, 3, generator=batch_generator(run.args.seed, step))
                loss = ((self.net(x) - x.sum(1, keepdim=True)) ** 2).mean()
                if nan_at is not None and step >= nan_at:
                    loss = loss * float("nan")
                opt = self.optimizers["model"]
                opt.zero_grad()
                loss.backward()
                opt.step()
                return {"loss": loss.detach()}

        return Toy()


def _toy_main(argv, **task_options):

    from genfast.training import CommandParser, add_train_args, mark_fixed, start_run

    parser = CommandParser(prog="toy")  # one-line usage errors, as every recipe's
    add_train_args(parser, recipe="toy", steps=6, batch_size=4, lr=0.05, ops=(), save_every=2)
    parser.add_argument("--width", type=int, default=1)  # an architecture flag, fixed by the run
    mark_fixed(parser, "--width")
    args = parser.parse_args([*argv, "--quiet", "--device", "cpu"])
    with start_run(parser, args, recipe="toy") as run:
        return run.train(_ToyTask(run, **task_options))


def _exit_code(argv, **task_options):
    try:
        return _toy_main(argv, **task_options)
    except SystemExit as exc:
        return exc.code


def test_loop_never_touches_the_users_files(tmp_path):
    out = tmp_path / "runs"
    (out / "other_experiment").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    # left by a save that was killed: genfast's own (its marker), removed
    from genfast.training.checkpoint import make_temp_dir

    (make_temp_dir(out, "checkpoint") / "model.safetensors").write_bytes(b"x" * 100)
    assert _toy_main(["--out", str(out)]) == 0
    # (.genfast-lock: the run's lock, see test_loop_second_run_into_the_same_out_exits_at_once)
    assert sorted(p.name for p in out.iterdir()) == [".genfast-lock", "checkpoint", "notes.txt", "other_experiment"]
    assert (out / "notes.txt").read_text() == "mine"
    assert _toy_main(["--out", str(out), "--overwrite", "--seed", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".genfast-lock", "checkpoint", "notes.txt", "other_experiment"]


def test_loop_refuses_to_replace_a_run_and_resumes_exactly(tmp_path, capsys):
    assert _toy_main(["--out", str(tmp_path / "whole")]) == 0
    assert _exit_code(["--out", str(tmp_path / "whole")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert _toy_main(["--out", str(tmp_path / "split"), "--stop-after", "3"]) == 0
    err = capsys.readouterr().err
    assert "saved step 3" in err and str(tmp_path / "split" / "checkpoint") in err
    assert _toy_main(["--out", str(tmp_path / "split"), "--resume"]) == 0
    assert "resumed from step 3" in capsys.readouterr().err
    whole, split = load_checkpoint(tmp_path / "whole")[0], load_checkpoint(tmp_path / "split")[0]
    assert whole["step"] == split["step"] == 6
    from genfast._io import load_safetensors_state

    a = load_safetensors_state(tmp_path / "whole" / "checkpoint" / "model.safetensors")
    b = load_safetensors_state(tmp_path / "split" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loop_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert _toy_main(["--out", str(out)], nan_at=3) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 2" in err and "--lr" in err
    assert load_checkpoint(out)[0]["step"] == 2  # the save at step 4 never happened


def test_loop_sigterm_saves_and_exits_130(tmp_path):
    from genfast.training import INTERRUPTED_EXIT

    evaluated = []
    assert _toy_main(["--out", str(tmp_path / "run")], signal_at=2, evaluated=evaluated) == INTERRUPTED_EXIT
    assert load_checkpoint(tmp_path / "run")[0]["step"] == 3  # the step in flight finished and was saved
    assert evaluated == [3]  # and its samples written (an interrupted run showed nothing)


def test_loop_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert _toy_main(["--out", str(tmp_path / "run")]) == 0
        path = save_image_grid(torch.zeros(1, 1, 4, 4), tmp_path / "run" / "samples" / "g.png")
    finally:
        os.umask(old)
    ckpt = tmp_path / "run" / "checkpoint"
    assert ckpt.stat().st_mode & 0o777 == 0o755
    for name in ("model.safetensors", "trainer.pt", "config.json"):
        assert (ckpt / name).stat().st_mode & 0o777 == 0o644, name
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("edit, message", [
    (lambda s: {**s, "step": -40}, "step must be an int >= 0, got -40"),
    (lambda s: {k: v for k, v in s.items() if k != "optimizers"}, "lacks optimizers"),
    (lambda s: {**s, "recipe": "vae"}, "of a 'vae' run, not a toy one"),
    (lambda s: {**s, "rng": {}}, "rng lacks 'torch'"),
    (lambda s: {**s, "rng": {**s["rng"], "torch": torch.zeros(7, dtype=torch.uint8)}}, "rng.torch must be a uint8"),
    (lambda s: {**s, "rng": {**s["rng"], "python": [3, [1, 2], None]}}, "rng.python is not a Python random state"),
    (lambda s: {**s, "rng": {**s["rng"], "python": [3, s["rng"]["python"][1], "x"]}}, "rng.python"),
    (lambda s: {**s, "task": [1, 2]}, "task must be a dict, got list"),
    (lambda s: {**s, "optimizers": {"model": 5}}, "optimizers.model is not an optimizer's state_dict"),
    (lambda s: {**s, "extra": 1}, "unknown field 'extra'"),
])
def test_loop_hostile_trainer_state_is_named(tmp_path, capsys, edit, message):
    out = tmp_path / "run"
    assert _toy_main(["--out", str(out)]) == 0
    path = out / "checkpoint" / "trainer.pt"
    torch.save(edit(torch.load(path, weights_only=True)), path)
    assert _exit_code(["--out", str(out), "--resume", "--steps", "8"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_loop_missing_trainer_state_is_no_silent_fallback(tmp_path, capsys):
    out = tmp_path / "run"
    assert _toy_main(["--out", str(out)]) == 0
    import shutil

    shutil.copytree(out / "checkpoint", out / ".checkpoint.genfast-old")  # a stale older copy beside it
    (out / "checkpoint" / "trainer.pt").unlink()
    assert _exit_code(["--out", str(out), "--resume", "--steps", "8"]) == 2
    assert str(out / "checkpoint" / "trainer.pt") + " is missing" in capsys.readouterr().err


def test_loop_older_checkpoint_format_says_how_to_convert(tmp_path, capsys):
    out = tmp_path / "run"
    save_checkpoint(out / "checkpoint", modules={"model": nn.Linear(3, 1)}, trainer_state={"step": 1},
                    config={"model": {"in": 3}})  # no format_version: written by an earlier genfast
    assert _exit_code(["--out", str(out), "--resume"]) == 2
    assert "python -m genfast.training.convert" in capsys.readouterr().err


def test_model_and_training_format_versions_agree():
    from genfast.models import _checkpoint
    from genfast.training import checkpoint

    assert _checkpoint.FORMAT_VERSION == checkpoint.FORMAT_VERSION


# ------------------------------------------------------------------------------------------ what genfast deletes
def _ls(path):
    return sorted(p.name for p in path.iterdir())


def test_loop_keeps_a_users_checkpoint_old_folder(tmp_path):
    """D3: a folder the user named checkpoint.old (or .checkpoint.tmp-x, without genfast's marker) survives."""
    out = tmp_path / "run"
    (out / "checkpoint.old").mkdir(parents=True)
    (out / "checkpoint.old" / "mine.txt").write_text("mine")
    (out / ".checkpoint.tmp-mine").mkdir()
    (out / ".checkpoint.tmp-mine" / "x.txt").write_text("mine too")
    assert _toy_main(["--out", str(out)]) == 0
    assert (out / "checkpoint.old" / "mine.txt").read_text() == "mine"
    assert (out / ".checkpoint.tmp-mine" / "x.txt").read_text() == "mine too"
    assert load_checkpoint(out)[0]["step"] == 6


def test_replacing_a_checkpoint_removes_only_what_genfast_wrote(tmp_path):
    save_checkpoint(tmp_path / "ck", modules={"net": _net()}, trainer_state={"step": 1})
    (tmp_path / "ck" / "NOTES.txt").write_text("mine")  # a user's file inside genfast's folder
    save_checkpoint(tmp_path / "ck", modules={"net": _net()}, trainer_state={"step": 2})
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("ck.kept-")]
    assert len(kept) == 1 and _ls(kept[0]) == ["NOTES.txt"] and (kept[0] / "NOTES.txt").read_text() == "mine"
    assert load_checkpoint(tmp_path / "ck")[0]["step"] == 2
    # A folder without the marker (written by hand, or by an earlier genfast) is renamed, never deleted.
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text("{}")
    save_checkpoint(tmp_path / "bare", modules={"net": _net()})
    assert [(p / "config.json").read_text() for p in tmp_path.iterdir() if p.name.startswith("bare.kept-")] == ["{}"]


def test_loop_refuses_a_checkpoint_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "mine.txt").write_text("mine")
    assert _exit_code(["--out", str(out)]) == 2
    assert "did not write" in capsys.readouterr().err
    assert _ls(out / "checkpoint") == ["mine.txt"]


def _old_vae_run(run, notes=True):
    from safetensors.torch import save_file

    (run / "checkpoint").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(run / "checkpoint" / "vae.safetensors"))
    (run / "checkpoint" / "config.json").write_text('{"model": "vae", "config": {"latent_dim": 2}, "seed": 0}')
    torch.save({"step": 3, "optimizer": {}, "rng": {}}, run / "checkpoint" / "trainer.pt")
    if notes:
        (run / "checkpoint" / "NOTES.txt").write_text("mine")


def test_convert_keeps_the_old_checkpoint_folder_and_the_users_files(tmp_path):
    """D1: converting renames the old checkpoint/ folder whole (NOTES.txt included); deletes nothing."""
    from genfast.training.convert import main as convert_main

    run = tmp_path / "run"
    _old_vae_run(run)
    assert convert_main([str(run)]) == 0
    assert (run / "checkpoint-format1" / "NOTES.txt").read_text() == "mine"
    assert _ls(run / "checkpoint-format1") == ["NOTES.txt", "config.json", "trainer.pt", "vae.safetensors"]
    assert load_checkpoint(run)[1]["format_version"] == 2
    # A second old run whose checkpoint-format1 name is taken: refused, nothing moved.
    other = tmp_path / "other"
    _old_vae_run(other)
    (other / "checkpoint-format1").mkdir()
    assert convert_main([str(other)]) == 1
    assert (other / "checkpoint" / "NOTES.txt").read_text() == "mine"


def test_convert_never_replaces_a_users_checkpoint_folder(tmp_path, capsys):
    """D1: an old GAN run keeps its files in the run folder; a user's <run>/checkpoint/ there is refused."""
    from safetensors.torch import save_file

    from genfast.training.convert import main as convert_main

    run = tmp_path / "gan"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "mine.txt").write_text("mine")
    for role in ("generator", "discriminator"):
        save_file({"w": torch.zeros(2)}, str(run / f"{role}.safetensors"))
    (run / "config.json").write_text('{"recipe": "dcgan", "model": {}}')
    torch.save({"step": 1, "opt_g": {}, "opt_d": {}, "rng": {}}, run / "trainer.pt")
    assert convert_main([str(run)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert _ls(run / "checkpoint") == ["mine.txt"]


def test_convert_copies_only_genfasts_tokenizer_file_and_follows_no_link(tmp_path, capsys):
    """D2: <run>/tokenizer/config.json does not replace the converted config; a symlink is never followed."""
    from safetensors.torch import save_file

    from genfast.training.convert import main as convert_main

    secret = tmp_path / "secret"
    secret.write_text("PRIVATE KEY")

    def old_gpt_run(run):
        (run / "checkpoint").mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(run / "checkpoint" / "model.safetensors"))
        (run / "checkpoint" / "config.json").write_text('{"model": {"n_layer": 1}, "tokenizer": "CharTokenizer"}')
        torch.save({"step": 3, "optimizer": {}, "rng": {}}, run / "checkpoint" / "trainer.pt")
        (run / "tokenizer").mkdir()
        (run / "tokenizer" / "config.json").write_text('{"evil": true}')
        (run / "tokenizer" / "id_rsa").symlink_to(secret)

    run = tmp_path / "gpt"
    old_gpt_run(run)
    (run / "tokenizer" / "char_tokenizer.json").write_text('{"type": "char", "itos": ["a"]}')
    assert convert_main([str(run)]) == 0
    ckpt = run / "checkpoint"
    assert _ls(ckpt) == [".genfast-made", "char_tokenizer.json", "config.json", "model.safetensors", "trainer.pt"]
    assert load_checkpoint(run)[1]["format_version"] == 2
    linked = tmp_path / "linked"
    old_gpt_run(linked)
    (linked / "tokenizer" / "char_tokenizer.json").symlink_to(secret)
    assert convert_main([str(linked)]) == 1
    assert "symbolic link" in capsys.readouterr().err
    assert not (linked / "checkpoint-format1").exists() and _ls(linked / "checkpoint") == [
        "config.json", "model.safetensors", "trainer.pt"]


# ------------------------------------------------------------------------------------------ hangs and crashes
def test_loop_second_run_into_the_same_out_exits_at_once(tmp_path, capsys):
    """C3: a run holds an flock on --out; a second one is a one-line usage error naming the first's pid."""
    import argparse

    from genfast.training import add_train_args, start_run

    out = tmp_path / "run"
    parser = argparse.ArgumentParser(prog="toy")
    add_train_args(parser, recipe="toy", steps=6, batch_size=4, lr=0.05, ops=())
    with start_run(parser, parser.parse_args(["--out", str(out), "--device", "cpu", "--quiet"]), recipe="toy"):
        assert _exit_code(["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"in use by another genfast run (process {os.getpid()})" in err and len(err.strip().splitlines()) == 1
    assert _toy_main(["--out", str(out)]) == 0  # released when the run ends


def test_loop_refuses_a_symlinked_checkpoint_folder(tmp_path, capsys):
    """C4: refused before training, and nothing behind the link is touched."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint").symlink_to(elsewhere, target_is_directory=True)
    assert _exit_code(["--out", str(out)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert _ls(elsewhere) == ["keep.txt"]
    with pytest.raises(ValueError, match="symbolic link"):
        save_checkpoint(out / "checkpoint", modules={"net": _net()})
    assert _ls(elsewhere) == ["keep.txt"]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")])
def test_loop_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch, failure):
    """C5: the disk fills at the second save (step 4): exit 1, one line, the checkpoint of step 2 stays."""
    real_save, calls = torch.save, []

    def filling_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise failure
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", filling_save)
    out = tmp_path / "run"
    assert _toy_main(["--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could not save step 4" in err
    assert "the last good checkpoint (step 2) stays" in err
    monkeypatch.undo()
    assert load_checkpoint(out)[0]["step"] == 2
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_loop_sighup_during_the_first_save_saves_and_exits_130(tmp_path):
    """C6: SIGHUP is treated like SIGTERM (a subprocess: SIGHUP's default action would kill pytest)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    code = ("import os, signal\n"
            "from tests.test_training import _toy_main\n"
            "sent = []\n"
            "hup = lambda directory: sent or sent.append(os.kill(os.getpid(), signal.SIGHUP))\n"
            f"raise SystemExit(_toy_main(['--out', {str(out)!r}, '--save-every', '1'], on_save=hup))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert load_checkpoint(out)[0]["step"] == 2  # the save at step 1 completed, then the step in flight
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_loop_resume_with_a_wrong_optimizer_state_names_the_field(tmp_path, capsys):
    out = tmp_path / "run"
    assert _toy_main(["--out", str(out)]) == 0
    path = out / "checkpoint" / "trainer.pt"
    state = torch.load(path, weights_only=True)
    state["optimizers"]["model"]["state"][0]["momentum_buffer"] = torch.zeros(5, 5)
    torch.save(state, path)
    code = _exit_code(["--out", str(out), "--resume", "--steps", "8"])
    assert code not in (0, None)
    message = str(code)
    assert "optimizers.model.state[0].momentum_buffer has shape [5, 5], the parameter [1, 3]" in message


def test_loop_resume_with_a_weights_file_missing_is_one_line(tmp_path):
    out = tmp_path / "run"
    assert _toy_main(["--out", str(out)]) == 0
    (out / "checkpoint" / "model.safetensors").unlink()
    code = _exit_code(["--out", str(out), "--resume", "--steps", "8"])
    assert "--resume: no weights file at" in str(code) and "model.safetensors" in str(code)


def test_loop_resume_refuses_nan_weights_unless_allowed(tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "run"
    assert _toy_main(["--out", str(out)]) == 0
    weights = out / "checkpoint" / "model.safetensors"
    save_file({"weight": torch.full((1, 3), float("nan")), "bias": torch.zeros(1)}, str(weights))
    code = _exit_code(["--out", str(out), "--resume", "--steps", "8"])
    assert "non-finite" in str(code) and "'weight'" in str(code) and "--allow-nonfinite" in str(code)
    # Allowed for debugging: it loads, and the NaN loss then stops the run (exit 1) keeping the checkpoint.
    assert _exit_code(["--out", str(out), "--resume", "--steps", "8", "--allow-nonfinite"]) == 1


# ------------------------------------------------------------------------------------------ --resume and flags
def _model_bytes(out):
    return (out / "checkpoint" / "model.safetensors").read_bytes()


def test_loop_resume_takes_the_runs_flags_and_stays_exact(tmp_path, capsys):
    """Flags not given on --resume are the run's (not the defaults): a run at --lr 0.01 resumed without --lr
    ends bitwise where an uninterrupted run does."""
    assert _toy_main(["--out", str(tmp_path / "whole"), "--lr", "0.01", "--steps", "8"]) == 0
    assert _toy_main(["--out", str(tmp_path / "split"), "--lr", "0.01", "--steps", "8", "--stop-after", "3"]) == 0
    capsys.readouterr()
    assert _toy_main(["--out", str(tmp_path / "split"), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "changed from the run" not in err
    assert load_checkpoint(tmp_path / "split")[0]["step"] == 8  # --steps 8 is the run's, not the default 6
    assert _model_bytes(tmp_path / "whole") == _model_bytes(tmp_path / "split")


def test_loop_resume_refuses_fixed_flags_and_announces_training_ones(tmp_path, capsys):
    out = tmp_path / "run"
    assert _toy_main(["--out", str(out), "--stop-after", "2"]) == 0
    capsys.readouterr()
    for flag, value in (("--width", "2"), ("--seed", "3")):
        assert _exit_code(["--out", str(out), "--resume", flag, value]) == 2
        err = capsys.readouterr().err
        assert f"--resume: {flag} {value} differs from the run's" in err and "fixed by the run" in err
    assert _exit_code(["--out", str(out), "--resume", "--width", "1"]) == 0  # the run's own value is fine
    assert "changed from the run" not in capsys.readouterr().err
    assert _toy_main(["--out", str(out), "--resume", "--lr", "0.5", "--steps", "9"]) == 0
    err = capsys.readouterr().err
    assert "--resume: changed from the run: --steps 9 (the run had 6), --lr 0.5 (the run had 0.05)" in err
    assert load_checkpoint(out)[1]["flags"]["lr"] == 0.5  # recorded for the next resume


def test_help_marks_the_flags_fixed_by_the_run(capsys):
    with pytest.raises(SystemExit):
        _toy_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--width WIDTH [fixed by the run" in text and "init [fixed by the run" in text


def test_training_grids_of_small_images_are_enlarged(tmp_path):
    """Training grids of 16x16 images were 146x74 px files: Run.save_grid enlarges small images as --scale does."""
    from genfast.training import Run
    from genfast.training.images import grid_scale

    assert [grid_scale(torch.zeros(1, 1, s, s)) for s in (8, 16, 32, 64, 256)] == [8, 4, 2, 1, 1]
    path = Run.save_grid(None, torch.zeros(4, 1, 16, 16), tmp_path / "g.png")  # (uses nothing of the run)
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    assert (width, height) == (4 * (2 + 2 * (16 + 2)), 4 * (2 + 2 * (16 + 2)))  # 2x2 images, padding 2, scale 4


def test_distributed_unwrap_frees_the_ddp_wrappers_before_close(tmp_path):
    """A one-process gloo group: unwrap() puts the module back in place of each DDP attribute (and nothing else),
    so close() destroys a group no live reducer still holds."""
    import gc
    import weakref

    import torch.distributed as torch_dist

    from genfast.training import Distributed

    store = torch_dist.FileStore(str(tmp_path / "store"), 1)
    torch_dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    dist = Distributed(rank=0, world_size=2, initialized_here=True)  # world_size 2: wrap() wraps

    class Holder:
        pass

    holder = Holder()
    holder.model = nn.Linear(3, 2)
    holder.ddp = dist.wrap(holder.model)
    holder.other = [1]
    assert isinstance(holder.ddp, nn.parallel.DistributedDataParallel)
    gone = weakref.ref(holder.ddp)
    Distributed.unwrap(holder)
    gc.collect()
    assert holder.ddp is holder.model and holder.other == [1]
    assert gone() is None
    dist.close(clean=False)  # the barrier needs the 2 ranks this object claims; skip it
    assert not torch_dist.is_initialized()
