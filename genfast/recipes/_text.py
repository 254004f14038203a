"""What the language-model recipes (`genfast train|sample gpt` and `genfast train|sample lstm`) share.

Training: the text flags (--data --max-chars --config --tokenizer --vocab-size); reading the text and training the
tokenizer (or, on --resume, loading it with the run's model config), every failure a usage error on --data; the
check of a BPE's --vocab-size against the text; the train / validation split and the random windows of tokens;
``TextTask``, the part of a language model's TrainTask that is the same in both (config.json, the tokenizer saved
beside the weights, one optimizer step on a random batch). Sampling: the generation flags (--prompt ... --stream),
the model's tokenizer checked against its vocabulary, and printing the continuations (streamed or not).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from genfast.data.text import DEFAULT_MAX_CHARS, read_text_file, stdlib_text
from genfast.data.tokenizers import CharTokenizer, HFTokenizer, load_tokenizer
from genfast.training import (
    Run,
    TrainTask,
    add_device_args,
    non_negative_float,
    non_negative_int,
    open_probability,
    positive_float,
    positive_int,
    unit_interval,
    warmup_cosine_lr,
)

VAL_FRACTION = 0.1


# ------------------------------------------------------------------------------------------ training
def add_text_args(p: argparse.ArgumentParser, *, presets, default_config: str, cap_file: bool) -> None:
    """--data --max-chars --config --tokenizer --vocab-size. ``cap_file``: --max-chars also cuts a --data file
    (otherwise only the default text)."""
    p.add_argument("--data", help="a UTF-8 text file (default: the Python standard library's own .py source)")
    p.add_argument("--max-chars", type=positive_int, default=DEFAULT_MAX_CHARS,
                   help=f"at most this many characters of the {'' if cap_file else 'default '}text "
                        "(default %(default)s)")
    p.add_argument("--config", default=default_config, choices=sorted(presets), help="model size (default %(default)s)")
    p.add_argument("--tokenizer", default="char", choices=("char", "bpe"),
                   help="characters, or a byte-level BPE trained on the data (default %(default)s)")
    p.add_argument("--vocab-size", type=positive_int, default=1024, help="BPE vocabulary size (default %(default)s)")


def check_vocab_size(parser: argparse.ArgumentParser, vocab_size: int, text: str) -> None:
    """A usage error unless a BPE of ``vocab_size`` can be learned from ``text``: 256 byte tokens and one special
    token, plus at most one merge per byte of the text. (The tokenizers library reserves memory for the whole
    vocabulary up front: 10**9 aborted the process.)"""
    least, most = 257, 257 + len(text.encode("utf-8", "surrogatepass"))
    if not least <= vocab_size <= most:
        parser.error(f"--vocab-size {vocab_size}: a byte-level BPE of this text has between {least} (the bytes and "
                     f"<|endoftext|>) and {most} tokens (one merge per byte of the text at most)")


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


def prepare_text(parser: argparse.ArgumentParser, args: argparse.Namespace, run: Run, config_type, *,
                 cap_file: bool, window: Callable[[Any], int], **overrides) -> tuple[Any, Any, torch.Tensor,
                                                                                     torch.Tensor]:
    """(tokenizer, config, train_ids, val_ids) of a run: the text of --data (cut to --max-chars if ``cap_file``)
    or the default text; a new tokenizer and ``config_type.preset(--config, vocab_size=..., **overrides)`` (the
    overrides that are not None), or on --resume the run's own; the tokens split with windows of
    ``window(config)``. Every failure is a usage error."""
    try:
        text = read_text_file(args.data, args.max_chars if cap_file else None) if args.data else \
            stdlib_text(args.max_chars)
        if run.resuming:
            tokenizer = load_tokenizer(run.checkpoint_found)
            config = config_type.from_dict(run.saved_config["model"])
        else:
            if args.tokenizer == "bpe":
                check_vocab_size(parser, args.vocab_size, text)
            tokenizer = CharTokenizer.train(text) if args.tokenizer == "char" else \
                HFTokenizer.train_bpe(text, vocab_size=args.vocab_size)
            overrides = {k: v for k, v in overrides.items() if v is not None}
            config = config_type.preset(args.config, vocab_size=tokenizer.vocab_size, **overrides)
        if config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"the checkpoint's vocabulary ({config.vocab_size}) does not match its "
                             f"tokenizer's ({tokenizer.vocab_size})")
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
        train_ids, val_ids = split_tokens(ids, window(config))
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--data {args.data}: {exc}" if args.data else str(exc))
    return tokenizer, config, train_ids, val_ids


class TextTask(TrainTask):
    """A language model's TrainTask: subclasses set run, config, tokenizer, train_ids, model, ddp and
    optimizers["model"]."""

    def config_dict(self) -> dict:
        args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.run.args).items()}
        return {"model": self.config.to_dict(), "tokenizer": type(self.tokenizer).__name__, "args": args}

    def write_side_files(self, directory: Path) -> None:
        self.tokenizer.save(directory)  # beside the weights, in the same atomic step

    def language_model_step(self, step: int, batch: tuple[torch.Tensor, torch.Tensor], *, min_lr: float,
                            non_blocking: bool = False) -> dict:
        """Optimizer step ``step`` on ``batch``, the global (x, y) of ``get_batch`` (drawn by the recipe, through
        its module's ``get_batch``), this rank's shard of it: warmup and cosine decay to ``min_lr``, gradient
        clipping. Returns {"loss", "lr"}."""
        run, args, dist = self.run, self.run.args, self.run.dist
        lr = warmup_cosine_lr(step, base_lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
                              min_lr=min_lr)
        optimizer = self.optimizers["model"]
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batch
        x = dist.shard(x).to(run.device, non_blocking=non_blocking)
        y = dist.shard(y).to(run.device, non_blocking=non_blocking)
        with run.autocast():
            _, loss = self.ddp(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        optimizer.step()
        return {"loss": loss.detach(), "lr": lr}


# ------------------------------------------------------------------------------------------ sampling
def add_generation_args(p: argparse.ArgumentParser, *, max_new_tokens: int, top_k: int, ops: tuple[str, ...]) -> None:
    """--prompt --max-new-tokens --temperature --top-k --top-p --min-p --repetition-penalty --num-samples --seed
    --stream, and the device flags for ``ops``."""
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=max_new_tokens, help="(default %(default)s)")
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 for greedy (default %(default)s)")
    p.add_argument("--top-k", type=non_negative_int, default=top_k, help="0 for none (default %(default)s)")
    p.add_argument("--top-p", type=unit_interval, default=1.0, help="in (0, 1]; 1 for none (default %(default)s)")
    p.add_argument("--min-p", type=open_probability, default=0.0, help="in [0, 1); 0 for none (default %(default)s)")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="(default %(default)s)")
    p.add_argument("--num-samples", type=positive_int, default=1, help="continuations drawn in one batch")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_device_args(p, ops=ops)


def generation_knobs(args: argparse.Namespace, device: torch.device) -> dict:
    """The sampling keywords of ``generate`` from the flags, with a generator seeded from --seed."""
    generator = torch.Generator(device).manual_seed(args.seed)
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, generator=generator)


def fitting_tokenizer(tokenizer, model, where: Path):
    """The tokenizer, unless it has fewer tokens than the model can sample (their ids would not decode)."""
    if tokenizer.vocab_size < model.config.vocab_size:
        raise ValueError(f"the tokenizer in {where} has {tokenizer.vocab_size} tokens, fewer than the model's "
                         f"vocabulary of {model.config.vocab_size}: they do not belong together")
    return tokenizer


def print_stream(tokenizer, prompt: list[int], start: Callable[[], Iterable[torch.Tensor]], *,
                 echo_prompt: bool = False) -> None:
    """Print the continuation of ``prompt`` as ``start()`` yields its tokens ([1] tensors), then a newline.
    ``echo_prompt``: print the prompt before starting (otherwise it comes out with the first complete token)."""
    ids, shown = list(prompt), ""
    if echo_prompt:
        shown = tokenizer.decode(ids)
        print(shown, end="", flush=True)
    for token in start():
        ids.append(int(token[0]))
        text = tokenizer.decode(ids)
        # Byte-level BPE may end mid-character (decoded as U+FFFD): print only what is complete.
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(tokenizer.decode(ids)[len(shown):])


def print_samples(tokenizer, out: torch.Tensor, num_samples: int) -> None:
    """Each row of ``out`` decoded, under a ``--- sample i`` line when there are several."""
    for i, row in enumerate(out.tolist()):
        if num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tokenizer.decode(row))


__all__ = ["add_text_args", "check_vocab_size", "split_tokens", "get_batch", "prepare_text", "TextTask",
           "add_generation_args", "generation_knobs", "fitting_tokenizer", "print_stream", "print_samples",
           "VAL_FRACTION"]
