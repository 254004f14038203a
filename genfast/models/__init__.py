"""genfast's models: one readable file each, a dataclass config, all attention, convolution and sampling through
genfast ops.

Each model loads from the run folder `genfast train <model>` writes in one line::

    model = genfast.models.load("runs/dcgan")      # any recipe: the model (the generator for the GANs), eval mode
    gpt = GPT.from_pretrained("runs/gpt")           # or per model: Generator.from_checkpoint, VAE.from_checkpoint ...

The submodules load on first use (``genfast.models.GPT`` imports genfast/models/gpt.py then).
"""

from __future__ import annotations

import importlib
import os

# public name -> the submodule that defines it
_EXPORTS = {
    "GPT": "gpt", "GPTConfig": "gpt",
    "Transformer": "transformer", "TransformerConfig": "transformer",
    "UNet": "unet", "UNetConfig": "unet",
    "VAE": "vae", "VAEConfig": "vae",
    "CycleGAN": "cyclegan", "CycleGANConfig": "cyclegan",
    "DCGANConfig": "dcgan", "CGANConfig": "cgan", "NumberGANConfig": "numbergan",
    "EBM": "ebm", "EBMConfig": "ebm",
    "PixelCNN": "pixelcnn", "PixelCNNConfig": "pixelcnn", "RealNVP": "realnvp", "RealNVPConfig": "realnvp",
    "LSTMLM": "lstm", "LSTMConfig": "lstm",
}
_SUBMODULES = ("gpt", "transformer", "unet", "vae", "cyclegan", "dcgan", "cgan", "numbergan", "ebm", "lstm", "pixelcnn",
               "realnvp")


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"genfast.models.{_EXPORTS[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"genfast.models.{name}")
    raise AttributeError(f"module 'genfast.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES])


def load(path: str | os.PathLike, device: str = "cpu", *, allow_nonfinite: bool = False):
    """The model a `genfast train <model> --out PATH` run trained (PATH: the run folder or its checkpoint folder),
    in eval mode on ``device``:

    gpt -> GPT; translator -> Transformer; numbergan, dcgan, cgan -> their Generator; cyclegan -> CycleGAN;
    vae -> VAE; ebm -> EBM (with its replay buffer); pixelcnn -> PixelCNN; realnvp -> RealNVP; ddpm -> a
    DiffusionPipeline around the EMA UNet with the run's DDIM schedule; lstm -> LSTMLM.

    The files are untrusted: config.json is checked against the weights' header before the model is built, and
    weights of another dtype kind than the model's, or holding NaN/inf (unless ``allow_nonfinite=True``, to debug
    a diverged run), are refused with a ValueError naming the file and the tensor or key at fault.
    """
    from genfast._io import read_json_config
    from genfast.models._checkpoint import build_and_load, find_run_checkpoint, read_run

    recipe = read_json_config(find_run_checkpoint(path) / "config.json").get("recipe")
    if recipe == "gpt":
        from genfast.models.gpt import GPT, GPTConfig

        directory, saved = read_run(path, "gpt")
        config = GPTConfig.from_dict(saved["model"])
        return build_and_load(lambda: GPT(config), directory, "model",
                              allow_nonfinite=allow_nonfinite).to(device).eval()
    if recipe == "translator":
        from genfast.models.transformer import Transformer, TransformerConfig

        directory, saved = read_run(path, "translator")
        config = TransformerConfig.from_dict(saved["model"])
        return build_and_load(lambda: Transformer(config), directory, "model",
                              allow_nonfinite=allow_nonfinite).to(device).eval()
    if recipe in ("numbergan", "dcgan", "cgan", "vae"):
        module = importlib.import_module(f"genfast.models.{recipe}")
        model_class = module.VAE if recipe == "vae" else module.Generator
        return model_class.from_checkpoint(path, device, allow_nonfinite=allow_nonfinite)
    if recipe == "cyclegan":
        from genfast.models.cyclegan import CycleGAN

        return CycleGAN.from_checkpoint(path, device, allow_nonfinite=allow_nonfinite)
    if recipe in ("pixelcnn", "realnvp"):
        module = importlib.import_module(f"genfast.models.{recipe}")
        flow_or_pixelcnn = module.PixelCNN if recipe == "pixelcnn" else module.RealNVP
        return flow_or_pixelcnn.from_checkpoint(path, device, allow_nonfinite=allow_nonfinite)
    if recipe == "ebm":
        from genfast.models.ebm import EBM

        return EBM.from_checkpoint(path, device, allow_nonfinite=allow_nonfinite).eval()
    if recipe == "lstm":
        from genfast.models.lstm import LSTMLM

        return LSTMLM.from_checkpoint(path, device, allow_nonfinite=allow_nonfinite)
    if recipe == "ddpm":
        from genfast.diffusion.pipeline import DiffusionPipeline, make_scheduler
        from genfast.models.unet import UNet

        unet = UNet.from_checkpoint(path, device, allow_nonfinite=allow_nonfinite)
        options = read_run(path, "ddpm")[1].get("scheduler")
        if not isinstance(options, dict):
            raise ValueError(f"{path}: the run's config.json has no 'scheduler' options")
        try:
            scheduler = make_scheduler("ddim", **options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: the run's config.json 'scheduler': {exc}") from exc
        return DiffusionPipeline(unet, scheduler)
    read_run(path, ())  # the clear error: an older format, or an unknown recipe
    raise ValueError(f"{path} holds a {recipe!r} checkpoint, which genfast.models.load does not know")


__all__ = ["load", *_EXPORTS]
