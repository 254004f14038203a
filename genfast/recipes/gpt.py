"""`genfast train gpt` and `genfast sample gpt`: a GPT-2-style language model, trained from scratch or sampled.

    genfast train gpt --config tiny --steps 2000 --out runs/gpt            # Python's stdlib source, chars
    genfast train gpt --data book.txt --tokenizer bpe --vocab-size 2048 --out runs/book
    torchrun --nproc_per_node 8 -m genfast train gpt --config gpt2 ...      # DDP over 8 GPUs
    genfast sample gpt --ckpt runs/gpt --prompt "def main(" --stream

The output directory holds ``checkpoint/`` (written atomically by genfast.training.save_checkpoint: the weights,
the optimizer, the step and the RNG states, so that ``--resume`` continues exactly) and ``tokenizer/``.
``--ckpt`` may also name a Hugging Face GPT-2 directory (config.json, model.safetensors, vocab.json, merges.txt).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from genfast.data.text import DEFAULT_MAX_CHARS, read_text_file, stdlib_text
from genfast.data.tokenizers import CharTokenizer, HFTokenizer, load_tokenizer
from genfast.models.gpt import GPT, PRESETS, GPTConfig
from genfast.training import (
    Distributed,
    StopOnInterrupt,
    batch_generator,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    progress_bar,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
    warmup_cosine_lr,
)

CHECKPOINT_DIR = "checkpoint"
TOKENIZER_DIR = "tokenizer"
VAL_FRACTION = 0.1


# ------------------------------------------------------------------------------------------ arguments
def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _non_negative(kind):
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genfast train gpt", description="Train a GPT-2-style language model.")
    p.add_argument("--data", help="a UTF-8 text file (default: the Python standard library's own .py source)")
    p.add_argument("--max-chars", type=_positive(int), default=DEFAULT_MAX_CHARS,
                   help="at most this many characters of the default text (default %(default)s)")
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS), help="model size (default %(default)s)")
    p.add_argument("--tokenizer", default="char", choices=("char", "bpe"),
                   help="characters, or a byte-level BPE trained on the data (default %(default)s)")
    p.add_argument("--vocab-size", type=_positive(int), default=1024, help="BPE vocabulary size (default %(default)s)")
    p.add_argument("--steps", type=_positive(int), default=2000, help="optimizer steps in all (default %(default)s)")
    p.add_argument("--batch-size", type=_positive(int), default=32,
                   help="sequences per step, over all processes (default %(default)s)")
    p.add_argument("--block-size", type=_positive(int), default=None,
                   help="tokens per sequence (default: the preset's context)")
    p.add_argument("--dropout", type=_non_negative(float), default=None, help="dropout (default: the preset's)")
    p.add_argument("--lr", type=_positive(float), default=1e-3, help="peak learning rate (default %(default)s)")
    p.add_argument("--min-lr", type=_non_negative(float), default=None, help="final learning rate (default lr/10)")
    p.add_argument("--warmup", type=_non_negative(int), default=100, help="warmup steps (default %(default)s)")
    p.add_argument("--weight-decay", type=_non_negative(float), default=0.1, help="AdamW (default %(default)s)")
    p.add_argument("--grad-clip", type=_non_negative(float), default=1.0,
                   help="max gradient norm, 0 for none (default %(default)s)")
    p.add_argument("--eval-every", type=_positive(int), default=250,
                   help="steps between eval loss, a sample and a checkpoint (default %(default)s)")
    p.add_argument("--eval-batches", type=_positive(int), default=10, help="batches per eval (default %(default)s)")
    p.add_argument("--sample-tokens", type=_non_negative(int), default=200,
                   help="tokens of the sample printed at each eval, 0 for none (default %(default)s)")
    p.add_argument("--out", default="runs/gpt", help="output directory (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--stop-after", type=_positive(int), default=None,
                   help="save and stop after this many steps of this run (for time-limited jobs; --resume later)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=_non_negative(int), default=0, help="seed of the data order and init")
    p.add_argument("--quiet", action="store_true", help="no progress bar or samples")
    return p


# ------------------------------------------------------------------------------------------ data
def _tokenizer_for(args, text: str, out: Path, resume: bool):
    """The run's tokenizer: the saved one on resume, else trained on ``text`` (the caller saves it)."""
    saved = out / TOKENIZER_DIR
    if resume and saved.is_dir():
        return load_tokenizer(saved)
    if args.tokenizer == "char":
        return CharTokenizer.train(text)
    return HFTokenizer.train_bpe(text, vocab_size=args.vocab_size)


def _save_tokenizer(tokenizer, out: Path) -> None:
    """Write ``out/tokenizer`` atomically (a temporary directory, then a rename)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TOKENIZER_DIR}.tmp-", dir=out))
    try:
        tokenizer.save(tmp)
        target = out / TOKENIZER_DIR
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: GPT, data: torch.Tensor, args, block_size: int, device: torch.device) -> float:
    """Mean loss over ``args.eval_batches`` fixed batches of ``data`` (the same batches at every eval)."""
    was_training = model.training
    model.eval()
    generator = batch_generator(args.seed, -1)
    losses = []
    for _ in range(args.eval_batches):
        x, y = get_batch(data, args.batch_size, block_size, generator)
        with _autocast(device):
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
    args = train_parser().parse_args(argv)
    dist = Distributed.from_environment(args.device)
    try:
        return _train(args, dist)
    finally:
        dist.close()


def _train(args, dist: Distributed) -> int:
    device = dist.device
    out = Path(args.out)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if dist.is_main and not args.quiet else \
        (lambda *a: None)
    if args.batch_size % dist.world_size:
        raise SystemExit(f"genfast train gpt: --batch-size {args.batch_size} must be divisible by the "
                         f"{dist.world_size} processes")
    found = find_checkpoint(out / CHECKPOINT_DIR) if args.resume else None
    if args.resume and found is None:
        log(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}; starting from scratch")
    seed_everything(args.seed)

    text = read_text_file(args.data) if args.data else stdlib_text(args.max_chars)
    tokenizer = _tokenizer_for(args, text, out, resume=found is not None)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)

    if found is not None:
        saved_config = json.loads((found / "config.json").read_text())
        config = GPTConfig.from_dict(saved_config["model"])
    else:
        overrides = {"vocab_size": tokenizer.vocab_size}
        if args.block_size is not None:
            overrides["block_size"] = args.block_size
        if args.dropout is not None:
            overrides["dropout"] = args.dropout
        config = GPTConfig.preset(args.config, **overrides)
    if config.vocab_size != tokenizer.vocab_size:
        raise SystemExit(f"genfast train gpt: the checkpoint's vocabulary ({config.vocab_size}) does not match the "
                         f"tokenizer's ({tokenizer.vocab_size})")
    block_size = config.block_size
    train_ids, val_ids = split_tokens(ids, block_size)

    model = GPT(config).to(device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
    step = 0
    if found is not None:
        trainer_state, _ = load_checkpoint(found, modules={"model": model}, map_location=device)
        optimizer.load_state_dict(trainer_state["optimizer"])
        step = int(trainer_state["step"])
        restore_rng_state(trainer_state["rng"])
        log(f"resumed from {found} at step {step}")
    elif dist.is_main:
        _save_tokenizer(tokenizer, out)
    ddp_model = dist.wrap(model)
    log(f"GPT {args.config}: {model.num_parameters() / 1e6:.2f}M parameters, vocabulary {config.vocab_size}, "
        f"{len(train_ids)} training tokens, {dist.world_size} process(es) on {device}")

    def save(at_step: int) -> None:
        if dist.is_main:
            state = {"optimizer": optimizer.state_dict(), "step": at_step, "rng": capture_rng_state()}
            save_checkpoint(out / CHECKPOINT_DIR, modules={"model": model}, trainer_state=state,
                            config={"model": config.to_dict(), "tokenizer": type(tokenizer).__name__,
                                    "args": vars(args)})
        dist.barrier()

    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    sample_prompt = tokenizer.encode(tokenizer.decode(val_ids[:16].tolist()))[:16] or [0]
    end = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
    bar = progress_bar(args.steps, initial=step, desc="train gpt", enabled=dist.is_main and not args.quiet)
    model.train()
    tokens_per_step = args.batch_size * block_size
    tic, last_loss = time.perf_counter(), None
    with StopOnInterrupt() as stop:
        while step < end:
            lr = warmup_cosine_lr(step, base_lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
                                  min_lr=min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # The global batch of this step is a function of (seed, step) alone: a resumed run sees the same data.
            x, y = get_batch(train_ids, args.batch_size, block_size, batch_generator(args.seed, step))
            x, y = dist.shard(x).to(device, non_blocking=True), dist.shard(y).to(device, non_blocking=True)
            with _autocast(device):
                _, loss = ddp_model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            step += 1
            bar.update(1)
            if step % 10 == 0 or step == end:  # reading the loss waits for the device: not every step
                last_loss = dist.mean(loss.detach())
                elapsed, tic = time.perf_counter() - tic, time.perf_counter()
                steps_done = 10 if step % 10 == 0 else step % 10
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{steps_done * tokens_per_step / max(elapsed, 1e-9):,.0f}")
            if step % args.eval_every == 0 or step == args.steps:
                val = evaluate(model, val_ids, args, block_size, device)
                log(f"\nstep {step}: train loss {last_loss if last_loss is None else round(last_loss, 4)}, "
                    f"val loss {val:.4f}")
                if args.sample_tokens and dist.is_main and not args.quiet:
                    log(sample_text(model, tokenizer, sample_prompt, args.sample_tokens, args.seed, device))
                save(step)
            if dist.any(stop.requested):
                save(step)
                log(f"stopped at step {step}; continue with --resume")
                bar.close()
                return 130
    if step % args.eval_every and step != args.steps:
        save(step)  # --stop-after ended the run between evals
    bar.close()
    if dist.is_main:
        print(f"trained to step {step}; checkpoint in {out / CHECKPOINT_DIR}")
    return 0


# ------------------------------------------------------------------------------------------ sampling
def sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genfast sample gpt", description="Continue a prompt with a trained GPT.")
    p.add_argument("--ckpt", required=True,
                   help="a `genfast train gpt` output directory, or a Hugging Face GPT-2 directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=_non_negative(int), default=200, help="(default %(default)s)")
    p.add_argument("--temperature", type=_non_negative(float), default=0.8, help="0 for greedy (default %(default)s)")
    p.add_argument("--top-k", type=_non_negative(int), default=50, help="0 for none (default %(default)s)")
    p.add_argument("--top-p", type=_positive(float), default=1.0, help="1 for none (default %(default)s)")
    p.add_argument("--min-p", type=_non_negative(float), default=0.0, help="0 for none (default %(default)s)")
    p.add_argument("--repetition-penalty", type=_positive(float), default=1.0, help="(default %(default)s)")
    p.add_argument("--num-samples", type=_positive(int), default=1, help="continuations drawn in one batch")
    p.add_argument("--seed", type=_non_negative(int), default=0)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    return p


def load_for_sampling(ckpt: str | os.PathLike, device: torch.device) -> tuple[GPT, object]:
    """(model, tokenizer) from a training output directory, its checkpoint/ directory, or a HF GPT-2 directory."""
    path = Path(ckpt)
    if not path.is_dir():
        raise FileNotFoundError(f"--ckpt: no directory at {path}")
    if find_checkpoint(path / CHECKPOINT_DIR) is not None:  # a training output directory
        run_dir, found = path, find_checkpoint(path / CHECKPOINT_DIR)
    elif find_checkpoint(path) is not None:  # its checkpoint/ directory (config.json + trainer.pt)
        run_dir, found = path.parent, find_checkpoint(path)
    elif (path / "config.json").is_file():  # a Hugging Face GPT-2 directory
        return GPT.from_pretrained(path, device=device), load_tokenizer(path)
    else:
        raise FileNotFoundError(f"--ckpt: no GPT checkpoint in {path} (expected {CHECKPOINT_DIR}/ from "
                                "`genfast train gpt`, or a Hugging Face GPT-2 directory)")
    config_data = json.loads((found / "config.json").read_text())
    if not isinstance(config_data.get("model"), dict):
        raise ValueError(f"--ckpt: {found} is not a GPT checkpoint (its config.json has no model config)")
    model = GPT(GPTConfig.from_dict(config_data["model"]))
    load_checkpoint(found, modules={"model": model})
    return model.to(device), load_tokenizer(run_dir / TOKENIZER_DIR)


def sample_main(argv: list[str]) -> int:
    args = sample_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_for_sampling(args.ckpt, device)
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
        for token in model.generate(idx, n, stream=True, **knobs):
            ids.append(int(token[0]))
            text = tokenizer.decode(ids)
            # Byte-level BPE may end mid-character (decoded as U+FFFD): print only what is complete.
            if not text.endswith("\ufffd"):
                print(text[len(shown):], end="", flush=True)
                shown = text
        print(tokenizer.decode(ids)[len(shown):])
        return 0
    out = model.generate(idx, n, **knobs)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tokenizer.decode(row))
    return 0


__all__ = ["train_main", "sample_main", "train_parser", "sample_parser", "get_batch", "split_tokens",
           "make_optimizer", "load_for_sampling"]
