"""genfast.models.GPT: backends agree, Hugging Face GPT-2 checkpoints load and save, generation with the KV cache
(greedy == no cache, left padding == separate runs, streaming), training reaches a loss bound, exact resume, DDP
gradients == one process, and clear errors for bad input."""

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch

import genfast
from genfast.models import GPT, GPTConfig
from genfast.recipes import gpt as recipe
from tests.conftest import serving_backends

V, CTX = 61, 48
SMALL = dict(vocab_size=V, block_size=CTX, n_layer=2, n_head=2, n_embd=32)
FUSED = serving_backends("attention", "cpu") + ["auto"]  # on CPU: Triton in its interpreter, and what auto picks


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SMALL, **overrides})).eval()


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def hf_model(model: GPT, directory: Path, dtype=torch.float64):
    """transformers' GPT2LMHeadModel on ``model``'s weights (through save_pretrained), in ``dtype``."""
    transformers = pytest.importorskip("transformers")
    model.save_pretrained(directory)
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager")
    return hf.to(dtype).eval()


# ------------------------------------------------------------------------------------------ config
def test_presets_have_gpt2_sizes():
    with torch.device("meta"):  # shapes only: no memory, no init cost
        assert GPT(GPTConfig.preset("gpt2")).num_parameters(non_embedding=False) == 124_439_808
        assert GPT(GPTConfig.preset("gpt2-medium")).num_parameters(non_embedding=False) == 354_823_168
    tiny = GPTConfig.preset("tiny", vocab_size=100)
    assert (tiny.n_layer, tiny.n_embd, tiny.vocab_size) == (4, 128, 100)
    assert GPTConfig.from_dict(tiny.to_dict()) == tiny


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown options \['n_embed', 'nlayers'\]"):
        GPTConfig.from_dict({"n_embed": 64, "nlayers": 2})
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        GPTConfig.preset("gpt5")
    with pytest.raises(ValueError, match="unknown options"):
        GPTConfig.preset("tiny", heads=3)
    with pytest.raises(ValueError, match="GPTConfig.from_dict: need a dict, got list"):  # ModelConfig's rule
        GPTConfig.from_dict([("n_layer", 2)])
    with pytest.raises(ValueError, match="n_embd=30 must be a multiple of n_head=4"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="vocab_size must be an int >= 1"):
        GPTConfig(vocab_size=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        GPTConfig(dropout=1.0)
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        GPT({"n_layer": 2})


# ------------------------------------------------------------------------------------------ backends
@pytest.mark.parametrize("backend", FUSED)
def test_backends_agree_logits_loss_grads(backend, tmp_path):
    """Each backend's logits, loss and gradients are within 2x the reference's error (+ a small atol) of
    transformers' GPT-2 computed in float64 on the same weights."""
    model = small_gpt()
    hf = hf_model(model, tmp_path)
    idx, targets = tokens(2, 13), tokens(2, 13, seed=2)
    targets[0, :3] = -1  # ignored positions

    out = hf(idx, labels=None)
    truth_loss = torch.nn.functional.cross_entropy(out.logits[:, :].flatten(0, 1), targets.flatten(), ignore_index=-1)
    truth_loss.backward()
    truth = {"logits": out.logits.detach(), "loss": truth_loss.detach()}
    for name, p in hf.named_parameters():
        g = p.grad.t() if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else p.grad
        truth[name] = g

    def run(backend_name):
        model.zero_grad()
        with genfast.backend(backend_name):
            logits, loss = model(idx, targets)
            loss.backward()
        got = {"logits": logits.detach(), "loss": loss.detach()}
        params = dict(model.named_parameters())
        for name in truth:
            if name in params:
                got[name] = params[name].grad.clone()
        return got

    ref, fused = run("reference"), run(backend)
    assert set(ref) == set(truth), set(truth) ^ set(ref)
    for name, want in truth.items():
        err_ref = (ref[name].double() - want).abs().max().item()
        err = (fused[name].double() - want).abs().max().item()
        assert err <= 2 * err_ref + 1e-6, (name, err, err_ref)
    assert ref["loss"].item() == pytest.approx(truth["loss"].item(), abs=1e-5)


# ------------------------------------------------------------------------------------------ Hugging Face
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_from_pretrained_matches_transformers(weights, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.GPT2Config(vocab_size=V, n_positions=CTX, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                     layer_norm_epsilon=1e-4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    if weights == "safetensors":
        hf.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
    else:
        # The layout of OpenAI's original files: GPT2Model keys (no "transformer." prefix), the causal-mask buffer.
        config.save_pretrained(tmp_path)
        state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        state["h.0.attn.bias"] = torch.ones(1, 1, CTX, CTX).tril()
        torch.save(state, tmp_path / "pytorch_model.bin")
    model = GPT.from_pretrained(tmp_path)
    assert model.config.n_inner == 48 and model.config.layer_norm_epsilon == 1e-4
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = tokens(3, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-5)
        # and greedy generation gives transformers' greedy tokens
        want = hf.generate(idx, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(idx),
                           pad_token_id=0)
    assert torch.equal(model.generate(idx, 8, temperature=0.0), want)


def test_save_pretrained_round_trip(tmp_path):
    model = small_gpt(seed=4)
    hf = hf_model(model, tmp_path, dtype=torch.float32)  # transformers loads what we wrote
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_positions"] == CTX
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    idx = tokens(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=1e-5, atol=1e-5)
    again = GPT.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_from_pretrained_rejects_other_architectures(tmp_path):
    transformers = pytest.importorskip("transformers")
    neo = tmp_path / "neo"
    transformers.GPTNeoConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=2,
                              attention_types=[[["global"], 2]]).save_pretrained(neo)
    torch.save({"x": torch.zeros(1)}, neo / "pytorch_model.bin")
    with pytest.raises(ValueError, match="'gpt_neo' model, not GPT-2"):
        GPT.from_pretrained(neo)
    # a config that says gpt2 over the weights of something else
    wrong = tmp_path / "wrong"
    small_gpt().save_pretrained(wrong)
    from safetensors.torch import save_file

    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(wrong / "model.safetensors"))
    with pytest.raises(ValueError, match="not a GPT's for its config.json"):
        GPT.from_pretrained(wrong)
    # a folder with neither a run's config (format_version, recipe) nor a Hugging Face one
    genfast.training.save_checkpoint(tmp_path / "ckpt", modules={"model": small_gpt()}, config={"model": SMALL})
    with pytest.raises(ValueError, match="not GPT-2"):
        GPT.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPT.from_pretrained(tmp_path / "nothing")
    bad = tmp_path / "exact_gelu"
    small_gpt().save_pretrained(bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function='relu'"):
        GPT.from_pretrained(bad)


def _run_folder(out: Path, model: GPT, **config_overrides) -> Path:
    """A run folder in the layout `genfast train gpt` writes: <out>/checkpoint/{config.json, model.safetensors}."""
    config = {"format_version": 2, "recipe": "gpt", "model": model.config.to_dict(), "tokenizer": "bytes",
              **config_overrides}
    genfast.training.save_checkpoint(out / "checkpoint", modules={"model": model}, config=config)
    return out


def test_from_pretrained_reads_a_run_folder(tmp_path):
    """GPT.from_pretrained(run_dir), or its checkpoint folder: the model that was saved."""
    model = small_gpt(seed=3, dropout=0.1)
    out = _run_folder(tmp_path / "run", model)
    for path in (out, out / "checkpoint"):
        again = GPT.from_pretrained(path)
        assert again.config == GPTConfig(**{**SMALL, "dropout": 0.0})
        for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(a, b), name
        assert again.lm_head.weight is again.transformer.wte.weight


def test_from_pretrained_finds_and_checks_a_run_folder_as_every_loader_does(tmp_path):
    """Issue 28: one reader of run folders (genfast.models._checkpoint): the checkpoint a crash left displaced
    between a save's two renames is found, and a run of an older format gets the converter's command."""
    model = small_gpt(seed=5)
    out = _run_folder(tmp_path / "run", model)
    os.replace(out / "checkpoint", out / ".checkpoint.genfast-old")  # killed between the two renames
    again = GPT.from_pretrained(out)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    old = _run_folder(tmp_path / "old", model)
    config_file = old / "checkpoint" / "config.json"
    config = json.loads(config_file.read_text())
    del config["format_version"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="convert it with `python -m genfast.training.convert") as info:
        GPT.from_pretrained(old)
    assert str(config_file) in str(info.value)


def _hostile_hf(tmp_path, **overrides) -> Path:
    folder = tmp_path / "hf"
    small_gpt().save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **overrides}))
    return folder


@pytest.mark.parametrize("layout", ["hf", "run"])
@pytest.mark.parametrize("overrides, match", [
    ({"n_layer": 100000}, r"key '(model\.)?n_layer' must be an int in \[1, 1024\], got 100000"),
    ({"vocab_size": 10**12}, r"key '(model\.)?vocab_size' must be an int in \[1, 16777216\]"),
    ({"n_layer": "12"}, r"key '(model\.)?n_layer' must be an int .* got '12'"),
    ({"n_embd": [[[[1]]]]}, r"key '(model\.)?n_embd' must be an int"),
    ({"n_layer": 3}, r"missing \['transformer\.h\.2\."),  # in bounds, but not what the weights hold
    ({"vocab_size": V + 1}, r"transformer\.wte\.weight \(61, 32\) \(config.json needs \(62, 32\)\)"),
])
def test_from_pretrained_checks_config_before_allocating(tmp_path, monkeypatch, layout, overrides, match):
    """Issue 18 #12: a hostile config.json is refused from the file and the weights' header alone: the model is
    never built (today n_layer=100000 or vocab_size=10**12 exhaust memory first)."""
    if layout == "hf":
        folder = _hostile_hf(tmp_path, **{{"block_size": "n_positions"}.get(k, k): v for k, v in overrides.items()})
    else:
        model = small_gpt()
        folder = _run_folder(tmp_path / "run", model)
        config_file = folder / "checkpoint" / "config.json"
        config = json.loads(config_file.read_text())
        config["model"].update(overrides)
        config_file.write_text(json.dumps(config))

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked against the weights")

    monkeypatch.setattr(GPT, "__init__", never)
    with pytest.raises(ValueError, match=match) as info:
        GPT.from_pretrained(folder)
    assert "config.json" in str(info.value) or "model.safetensors" in str(info.value)


@pytest.mark.parametrize("config, match", [
    ("[" * 50000 + "]" * 50000, "nested too deeply"),  # RecursionError today
    ('{"model_type": "gpt2", "n_layer": ' + "[" * 100 + "]" * 100 + "}", "nested more than"),
    ('{"model_type": "gpt2", "layer_norm_epsilon": "small"}', "key 'layer_norm_epsilon' must be a number"),
    ('{"format_version": 2, "recipe": "translator", "model": {}}', "key 'recipe' is 'translator'"),
    ('{"format_version": 7, "recipe": "gpt", "model": {}}', "key 'format_version' is 7"),
    ('{"format_version": 2, "recipe": "gpt", "model": [1]}', "key 'model' must be an object"),
    ('{"format_version": 2, "recipe": "gpt", "model": {"n_layers": 2}}', r"unknown fields \['n_layers'\]"),
    ('{"format_version": 2, "recipe": "gpt", "model": {"bias": "yes"}}', "key 'model': GPTConfig: bias"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_from_pretrained_malformed_config_names_file_and_key(tmp_path, config, match):
    small_gpt().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ValueError, match=match) as info:
        GPT.from_pretrained(tmp_path)
    assert "config.json" in str(info.value)


def test_forward_refuses_token_ids_outside_the_vocabulary():
    """Issue 18 #11: an id >= vocab_size (or < 0) is a ValueError naming idx, not a raw IndexError."""
    model = small_gpt()
    for bad in (V, V + 100, -1):
        idx = tokens(2, 5)
        idx[1, 3] = bad
        with pytest.raises(ValueError, match=rf"idx must hold token ids in \[0, vocab_size={V}\)"):
            model(idx)


# ------------------------------------------------------------------------------------------ generation
def greedy_without_cache(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_generate_with_cache_equals_without(backend):
    model = small_gpt(seed=5)
    idx = tokens(2, 19)  # a prefill longer than the decode kernel's 16 new tokens
    with genfast.backend(backend):
        got = model.generate(idx, 10, temperature=0.0)
    assert torch.equal(got, greedy_without_cache(model, idx, 10))
    short = tokens(2, 3, seed=6)  # a prefill that the decode kernel serves
    with genfast.backend(backend):
        assert torch.equal(model.generate(short, 6, temperature=0.0), greedy_without_cache(model, short, 6))


@pytest.mark.parametrize("knobs", [dict(temperature=0.0), dict(temperature=0.9, top_k=10, top_p=0.9),
                                   dict(temperature=0.7, repetition_penalty=1.3, min_p=0.05)])
def test_left_padded_batch_equals_separate_runs(knobs):
    """Row i of a left-padded batch == prompt i run without padding. Sampling draws row b's noise from the step's
    seed at offset b * V, so the unpadded run is a batch of prompt i repeated, whose row i sees the same noise."""
    model = small_gpt(seed=7)
    prompts = [tokens(1, n, seed=10 + n)[0] for n in (9, 4, 12)]
    b, t = len(prompts), max(len(p) for p in prompts)
    idx = torch.full((b, t), 5, dtype=torch.int64)  # padding ids must not matter (nor count for the penalty)
    mask = torch.zeros(b, t, dtype=torch.int64)
    for i, p in enumerate(prompts):
        idx[i, t - len(p):], mask[i, t - len(p):] = p, 1
    batch = model.generate(idx, 7, attention_mask=mask, generator=torch.Generator().manual_seed(0), **knobs)
    assert torch.equal(batch[:, :t], idx)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None].repeat(b, 1), 7, generator=torch.Generator().manual_seed(0), **knobs)
        assert torch.equal(batch[i, t:], alone[i, len(p):]), i


def _left_padded(prompts):
    b, t = len(prompts), max(len(p) for p in prompts)
    idx = torch.full((b, t), 5, dtype=torch.int64)
    mask = torch.zeros(b, t, dtype=torch.int64)
    for i, p in enumerate(prompts):
        idx[i, t - len(p):], mask[i, t - len(p):] = p, 1
    return idx, mask


# fp32 (bitwise equal on a CPU: the prefill's matmuls did not depend on the batch here; genfast's attention ops take
# no fp64, so there is no fp64 fallback to test).
@pytest.mark.parametrize("backend", FUSED)
def test_seeded_prompt_gets_the_same_tokens_alone_and_in_a_batch(backend):
    """seed= (issue 30): a prompt's sampled continuation with its seed is identical alone and at place 2 of a batch
    with 4 other prompts of different lengths (left-padded), with per-row seeds and batch-invariant decode. The
    generator= path draws row b's noise at offset b * V of one stream, so the same prompt moves its tokens."""
    model = small_gpt(seed=11)
    knobs = dict(temperature=0.9, top_k=20, top_p=0.95)
    prompts = [tokens(1, n, seed=20 + n)[0] for n in (3, 12, 7, 5, 20)]
    idx, mask = _left_padded(prompts)
    seeds = torch.tensor([101, -7, 2 ** 62, 0, 55])
    with genfast.backend(backend):
        batch = model.generate(idx, 12, attention_mask=mask, seed=seeds, **knobs)
        alone = model.generate(prompts[2][None], 12, seed=seeds[2:3], **knobs)
        # An int seed means seed, seed + 1, ... per row; a row's stream is its own from its first new token on.
        assert torch.equal(model.generate(idx, 4, attention_mask=mask, seed=100, **knobs)[:, -4:],
                           model.generate(idx, 4, attention_mask=mask, seed=torch.arange(100, 105), **knobs)[:, -4:])
    t = idx.shape[1]
    assert torch.equal(batch[2, t:], alone[0, len(prompts[2]):])
    assert not torch.equal(batch[0, t:], batch[2, t:])  # rows do draw different tokens


def test_generate_seed_errors():
    model = small_gpt()
    with pytest.raises(ValueError, match="seed or generator"):
        model.generate(tokens(2, 4), 2, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="seed must be None, an int"):
        model.generate(tokens(2, 4), 2, seed=1.5)
    with pytest.raises(ValueError, match=r"seed as a tensor must be int64 \[B\]"):
        model.generate(tokens(2, 4), 2, seed=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"seed as a tensor must be int64 \[B\]"):
        model.generate(tokens(2, 4), 2, seed=torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="seed must be in"):
        model.generate(tokens(2, 4), 2, seed=2 ** 63 - 1)


def test_left_padded_greedy_matches_transformers(tmp_path):
    model = small_gpt(seed=8)
    hf = hf_model(model, tmp_path, dtype=torch.float32)
    idx, mask = tokens(2, 10), torch.ones(2, 10, dtype=torch.int64)
    mask[1, :4] = 0
    with torch.no_grad():
        want = hf.generate(idx, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(idx, 6, temperature=0.0, attention_mask=mask), want)


def test_stream_yields_the_same_tokens():
    model = small_gpt(seed=9)
    idx = tokens(2, 5)
    knobs = dict(temperature=0.8, top_k=20)
    whole = model.generate(idx, 9, generator=torch.Generator().manual_seed(3), **knobs)
    stream = model.generate(idx, 9, generator=torch.Generator().manual_seed(3), stream=True, **knobs)
    assert not isinstance(stream, torch.Tensor)
    steps = list(stream)
    assert len(steps) == 9 and all(s.shape == (2,) and s.dtype == torch.int64 for s in steps)
    assert torch.equal(torch.stack(steps, dim=1), whole[:, 5:])


def test_eos_stops_and_fills():
    model = small_gpt(seed=10)
    idx = tokens(2, 6)
    free = model.generate(idx, 20, temperature=0.0)[:, 6:]
    eos = int(free[0, 2])  # row 0 emits it at step 2
    got = model.generate(idx, 20, temperature=0.0, eos_token_id=eos)[:, 6:]
    row1_hits = (free[1] == eos).nonzero()
    stop = max(2, int(row1_hits[0]) if len(row1_hits) else 19)
    assert got.shape[1] == stop + 1  # stopped right after the step where both had finished
    assert (got[0, 3:] == eos).all() and torch.equal(got[0, :3], free[0, :3])
    streamed = torch.stack(list(model.generate(idx, 20, temperature=0.0, eos_token_id=eos, stream=True)), 1)
    assert torch.equal(streamed, got)


def test_generate_errors():
    model = small_gpt()
    with pytest.raises(ValueError, match=rf"prompt has {CTX + 1} tokens, longer than the context"):
        model.generate(tokens(1, CTX + 1), 1)
    with pytest.raises(ValueError, match="do not fit in the context"):
        model.generate(tokens(1, CTX - 2), 3)
    with pytest.raises(ValueError, match="input_ids must be int64"):
        model.generate(tokens(1, 4).int(), 2)
    with pytest.raises(ValueError, match="token ids in"):
        model.generate(torch.tensor([[0, V]]), 2)
    with pytest.raises(ValueError, match="padded on the left"):
        model.generate(tokens(1, 4), 2, attention_mask=torch.tensor([[1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate(tokens(1, 4), 2, top_p=0.0)
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(tokens(1, 4), 2, eos_token_id=V)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(tokens(1, 4), -1)
    with pytest.raises(ValueError, match="prompt has"):  # a streaming call fails at once, not on next()
        model.generate(tokens(1, CTX + 1), 1, stream=True)
    with pytest.raises(ValueError, match="longer than the context"):
        model(tokens(1, CTX + 1))
    assert torch.equal(model.generate(tokens(1, 4), 0), tokens(1, 4))
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device"):
        model.generate(tokens(1, 4), 2, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be None or a bool"):
        model.generate(tokens(1, 4), 2, cuda_graph="yes")


@pytest.mark.parametrize("temperature", [1e-40, 1e-45])
def test_generate_tiny_temperature_is_checked_on_the_real_logits(temperature):
    """Issue 18 #4: logits / temperature overflows float32 on the real logits (the old check ran on a row of
    zeros and the tokens came out random): a clear error, not random tokens."""
    model = small_gpt(seed=2)
    with pytest.raises(ValueError, match="temperature is so small that logits / temperature overflows"):
        model.generate(tokens(2, 4), 3, temperature=temperature)
    # A small temperature that does not overflow samples the greedy tokens.
    assert torch.equal(model.generate(tokens(2, 4), 3, temperature=1e-30), model.generate(tokens(2, 4), 3,
                                                                                          temperature=0.0))


# ------------------------------------------------------------------------------------------ decode linears
def _decode_linear_module():
    from genfast.models import _decode_linear
    return _decode_linear


def _decode_copy(module):
    """(key, copy) that a DecodeLinear keeps after a decode call, or None."""
    return module.__dict__.get(_decode_linear_module()._COPY)


# (in, out): out >= in takes the [in, out] copy at one row, in > out oneDNN's layout (models/_decode_linear.py).
@pytest.mark.parametrize("shape", [(17, 97), (32, 32), (97, 17)])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_decode_linear_matches_linear(shape, rows, bias):
    """Inside decode_linears(), a DecodeLinear multiplies by its cached copy: within 2x torch's own fp32 error of
    the fp64 product, for a decode step's [B, 1, C] rows, contiguous or not."""
    dl = _decode_linear_module()
    torch.manual_seed(0)
    lin = dl.DecodeLinear(*shape, bias=bias)
    x = torch.randn(rows, 3, shape[0])[:, 1:2]  # (B, 1, C), not contiguous
    want = torch.nn.functional.linear(x.double(), lin.weight.double(), None if lin.bias is None else
                                      lin.bias.double())
    torch_err = (torch.nn.functional.linear(x, lin.weight, lin.bias).double() - want).abs().max()
    with torch.no_grad(), dl.decode_linears():
        got = lin(x)
    assert got.shape == (rows, 1, shape[1]) and got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= 2 * torch_err + 1e-6
    key, copy = _decode_copy(lin)  # the copy was made, in the layout the rule picks
    assert copy.is_mkldnn == (rows > 1 or shape[0] > shape[1])
    if not copy.is_mkldnn:
        assert torch.equal(copy, lin.weight.t())


def test_decode_linear_is_linear_outside_its_conditions():
    """Outside decode_linears(), in a block entered with autograd on, under the reference backend, or in fp64:
    exactly F.linear, and no copy made."""
    dl = _decode_linear_module()
    torch.manual_seed(1)
    lin = dl.DecodeLinear(32, 48)
    lin64 = dl.DecodeLinear(32, 48, dtype=torch.float64)
    x = torch.randn(1, 32, requires_grad=True)
    x64 = x.detach().double()
    want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert torch.equal(lin(x), want)
    with dl.decode_linears():
        y = lin(x)  # grad mode: nn.Linear's forward and backward
        assert torch.equal(y, want)
        y.sum().backward()
        assert lin.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        with genfast.backend("reference"), dl.decode_linears():
            assert torch.equal(lin(x), want)
        with dl.decode_linears():
            assert torch.equal(lin64(x64), torch.nn.functional.linear(x64, lin64.weight, lin64.bias))
            assert _decode_copy(lin) is None and _decode_copy(lin64) is None
            lin(x)  # and the same block does serve an fp32 call
    assert _decode_copy(lin) is not None


def test_decode_linear_copy_follows_the_weights():
    """The cached copy is remade when the weight changes in place (its _version), is replaced (its data_ptr) or the
    batch size changes; release_packed frees it."""
    dl = _decode_linear_module()
    torch.manual_seed(2)
    lin = dl.DecodeLinear(24, 40)
    x1, x4 = torch.randn(1, 24), torch.randn(4, 24)

    def check(x):
        with torch.no_grad(), dl.decode_linears():
            got = lin(x)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)

    check(x1)
    replacement = torch.randn(40, 24)
    while replacement._version < lin.weight._version:  # the same _version: only its data_ptr tells them apart
        replacement.mul_(1.0)
    lin.weight = torch.nn.Parameter(replacement)
    assert lin.weight._version == replacement._version
    check(x1)
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # an optimizer step or load_state_dict writes in place like this
        lin.bias.add_(1.0)  # the bias is read at each call, never copied
    check(x1)
    check(x4)
    assert _decode_copy(lin)[1].is_mkldnn
    check(x1)
    assert dl.release_packed(lin) == 1 and dl.release_packed(lin) == 0
    with pytest.raises(TypeError, match="release_packed: module must be an nn.Module"):
        dl.release_packed(lin.weight)


def test_gpt_decode_copies_keep_tokens_and_checkpoints(monkeypatch, tmp_path):
    """GPT's linears are DecodeLinears over the same parameters (state dict, init and checkpoints unchanged); its
    decode steps run on the copies, with the tokens of F.linear's decode; a model holding copies deep-copies."""
    import contextlib
    import copy
    import sys

    dl = _decode_linear_module()
    model = small_gpt(seed=12)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * SMALL["n_layer"] + 1 and all(isinstance(m, dl.DecodeLinear) for m in linears)
    names = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert names["transformer.h.0.attn.c_attn.weight"] == (96, 32) and names["lm_head.weight"] == (V, 32)
    rng = torch.random.get_rng_state()
    attn = model.transformer.h[0].attn
    assert dl.DecodeLinear.from_linear(attn.c_attn).weight is attn.c_attn.weight  # shared, not copied
    assert torch.equal(torch.random.get_rng_state(), rng)  # and no RNG drawn: a seeded GPT's init is unchanged
    greedy, sampled = dict(temperature=0.0), dict(temperature=0.9, top_k=20)
    runs = {}
    for b in (1, 3):
        idx = tokens(b, 7, seed=30 + b)
        runs[b] = [model.generate(idx, 9, **greedy),
                   model.generate(idx, 9, generator=torch.Generator().manual_seed(4), **sampled)]
        assert all(_decode_copy(m) is not None for m in linears)  # every linear of the step ran on its copy
    twin = copy.deepcopy(model)
    assert torch.equal(twin.generate(tokens(3, 7, seed=33), 9, **greedy), runs[3][0])
    monkeypatch.setattr(sys.modules[GPT.__module__], "decode_linears", contextlib.nullcontext)  # F.linear only
    for b in (1, 3):
        idx = tokens(b, 7, seed=30 + b)
        assert torch.equal(model.generate(idx, 9, **greedy), runs[b][0])
        assert torch.equal(model.generate(idx, 9, generator=torch.Generator().manual_seed(4), **sampled), runs[b][1])
    again = GPT.from_pretrained(model.save_pretrained(tmp_path))
    assert {n: tuple(p.shape) for n, p in again.state_dict().items()} == names
    assert model.release_decode_copies() == len(linears) and all(_decode_copy(m) is None for m in linears)


# ------------------------------------------------------------------------------------------ training
TEXT = ("Twinkle, twinkle, little star, how I wonder what you are! Up above the world so high, like a diamond in "
        "the sky. When the blazing sun is gone, when he nothing shines upon, then you show your little light, "
        "twinkle, twinkle, all the night.\n")


def _train(out: Path, data: Path, *extra: str) -> int:
    args = ["--data", str(data), "--out", str(out), "--device", "cpu", "--quiet", "--block-size", "32",
            "--batch-size", "8", "--warmup", "10", *extra]
    return recipe.train_main(args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT trained through `genfast train gpt` for 200 steps on a short repeated rhyme."""
    root = tmp_path_factory.mktemp("gpt_train")
    data = root / "rhyme.txt"
    data.write_text(TEXT * 8)
    assert _train(root / "run", data, "--steps", "200", "--eval-every", "200", "--lr", "3e-3") == 0
    return root / "run", data


def test_default_flags_are_set():
    """`genfast train gpt` with no flags: --sample-every has its default (the old alias --eval-every once left it
    None, so a default run stopped at its first step) and the alias still sets it."""
    parser = recipe.train_parser()
    assert parser.parse_args([]).sample_every == 250
    assert parser.parse_args(["--eval-every", "7"]).sample_every == 7
    assert parser.parse_args(["--sample-every", "9"]).sample_every == 9


def test_training_reaches_loss_bound(trained):
    """Loss below 0.5 nats/char, where a model of character frequencies alone cannot go below the text's unigram
    entropy (about 3 nats/char here): the model has learned the rhyme from its context."""
    out, data = trained
    model, tokenizer = recipe.load_for_sampling(out, torch.device("cpu"))
    ids = torch.tensor(tokenizer.encode(data.read_text()))
    counts = torch.bincount(ids).double()
    unigram_entropy = -(counts / counts.sum() * (counts / counts.sum()).clamp_min(1e-12).log()).sum().item()
    assert unigram_entropy > 2.5
    x, y = recipe.get_batch(ids, 16, 32, torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, loss = model.eval()(x, y)
    assert loss.item() < 0.5, loss.item()


def test_sample_cli(trained, capsys):
    out, _ = trained
    assert recipe.sample_main(["--ckpt", str(out), "--prompt", "Up above the w", "--max-new-tokens", "30",
                               "--temperature", "0", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Up above the world so high, like"), text
    assert recipe.sample_main(["--ckpt", str(out / "checkpoint"), "--prompt", "Up above the w", "--max-new-tokens",
                               "30", "--temperature", "0", "--stream", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == text
    with pytest.raises(SystemExit, match="longer than the model's context"):
        recipe.sample_main(["--ckpt", str(out), "--prompt", "x" * 40, "--device", "cpu"])


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """Stopped after 7 steps (--stop-after), or by Ctrl-C during step 3, then resumed: the final weights equal
    those of the uninterrupted run bit for bit (dropout on, so the restored RNG state matters too)."""
    from safetensors.torch import load_file

    data = tmp_path / "rhyme.txt"
    data.write_text(TEXT * 4)
    common = ("--steps", "12", "--eval-every", "5", "--dropout", "0.1", "--eval-batches", "1", "--seed", "3")
    weights = lambda run: load_file(str(tmp_path / run / "checkpoint" / "model.safetensors"))  # noqa: E731
    assert _train(tmp_path / "whole", data, *common) == 0
    whole = weights("whole")

    assert _train(tmp_path / "split", data, *common, "--stop-after", "7") == 0
    assert genfast.training.load_checkpoint(tmp_path / "split" / "checkpoint")[0]["step"] == 7
    at_7 = weights("split")
    assert _train(tmp_path / "split", data, *common, "--resume") == 0

    real_get_batch, calls = recipe.get_batch, []

    def interrupting_get_batch(*args):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C while step 3 (index 2) is being prepared: it finishes, saves, stops
            os.kill(os.getpid(), signal.SIGINT)
        return real_get_batch(*args)

    monkeypatch.setattr(recipe, "get_batch", interrupting_get_batch)
    assert _train(tmp_path / "ctrl_c", data, *common) == 130
    monkeypatch.undo()
    assert genfast.training.load_checkpoint(tmp_path / "ctrl_c" / "checkpoint")[0]["step"] == 3
    assert _train(tmp_path / "ctrl_c", data, *common, "--resume") == 0

    for run in ("split", "ctrl_c"):
        got = weights(run)
        assert got.keys() == whole.keys()
        for name in whole:
            assert torch.equal(got[name], whole[name]), (run, name)
    assert not all(torch.equal(at_7[name], whole[name]) for name in whole)  # the resumed run did train on


def test_train_errors(tmp_path, capsys):
    """Bad --data is a usage error: exit status 2 and one line naming the problem, no traceback."""
    def usage_error(data: Path, message: str) -> None:
        with pytest.raises(SystemExit) as exc:
            _train(tmp_path / "o", data)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err

    usage_error(tmp_path / "missing.txt", "no file at")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    usage_error(empty, "is empty")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    usage_error(latin, "not UTF-8")
    binary = tmp_path / "binary.bin"
    binary.write_bytes(b"\x00\x01\x02 some text " * 50)
    usage_error(binary, "binary file")
    short = tmp_path / "short.txt"
    short.write_text("abc def")
    usage_error(short, "too few")


# ------------------------------------------------------------------------------------------ DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = genfast.training.Distributed.from_environment("cpu")
    try:
        model = small_gpt(seed=11).train()
        ddp = dist.wrap(model)
        x, y = tokens(4, 12, seed=20), tokens(4, 12, seed=21)
        _, loss = ddp(dist.shard(x), dist.shard(y))
        loss.backward()
        if dist.is_main:
            torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(out_dir, "grads.pt"))
        # The DDP wrapper (its reducer holds gloo work) goes before the process group; the other order can abort
        # a process at exit ("terminate called without an active exception").
        del ddp
        dist.barrier()
    finally:
        dist.close()


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ddp_grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    model = small_gpt(seed=11).train()
    _, loss = model(tokens(4, 12, seed=20), tokens(4, 12, seed=21))
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-5, atol=1e-6)
