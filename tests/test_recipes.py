"""Every `genfast train|sample <model>` on the one training loop: the same run folder, the same usage errors, the
same load-back into Python, for each of the eight recipes (tiny configs, two steps each)."""

import json

import pytest
import torch

import genfast
from genfast import _backend
from genfast.recipes import load_recipe

GAN_TINY = ["--g-features", "8", "--d-features", "8", "--latent-dim", "8", "--batch-size", "8"]
TRAIN_ARGS = {
    "gpt": ["--config", "tiny", "--block-size", "16", "--batch-size", "4", "--eval-batches", "1", "--sample-tokens",
            "0", "--warmup", "1"],
    "translator": ["--config", "tiny", "--batch-size", "8", "--eval-examples", "4", "--warmup", "1"],
    "numbergan": ["--hidden", "16", "--latent-dim", "8", "--batch-size", "8", "--eval-samples", "16"],
    "dcgan": GAN_TINY,
    "cgan": [*GAN_TINY, "--embed-dim", "4"],
    "cyclegan": ["--image-size", "16", "--ngf", "4", "--ndf", "4", "--n-residual", "1", "--disc-layers", "2",
                 "--batch-size", "2", "--pool-size", "2"],
    "vae": ["--image-size", "8", "--latent-dim", "4", "--base-channels", "4", "--batch-size", "8"],
    "ddpm": ["--config", "tiny", "--batch-size", "8", "--num-images", "32", "--sample-steps", "2", "--warmup", "2"],
    "ebm": ["--features", "4", "--buffer-size", "16", "--batch-size", "8", "--langevin-steps", "2", "--sample-steps",
            "2", "--n-samples", "4"],
}
RECIPES = list(TRAIN_ARGS)
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def sample_args(recipe: str, tmp_path) -> list[str]:
    out = ["--out", str(tmp_path / f"{recipe}.png")]
    return {"gpt": ["--prompt", "the q", "--max-new-tokens", "3"], "translator": ["one"],
            "numbergan": ["--n", "2"], "ebm": ["--n", "2", "--steps", "2", *out],
            "dcgan": ["--n", "2", *out], "cgan": ["--n", "1", *out], "cyclegan": ["--input", "a", "--n", "2", *out],
            "vae": ["--n", "2", *out], "ddpm": ["--n", "2", "--steps", "2", "--quiet", *out]}[recipe]


def train_argv(recipe: str, out, tmp_path, *extra: str) -> list[str]:
    argv = [*TRAIN_ARGS[recipe], "--out", str(out), "--device", "cpu", "--quiet", "--sample-every", "1000", *extra]
    if recipe == "gpt":
        data = tmp_path / "text.txt"
        data.write_text(TEXT)
        argv += ["--data", str(data)]
    return argv


def code_of(call, *args) -> int:
    try:
        return call(*args)
    except SystemExit as exc:
        return exc.code


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One two-step run of every recipe."""
    root = tmp_path_factory.mktemp("runs")
    for recipe in RECIPES:
        assert load_recipe(recipe).train_main(train_argv(recipe, root / recipe, root, "--steps", "2")) == 0, recipe
    return root


@pytest.mark.parametrize("recipe", RECIPES)
def test_one_run_folder_layout(runs, recipe):
    run = runs / recipe
    # (.genfast-lock: the run's flock, so that two runs never write one folder)
    assert sorted(p.name for p in run.iterdir()) in ([".genfast-lock", "checkpoint"],
                                                     [".genfast-lock", "checkpoint", "samples"])
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    assert config["format_version"] == 2 and config["recipe"] == recipe and isinstance(config["model"], dict)
    state = torch.load(run / "checkpoint" / "trainer.pt", weights_only=True)
    assert state["step"] == 2 and state["recipe"] == recipe
    if recipe == "gpt":
        assert config["model"] == genfast.models.GPTConfig.from_dict(config["model"]).to_dict()
        assert (run / "checkpoint" / "char_tokenizer.json").is_file()  # written with the weights, atomically


@pytest.mark.parametrize("recipe", RECIPES)
def test_loads_back_in_one_line(runs, recipe):
    model = genfast.models.load(runs / recipe)
    expected = {"gpt": "GPT", "translator": "Transformer", "numbergan": "Generator", "dcgan": "Generator",
                "cgan": "Generator", "cyclegan": "CycleGAN", "vae": "VAE", "ddpm": "DiffusionPipeline",
                "ebm": "EBM"}[recipe]
    assert type(model).__name__ == expected
    weights = load_weights(runs / recipe, recipe)
    module = model.unet if recipe == "ddpm" else model
    part = module.generators if recipe == "cyclegan" else module
    for name, tensor in part.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def load_weights(run, recipe):
    from genfast._io import load_safetensors_state

    role = {"numbergan": "generator", "dcgan": "generator", "cgan": "generator", "cyclegan": "generators",
            "ddpm": "ema"}.get(recipe, "model")
    return load_safetensors_state(run / "checkpoint" / f"{role}.safetensors")


@pytest.mark.parametrize("recipe", RECIPES)
def test_sample_from_the_run(runs, recipe, tmp_path, capsys):
    assert load_recipe(recipe).sample_main(["--ckpt", str(runs / recipe), "--device", "cpu",
                                            *sample_args(recipe, tmp_path)]) == 0


@pytest.mark.parametrize("recipe", RECIPES)
def test_fresh_run_never_replaces_a_run(runs, recipe, tmp_path, capsys):
    module = load_recipe(recipe)
    before = (runs / recipe / "checkpoint" / "trainer.pt").read_bytes()
    assert code_of(module.train_main, train_argv(recipe, runs / recipe, tmp_path, "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert (runs / recipe / "checkpoint" / "trainer.pt").read_bytes() == before


@pytest.mark.parametrize("recipe", RECIPES)
def test_usage_errors(runs, recipe, tmp_path, capsys, monkeypatch):
    """Bad arguments: exit status 2 and one line on stderr, no traceback, for every recipe."""
    module = load_recipe(recipe)
    other = runs / ("vae" if recipe != "vae" else "dcgan")
    out = tmp_path / "new"
    cases = [
        (module.train_main, train_argv(recipe, out, tmp_path, "--steps", "0"), "--steps"),
        (module.train_main, train_argv(recipe, out, tmp_path, "--lr", "-1"), "--lr"),
        (module.train_main, train_argv(recipe, out, tmp_path, "--resume", "--overwrite"), "contradict"),
        (module.train_main, train_argv(recipe, out, tmp_path, "--resume"), "no checkpoint"),
        (module.train_main, train_argv(recipe, out, tmp_path, "--device", "tpu"), "--device"),
        (module.train_main, train_argv(recipe, tmp_path / "file" / "sub", tmp_path), "--out"),
        (module.train_main, [*train_argv(recipe, other, tmp_path), "--resume"], f"not a {recipe} one"),
        (module.sample_main, ["--ckpt", str(other), *sample_args(recipe, tmp_path)], f"not a {recipe}"),
        (module.sample_main, ["--ckpt", str(tmp_path / "nowhere"), *sample_args(recipe, tmp_path)], "--ckpt"),
    ]
    if recipe != "translator":
        cases.append((module.sample_main, sample_args(recipe, tmp_path), "--ckpt"))  # missing
    (tmp_path / "file").write_text("a file where --out wants a folder")
    if not torch.cuda.is_available():
        cases.append((module.train_main, train_argv(recipe, out, tmp_path, "--device", "cuda"), "CUDA"))
    for call, argv, message in cases:
        assert code_of(call, argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
    # Triton on CPU tensors needs its interpreter: a usage error before training, not a traceback after it.
    monkeypatch.setattr(_backend, "TRITON_INTERPRET", False)
    assert code_of(module.train_main, train_argv(recipe, out, tmp_path, "--backend", "triton")) == 2
    assert "--backend triton cannot run" in capsys.readouterr().err
    assert not (out / "checkpoint").exists()


def test_backend_choices_are_those_that_serve():
    """--backend offers only the backends that have a kernel for every op the model uses."""
    from genfast.training.options import backend_choices

    assert "cpu" not in backend_choices(("attention",))  # gpt, translator: no C++ attention kernel
    assert "cpu" not in backend_choices(("conv_transpose2d", "reparameterize", "gaussian_kl"))  # vae
    assert "cpu" in backend_choices(("conv_transpose2d",))  # the image GANs
    for recipe in ("vae", "gpt"):
        assert code_of(load_recipe(recipe).train_main, ["--backend", "cpu"]) == 2


def test_gpt_dropout_and_top_p_are_checked(runs, tmp_path, capsys):
    gpt = load_recipe("gpt")
    assert code_of(gpt.train_main, train_argv("gpt", tmp_path / "g", tmp_path, "--dropout", "1.5")) == 2
    assert "--dropout" in capsys.readouterr().err
    assert code_of(gpt.sample_main, ["--ckpt", str(runs / "gpt"), "--prompt", "a", "--top-p", "1.5"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_binary_data_file_is_a_usage_error(tmp_path, capsys):
    data = tmp_path / "blob.bin"
    data.write_bytes(bytes(range(256)) * 8)
    argv = [*TRAIN_ARGS["gpt"], "--data", str(data), "--out", str(tmp_path / "g"), "--device", "cpu", "--quiet"]
    assert code_of(load_recipe("gpt").train_main, argv) == 2
    assert "--data" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["dcgan", "vae", "gpt"])
def test_earlier_checkpoints_convert(runs, recipe, tmp_path, capsys):
    """A run folder in an earlier layout: a clear error that says how to convert, then the converter, then it
    resumes."""
    import shutil

    from genfast.training.convert import main as convert_main

    new = runs / recipe / "checkpoint"
    config = json.loads((new / "config.json").read_text())
    state = torch.load(new / "trainer.pt", weights_only=True)
    old = tmp_path / "old"
    if recipe == "dcgan":  # files in the run folder itself
        old.mkdir()
        for role in ("generator", "discriminator"):
            shutil.copyfile(new / f"{role}.safetensors", old / f"{role}.safetensors")
        (old / "config.json").write_text(json.dumps({"recipe": "dcgan", "model": config["model"], "args": {}}))
        torch.save({"step": state["step"], "opt_g": state["optimizers"]["generator"], "rng": state["rng"],
                    "opt_d": state["optimizers"]["discriminator"], "task": {}}, old / "trainer.pt")
    else:
        (old / "checkpoint").mkdir(parents=True)
        stem = "vae" if recipe == "vae" else "model"
        shutil.copyfile(new / "model.safetensors", old / "checkpoint" / f"{stem}.safetensors")
        saved = {"model": "vae", "config": config["model"], "data": "digits", "seed": 0} if recipe == "vae" else \
            {"model": config["model"], "tokenizer": "CharTokenizer", "args": {}}
        (old / "checkpoint" / "config.json").write_text(json.dumps(saved))
        torch.save({"step": state["step"], "optimizer": state["optimizers"]["model"], "rng": state["rng"]},
                   old / "checkpoint" / "trainer.pt")
        if recipe == "gpt":
            (old / "tokenizer").mkdir()
            shutil.copyfile(new / "char_tokenizer.json", old / "tokenizer" / "char_tokenizer.json")
    module = load_recipe(recipe)
    assert code_of(module.train_main, [*train_argv(recipe, old, tmp_path, "--steps", "3"), "--resume"]) == 2
    assert "python -m genfast.training.convert" in capsys.readouterr().err
    assert convert_main([str(old)]) == 0
    assert module.train_main([*train_argv(recipe, old, tmp_path, "--steps", "3"), "--resume"]) == 0
    assert "resumed from step 2" in capsys.readouterr().err


def test_gpt_huge_bpe_vocabulary_is_a_usage_error(tmp_path, capsys):
    """C2: --vocab-size 10**9 aborted the process (the tokenizers library allocated 70 GB); bounded by the data."""
    argv = [*train_argv("gpt", tmp_path / "g", tmp_path), "--tokenizer", "bpe", "--vocab-size", str(10**9)]
    assert code_of(load_recipe("gpt").train_main, argv) == 2
    err = capsys.readouterr().err
    assert f"--vocab-size {10**9}" in err and f"and {257 + len(TEXT)} tokens" in err and len(err.splitlines()) == 1


def test_gpt_sample_with_a_tokenizer_smaller_than_the_model(runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "gpt"
    shutil.copytree(runs / "gpt", run)
    tokenizer = run / "checkpoint" / "char_tokenizer.json"
    data = json.loads(tokenizer.read_text())
    tokenizer.write_text(json.dumps({**data, "itos": data["itos"][:5]}))
    assert code_of(load_recipe("gpt").sample_main, ["--ckpt", str(run), "--prompt", "t", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "has 5 tokens, fewer than the model's vocabulary" in err and "Traceback" not in err


def test_sample_refuses_nan_weights_unless_allow_nonfinite(runs, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "vae"
    shutil.copytree(runs / "vae", run)
    weights = run / "checkpoint" / "model.safetensors"
    state = load_file(str(weights))
    name = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(weights))
    argv = ["--ckpt", str(run), "--device", "cpu", "--n", "2", "--out", str(tmp_path / "v.png")]
    assert code_of(load_recipe("vae").sample_main, argv) == 2
    assert "non-finite" in capsys.readouterr().err
    assert code_of(load_recipe("vae").sample_main, [*argv, "--allow-nonfinite"]) == 0


def test_gpt_resume_refuses_another_architecture(runs, tmp_path, capsys):
    """`--resume --config gpt2 --lr 5` trained the tiny model under a 'GPT gpt2' header: now --config is refused
    (fixed by the run), and --help says which flags are."""
    import shutil

    run = tmp_path / "gpt"
    shutil.copytree(runs / "gpt", run)
    gpt = load_recipe("gpt")
    # (train_argv(..., runs): the run's own --data file; another path would be refused too, --data being fixed)
    argv = [*train_argv("gpt", run, runs, "--steps", "3"), "--resume", "--config", "gpt2", "--lr", "5"]
    assert code_of(gpt.train_main, argv) == 2
    err = capsys.readouterr().err
    assert "--resume: --config gpt2 differs from the run's tiny" in err and len(err.strip().splitlines()) == 1
    help_text = " ".join(gpt.train_parser().format_help().split())
    assert "model size (default tiny) [fixed by the run" in help_text


@pytest.mark.parametrize("recipe, flags, named", [
    ("vae", ["--batch-size", str(10**12)], f"--batch-size {10**12}:"),
    ("vae", ["--latent-dim", str(10**9)], f"--latent-dim {10**9} --base-channels 4:"),
    ("vae", ["--base-channels", str(10**7)], f"--latent-dim 4 --base-channels {10**7}:"),
    ("numbergan", ["--hidden", str(10**9)], f"--hidden {10**9} --latent-dim 8:"),
])
def test_huge_flags_are_refused_before_allocating(recipe, flags, named, tmp_path, capsys):
    """Estimated from the flags (weights on the meta device, one sample's activations) against the machine's
    memory: a one-line usage error naming the flag, before --out is made (these used to be allocator tracebacks)."""
    out = tmp_path / "run"
    assert code_of(load_recipe(recipe).train_main, [*train_argv(recipe, out, tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "more than the" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_translator_prints_its_model_size(tmp_path, capsys):
    argv = [a for a in train_argv("translator", tmp_path / "t", tmp_path, "--steps", "1") if a != "--quiet"]
    assert load_recipe("translator").train_main(argv) == 0
    err = capsys.readouterr().err
    assert "Transformer tiny: " in err and "M parameters, vocabularies" in err


def test_gpt_warmup_scales_to_a_short_run_and_resume_keeps_it(tmp_path, capsys):
    """--warmup not given: at most a tenth of --steps (a 60-step run ended at 60% of its rate with the fixed 100),
    saved in config.json at the first start, so a resume with more --steps keeps the schedule it began."""
    argv = [a for a in train_argv("gpt", tmp_path / "g", tmp_path, "--steps", "20", "--stop-after", "1")]
    warmup = argv.index("--warmup")
    del argv[warmup:warmup + 2]
    gpt = load_recipe("gpt")
    assert gpt.train_main(argv) == 0
    config = json.loads((tmp_path / "g" / "checkpoint" / "config.json").read_text())
    assert config["flags"]["warmup"] == 2
    assert gpt.train_main([*argv, "--resume", "--steps", "400"]) == 0
    config = json.loads((tmp_path / "g" / "checkpoint" / "config.json").read_text())
    assert config["flags"]["warmup"] == 2 and config["flags"]["steps"] == 400


def test_cgan_sample_n_is_the_total(runs, tmp_path, capsys):
    """`genfast sample cgan --n 18` wrote 162 images (18 per class); --n is now the number of images."""
    from genfast.models.cgan import Generator

    classes = Generator.from_checkpoint(runs / "cgan").config.num_classes
    cgan = load_recipe("cgan")
    base = ["--ckpt", str(runs / "cgan"), "--device", "cpu", "--out", str(tmp_path / "c.png")]
    assert cgan.sample_main([*base, "--n", str(2 * classes)]) == 0
    assert f"({2 * classes} images)" in capsys.readouterr().err
    assert cgan.sample_main([*base, "--n", str(2 * classes + 1)]) == 0  # not a multiple: says what it writes
    err = capsys.readouterr().err
    assert f"writing {2 * classes} images, 2 for each of the {classes} classes" in err
