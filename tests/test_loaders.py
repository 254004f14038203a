"""Loading models from untrusted run folders: config.json checked against the weights' header before anything is
built, and the weights' values checked (genfast.models._checkpoint.check_weights) on every loader path.

The run folders are written by hand here (config.json + safetensors, the layout genfast.training.checkpoint
writes), so a hostile file costs no training.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import genfast
from genfast.models._checkpoint import FORMAT_VERSION, CheckpointError, check_weights
from genfast.models.gpt import GPT, GPTConfig


def _model_state(dtype=torch.float32):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(dtype)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- check_weights
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_check_weights_refuses_another_dtype_kind(dtype):
    model, state = _model_state()
    state["0.weight"] = torch.ones(4, 3, dtype=dtype)
    with pytest.raises(CheckpointError, match=r"tensor '0.weight' is .*\((integer|bool)\) in the file.*float32"):
        check_weights(state, model, "w.safetensors")
    assert issubclass(CheckpointError, ValueError)


def test_check_weights_keeps_batchnorm_counter_and_same_dtypes_quiet(caplog):
    model, state = _model_state()
    assert state["1.num_batches_tracked"].dtype == torch.int64
    with caplog.at_level(logging.WARNING, logger="genfast"):
        check_weights(state, model, "w.safetensors")
        check_weights(state, model.state_dict(), "w.safetensors")  # a state dict works as well as the module
    assert caplog.records == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn])
def test_check_weights_announces_float_casts_in_one_line(dtype, caplog):
    model, state = _model_state()
    for key in ("0.weight", "0.bias", "1.weight"):
        state[key] = state[key].to(dtype)
    with caplog.at_level(logging.WARNING, logger="genfast"):
        check_weights(state, model, "w.safetensors")
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "\n" not in message and "w.safetensors" in message
    assert f"3 {str(dtype).replace('torch.', '')} -> float32" in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_weights_refuses_nonfinite_unless_allowed(bad):
    model, state = _model_state()
    state["1.running_var"][2] = bad
    with pytest.raises(CheckpointError, match=r"'1.running_var' holds 1 non-finite"):
        check_weights(state, model, "w.safetensors")
    check_weights(state, model, "w.safetensors", allow_nonfinite=True)
    with pytest.raises(TypeError, match="allow_nonfinite"):
        check_weights(state, model, "w.safetensors", allow_nonfinite="yes")


# ---------------------------------------------------------------------------------------------- run folders
# A refusal takes well under a second on a quiet machine; the code before took minutes (killed at 60 s). The bound
# leaves room for a loaded 2-core machine.
SECONDS = 20
GPT_CONFIG = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def _write_run(out: Path, recipe: str, model_config: dict, weights: dict[str, dict[str, torch.Tensor]],
               **extra) -> Path:
    """A run folder as `genfast train` writes it: checkpoint/config.json and one safetensors file per role."""
    directory = out / "checkpoint"
    directory.mkdir(parents=True)
    config = {"format_version": FORMAT_VERSION, "recipe": recipe, "model": model_config, **extra}
    (directory / "config.json").write_text(json.dumps(config))
    for role, state in weights.items():
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, directory / f"{role}.safetensors")
    return out


def _gpt_run(tmp_path, **model_overrides) -> Path:
    torch.manual_seed(0)
    state = GPT(GPTConfig(**GPT_CONFIG)).state_dict()
    return _write_run(tmp_path / "run", "gpt", {**GPT_CONFIG, "dropout": 0.0, **model_overrides}, {"model": state})


def _gpt_loaders():
    """Every public path that reads a GPT run folder."""
    return {"models.load": genfast.models.load, "GPT.from_pretrained": GPT.from_pretrained}


@pytest.mark.parametrize("loader", sorted(_gpt_loaders()))
def test_a_huge_layer_count_is_refused_at_once(tmp_path, loader):
    """C1: "n_layer": 100000 in config.json hung models.load (and `genfast sample gpt`) for minutes."""
    run = _gpt_run(tmp_path, n_layer=100000)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="n_layer") as caught:
        _gpt_loaders()[loader](run)
    assert time.perf_counter() - start < SECONDS
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("loader", sorted(_gpt_loaders()))
def test_a_width_beyond_any_storage_is_refused_naming_it(tmp_path, loader):
    """n_embd = 10**9 overflowed torch's storage size (a RuntimeError) while the model was built."""
    run = _gpt_run(tmp_path, n_embd=10**9, n_head=1)
    with pytest.raises(ValueError, match="n_embd") as caught:
        _gpt_loaders()[loader](run)
    assert "\n" not in str(caught.value)


def test_run_folder_loads_with_matching_config(tmp_path):
    run = _gpt_run(tmp_path)
    model = genfast.models.load(run)
    torch.manual_seed(0)
    reference = GPT(GPTConfig(**GPT_CONFIG))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def _gpt_run_with(tmp_path, change) -> Path:
    """A GPT run folder whose saved weights are ``change(state)``."""
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in GPT(GPTConfig(**GPT_CONFIG)).state_dict().items()}
    change(state)
    return _write_run(tmp_path / "run", "gpt", {**GPT_CONFIG, "dropout": 0.0}, {"model": state})


def _set(name, value):
    def change(state):
        state[name] = value(state[name])
    return change


@pytest.mark.parametrize("loader", sorted(_gpt_loaders()))
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_loaders_refuse_weights_of_another_kind(tmp_path, loader, dtype):
    """int64, uint8 and bool weights were cast to float32 without a word."""
    run = _gpt_run_with(tmp_path, _set("transformer.h.0.ln_1.weight", lambda t: t.to(dtype)))
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.0\.ln_1\.weight' is (int64|uint8|bool)"):
        _gpt_loaders()[loader](run)


@pytest.mark.parametrize("loader", sorted(_gpt_loaders()))
def test_loaders_announce_a_float_cast_once(tmp_path, loader, caplog):
    def to_bf16(state):
        for name in state:
            state[name] = state[name].to(torch.bfloat16)
    run = _gpt_run_with(tmp_path, to_bf16)
    with caplog.at_level(logging.WARNING, logger="genfast"):
        model = _gpt_loaders()[loader](run)
    casts = [r.getMessage() for r in caplog.records if "cast" in r.getMessage()]
    assert len(casts) == 1 and "bfloat16 -> float32" in casts[0], casts
    assert model.transformer.wte.weight.dtype == torch.float32


@pytest.mark.parametrize("loader", sorted(_gpt_loaders()))
def test_loaders_refuse_nonfinite_weights_unless_allowed(tmp_path, loader):
    def poison(t):
        t = t.clone()
        t[1, 2] = float("nan")
        return t
    run = _gpt_run_with(tmp_path, _set("transformer.h.1.mlp.c_fc.weight", poison))
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.1\.mlp\.c_fc\.weight' holds 1 non-finite"):
        _gpt_loaders()[loader](run)
    model = _gpt_loaders()[loader](run, allow_nonfinite=True)
    assert torch.isnan(model.transformer.h[1].mlp.c_fc.weight[1, 2])


def test_vae_loader_keeps_batchnorm_counters_and_refuses_nan(tmp_path):
    from genfast.models.vae import VAE, VAEConfig

    config = dict(image_size=16, channels=1, latent_dim=4, base_channels=4)
    state = VAE(VAEConfig(**config)).state_dict()
    counters = [k for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert counters and all(state[k].dtype == torch.int64 for k in counters)
    run = _write_run(tmp_path / "ok", "vae", config, {"model": state})
    assert isinstance(genfast.models.load(run), VAE)
    poisoned = dict(state)
    name = next(k for k in state if k.endswith("running_var"))
    poisoned[name] = torch.full_like(state[name], float("inf"))
    run = _write_run(tmp_path / "nan", "vae", config, {"model": poisoned})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        genfast.models.load(run)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        VAE.from_checkpoint(run)


@pytest.mark.parametrize("loader", sorted(_gpt_loaders()))
def test_an_integer_of_5001_digits_is_refused_naming_its_key(tmp_path, loader):
    """Python refused it with "Exceeds the limit (4300 digits)" and no file or key."""
    run = _gpt_run(tmp_path)
    config_file = run / "checkpoint" / "config.json"
    text = config_file.read_text().replace('"n_layer": 2', '"n_layer": ' + "9" * 5001)
    config_file.write_text(text)
    with pytest.raises(ValueError, match=r"key 'model\.n_layer' is an integer of 5001 digits"):
        _gpt_loaders()[loader](run)


def _sparse_gpt_run(tmp_path, vocab_size: int) -> Path:
    """A run folder whose config and safetensors header agree on a vocab_size x 8 float32 embedding, written
    sparse: the file claims vocab_size * 64 bytes of tensors without holding them on disk."""
    config = {**GPT_CONFIG, "vocab_size": vocab_size, "dropout": 0.0}
    with torch.device("meta"):
        shapes = {k: (list(v.shape), v.numel()) for k, v in GPT(GPTConfig(**config)).state_dict().items()}
    header, offset = {}, 0
    for name, (shape, numel) in shapes.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * numel]}
        offset += 4 * numel
    raw = json.dumps(header).encode()
    run = _write_run(tmp_path / "sparse", "gpt", config, {})
    with open(run / "checkpoint" / "model.safetensors", "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        fh.truncate(8 + len(raw) + offset)
    return run


@pytest.mark.parametrize("loader", sorted(_gpt_loaders()))
def test_weights_beyond_the_machines_memory_are_refused_before_loading(tmp_path, loader, monkeypatch):
    """A sparse safetensors file claiming 4 GB (config and header agreeing) reached the allocator."""
    run = _sparse_gpt_run(tmp_path, vocab_size=2**23)  # 2 x 2**23 x 8 x 4 bytes: 0.5 GiB of embeddings
    monkeypatch.setattr(genfast._io, "machine_memory_bytes", lambda: 2**28)  # a 256 MiB machine
    with pytest.raises(ValueError, match=r"'(transformer\.wte|lm_head)\.weight'.*more than this machine's") as caught:
        _gpt_loaders()[loader](run)
    assert "\n" not in str(caught.value)


def test_sample_gpt_refuses_a_huge_layer_count_in_one_line(tmp_path, capsys):
    """C1 through the CLI: `genfast sample gpt` on n_layer 100000 hung."""
    from genfast.cli import main as cli_main

    run = _gpt_run(tmp_path, n_layer=100000)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exited:
        cli_main(["sample", "gpt", "--ckpt", str(run), "--prompt", "a", "--max-new-tokens", "1"])
    assert exited.value.code == 2 and time.perf_counter() - start < SECONDS
    err = capsys.readouterr().err.strip().splitlines()
    assert "n_layer = 100000" in err[-1] and "Traceback" not in "".join(err)


def test_unknown_recipe_is_named(tmp_path):
    run = _write_run(tmp_path / "run", "evil", {}, {})
    with pytest.raises(ValueError, match=r"holds a 'evil' checkpoint, which genfast does not know"):
        genfast.models.load(run)


# ---------------------------------------------------------------------------------------------- DDPM
def _ddpm_run(tmp_path, model_overrides=None, scheduler=None) -> Path:
    from genfast.models.unet import UNet, UNetConfig

    config = UNetConfig.preset("tiny").to_dict()
    state = UNet(UNetConfig(**config)).state_dict()
    return _write_run(tmp_path / "ddpm", "ddpm", {**config, **(model_overrides or {})},
                      {"ema": state, "model": state}, scheduler={"num_train_timesteps": 1000, **(scheduler or {})})


def test_ddpm_image_size_beyond_memory_is_refused(tmp_path):
    """image_size = 10**6 loaded: no weight bounds it (the attention level it picks is set to match here), and
    one image's feature map would take 32 TB."""
    from genfast.models.unet import UNet

    run = _ddpm_run(tmp_path, {"image_size": 2**20, "attention_resolutions": [2**19]})
    for load in (genfast.models.load, UNet.from_checkpoint):
        with pytest.raises(ValueError, match=r"model\.image_size=1048576 .*more than this machine's"):
            load(run)


def test_ddpm_image_size_is_checked_against_the_weights(tmp_path):
    """Where the image size moves the attention levels, the weights' header refuses it."""
    run = _ddpm_run(tmp_path, {"image_size": 64})
    with pytest.raises(ValueError, match=r"ema\.safetensors does not fit the config"):
        genfast.models.load(run)


def test_ddpm_num_train_timesteps_beyond_memory_is_refused(tmp_path):
    """num_train_timesteps = 10**10 ended in the allocator (40 GB of betas)."""
    run = _ddpm_run(tmp_path, scheduler={"num_train_timesteps": 10**10})
    with pytest.raises(ValueError, match=r"'scheduler': DDIMScheduler: num_train_timesteps=10000000000 needs"):
        genfast.models.load(run)
    from genfast.diffusion.pipeline import make_scheduler

    with pytest.raises(ValueError, match="DDPMScheduler: num_train_timesteps=10000000000 needs"):
        make_scheduler("ddpm", num_train_timesteps=10**10)
    assert len(make_scheduler("ddpm", num_train_timesteps=1000)) == 1000


# ---------------------------------------------------------------------------------------------- every recipe
# recipe -> (a small config, the field blown up, its value). The weights are the small config's.
BLOWN_UP = {
    "numbergan": (dict(hidden=16, latent_dim=4, embed_dim=4), "hidden", 10**9),
    "dcgan": (dict(image_size=32, latent_dim=4, g_features=4, d_features=4), "latent_dim", 10**9),
    "cgan": (dict(num_classes=3, latent_dim=4, embed_dim=4, g_features=4, d_features=4), "num_classes", 10**12),
    "vae": (dict(image_size=16, latent_dim=4, base_channels=4), "latent_dim", 10**9),
    "cyclegan": (dict(channels=3, ngf=4, ndf=4, n_residual=1), "n_residual", 100000),
    "ebm": (dict(image_size=16, features=4, buffer_size=8), "features", 1024),
    "translator": (dict(src_vocab_size=8, tgt_vocab_size=8, d_model=8, n_heads=2, n_encoder_layers=1,
                        n_decoder_layers=1, d_ff=16, max_positions=8), "n_decoder_layers", 100000),
    "lstm": (dict(vocab_size=8, n_embd=4, n_hidden=4, n_layer=1), "n_layer", 100000),
    "ddpm": (dict(image_size=8, base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[4],
                  attention_head_dim=8, num_groups=4), "num_res_blocks", 100000),
}


def _weights(recipe: str, config: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Each role's state dict, as the recipe's training saves it."""
    from genfast.models import cgan, cyclegan, dcgan, ebm, lstm, numbergan, transformer, unet, vae

    if recipe in ("numbergan", "dcgan", "cgan"):
        module = {"numbergan": numbergan, "dcgan": dcgan, "cgan": cgan}[recipe]
        config_class = {"numbergan": numbergan.NumberGANConfig, "dcgan": dcgan.DCGANConfig,
                        "cgan": cgan.CGANConfig}[recipe]
        return {"generator": module.Generator(config_class(**config)).state_dict()}
    if recipe == "cyclegan":
        model = cyclegan.CycleGAN(cyclegan.CycleGANConfig(**config))
        return {"generators": model.generators.state_dict(), "discriminators": model.discriminators.state_dict()}
    if recipe == "ddpm":
        state = unet.UNet(unet.UNetConfig(**config)).state_dict()
        return {"ema": state, "model": state}
    model = {"vae": lambda: vae.VAE(vae.VAEConfig(**config)), "ebm": lambda: ebm.EBM(ebm.EBMConfig(**config)),
             "translator": lambda: transformer.Transformer(transformer.TransformerConfig(**config)),
             "lstm": lambda: lstm.LSTMLM(lstm.LSTMConfig(**config))}[recipe]()
    return {"model": model.state_dict()}


@pytest.mark.parametrize("recipe", sorted(BLOWN_UP))
def test_every_loader_refuses_a_blown_up_size_at_once_naming_it(tmp_path, recipe):
    """The check against the header runs on every path through build_and_load; the small config loads."""
    config, field, value = BLOWN_UP[recipe]
    extra = {"scheduler": {"num_train_timesteps": 100}} if recipe == "ddpm" else {}
    genfast.models.load(_write_run(tmp_path / "ok", recipe, config, _weights(recipe, config), **extra))
    run = _write_run(tmp_path / "big", recipe, {**config, field: value}, _weights(recipe, config), **extra)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"model\.{field} = {value}\b") as caught:
        genfast.models.load(run)
    assert time.perf_counter() - start < SECONDS and "\n" not in str(caught.value)


def test_sample_vae_refuses_nan_weights_in_one_line(tmp_path, capsys):
    """`genfast sample vae` exited 0 with non-finite images from NaN weights."""
    from genfast.cli import main as cli_main
    from genfast.models.vae import VAE, VAEConfig

    config = dict(image_size=16, channels=1, latent_dim=4, base_channels=4)
    state = dict(VAE(VAEConfig(**config)).state_dict())
    state["decoder.0.1.weight"] = torch.full_like(state["decoder.0.1.weight"], float("nan"))
    run = _write_run(tmp_path / "vae", "vae", config, {"model": state})
    with pytest.raises(SystemExit) as exited:
        cli_main(["sample", "vae", "--ckpt", str(run), "--out", str(tmp_path / "grid.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and "'decoder.0.1.weight' holds 4 non-finite" in err[-1], err
    assert not (tmp_path / "grid.png").exists()


def test_a_pickle_beyond_the_machines_memory_is_refused_before_torch_load(tmp_path, monkeypatch):
    """A Hugging Face folder's pytorch_model.bin has no header: its size bounds what torch.load would hold."""
    folder = GPT(GPTConfig(**GPT_CONFIG)).save_pretrained(tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as fh:
        fh.truncate(2**30)  # sparse: claims 1 GiB
    monkeypatch.setattr(genfast._io, "machine_memory_bytes", lambda: 2**30)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran"))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin needs 2\.0 GiB, more than this machine's 1\.0 GiB"):
        GPT.from_pretrained(folder)


def test_loaders_find_only_genfasts_displaced_checkpoint(tmp_path):
    """A crash between a save's two renames leaves `.checkpoint.genfast-old` (marked) and no `checkpoint`: the loaders
    read it, as --resume does; a user's `checkpoint.old` or an unmarked folder of that name is never read."""
    from genfast.models._checkpoint import displaced_dir, find_run_checkpoint
    from genfast.training.checkpoint import CHECKPOINT_DIR, save_checkpoint

    save_checkpoint(tmp_path / CHECKPOINT_DIR, modules={"model": nn.Linear(2, 2)}, config={"recipe": "x"})
    displaced = displaced_dir(tmp_path / CHECKPOINT_DIR)
    (tmp_path / CHECKPOINT_DIR).rename(displaced)
    assert find_run_checkpoint(tmp_path) == displaced

    (displaced / ".genfast-made").unlink()  # no marker: a folder genfast cannot prove it made
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_run_checkpoint(tmp_path)

    user = tmp_path / "user-run"
    (user / "checkpoint.old").mkdir(parents=True)
    (user / "checkpoint.old" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_run_checkpoint(user)
