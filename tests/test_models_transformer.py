"""genfast.models.Transformer (encoder-decoder), its decoding, the number-phrase corpus and the translator recipe."""

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import genfast
from genfast.data.number_phrases import english, french, is_valid_number, number_phrase_splits
from genfast.data.parallel_text import read_tsv, split_pairs, write_tsv
from genfast.models import Transformer, TransformerConfig
from genfast.recipes import translator as recipe
from genfast.training import load_checkpoint, load_safetensors_state, save_checkpoint
from tests.conftest import backend_params

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig.preset("tiny", **{"src_vocab_size": 13, "tgt_vocab_size": 11, **overrides})
    return Transformer(cfg).eval()


def _spread(model: Transformer, std: float = 0.4, seed: int = 1) -> Transformer:
    """Random weights large enough that an untrained model's outputs vary with the input (and end with eos)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _reverse_task(model: Transformer, steps: int = 60, seed: int = 0) -> Transformer:
    """Train ``model`` briefly to reverse its source (tokens 3.. of the target vocabulary, lengths 1 to 6): a
    half-trained model whose outputs vary, end with eos at different steps, and leave beam search choices."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        lengths = torch.randint(1, 7, (16,), generator=g)
        body = torch.randint(3, cfg.tgt_vocab_size, (16, 6), generator=g)
        pad = torch.arange(6)[None, :] >= lengths[:, None]
        src = body.masked_fill(pad, 0)
        tgt = torch.zeros(16, 8, dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            tgt[i, :n + 2] = torch.tensor([1] + body[i, :n].flip(0).tolist() + [2])
        loss = model.loss(src, tgt[:, :-1], tgt[:, 1:], pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _batch(b=3, s=7, t=5, src_vocab=13, tgt_vocab=11, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, src_vocab, (b, s), generator=g)
    tgt_in = torch.randint(3, tgt_vocab, (b, t), generator=g)
    tgt_in[:, 0] = 1  # bos
    tgt_out = torch.randint(2, tgt_vocab, (b, t), generator=g)
    pad = torch.zeros(b, s, dtype=torch.bool)
    for i, n in enumerate(lengths or []):
        pad[i, n:] = True
    src = src.masked_fill(pad, 0)
    return src, tgt_in, tgt_out, pad


# ------------------------------------------------------------------------------------------- config
def test_config_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown options \['colour', 'n_layer'\]"):
        TransformerConfig.from_dict({"d_model": 64, "n_layer": 2, "colour": "red"})
    with pytest.raises(ValueError, match="unknown options"):
        TransformerConfig.preset("tiny", heads=2)
    with pytest.raises(ValueError, match="TransformerConfig.from_dict: need a dict, got str"):  # ModelConfig's rule
        TransformerConfig.from_dict("tiny")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        TransformerConfig.preset("huge")


@pytest.mark.parametrize("overrides, message", [
    ({"d_model": 30, "n_heads": 4}, "multiple of n_heads"),
    ({"n_heads": 0}, "n_heads must be an int >= 1"),
    ({"dropout": 1.0}, "dropout"),
    ({"share_embeddings": True, "src_vocab_size": 10, "tgt_vocab_size": 12}, "one vocabulary"),
    ({"eos_id": 0}, "must differ"),
    ({"bos_id": 99}, "bos_id"),
])
def test_config_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**overrides)


def test_config_round_trip():
    cfg = TransformerConfig.preset("small", src_vocab_size=40, tgt_vocab_size=50, pre_norm=False)
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------------- fused vs reference
def _run(model, backend, batch):
    src, tgt_in, tgt_out, pad = batch
    model.zero_grad(set_to_none=True)
    with genfast.backend(backend):
        logits = model(src, tgt_in, pad)
    loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=model.config.pad_id)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("device, backend", backend_params("attention"))
def test_fused_matches_reference(device, backend, pre_norm=True):
    """Logits, loss and every gradient of the model through a fused attention backend vs the reference (fp32),
    each measured against an fp64 ground truth: the fused error may be at most 2x the reference's + a small atol."""
    model = _spread(_model(pre_norm=pre_norm)).to(device).train()  # train(): dropout 0 in tiny, grads on
    # Odd lengths and a padded source: the masks reach the kernels.
    batch = tuple(x.to(device) for x in _batch(b=2, s=7, t=5, lengths=[7, 4]))
    ref = _run(model, "reference", batch)
    fused = _run(model, backend, batch)
    truth = _run(model.double(), "reference", batch)
    for what, r, f, t in (("logits", ref[0], fused[0], truth[0]), ("loss", ref[1], fused[1], truth[1])):
        ref_err, err = (r.double() - t).abs().max().item(), (f.double() - t).abs().max().item()
        assert err <= 2 * ref_err + 1e-6, (what, err, ref_err)
    for name, t in truth[2].items():
        scale = t.abs().max().item()
        ref_err = (ref[2][name].double() - t).abs().max().item()
        err = (fused[2][name].double() - t).abs().max().item()
        assert err <= 2 * ref_err + 1e-6 * scale, (name, err, ref_err, scale)


# ------------------------------------------------------------------------------------------- padding
# (The fused backends: test_fused_matches_reference runs them on a padded batch against this reference.)
@pytest.mark.parametrize("backend", ["reference"])
def test_source_padding_does_not_change_outputs(backend):
    model = _spread(_model())
    src, tgt_in, _, _ = _batch(b=2, s=5, t=4)
    extra = torch.zeros(2, 3, dtype=torch.long)  # three pad tokens appended
    src_padded = torch.cat([src, extra], dim=1)
    pad = torch.cat([torch.zeros(2, 5, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)], dim=1)
    with genfast.backend(backend), torch.no_grad():
        memory = model.encode(src)
        memory_padded = model.encode(src_padded, pad)
        logits = model(src, tgt_in)
        logits_padded = model(src_padded, tgt_in, pad)
    torch.testing.assert_close(memory_padded[:, :5], memory, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_padded, logits, rtol=1e-5, atol=1e-5)
    # And the padding changes something when it is not masked (the test can fail).
    with genfast.backend(backend), torch.no_grad():
        assert not torch.allclose(model(src_padded, tgt_in), logits, atol=1e-3)
    out = model.greedy_decode(src_padded, max_len=6, src_pad_mask=pad)
    assert torch.equal(out, model.greedy_decode(src, max_len=6))


# ------------------------------------------------------------------------------------------- decoding
@functools.lru_cache(maxsize=None)
def _trained(seed: int = 0, steps: int = 60, tgt_vocab_size: int = 11, pre_norm: bool = True) -> Transformer:
    return _reverse_task(_model(seed=seed, tgt_vocab_size=tgt_vocab_size, pre_norm=pre_norm), steps, seed)


def _ragged(vocab: int = 11, b: int = 5):
    src, _, _, pad = _batch(b=b, s=6, lengths=[6, 3, 5, 1, 4][:b], seed=3, src_vocab=vocab)
    return src, pad


@pytest.mark.parametrize("pre_norm", [True, False])
def test_greedy_with_cache_equals_without(pre_norm):
    model = _trained(pre_norm=pre_norm)
    src, pad = _ragged()
    cached = model.greedy_decode(src, max_len=12, src_pad_mask=pad)
    full = model.greedy_decode(src, max_len=12, src_pad_mask=pad, use_cache=False)
    assert torch.equal(cached, full)
    assert (cached == model.config.eos_id).any()  # the outputs end: eos is exercised


def _greedy_step_by_step(model: Transformer, src, pad, max_len: int) -> torch.Tensor:
    """Greedy decoding written out: the whole prefix through model.decode at each step, stop once all ended."""
    cfg = model.config
    memory = model.encode(src, pad)
    tokens = torch.full((src.shape[0], 1), cfg.bos_id)
    finished = torch.zeros(src.shape[0], dtype=torch.bool)
    for _ in range(max_len):
        logits = model.decode(tokens, memory, pad)[:, -1].float()
        logits[:, [cfg.pad_id, cfg.bos_id]] = -math.inf
        nxt = torch.where(finished, cfg.pad_id, logits.argmax(-1))
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        finished |= nxt == cfg.eos_id
        if finished.all():
            break
    return tokens[:, 1:]


@pytest.mark.parametrize("max_len", [1, 3, 9, 12, 17])
def test_greedy_equals_the_written_out_loop(max_len):
    """The cached, static-shape loop (the stop check every few tokens, then trimmed) gives the tokens and the
    length of the plain loop, whether the rows end before, at or after a check, or are cut at max_len."""
    model = _trained()
    src, pad = _ragged()
    want = _greedy_step_by_step(model, src, pad, max_len)
    for use_cache in (True, False):
        got = model.greedy_decode(src, max_len=max_len, src_pad_mask=pad, use_cache=use_cache)
        assert torch.equal(got, want), (use_cache, got, want)


def test_greedy_equals_beam_of_one():
    model = _trained()
    src, pad = _ragged()
    greedy = model.greedy_decode(src, max_len=12, src_pad_mask=pad)
    beam, score = model.beam_search(src, beam_size=1, max_len=12, src_pad_mask=pad)
    assert torch.equal(beam, greedy)
    torch.testing.assert_close(score, model.sequence_log_prob(src, greedy, pad))


@pytest.mark.parametrize("seed, steps", [(0, 60), (1, 30), (2, 15)])
def test_beam_at_least_as_likely_as_greedy(seed, steps):
    model = _trained(seed, steps)
    src, pad = _ragged()
    greedy = model.greedy_decode(src, max_len=10, src_pad_mask=pad)
    greedy_lp = model.sequence_log_prob(src, greedy, pad)
    beam, score = model.beam_search(src, beam_size=5, max_len=10, length_penalty=0.0, src_pad_mask=pad)
    torch.testing.assert_close(score, model.sequence_log_prob(src, beam, pad))  # the score is the sequence's
    assert (score >= greedy_lp - 1e-5).all(), (score, greedy_lp)
    assert (score > greedy_lp + 1e-2).any()  # and beats it somewhere: a beam stuck on the greedy path would fail
    cached = model.beam_search(src, beam_size=5, max_len=10, length_penalty=0.0, src_pad_mask=pad, use_cache=False)
    assert torch.equal(cached[0], beam)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_is_exhaustive_search(length_penalty):
    """With a beam wider than the number of hypotheses, beam search returns the exact best of them all."""
    model = _trained(tgt_vocab_size=5, steps=20)  # emits eos (2), 3 or 4
    src, pad = _ragged(vocab=5)
    max_len = 3
    tokens, score = model.beam_search(src, beam_size=27, max_len=max_len, length_penalty=length_penalty,
                                      src_pad_mask=pad)
    hypotheses = []  # every sequence the decoder can produce: ends with eos, or is cut at max_len
    for n in range(1, max_len + 1):
        for body in itertools.product([3, 4], repeat=n - 1):
            hypotheses.append(list(body) + [2] + [0] * (max_len - n))
        if n == max_len:
            hypotheses += [list(body) for body in itertools.product([3, 4], repeat=n)]
    for i in range(src.shape[0]):
        cand = torch.tensor(hypotheses)
        lp = model.sequence_log_prob(src[i:i + 1].expand(len(cand), -1), cand,
                                     pad[i:i + 1].expand(len(cand), -1))
        lengths = torch.tensor([h.index(2) + 1 if 2 in h else max_len for h in hypotheses])
        best = (lp / ((5.0 + lengths) / 6.0) ** length_penalty).argmax()
        got = tokens[i].tolist() + [0] * (max_len - tokens.shape[1])
        assert got == hypotheses[best], (i, got, hypotheses[best])
        torch.testing.assert_close(score[i], lp[best])


def test_decoding_on_fused_backend_matches_reference():
    backends = [p.values[1] for p in backend_params("attention")]
    if not backends:
        pytest.skip("no fused attention backend here")
    model = _trained()
    src, pad = _ragged(b=2)
    with genfast.backend("reference"):
        want = model.beam_search(src, beam_size=2, max_len=3, src_pad_mask=pad)
    with genfast.backend(backends[0]):  # the KV-cached decoder's attention and the cross-attention, fused
        got = model.beam_search(src, beam_size=2, max_len=3, src_pad_mask=pad)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_shared_embeddings_and_untied_output():
    shared = _model(src_vocab_size=11, share_embeddings=True)
    assert shared.src_embed is shared.tgt_embed
    untied = _model(tie_output=False)
    assert untied.lm_head is not None
    src, tgt_in, tgt_out, pad = _batch(src_vocab=11)
    for m in (shared, untied):
        assert m(src, tgt_in, pad).shape == (3, 5, 11)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    model = _model()
    long_src = torch.full((1, model.config.max_positions + 1), 5)
    with pytest.raises(ValueError, match="more than max_positions=64"):
        model(long_src, torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="more than max_positions"):
        model.greedy_decode(long_src)
    with pytest.raises(ValueError, match="max_len=65 exceeds max_positions=64"):
        model.greedy_decode(torch.full((1, 3), 5), max_len=65)
    with pytest.raises(ValueError, match="src must be an int64 tensor"):
        model(torch.rand(2, 3), torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="src_pad_mask has shape"):
        model(torch.full((2, 3), 5), torch.ones(2, 2, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="beam_size must be an int >= 1"):
        model.beam_search(torch.full((1, 3), 5), beam_size=0)
    with pytest.raises(ValueError, match="batch"):
        model(torch.full((2, 3), 5), torch.ones(3, 2, dtype=torch.long))


# ------------------------------------------------------------------------------------------- number phrases
@pytest.mark.parametrize("n, en, fr", [
    (0, "zero", "zéro"), (17, "seventeen", "dix-sept"), (21, "twenty-one", "vingt et un"),
    (71, "seventy-one", "soixante et onze"), (75, "seventy-five", "soixante-quinze"),
    (80, "eighty", "quatre-vingts"), (81, "eighty-one", "quatre-vingt-un"), (91, "ninety-one", "quatre-vingt-onze"),
    (100, "one hundred", "cent"), (200, "two hundred", "deux cents"), (201, "two hundred and one", "deux cent un"),
    (321, "three hundred and twenty-one", "trois cent vingt et un"), (480, "four hundred and eighty",
                                                                      "quatre cent quatre-vingts"),
    (1000, "one thousand", "mille"), (1005, "one thousand and five", "mille cinq"),
    (2000, "two thousand", "deux mille"), (9999, "nine thousand nine hundred and ninety-nine",
                                           "neuf mille neuf cent quatre-vingt-dix-neuf"),
])
def test_number_phrases(n, en, fr):
    assert english(n) == en
    assert french(n) == fr


def test_number_phrase_split_is_fixed_and_disjoint():
    train, valid = number_phrase_splits()
    assert len(train) + len(valid) == 10000 and 400 < len(valid) < 600
    assert not set(train) & set(valid)
    assert ("zero", "zéro") in valid and is_valid_number(0)  # a fixed function of the number
    with pytest.raises(ValueError, match="n must be in"):
        french(10000)


def test_tsv_round_trip_and_errors(tmp_path):
    pairs = [("one", "un"), ("two", "deux"), ("three", "trois")]
    path = write_tsv(pairs, tmp_path / "p.tsv")
    assert read_tsv(path) == pairs
    train, valid = split_pairs(pairs * 10, 0.3)
    assert train and valid and not set(train) & set(valid)  # duplicates stay on one side
    assert split_pairs(pairs * 10, 0.01)[1] and split_pairs(pairs * 10, 0.99)[0]  # never an empty side
    with pytest.raises(ValueError, match="2 distinct pairs"):
        split_pairs(pairs[:1] * 3)
    with pytest.raises(FileNotFoundError, match="no parallel-text file"):
        read_tsv(tmp_path / "missing.tsv")
    (tmp_path / "notab.tsv").write_text("one\tun\ntwo deux\n")
    with pytest.raises(ValueError, match=r"notab.tsv:2: expected one tab between source and target, found 0"):
        read_tsv(tmp_path / "notab.tsv")
    (tmp_path / "empty.tsv").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no sentence pairs"):
        read_tsv(tmp_path / "empty.tsv")
    (tmp_path / "side.tsv").write_text("one\t \n")
    with pytest.raises(ValueError, match="side.tsv:1: the target side is empty"):
        read_tsv(tmp_path / "side.tsv")


# ------------------------------------------------------------------------------------------- recipe
TINY = ["--config", "tiny", "--batch-size", "32", "--quiet", "--eval-examples", "16", "--device", "cpu"]


@pytest.mark.slow
def test_training_reaches_loss_bound(tmp_path):
    """200 steps of the tiny model (~100k parameters) on the number phrases with the tiny preset's own defaults
    (lr 3e-3, warmup 20, no dropout): the valid loss, ln(36) ~ 3.6 nats per character at the start, falls below 0.6
    on the 496 valid pairs (seen here: 0.38 at step 200, as the README says; 0.81 with the small preset's lr 1e-3
    and warmup 100, which fails the bound)."""
    out = tmp_path / "run"
    assert recipe.train_main(TINY + ["--steps", "200", "--out", str(out), "--save-every", "1000",
                                     "--sample-every", "1000"]) == 0
    model, src_vocab, tgt_vocab = recipe.load_translator(out)
    _, valid = number_phrase_splits()
    result = recipe.evaluate(model, valid, src_vocab, tgt_vocab, "cpu", max_examples=8)
    assert result["loss"] < 0.6, result


def test_eval_samples_vary(tmp_path, capsys):
    """Each eval prints a sample drawn from its step: the evals at steps 3 and 4 (the last) show two different valid
    pairs, neither the first ("zero", the hardest), which step // sample_every * 37 showed at the end of every run
    shorter than --sample-every, and twice here."""
    import re

    args = [a for a in TINY if a != "--quiet"] + ["--steps", "4", "--sample-every", "3", "--eval-examples", "200",
                                                  "--out", str(tmp_path / "run")]
    assert recipe.train_main(args) == 0
    output = capsys.readouterr()
    shown = re.findall(r"step (\d+): valid loss .*?; '([^']*)' ->", output.out + output.err)
    assert [step for step, _ in shown] == ["3", "4"], shown
    assert shown[0][1] != shown[1][1] and "zero" not in {source for _, source in shown}


def test_resume_equals_uninterrupted(tmp_path):
    """Stopping after step 3 and resuming gives bitwise the weights of an uninterrupted 6-step run (with dropout
    on, so the RNG state must come back too)."""
    common = TINY + ["--steps", "6", "--dropout", "0.1", "--save-every", "2", "--sample-every", "4"]
    assert recipe.train_main(common + ["--out", str(tmp_path / "a")]) == 0
    assert recipe.train_main(common + ["--out", str(tmp_path / "b"), "--stop-after", "3"]) == 0
    mid = load_safetensors_state(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert recipe.train_main(common + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    a = load_safetensors_state(tmp_path / "a" / "checkpoint" / "model.safetensors")
    b = load_safetensors_state(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], mid[k]) for k in a)  # the resumed half did train
    trainer, _ = load_checkpoint(tmp_path / "b" / "checkpoint")
    assert trainer["step"] == 6


def test_cli_train_then_translate(tmp_path, capsys):
    from genfast.cli import main

    data = write_tsv([(english(n), french(n)) for n in range(0, 400, 3)], tmp_path / "pairs.tsv")
    out = tmp_path / "run"
    assert main(["train", "translator", "--data", str(data), *TINY, "--steps", "3", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["translate", "--ckpt", str(out), "twenty-one", "three hundred and five"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert main(["sample", "translator", "--ckpt", str(out / "checkpoint"), "--beam", "3", "seven"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_cli_errors(tmp_path, capsys):
    from genfast.cli import main

    bad = tmp_path / "bad.tsv"
    bad.write_text("one un\n")
    assert main(["train", "translator", "--data", str(bad), *TINY, "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    assert "expected one tab" in capsys.readouterr().err
    assert main(["train", "translator", "--data", str(tmp_path / "nope.tsv"), *TINY, "--out",
                 str(tmp_path / "r")]) == 2
    assert "no parallel-text file" in capsys.readouterr().err
    # A checkpoint of another architecture.
    other = tmp_path / "gpt"
    save_checkpoint(other / "checkpoint", modules={"model": torch.nn.Linear(2, 2)},
                    config={"format_version": 2, "recipe": "gpt", "model": {}})
    assert main(["translate", "--ckpt", str(other), "one"]) == 2
    assert "holds a 'gpt' checkpoint, not a translator one" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a translator"):
        recipe.load_translator(other)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        recipe.load_translator(tmp_path / "nowhere")


def test_source_longer_than_max_positions_in_data(tmp_path, capsys):
    data = write_tsv([("x" * 80, "y"), ("a", "b"), ("c", "d")], tmp_path / "long.tsv")
    args = ["--data", str(data), *TINY, "--steps", "1", "--out", str(tmp_path / "r")]
    assert recipe.train_main(args) == 2
    assert "more than max_positions=64" in capsys.readouterr().err


def test_greedy_loss_sum_is_global_token_normalised():
    """The recipe's loss: summed over tokens, so shards of a batch add up to the whole batch's gradient."""
    model = _spread(_model()).train()
    src, tgt_in, tgt_out, pad = _batch(b=4, lengths=[7, 2, 5, 3], seed=5)
    tgt_out[1, 3:] = 0  # padded targets are ignored
    whole = model.loss(src, tgt_in, tgt_out, pad)
    parts = sum(model.loss(src[i:i + 2], tgt_in[i:i + 2], tgt_out[i:i + 2], pad[i:i + 2], reduction="sum")
                for i in (0, 2))
    torch.testing.assert_close(parts / (tgt_out != 0).sum(), whole)
    assert math.isfinite(whole.item())


@pytest.mark.slow
def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) trains the weights one process trains on the whole batch: the loss is
    normalised by the global token count, so DDP's averaged gradients are the whole batch's."""
    import os
    import subprocess
    import sys

    args = TINY + ["--steps", "3", "--batch-size", "8", "--dropout", "0", "--sample-every", "100"]
    assert recipe.train_main(args + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "genfast", "train", "translator", *args,
                           "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_safetensors_state(tmp_path / "one" / "checkpoint" / "model.safetensors")
    two = load_safetensors_state(tmp_path / "two" / "checkpoint" / "model.safetensors")
    # The key biases get no gradient (softmax ignores a shift shared by all keys) but rounding noise, which Adam
    # turns into lr-sized steps whose sign depends on the summation order: they are left out, the rest must agree.
    d = TransformerConfig.preset("tiny").d_model
    for state in (one, two):
        for key in state:
            if key.endswith("qkv.bias"):
                state[key][d:2 * d] = 0
            elif key.endswith("kv.bias"):
                state[key][:d] = 0
    bad = {}
    for key in one:  # the all-reduce sums in another order: equal up to fp32 rounding
        err = (two[key] - one[key]).abs().max().item()
        if err > 1e-5 * one[key].abs().max().item() + 1e-6:
            bad[key] = err
    assert not bad, bad
