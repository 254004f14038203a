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

from genfast.data.text import DEFAULT_MAX_CHARS, read_text_file, stdlib_text
from genfast.data.tokenizers import CharTokenizer, HFTokenizer, load_tokenizer
from genfast.models._checkpoint import build_and_load, read_run
from genfast.models.gpt import GPT, PRESETS, GPTConfig
from genfast.recipes._common import backend_errors, load_or_exit, sample_device
from genfast.training import (
    CommandParser,
    Run,
    TrainTask,
    add_device_args,
    add_train_args,
    batch_generator,
    default_warmup,
    mark_fixed,
    non_negative_float,
    non_negative_int,
    open_probability,
    positive_float,
    positive_int,
    start_run,
    unit_interval,
    warmup_cosine_lr,
)

VAL_FRACTION = 0.1
WARMUP = 100  # --warmup's default for a long run (default_warmup scales it to short ones)
LOG_EVERY = 10  # steps between reading the loss on the host (it waits for the device)
TRAIN_OPS = ("attention",)
SAMPLE_OPS = ("attention", "attention_decode", "kv_cache_append", "sample_tokens")


# ------------------------------------------------------------------------------------------ arguments
def train_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="genfast train gpt", description="Train a GPT-2-style language model.")
    p.add_argument("--data", help="a UTF-8 text file (default: the Python standard library's own .py source)")
    p.add_argument("--max-chars", type=positive_int, default=DEFAULT_MAX_CHARS,
                   help="at most this many characters of the default text (default %(default)s)")
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS), help="model size (default %(default)s)")
    p.add_argument("--tokenizer", default="char", choices=("char", "bpe"),
                   help="characters, or a byte-level BPE trained on the data (default %(default)s)")
    p.add_argument("--vocab-size", type=positive_int, default=1024, help="BPE vocabulary size (default %(default)s)")
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


# ------------------------------------------------------------------------------------------ data
def split_tokens(ids: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train / validation split (the last 10% for validation, at least one block + 1 tokens each)."""
    n_val = max(block_size + 1, int(len(ids) * VAL_FRACTION))
    if len(ids) - n_val < block_size + 1:
        raise ValueError(f"data: {len(ids)} tokens are too few for a block size of {block_size} (need at least "
                         f"{2 * (block_size + 1)} for training and validation); use more text or --block-size")
    return ids[:-n_val], ids[-n_val:]


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """Random windows of ``data``: x [B, T], and y the same windows shifted by one token."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = starts[:, None] + torch.arange(block_size + 1)
    windows = data[offsets]
    return windows[:, :-1], windows[:, 1:]


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


def _check_vocab_size(parser: argparse.ArgumentParser, vocab_size: int, text: str) -> None:
    """A usage error unless a BPE of ``vocab_size`` can be learned from ``text``: 256 byte tokens and one special
    token, plus at most one merge per byte of the text. (The tokenizers library reserves memory for the whole
    vocabulary up front: 10**9 aborted the process.)"""
    least, most = 257, 257 + len(text.encode("utf-8", "surrogatepass"))
    if not least <= vocab_size <= most:
        parser.error(f"--vocab-size {vocab_size}: a byte-level BPE of this text has between {least} (the bytes and "
                     f"<|endoftext|>) and {most} tokens (one merge per byte of the text at most)")


def train_main(argv: list[str]) -> int:
    parser = train_parser()
    args = parser.parse_args(argv)
    with start_run(parser, args, recipe="gpt", ops=TRAIN_OPS) as run:
        if args.warmup is None:  # (on --resume the run's own value is already here: start_run applied its flags)
            saved = (run.saved_config or {}).get("args", {})  # a run from before "flags": its args hold it
            args.warmup = saved["warmup"] if type(saved.get("warmup")) is int else default_warmup(WARMUP, args.steps)
        try:
            text = read_text_file(args.data) if args.data else stdlib_text(args.max_chars)
            if run.resuming:
                tokenizer = load_tokenizer(run.checkpoint_found)
                config = GPTConfig.from_dict(run.saved_config["model"])
            else:
                if args.tokenizer == "bpe":
                    _check_vocab_size(parser, args.vocab_size, text)
                tokenizer = CharTokenizer.train(text) if args.tokenizer == "char" else \
                    HFTokenizer.train_bpe(text, vocab_size=args.vocab_size)
                overrides = {"vocab_size": tokenizer.vocab_size}
                if args.block_size is not None:
                    overrides["block_size"] = args.block_size
                if args.dropout is not None:
                    overrides["dropout"] = args.dropout
                config = GPTConfig.preset(args.config, **overrides)
            if config.vocab_size != tokenizer.vocab_size:
                raise ValueError(f"the checkpoint's vocabulary ({config.vocab_size}) does not match its "
                                 f"tokenizer's ({tokenizer.vocab_size})")
            ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
            train_ids, val_ids = split_tokens(ids, config.block_size)
        except (FileNotFoundError, ValueError) as exc:
            parser.error(f"--data {args.data}: {exc}" if args.data else str(exc))
        task = GPTTask(run, config, tokenizer, train_ids, val_ids)
        run.log(f"GPT {args.config}: {task.model.num_parameters() / 1e6:.2f}M parameters, vocabulary "
                f"{config.vocab_size}, {len(train_ids)} training tokens, {run.dist.world_size} process(es) on "
                f"{run.device}")
        return run.train(task)


class GPTTask(TrainTask):
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

    def config_dict(self) -> dict:
        args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.run.args).items()}
        return {"model": self.config.to_dict(), "tokenizer": type(self.tokenizer).__name__, "args": args}

    def write_side_files(self, directory: Path) -> None:
        self.tokenizer.save(directory)  # beside the weights, in the same atomic step

    def train_step(self, step: int) -> dict:
        run, args, dist = self.run, self.run.args, self.run.dist
        lr = warmup_cosine_lr(step, base_lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
                              min_lr=self.min_lr)
        optimizer = self.optimizers["model"]
        for group in optimizer.param_groups:
            group["lr"] = lr
        # The global batch of this step is a function of (seed, step) alone: a resumed run sees the same data.
        x, y = get_batch(self.train_ids, args.batch_size, self.config.block_size, batch_generator(args.seed, step))
        x, y = dist.shard(x).to(run.device, non_blocking=True), dist.shard(y).to(run.device, non_blocking=True)
        with run.autocast():
            _, loss = self.ddp(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        optimizer.step()
        figures = {"loss": loss.detach(), "lr": lr}
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
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=200, help="(default %(default)s)")
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 for greedy (default %(default)s)")
    p.add_argument("--top-k", type=non_negative_int, default=50, help="0 for none (default %(default)s)")
    p.add_argument("--top-p", type=unit_interval, default=1.0, help="in (0, 1]; 1 for none (default %(default)s)")
    p.add_argument("--min-p", type=open_probability, default=0.0, help="in [0, 1); 0 for none (default %(default)s)")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="(default %(default)s)")
    p.add_argument("--num-samples", type=positive_int, default=1, help="continuations drawn in one batch")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_device_args(p, ops=SAMPLE_OPS)
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
        return model.to(device), _fitting_tokenizer(load_tokenizer(directory), model, directory)
    if (path / "config.json").is_file():  # a Hugging Face GPT-2 directory
        model = GPT.from_pretrained(path, device=device, allow_nonfinite=allow_nonfinite)
        return model, _fitting_tokenizer(load_tokenizer(path), model, path)
    raise FileNotFoundError(f"no GPT checkpoint in {path} (expected checkpoint/ from `genfast train gpt`, or a "
                            "Hugging Face GPT-2 directory)")


def _fitting_tokenizer(tokenizer, model: GPT, where: Path):
    """The tokenizer, unless it has fewer tokens than the model can sample (their ids would not decode)."""
    if tokenizer.vocab_size < model.config.vocab_size:
        raise ValueError(f"the tokenizer in {where} has {tokenizer.vocab_size} tokens, fewer than the model's "
                         f"vocabulary of {model.config.vocab_size}: they do not belong together")
    return tokenizer


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
    generator = torch.Generator(device).manual_seed(args.seed)
    knobs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                 repetition_penalty=args.repetition_penalty, generator=generator)
    if args.stream and args.num_samples == 1:
        ids, shown = list(prompt), ""
        for token in backend_errors(parser, lambda: model.generate(idx, n, stream=True, **knobs)):
            ids.append(int(token[0]))
            text = tokenizer.decode(ids)
            # Byte-level BPE may end mid-character (decoded as U+FFFD): print only what is complete.
            if not text.endswith("\ufffd"):
                print(text[len(shown):], end="", flush=True)
                shown = text
        print(tokenizer.decode(ids)[len(shown):])
        return 0
    out = backend_errors(parser, lambda: model.generate(idx, n, **knobs))
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tokenizer.decode(row))
    return 0


__all__ = ["train_main", "sample_main", "train_parser", "sample_parser", "get_batch", "split_tokens",
           "make_optimizer", "load_for_sampling"]
