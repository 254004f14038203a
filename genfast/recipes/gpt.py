"""`genfast train gpt` and `genfast sample gpt`: a GPT-2-style language model, trained from scratch or sampled.

    genfast train gpt --config tiny --steps 2000 --out runs/gpt            # Python's stdlib source, chars
    genfast train gpt --data book.txt --tokenizer bpe --vocab-size 2048 --out runs/book
    torchrun --nproc_per_node 8 -m genfast train gpt --config gpt2 ...      # DDP over 8 GPUs
    genfast sample gpt --ckpt runs/gpt --prompt "def main(" --stream

The run folder holds ``checkpoint/`` (written atomically by genfast.training: config.json whose "model" is the
GPTConfig, model.safetensors, trainer.pt with the optimizer, the step and the RNG states so that ``--resume``
continues exactly, and the tokenizer, written in the same atomic step as the weights). In Python:
``GPT.from_pretrained("runs/gpt")``. ``--ckpt`` may also name a Hugging Face GPT-2 directory (config.json,
model.safetensors, vocab.json, merges.txt).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from genfast.data.tokenizers import load_tokenizer
from genfast.models._checkpoint import build_and_load, read_run
from genfast.models.gpt import GPT, PRESETS, GPTConfig
from genfast.recipes._common import backend_errors, load_or_exit, sample_device
from genfast.recipes._text import (
    TextTask,
    add_generation_args,
    add_text_args,
    fitting_tokenizer,
    generation_knobs,
    get_batch,
    prepare_text,
    print_samples,
    print_stream,
    split_tokens,
)
from genfast.training import (
    CommandParser,
    Run,
    add_train_args,
    batch_generator,
    default_warmup,
    mark_fixed,
    non_negative_float,
    non_negative_int,
    open_probability,
    positive_int,
    start_run,
)

WARMUP = 100  # --warmup's default for a long run (default_warmup scales it to short ones)
LOG_EVERY = 10  # steps between reading the loss on the host (it waits for the device)
TRAIN_OPS = ("attention",)
CAP_FILE = False  # --max-chars cuts only the default text, not a --data file
SAMPLE_OPS = ("attention", "attention_decode", "kv_cache_append", "sample_tokens")


# ------------------------------------------------------------------------------------------ arguments
def train_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="genfast train gpt", description="Train a GPT-2-style language model.")
    add_text_args(p, presets=PRESETS, default_config="tiny", cap_file=CAP_FILE)
    p.add_argument("--block-size", type=positive_int, default=None,
                   help="tokens per sequence (default: the preset's context)")
    p.add_argument("--dropout", type=open_probability, default=None, help="dropout in [0, 1) (default: the preset's)")
    p.add_argument("--min-lr", type=non_negative_float, default=None, help="final learning rate (default lr/10)")
    p.add_argument("--warmup", type=non_negative_int, default=None,
                   help=f"warmup steps (default {WARMUP}, at most a tenth of --steps)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.1, help="AdamW (default %(default)s)")
    p.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                   help="max gradient norm, 0 for none (default %(default)s)")
    # The old name of --sample-every. Its default must be SUPPRESS: argparse fills a dest from the first action that
    # has it, and a None here would hide --sample-every's default (a default run then failed at its first step).
    p.add_argument("--eval-every", dest="sample_every", type=positive_int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    p.add_argument("--eval-batches", type=positive_int, default=10, help="batches per eval (default %(default)s)")
    p.add_argument("--sample-tokens", type=non_negative_int, default=200,
                   help="tokens of the sample printed at each eval, 0 for none (default %(default)s)")
    add_train_args(p, recipe="gpt", steps=2000, batch_size=32, lr=1e-3, ops=TRAIN_OPS, save_every=250,
                   sample_every=250)
    mark_fixed(p, "--data", "--max-chars", "--config", "--tokenizer", "--vocab-size", "--block-size", "--dropout")
    return p


# ------------------------------------------------------------------------------------------ training
def make_optimizer(model: GPT, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on biases or LayerNorm gains), GPT-2's betas."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


@torch.no_grad()
def evaluate(model: GPT, data: torch.Tensor, args, block_size: int, device: torch.device) -> float:
    """Mean loss over ``args.eval_batches`` fixed batches of ``data`` (the same batches at every eval)."""
    was_training = model.training
    model.eval()
    generator = batch_generator(args.seed, -1)
    losses = []
    for _ in range(args.eval_batches):
        x, y = get_batch(data, args.batch_size, block_size, generator)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses.append(model(x.to(device), y.to(device))[1].float())
    model.train(was_training)
    return float(torch.stack(losses).mean())


def sample_text(model: GPT, tokenizer, prompt_ids: list[int], n: int, seed: int, device: torch.device) -> str:
    was_training = model.training
    model.eval()
    n = min(n, model.config.block_size - len(prompt_ids))
    generator = torch.Generator(device).manual_seed(seed)
    idx = torch.tensor([prompt_ids], dtype=torch.int64, device=device)
    out = model.generate(idx, n, temperature=0.8, top_k=50, generator=generator)
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())


def train_main(argv: list[str]) -> int:
    parser = train_parser()
    args = parser.parse_args(argv)
    with start_run(parser, args, recipe="gpt", ops=TRAIN_OPS) as run:
        if args.warmup is None:  # (on --resume the run's own value is already here: start_run applied its flags)
            saved = (run.saved_config or {}).get("args", {})  # a run from before "flags": its args hold it
            args.warmup = saved["warmup"] if type(saved.get("warmup")) is int else default_warmup(WARMUP, args.steps)
        tokenizer, config, train_ids, val_ids = prepare_text(
            parser, args, run, GPTConfig, cap_file=CAP_FILE, window=lambda config: config.block_size,
            block_size=args.block_size, dropout=args.dropout)
        task = GPTTask(run, config, tokenizer, train_ids, val_ids)
        run.log(f"GPT {args.config}: {task.model.num_parameters() / 1e6:.2f}M parameters, vocabulary "
                f"{config.vocab_size}, {len(train_ids)} training tokens, {run.dist.world_size} process(es) on "
                f"{run.device}")
        return run.train(task)


class GPTTask(TextTask):
    log_every = LOG_EVERY

    def __init__(self, run: Run, config: GPTConfig, tokenizer, train_ids: torch.Tensor, val_ids: torch.Tensor):
        args = run.args
        self.run, self.config, self.tokenizer = run, config, tokenizer
        self.train_ids, self.val_ids = train_ids, val_ids
        self.model = GPT(config).to(run.device)
        self.modules = {"model": self.model}
        self.optimizers = {"model": make_optimizer(self.model, args.lr, args.weight_decay, run.device)}
        self.ddp = run.dist.wrap(self.model)
        self.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
        self.sample_prompt = tokenizer.encode(tokenizer.decode(val_ids[:16].tolist()))[:16] or [0]
        self.tokens_per_step = args.batch_size * config.block_size
        self.tic = time.perf_counter()
        self.model.train()

    def train_step(self, step: int) -> dict:
        args = self.run.args
        # The global batch of this step is a function of (seed, step) alone: a resumed run sees the same data.
        batch = get_batch(self.train_ids, args.batch_size, self.config.block_size, batch_generator(args.seed, step))
        figures = self.language_model_step(step, batch, min_lr=self.min_lr, non_blocking=True)
        if (step + 1) % LOG_EVERY == 0:
            elapsed, self.tic = time.perf_counter() - self.tic, time.perf_counter()
            figures["tok_s"] = LOG_EVERY * self.tokens_per_step / max(elapsed, 1e-9)
        return figures

    def evaluate(self, step: int) -> bool:
        run, args = self.run, self.run.args
        val = evaluate(self.model, self.val_ids, args, self.config.block_size, run.device)  # every rank: same
        run.log(f"step {step}: val loss {val:.4f}")
        if args.sample_tokens and run.verbose:
            run.log(sample_text(self.model, self.tokenizer, self.sample_prompt, args.sample_tokens, args.seed,
                                run.device))
        return False


# ------------------------------------------------------------------------------------------ sampling
def sample_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="genfast sample gpt", description="Continue a prompt with a trained GPT.")
    p.add_argument("--ckpt", type=Path, required=True,
                   help="a `genfast train gpt` run folder, or a Hugging Face GPT-2 directory")
    add_generation_args(p, max_new_tokens=200, top_k=50, ops=SAMPLE_OPS)
    return p


def load_for_sampling(ckpt: str | os.PathLike, device: torch.device, *,
                      allow_nonfinite: bool = False) -> tuple[GPT, object]:
    """(model, tokenizer) from a run folder, its checkpoint/ folder, or a Hugging Face GPT-2 directory."""
    path = Path(ckpt)
    if not path.is_dir():
        raise FileNotFoundError(f"no directory at {path}")
    if (path / "checkpoint").is_dir() or (path / "trainer.pt").is_file():  # a genfast run
        directory, saved = read_run(path, "gpt")
        config = GPTConfig.from_dict(saved["model"])
        model = build_and_load(lambda: GPT(config), directory, "model", allow_nonfinite=allow_nonfinite)
        return model.to(device), fitting_tokenizer(load_tokenizer(directory), model, directory)
    if (path / "config.json").is_file():  # a Hugging Face GPT-2 directory
        model = GPT.from_pretrained(path, device=device, allow_nonfinite=allow_nonfinite)
        return model, fitting_tokenizer(load_tokenizer(path), model, path)
    raise FileNotFoundError(f"no GPT checkpoint in {path} (expected checkpoint/ from `genfast train gpt`, or a "
                            "Hugging Face GPT-2 directory)")


def sample_main(argv: list[str]) -> int:
    parser = sample_parser()
    args = parser.parse_args(argv)
    device = sample_device(parser, args, SAMPLE_OPS)
    model, tokenizer = load_or_exit(parser, lambda: load_for_sampling(args.ckpt, device,
                                                                       allow_nonfinite=args.allow_nonfinite))
    model.eval()
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise SystemExit("genfast sample gpt: --prompt must hold at least one token")
    ctx = model.config.block_size
    if len(prompt) > ctx:
        raise SystemExit(f"genfast sample gpt: the prompt is {len(prompt)} tokens, longer than the model's context "
                         f"of {ctx}")
    n = args.max_new_tokens
    if len(prompt) + n > ctx:
        n = ctx - len(prompt)
        print(f"(generating {n} tokens: the prompt and the new tokens must fit in the context of {ctx})",
              file=sys.stderr)
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.int64, device=device)
    knobs = generation_knobs(args, device)
    if args.stream and args.num_samples == 1:
        print_stream(tokenizer, prompt, lambda: backend_errors(parser, lambda: model.generate(idx, n, stream=True,
                                                                                              **knobs)))
        return 0
    out = backend_errors(parser, lambda: model.generate(idx, n, **knobs))
    print_samples(tokenizer, out, args.num_samples)
    return 0


__all__ = ["train_main", "sample_main", "train_parser", "sample_parser", "get_batch", "split_tokens",
           "make_optimizer", "load_for_sampling"]
