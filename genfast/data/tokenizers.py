"""Tokenizers for the language models: character-level, byte-level BPE trained locally, and GPT-2's own.

All share one small interface — ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``save(directory)`` and ``load_tokenizer(directory)`` — so the models and recipes need not care which one
they hold. The BPE and GPT-2 tokenizers use Hugging Face's ``tokenizers`` library (imported when used).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

CHAR_FILE = "char_tokenizer.json"
BPE_FILE = "tokenizer.json"


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError("the BPE and GPT-2 tokenizers need the `tokenizers` package "
                          "(pip install tokenizers), or use CharTokenizer") from exc
    return tokenizers


class CharTokenizer:
    """One id per character seen in the training text (sorted, so the same text gives the same ids).

    Characters not in the vocabulary encode to ``unk_id`` (id 0, printed as ``unk``).
    """

    def __init__(self, chars: Iterable[str], unk: str = "\ufffd"):
        chars = sorted(set(chars) - {unk})
        self.itos = [unk] + chars
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.unk_id = 0

    @classmethod
    def train(cls, texts: str | Iterable[str]) -> "CharTokenizer":
        if isinstance(texts, str):
            texts = [texts]
        chars: set[str] = set()
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts: need strings, got {type(text).__name__}")
            chars.update(text)
        if not chars:
            raise ValueError("texts: no characters to build a vocabulary from")
        return cls(chars)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return [self.stoi.get(c, self.unk_id) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise ValueError(f"ids: token id {i} is outside the vocabulary [0, {len(self.itos)})")
            out.append(self.itos[i])
        return "".join(out)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / CHAR_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"type": "char", "itos": self.itos}, ensure_ascii=False))
        return path


class HFTokenizer:
    """A byte-level BPE tokenizer of the ``tokenizers`` library (trained here, or GPT-2's from its files)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def train_bpe(cls, texts: str | Iterable[str], vocab_size: int = 1024, *,
                  special_tokens: tuple[str, ...] = ("<|endoftext|>",)) -> "HFTokenizer":
        """Train a byte-level BPE (GPT-2's scheme) on ``texts``; the 256 byte tokens are always present."""
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size must be an int >= {256 + len(special_tokens)} (bytes + special), "
                             f"got {vocab_size!r}")
        tk = _require_tokenizers()
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                         show_progress=False)
        tokenizer.train_from_iterator([texts] if isinstance(texts, str) else texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_gpt2_files(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike) -> "HFTokenizer":
        """GPT-2's tokenizer from local vocab.json and merges.txt (never a download)."""
        for name, path in (("vocab_file", vocab_file), ("merges_file", merges_file)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{name}: no file at {path}")
        tk = _require_tokenizers()
        try:
            model = tk.models.BPE.from_file(str(vocab_file), str(merges_file))
        except Exception as exc:
            raise ValueError(f"could not read a GPT-2 tokenizer from {vocab_file} and {merges_file}: {exc}") from exc
        tokenizer = tk.Tokenizer(model)
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self.tokenizer.decode(ids)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / BPE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path


def load_tokenizer(directory: str | os.PathLike) -> CharTokenizer | HFTokenizer:
    """The tokenizer saved in ``directory``: char_tokenizer.json, tokenizer.json, or GPT-2's vocab.json +
    merges.txt."""
    directory = Path(directory)
    if (directory / CHAR_FILE).is_file():
        try:
            data = json.loads((directory / CHAR_FILE).read_text())
            itos = data["itos"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{directory / CHAR_FILE} is not a genfast character tokenizer: {exc}") from exc
        if not isinstance(itos, list) or not itos or not all(isinstance(c, str) for c in itos):
            raise ValueError(f"{directory / CHAR_FILE}: itos must be a non-empty list of strings")
        tok = CharTokenizer(itos[1:], unk=itos[0])
        return tok
    if (directory / BPE_FILE).is_file():
        tk = _require_tokenizers()
        try:
            return HFTokenizer(tk.Tokenizer.from_file(str(directory / BPE_FILE)))
        except Exception as exc:
            raise ValueError(f"{directory / BPE_FILE} is not a readable tokenizer: {exc}") from exc
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return HFTokenizer.from_gpt2_files(directory / "vocab.json", directory / "merges.txt")
    raise FileNotFoundError(f"no tokenizer in {directory} (expected {CHAR_FILE}, {BPE_FILE}, "
                            "or vocab.json + merges.txt)")
