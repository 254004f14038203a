"""`genfast train translator` and `genfast translate`: an encoder-decoder Transformer on sentence pairs.

    genfast train translator                        # built-in English -> French number phrases
    genfast train translator --data pairs.tsv       # your own source<TAB>target lines
    genfast translate --ckpt runs/translator "three hundred and twenty-one"

Training: AdamW, linear warmup then cosine decay, gradient clipping, bf16 autocast on a GPU, a progress bar
with the loss and tokens/s, an eval (valid loss, exact-match accuracy of greedy translations, one sample
translation) every --sample-every steps, checkpoints written atomically every --save-every steps and at the
end, an exact --resume, Ctrl-C saving before it exits, and DDP under torchrun (each process takes its slice
of every global batch; the loss is normalised by the global token count, so the gradients are those of one
process on the whole batch).

Tokens: character-level, one tokenizer per side (or one for both with --shared-vocab), after three special
ids (pad, bos, eos). The tokenizers travel inside the checkpoint's config.json, so weights and vocabulary are
written in the same atomic step and cannot drift apart.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from genfast.data.number_phrases import number_phrase_splits
from genfast.data.parallel_text import Pair, read_tsv, split_pairs
from genfast.data.tokenizers import CharTokenizer
from genfast.models._checkpoint import build_and_load, read_run
from genfast.models.transformer import PRESETS, Transformer, TransformerConfig
from genfast.training import (
    CommandParser,
    Run,
    TrainTask,
    add_train_args,
    batch_generator,
    default_warmup,
    mark_fixed,
    non_negative_float,
    non_negative_int,
    open_probability,
    positive_int,
    resolve_device,
    warmup_cosine_lr,
)
from genfast.training.loop import start_run

OPS = ("attention",)
# Per preset: the learning rate and warmup its default run uses. The tiny model (~100k parameters) learns the
# number phrases in a few hundred steps only with a higher rate and a short warmup: at the small preset's 1e-3
# and 100 warmup steps, 200 steps of batch 32 end at a valid loss of 0.81 and no exact translation.
TRAINING_DEFAULTS: dict[str, dict] = {
    "tiny": dict(lr=3e-3, warmup=20),
    "small": dict(lr=1e-3, warmup=100),
    "base": dict(lr=1e-3, warmup=100),
}
PAD, BOS, EOS = 0, 1, 2
N_SPECIAL = 3


# ------------------------------------------------------------------------------------------- vocabulary
class Vocab:
    """A CharTokenizer behind the three special ids: token id = character id + 3."""

    def __init__(self, tokenizer: CharTokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: list[str]) -> "Vocab":
        return cls(CharTokenizer.train(texts))

    @property
    def size(self) -> int:
        return self.tokenizer.vocab_size + N_SPECIAL

    def encode(self, text: str) -> list[int]:
        return [i + N_SPECIAL for i in self.tokenizer.encode(text)]

    def decode(self, ids) -> str:
        """Text of ids up to the first eos, special ids skipped."""
        chars = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i >= N_SPECIAL:
                chars.append(i - N_SPECIAL)
        return self.tokenizer.decode(chars)

    def to_json(self) -> dict:
        return {"type": "char", "itos": self.tokenizer.itos}

    @classmethod
    def from_json(cls, data) -> "Vocab":
        if not isinstance(data, dict) or data.get("type") != "char" or not isinstance(data.get("itos"), list) \
                or not data["itos"] or not all(isinstance(c, str) for c in data["itos"]):
            raise ValueError("the checkpoint's tokenizer entry is not a genfast character tokenizer")
        return cls(CharTokenizer(data["itos"][1:], unk=data["itos"][0]))


def encode_batch(src_texts: list[str], tgt_texts: list[str] | None, src_vocab: Vocab, tgt_vocab: Vocab,
                 device) -> dict[str, torch.Tensor]:
    """Padded tensors: src (B, S), src_pad_mask (B, S); with targets also tgt_in / tgt_out (B, T)."""
    src_ids = [src_vocab.encode(s) for s in src_texts]
    width = max(len(s) for s in src_ids)
    src = torch.full((len(src_ids), width), PAD, dtype=torch.long)
    for i, ids in enumerate(src_ids):
        src[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    batch = {"src": src, "src_pad_mask": src == PAD}
    if tgt_texts is not None:
        tgt_ids = [[BOS] + tgt_vocab.encode(t) + [EOS] for t in tgt_texts]
        width = max(len(t) for t in tgt_ids) - 1
        tgt_in = torch.full((len(tgt_ids), width), PAD, dtype=torch.long)
        tgt_out = torch.full((len(tgt_ids), width), PAD, dtype=torch.long)
        for i, ids in enumerate(tgt_ids):
            tgt_in[i, :len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
            tgt_out[i, :len(ids) - 1] = torch.tensor(ids[1:], dtype=torch.long)
        batch.update(tgt_in=tgt_in, tgt_out=tgt_out)
    return {name: t.to(device) for name, t in batch.items()}


# ------------------------------------------------------------------------------------------- data
def load_pairs(args) -> tuple[list[Pair], list[Pair]]:
    """(train, valid): the user's TSV split by hash, or the built-in number phrases."""
    if args.data is None:
        return number_phrase_splits()
    if args.valid_data is not None:
        return read_tsv(args.data), read_tsv(args.valid_data)
    return split_pairs(read_tsv(args.data), args.valid_fraction)


def _check_lengths(pairs: list[Pair], src_vocab: Vocab, tgt_vocab: Vocab, max_positions: int, what: str) -> None:
    for i, (s, t) in enumerate(pairs):
        if len(src_vocab.encode(s)) > max_positions:
            raise ValueError(f"{what} pair {i}: the source has {len(s)} characters, more than max_positions="
                             f"{max_positions} (raise --max-positions)")
        if len(tgt_vocab.encode(t)) + 1 > max_positions:
            raise ValueError(f"{what} pair {i}: the target has {len(t)} characters; with bos that is more than "
                             f"max_positions={max_positions} (raise --max-positions)")


# ------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model: Transformer, pairs: list[Pair], src_vocab: Vocab, tgt_vocab: Vocab, device, *,
             batch_size: int = 256, max_examples: int | None = None, max_len: int | None = None,
             sample_index: int = 0) -> dict:
    """Loss on all ``pairs`` (mean per target token) and the exact-match accuracy of greedy translations of the
    first ``max_examples`` of them (all by default); ``sample`` is (source, reference, translation) of the
    translated pair ``sample_index`` (modulo their number: successive evals can show different pairs)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    n_translate = len(pairs) if max_examples is None else min(max_examples, len(pairs))
    total_loss, total_tokens, exact = 0.0, 0, 0
    first = None
    shown = sample_index % max(1, n_translate)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = encode_batch([s for s, _ in chunk], [t for _, t in chunk], src_vocab, tgt_vocab, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.loss(batch["src"], batch["tgt_in"], batch["tgt_out"], batch["src_pad_mask"],
                              reduction="sum")
        total_loss += float(loss)
        total_tokens += int((batch["tgt_out"] != PAD).sum())
        k = max(0, min(len(chunk), n_translate - start))
        if k == 0:
            continue
        limit = max_len or min(model.config.max_positions, batch["tgt_in"].shape[1] + 8)
        out = model.greedy_decode(batch["src"][:k], max_len=limit, src_pad_mask=batch["src_pad_mask"][:k])
        for i, ((s, t), ids) in enumerate(zip(chunk, out.tolist())):
            guess = tgt_vocab.decode(ids)
            exact += guess == t
            if start + i == shown:
                first = (s, t, guess)
    model.train(was_training)
    return {"loss": total_loss / max(1, total_tokens), "exact": exact / max(1, n_translate), "sample": first}


# ------------------------------------------------------------------------------------------- training
def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="genfast train translator",
                           description="Train an encoder-decoder Transformer on sentence pairs.")
    parser.add_argument("--data", type=Path, default=None,
                        help="TSV of source<TAB>target lines (default: built-in English -> French number phrases)")
    parser.add_argument("--valid-data", type=Path, default=None, help="TSV of validation pairs (default: a hashed "
                        "--valid-fraction of --data)")
    parser.add_argument("--valid-fraction", type=open_probability, default=0.05)
    parser.add_argument("--config", default="small", choices=list(PRESETS), help="model size preset (default small)")
    parser.add_argument("--max-positions", type=positive_int, default=None,
                        help="longest sequence (default: the preset's)")
    parser.add_argument("--dropout", type=open_probability, default=None, help="default: the preset's")
    parser.add_argument("--post-norm", action="store_true", help="the paper's post-LayerNorm (default: pre-LN)")
    parser.add_argument("--shared-vocab", action="store_true",
                        help="one character vocabulary and embedding table for both sides")
    parser.add_argument("--warmup", type=non_negative_int, default=None,
                        help="learning-rate warmup steps (default: the preset's, " + _defaults_text("warmup") + ")")
    parser.add_argument("--min-lr", type=non_negative_float, default=None,
                        help="learning rate at the end (default lr / 10)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.01)
    parser.add_argument("--grad-clip", type=non_negative_float, default=1.0, help="max gradient norm (0: no clipping)")
    parser.add_argument("--label-smoothing", type=open_probability, default=0.0)
    parser.add_argument("--eval-examples", type=positive_int, default=200,
                        help="valid pairs translated for the exact-match accuracy at each eval")
    add_train_args(parser, recipe="translator", steps=3000, batch_size=64, lr=TRAINING_DEFAULTS["small"]["lr"],
                   ops=OPS)
    # --lr defaults to the preset's too: None here, resolved by resolve_training_defaults.
    lr_action = next(action for action in parser._actions if action.dest == "lr")
    lr_action.default, lr_action.help = None, "learning rate (default: the preset's, " + _defaults_text("lr") + ")"
    mark_fixed(parser, "--data", "--valid-data", "--valid-fraction", "--config", "--max-positions", "--dropout",
               "--post-norm", "--shared-vocab")
    return parser


def _defaults_text(key: str) -> str:
    return ", ".join(f"{value:g} for {name}" for name, value in
                     ((name, TRAINING_DEFAULTS[name][key]) for name in PRESETS))


def resolve_training_defaults(args: argparse.Namespace, saved_args: dict | None) -> None:
    """Fill --lr and --warmup left unset: from the checkpoint's run on --resume (so the schedule continues as it
    began), else from the --config preset's TRAINING_DEFAULTS (the warmup at most a tenth of --steps)."""
    saved_args = saved_args if isinstance(saved_args, dict) else {}
    for key in ("lr", "warmup"):
        if getattr(args, key) is None:
            saved = saved_args.get(key)
            usable = isinstance(saved, (int, float)) and not isinstance(saved, bool) and saved >= 0
            preset = TRAINING_DEFAULTS[args.config][key]
            setattr(args, key, saved if usable else default_warmup(preset, args.steps) if key == "warmup" else preset)


def train_main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.valid_fraction == 0:
        parser.error("--valid-fraction must be in (0, 1), got 0")
    with start_run(parser, args, recipe="translator", ops=OPS) as run:
        resolve_training_defaults(args, run.saved_config.get("args") if run.resuming else None)
        try:
            train_pairs, valid_pairs = load_pairs(args)
            config, src_vocab, tgt_vocab = _model_setup(args, run, train_pairs)
            _check_lengths(train_pairs, src_vocab, tgt_vocab, config.max_positions, "training")
            _check_lengths(valid_pairs, src_vocab, tgt_vocab, config.max_positions, "valid")
        except (FileNotFoundError, ValueError) as exc:
            print(f"genfast train translator: error: {exc}", file=sys.stderr)
            return 2
        task = TranslatorTask(run, config, src_vocab, tgt_vocab, train_pairs, valid_pairs)
        params = sum(p.numel() for p in task.model.parameters())
        run.log(f"Transformer {args.config}: {params / 1e6:.2f}M parameters, vocabularies {src_vocab.size} -> "
                f"{tgt_vocab.size}, {len(train_pairs)} training pairs, {run.dist.world_size} process(es) on "
                f"{run.device}")
        return run.train(task)


def _model_setup(args, run: Run, train_pairs):
    """(config, src_vocab, tgt_vocab): from the checkpoint on --resume, else built from the data."""
    if run.resuming:
        return model_from_saved(run.saved_config)
    if args.shared_vocab:
        src_vocab = tgt_vocab = Vocab.train([s for s, _ in train_pairs] + [t for _, t in train_pairs])
    else:
        src_vocab = Vocab.train([s for s, _ in train_pairs])
        tgt_vocab = Vocab.train([t for _, t in train_pairs])
    overrides = dict(src_vocab_size=src_vocab.size, tgt_vocab_size=tgt_vocab.size, pre_norm=not args.post_norm,
                     share_embeddings=args.shared_vocab, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    if args.max_positions is not None:
        overrides["max_positions"] = args.max_positions
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    return TransformerConfig.preset(args.config, **overrides), src_vocab, tgt_vocab


def model_from_saved(saved: dict) -> tuple[TransformerConfig, Vocab, Vocab]:
    """The config and vocabularies a translator checkpoint's config.json holds (checked by read_run)."""
    tokenizers = saved.get("tokenizers")
    if not isinstance(tokenizers, dict):
        raise ValueError("the checkpoint's config.json has no 'tokenizers' entry: not a translator checkpoint")
    return (TransformerConfig.from_dict(saved["model"]), Vocab.from_json(tokenizers.get("source")),
            Vocab.from_json(tokenizers.get("target")))


class TranslatorTask(TrainTask):
    def __init__(self, run: Run, config: TransformerConfig, src_vocab: Vocab, tgt_vocab: Vocab,
                 train_pairs: list[Pair], valid_pairs: list[Pair]):
        args = run.args
        self.run, self.config, self.src_vocab, self.tgt_vocab = run, config, src_vocab, tgt_vocab
        self.train_pairs, self.valid_pairs = train_pairs, valid_pairs
        self.model = model = Transformer(config).to(run.device)
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        self.modules = {"model": model}
        self.optimizers = {"model": torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                                       {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                                                      betas=(0.9, 0.98), eps=1e-9)}
        self.wrapped = run.dist.wrap(model)
        self.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
        model.train()

    def config_dict(self) -> dict:
        args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.run.args).items()}
        return {"model": self.config.to_dict(), "args": args,
                "tokenizers": {"source": self.src_vocab.to_json(), "target": self.tgt_vocab.to_json()}}

    def train_step(self, step: int) -> dict:
        run, args, dist = self.run, self.run.args, self.run.dist
        g = batch_generator(args.seed, step)  # the same global batch on every rank, sharded below
        picks = torch.randint(len(self.train_pairs), (args.batch_size,), generator=g).tolist()
        chunk = [self.train_pairs[i] for i in picks]
        batch = encode_batch([s for s, _ in chunk], [t for _, t in chunk], self.src_vocab, self.tgt_vocab,
                             run.device)
        global_tokens = int((batch["tgt_out"] != PAD).sum())
        local = {name: dist.shard(t) for name, t in batch.items()}
        lr = warmup_cosine_lr(step, base_lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
                              min_lr=self.min_lr)
        optimizer = self.optimizers["model"]
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        with run.autocast():
            loss_sum = _summed_loss(self.wrapped, local, args.label_smoothing)
        # DDP averages gradients over ranks: scale so the result is sum over all tokens / global token count.
        (loss_sum * dist.world_size / global_tokens).backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = int((batch["src"] != PAD).sum()) + global_tokens
        return {"loss": loss_sum.detach() / global_tokens * dist.world_size, "lr": lr,
                "tok_s": tokens / max(time.perf_counter() - started, 1e-9)}

    def evaluate(self, step: int) -> bool:
        run, args = self.run, self.run.args
        if not run.verbose:
            return False
        # A different valid pair at each eval, drawn from the step: one fixed example (the first is "zero", the
        # hardest to get right) would hide progress, and so would index 0 for every run shorter than --sample-every.
        result = evaluate(self.model, self.valid_pairs, self.src_vocab, self.tgt_vocab, run.device,
                          max_examples=args.eval_examples, sample_index=random.Random(step).randrange(1 << 30))
        src, ref, guess = result["sample"]
        run.log(f"step {step}: valid loss {result['loss']:.4f} ({len(self.valid_pairs)} pairs), exact match "
                f"{result['exact']:.1%} (first {min(len(self.valid_pairs), args.eval_examples)}); {src!r} -> "
                f"{guess!r} (reference {ref!r})")
        return False


def _summed_loss(wrapped, batch, label_smoothing: float) -> torch.Tensor:
    """The summed token loss through the (possibly DDP-wrapped) model's forward, so DDP sees the call."""
    model = wrapped.module if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else wrapped
    logits = wrapped(batch["src"], batch["tgt_in"], batch["src_pad_mask"])
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["tgt_out"].flatten(),
                                             ignore_index=model.config.pad_id, label_smoothing=label_smoothing,
                                             reduction="sum")


# ------------------------------------------------------------------------------------------- translate
def load_translator(ckpt: str | Path, device="cpu", *,
                    allow_nonfinite: bool = False) -> tuple[Transformer, Vocab, Vocab]:
    """A trained translator and its vocabularies from a run folder (or its checkpoint/ folder)."""
    directory, saved = read_run(ckpt, "translator")
    config, src_vocab, tgt_vocab = model_from_saved(saved)
    model = build_and_load(lambda: Transformer(config), directory, "model", allow_nonfinite=allow_nonfinite)
    return model.to(device).eval(), src_vocab, tgt_vocab


def translate(model: Transformer, src_vocab: Vocab, tgt_vocab: Vocab, texts: list[str], *, beam: int = 1,
              max_len: int | None = None, length_penalty: float = 1.0) -> list[str]:
    """Translations of ``texts`` (one batch): greedy with beam=1, else beam search."""
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise ValueError("texts: need one or more non-empty strings to translate")
    device = model.positions.device
    batch = encode_batch([t.strip() for t in texts], None, src_vocab, tgt_vocab, device)
    limit = max_len or model.config.max_positions
    if beam == 1:
        out = model.greedy_decode(batch["src"], max_len=limit, src_pad_mask=batch["src_pad_mask"])
    else:
        out, _ = model.beam_search(batch["src"], beam_size=beam, max_len=limit, length_penalty=length_penalty,
                                   src_pad_mask=batch["src_pad_mask"])
    return [tgt_vocab.decode(ids) for ids in out.tolist()]


def translate_main(argv: list[str], prog: str = "genfast translate") -> int:
    parser = CommandParser(prog=prog, description="Translate text with a trained translator (one line of output "
                           "per input; reads lines from stdin when no TEXT is given).")
    parser.add_argument("--ckpt", type=Path, required=True, help="the --out folder of `genfast train translator`")
    parser.add_argument("--beam", type=positive_int, default=1, help="beam size (1: greedy decoding)")
    parser.add_argument("--length-penalty", type=non_negative_float, default=1.0,
                        help="GNMT length penalty alpha for beams")
    parser.add_argument("--max-len", type=positive_int, default=None, help="longest output (default: max_positions)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="load weights holding NaN or inf (refused otherwise): to debug a run that diverged")
    parser.add_argument("text", nargs="*", help="text to translate")
    args = parser.parse_args(argv)
    texts = args.text or [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not texts:
        parser.error("nothing to translate: give TEXT arguments or lines on stdin")
    device = resolve_device(parser, args.device)
    try:
        model, src_vocab, tgt_vocab = load_translator(args.ckpt, device,
                                                      allow_nonfinite=args.allow_nonfinite)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"{prog}: error: --ckpt: {exc}", file=sys.stderr)
        return 2
    try:
        for line in translate(model, src_vocab, tgt_vocab, texts, beam=args.beam, max_len=args.max_len,
                              length_penalty=args.length_penalty):
            print(line)
    except (FileNotFoundError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def sample_main(argv: list[str]) -> int:
    """`genfast sample translator` is `genfast translate`."""
    return translate_main(argv, prog="genfast sample translator")


__all__ = ["train_main", "translate_main", "sample_main", "translate", "load_translator", "evaluate", "Vocab"]
