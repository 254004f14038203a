"""genfast.data.tokenizers: round trips, save/load, errors, and GPT-2's tokenizer from vocab.json / merges.txt."""

import json

import pytest

from genfast.data.tokenizers import CHAR_FILE, CharTokenizer, HFTokenizer, load_tokenizer

TEXT = "def add(a, b):\n    return a + b  # ünïcode ✓\n"


def test_char_round_trip_and_order():
    tok = CharTokenizer.train(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.vocab_size == len(set(TEXT)) + 1  # + the unknown character, id 0
    assert tok.itos[1:] == sorted(set(TEXT))  # the same text gives the same ids, whatever the order seen
    assert CharTokenizer.train(reversed(list(TEXT))).itos == tok.itos
    assert tok.encode("a\x00") == [tok.stoi["a"], tok.unk_id]


def test_char_save_load(tmp_path):
    tok = CharTokenizer.train([TEXT, "xyz"])
    path = tok.save(tmp_path)
    assert path.name == CHAR_FILE
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.itos == tok.itos
    assert again.encode(TEXT) == tok.encode(TEXT)


def test_char_errors(tmp_path):
    with pytest.raises(ValueError, match="no characters"):
        CharTokenizer.train("")
    with pytest.raises(TypeError, match="texts: need strings"):
        CharTokenizer.train([b"bytes"])
    tok = CharTokenizer.train("ab")
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(3)
    with pytest.raises(ValueError, match="token id 3 is outside the vocabulary"):
        tok.decode([1, 3])
    (tmp_path / CHAR_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="is not a genfast character tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / CHAR_FILE).write_text(json.dumps({"itos": []}))
    with pytest.raises(ValueError, match="non-empty list of strings"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(tmp_path / "empty")


def test_bpe_train_round_trip_save_load(tmp_path):
    pytest.importorskip("tokenizers")
    corpus = [TEXT * 20, "the quick brown fox jumps over the lazy dog\n" * 20]
    tok = HFTokenizer.train_bpe(corpus, vocab_size=300)
    assert 256 < tok.vocab_size <= 300
    for text in (TEXT, "unseen: 日本語 and emoji 🙂", ""):
        assert tok.decode(tok.encode(text)) == text  # byte-level: any text round-trips
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges were learned
    assert tok.token_id("<|endoftext|>") is not None
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(TEXT) == tok.encode(TEXT) and again.vocab_size == tok.vocab_size


def test_bpe_errors(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(ValueError, match="vocab_size must be an int >= 257"):
        HFTokenizer.train_bpe(TEXT, vocab_size=100)
    tok = HFTokenizer.train_bpe(TEXT, vocab_size=270)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(None)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a readable tokenizer"):
        load_tokenizer(tmp_path)


def _gpt2_files(directory):
    """A tiny GPT-2-format tokenizer: the 256 byte symbols of GPT-2's byte-to-unicode map, plus a few merges."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r")]
    vocab = {s: i for i, s in enumerate(symbols)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab


def test_gpt2_files(tmp_path):
    pytest.importorskip("tokenizers")
    vocab = _gpt2_files(tmp_path)
    tok = HFTokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    ids = tok.encode("hello world")
    # "hell" merges to one token, " w" (Ġw) to one, "or" to one: h-e-l-l -> hell, o, Ġw, or, l, d
    assert ids == [vocab["hell"], vocab["o"], vocab["Ġw"], vocab["or"], vocab["l"], vocab["d"]]
    assert tok.decode(ids) == "hello world"
    assert tok.decode(tok.encode("ünï ✓")) == "ünï ✓"
    assert tok.vocab_size == len(vocab)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)  # found by load_tokenizer too
    assert load_tokenizer(tmp_path).encode("hello world") == ids


def test_gpt2_files_errors(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(FileNotFoundError, match="vocab_file: no file"):
        HFTokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text("[1, 2]")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nx y\n")
    with pytest.raises(ValueError, match="could not read a GPT-2 tokenizer"):
        HFTokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
