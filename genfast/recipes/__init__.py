"""Command-line recipes: `genfast train <model>` and `genfast sample <model>`.

Each recipe is a module here that defines ``train_main(argv: list[str]) -> int`` and ``sample_main(argv) -> int``.
Training is what is the model's own (models, optimizers, the batch, the step's losses, samples) as a
genfast.training.TrainTask, run by the one loop (genfast.training.start_run / Run.train; see
genfast/training/loop.py); sampling loads the run with the model's ``from_checkpoint`` and shares the helpers of
``_common.py``. genfast/cli.py imports a recipe only when it is asked for.
"""

from __future__ import annotations

import importlib

# model name -> (module, one-line help)
RECIPES: dict[str, tuple[str, str]] = {
    "gpt": ("genfast.recipes.gpt", "GPT-2-style language model (default data: the Python standard library's source)"),
    "translator": ("genfast.recipes.translator", "encoder-decoder Transformer for translation (default data: "
                   "built-in English -> French number phrases; or a TSV of sentence pairs)"),
    "numbergan": ("genfast.recipes.numbergan", "GAN over sequences of integers, learning multiples of 5"),
    "dcgan": ("genfast.recipes.dcgan", "DCGAN on 32x32 / 64x64 images"),
    "cgan": ("genfast.recipes.cgan", "class-conditional GAN"),
    "cyclegan": ("genfast.recipes.cyclegan", "CycleGAN between two image domains (default data: built-in circles "
                 "and squares; or two image folders)"),
    "vae": ("genfast.recipes.vae", "convolutional VAE"),
    "ddpm": ("genfast.recipes.ddpm", "diffusion UNet with DDPM / DDIM sampling"),
    "ebm": ("genfast.recipes.ebm", "energy-based model sampled by Langevin dynamics (contrastive divergence)"),
    "pixelcnn": ("genfast.recipes.pixelcnn", "gated PixelCNN drawing images pixel by pixel (digits, shapes)"),
    "realnvp": ("genfast.recipes.realnvp", "RealNVP normalizing flow (two moons, rings, digits)"),
    "lstm": ("genfast.recipes.lstm", "LSTM language model, characters by default (default data: the stdlib's source)"),
}


def load_recipe(name: str):
    """The recipe module for ``name``; ValueError naming the known ones otherwise."""
    if name not in RECIPES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(RECIPES)}")
    module_name = RECIPES[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ValueError(f"the {name} recipe is not available in this version of genfast") from exc
        raise
