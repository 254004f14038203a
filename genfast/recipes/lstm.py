"""`genfast train lstm` and `genfast sample lstm`: a character-level (or BPE) LSTM language model.

    genfast train lstm --out runs/lstm                          # Python's stdlib source, characters, ~6 min on 2 cores
    genfast train lstm --data book.txt --tokenizer bpe --vocab-size 1024 --out runs/book
    genfast sample lstm --ckpt runs/lstm --prompt "def " --max-new-tokens 400 --stream

Training runs on the one loop (genfast/training/loop.py): random windows of ``--seq-len`` tokens from zero state,
Adam with warmup and cosine decay, gradient clipping. Every --sample-every steps the validation text (the last 10%)
is read as a stream, in ``--batch-size`` contiguous pieces carrying the LSTM state from window to window, and its
bits per character are printed beside those of a unigram model of the training text (the token frequencies), with
a sample. The run folder is the trainer's (checkpoint/ with config.json whose "model" is the LSTMConfig,
model.safetensors, trainer.pt, and the tokenizer beside the weights). In Python: ``genfast.models.load("runs/lstm")``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from genfast._io import check_fits_memory
from genfast.data.tokenizers import load_tokenizer
from genfast.models.lstm import LSTMLM, LSTMConfig
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
)
from genfast.training import (
    CommandParser,
    Run,
    add_train_args,
    batch_generator,
    non_negative_float,
    non_negative_int,
    open_probability,
    positive_int,
    start_run,
)

LOG_EVERY = 10  # steps between reading the loss on the host
TRAIN_OPS = ("sample_tokens", "lstm_cell")  # sampling at each eval
SAMPLE_OPS = ("lstm_cell", "sample_tokens")
SAMPLE_PROMPT_TOKENS = 16
CAP_FILE = True  # --max-chars cuts a --data file too


# ------------------------------------------------------------------------------------------ arguments
def train_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="genfast train lstm", description="Train an LSTM language model (characters by default).")
    add_text_args(p, presets=LSTMConfig.PRESETS, default_config="small", cap_file=CAP_FILE)
    p.add_argument("--seq-len", type=positive_int, default=64,
                   help="tokens per training window (backpropagation through time) (default %(default)s)")
    p.add_argument("--dropout", type=open_probability, default=None, help="dropout in [0, 1) (default: the preset's)")
    p.add_argument("--warmup", type=non_negative_int, default=20, help="warmup steps (default %(default)s)")
    p.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                   help="max gradient norm, 0 for none (default %(default)s)")
    p.add_argument("--eval-tokens", type=positive_int, default=16384,
                   help="validation tokens read at each eval (default %(default)s)")
    p.add_argument("--sample-tokens", type=non_negative_int, default=200,
                   help="tokens of the sample printed at each eval, 0 for none (default %(default)s)")
    add_train_args(p, recipe="lstm", steps=300, batch_size=32, lr=3e-3, ops=TRAIN_OPS, save_every=100,
                   sample_every=100)
    return p


# ------------------------------------------------------------------------------------------ evaluation
def unigram_bits(train_ids: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> float:
    """Total bits of ``ids`` under the training text's token frequencies (add-one smoothing)."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    log2p = torch.log2(counts / counts.sum())
    return float(-log2p[ids].sum())


def eval_pieces(val_ids: torch.Tensor, streams: int) -> torch.Tensor:
    """The validation tokens as ``streams`` contiguous pieces [S, L] (L >= 2), read side by side."""
    streams = max(1, min(streams, len(val_ids) // 2))
    n = len(val_ids) // streams * streams
    return val_ids[:n].view(streams, -1)


@torch.no_grad()
def stream_bits(model: LSTMLM, pieces: torch.Tensor, seq_len: int, device: torch.device) -> float:
    """Total bits the model gives ``pieces[:, 1:]``, each token predicted from every token before it in its piece
    (the state carried from window to window of ``seq_len``)."""
    was_training = model.training
    model.eval()
    pieces = pieces.to(device)
    inputs, targets = pieces[:, :-1], pieces[:, 1:]
    state, total = None, 0.0
    for start in range(0, inputs.shape[1], seq_len):
        out, state = model.encode(inputs[:, start:start + seq_len], state)
        logits = model.head(out).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), targets[:, start:start + seq_len].flatten(),
                                       reduction="sum"))
    model.train(was_training)
    return total / math.log(2)


def sample_text(model: LSTMLM, tokenizer, prompt_ids: list[int], n: int, seed: int, device: torch.device) -> str:
    generator = torch.Generator(device).manual_seed(seed)
    idx = torch.tensor([prompt_ids], dtype=torch.int64, device=device)
    out = model.generate(idx, n, temperature=0.8, top_k=20, generator=generator)
    return tokenizer.decode(out[0].tolist())


# ------------------------------------------------------------------------------------------ training
def train_main(argv: list[str]) -> int:
    parser = train_parser()
    args = parser.parse_args(argv)
    # Before --out is made or the text read: the vocabulary is not known yet, so a character one is taken as 256.
    vocab = args.vocab_size if args.tokenizer == "bpe" else 256
    _check_step_memory(parser, LSTMConfig.preset(args.config, vocab_size=vocab), args.batch_size, args.seq_len)
    with start_run(parser, args, recipe="lstm", ops=TRAIN_OPS) as run:
        tokenizer, config, train_ids, val_ids = prepare_text(
            parser, args, run, LSTMConfig, cap_file=CAP_FILE, window=lambda config: args.seq_len,
            dropout=args.dropout)
        task = LSTMTask(run, config, tokenizer, train_ids, val_ids)
        run.log(f"LSTM {args.config}: {task.model.num_parameters() / 1e6:.2f}M parameters, vocabulary "
                f"{config.vocab_size}, {len(train_ids)} training tokens, {task.eval_pieces[:, 1:].numel()} "
                f"validation tokens ({task.eval_chars} characters) on {run.device}")
        return run.train(task)


def _check_step_memory(parser: argparse.ArgumentParser, config: LSTMConfig, batch_size: int, seq_len: int) -> None:
    """A usage error before anything is allocated when one step's activations cannot fit this machine: per token,
    the embedding, each layer's gates, states and outputs, and the logits, kept for the backward (fp32), twice over
    for their gradients."""
    per_token = config.n_embd + config.n_layer * 8 * config.n_hidden + 3 * config.vocab_size
    try:
        check_fits_memory(2 * 4 * batch_size * seq_len * per_token, f"--batch-size {batch_size} with --seq-len "
                                                                    f"{seq_len}")
    except ValueError as exc:
        parser.error(str(exc))


class LSTMTask(TextTask):
    log_every = LOG_EVERY

    def __init__(self, run: Run, config: LSTMConfig, tokenizer, train_ids: torch.Tensor, val_ids: torch.Tensor):
        args = run.args
        self.run, self.config, self.tokenizer = run, config, tokenizer
        self.train_ids = train_ids
        # Validation: pieces read side by side; bits and characters are those of the tokens scored (all but the
        # first of each piece, which has no context).
        self.eval_pieces = eval_pieces(val_ids[:args.eval_tokens], args.batch_size)
        scored = self.eval_pieces[:, 1:]
        self.eval_chars = sum(len(tokenizer.decode(row)) for row in scored.tolist())
        self.model = LSTMLM(config).to(run.device)
        self.modules = {"model": self.model}
        self.optimizers = {"model": torch.optim.Adam(self.model.parameters(), lr=args.lr)}
        self.ddp = run.dist.wrap(self.model)
        self.sample_prompt = tokenizer.encode(tokenizer.decode(val_ids[:SAMPLE_PROMPT_TOKENS].tolist())) or [0]
        self.unigram_bpc = unigram_bits(train_ids, scored.flatten(), config.vocab_size) / max(self.eval_chars, 1)
        self.model.train()

    def train_step(self, step: int) -> dict:
        args = self.run.args
        # The global batch of this step is a function of (seed, step) alone: a resumed run sees the same data.
        batch = get_batch(self.train_ids, args.batch_size, args.seq_len, batch_generator(args.seed, step))
        return self.language_model_step(step, batch, min_lr=args.lr / 10)

    def evaluate(self, step: int) -> bool:
        run, args = self.run, self.run.args
        bpc = stream_bits(self.model, self.eval_pieces, args.seq_len, run.device) / max(self.eval_chars, 1)
        run.log(f"step {step}: val bits/char {bpc:.3f} (unigram {self.unigram_bpc:.3f}, ratio "
                f"{bpc / self.unigram_bpc:.3f})")
        if args.sample_tokens and run.verbose:
            run.log(sample_text(self.model, self.tokenizer, self.sample_prompt, args.sample_tokens, args.seed,
                                run.device))
        return False


# ------------------------------------------------------------------------------------------ sampling
def sample_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="genfast sample lstm", description="Continue a prompt with a trained LSTM.")
    p.add_argument("--ckpt", type=Path, required=True, help="a `genfast train lstm` run folder (its --out)")
    add_generation_args(p, max_new_tokens=300, top_k=20, ops=SAMPLE_OPS)
    return p


def load_for_sampling(ckpt, device: torch.device, *, allow_nonfinite: bool = False) -> tuple[LSTMLM, object]:
    """(model, tokenizer) of a `genfast train lstm` run folder or its checkpoint/ folder."""
    from genfast.models._checkpoint import find_run_checkpoint

    model = LSTMLM.from_checkpoint(ckpt, device, allow_nonfinite=allow_nonfinite)
    directory = find_run_checkpoint(ckpt)
    return model, fitting_tokenizer(load_tokenizer(directory), model, directory)


def sample_main(argv: list[str]) -> int:
    parser = sample_parser()
    args = parser.parse_args(argv)
    device = sample_device(parser, args, SAMPLE_OPS)
    model, tokenizer = load_or_exit(parser, lambda: load_for_sampling(args.ckpt, device,
                                                                       allow_nonfinite=args.allow_nonfinite))
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        parser.error("--prompt must hold at least one token")
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.int64, device=device)
    knobs = generation_knobs(args, device)
    try:
        if args.stream and args.num_samples == 1:
            print_stream(tokenizer, prompt, lambda: backend_errors(
                parser, lambda: model.generate(idx, args.max_new_tokens, stream=True, **knobs)), echo_prompt=True)
            return 0
        out = backend_errors(parser, lambda: model.generate(idx, args.max_new_tokens, **knobs))
    except ValueError as exc:  # sizes that do not fit this machine, knobs out of range
        parser.error(str(exc))
    print_samples(tokenizer, out, args.num_samples)
    return 0


__all__ = ["train_main", "sample_main", "train_parser", "sample_parser", "load_for_sampling", "stream_bits",
           "unigram_bits", "eval_pieces"]
