"""LSTMLM: the fused paths (lstm_cell over a sequence, token-by-token generation) against nn.LSTM, and generation's
contract (the state carried, the prompt read once, the sampling knobs). Tiny configs: seconds in all."""

import pytest
import torch

import genfast
from genfast.models.lstm import LSTMLM, LSTMConfig
from genfast.ops import lstm as lstm_ops

V = 23


def tiny(seed=0, **overrides) -> LSTMLM:
    torch.manual_seed(seed)
    return LSTMLM(LSTMConfig.preset("tiny", vocab_size=V, **overrides)).eval()


def ids(b, t, seed=1):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def plain_greedy(model: LSTMLM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """The textbook loop: nn.LSTM one token at a time from its state, argmax of the head."""
    with torch.no_grad():
        out, state = model.lstm(model.embed(prompt))
        tokens = []
        for _ in range(n):
            token = model.head(out[:, -1]).argmax(-1, keepdim=True)
            tokens.append(token)
            out, state = model.lstm(model.embed(token), state)
    return torch.cat([prompt, *tokens], dim=1)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fused_sequence_matches_nn_lstm(backend):
    model = tiny().train()
    model.drop.p = 0.0  # the two paths would draw different dropout masks
    model.lstm.dropout = 0.0
    x, y = ids(3, 11), ids(3, 11, seed=2)
    with genfast.backend(backend):
        logits, loss = model(x, y, fused=True)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    want_logits, want_loss = model(x, y, fused=False)
    want_grads = torch.autograd.grad(want_loss, list(model.parameters()))
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch,prompt_len", [(1, 1), (3, 5)])
def test_greedy_generation_is_the_nn_lstm_loop(batch, prompt_len):
    model = tiny()
    prompt = ids(batch, prompt_len)
    got = model.generate(prompt, 12, temperature=0.0)
    assert got.shape == (batch, prompt_len + 12)
    torch.testing.assert_close(got, plain_greedy(model, prompt, 12))


def test_prompt_is_read_once_and_each_token_is_one_fused_step(monkeypatch):
    model = tiny()
    calls = {"lstm": 0, "cell": 0}
    lstm_forward = model.lstm.forward
    cell = lstm_ops.lstm_cell

    def counting_lstm(*args, **kwargs):
        calls["lstm"] += 1
        return lstm_forward(*args, **kwargs)

    def counting_cell(*args):
        calls["cell"] += 1
        return cell(*args)

    monkeypatch.setattr(model.lstm, "forward", counting_lstm)
    monkeypatch.setattr("genfast.ops.lstm_cell", counting_cell)
    model.generate(ids(2, 9), 30, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert calls == {"lstm": 1, "cell": 30 * model.config.n_layer}


def test_stream_yields_what_generate_returns():
    model = tiny()
    prompt = ids(2, 4)
    knobs = dict(temperature=0.9, top_k=5, top_p=0.9)
    whole = model.generate(prompt, 10, generator=torch.Generator().manual_seed(3), **knobs)
    stream = model.generate(prompt, 10, generator=torch.Generator().manual_seed(3), stream=True, **knobs)
    streamed = torch.stack(list(stream), dim=1)
    torch.testing.assert_close(torch.cat([prompt, streamed], dim=1), whole)


def test_sampling_is_reproducible_and_follows_the_knobs():
    model = tiny()
    prompt = ids(4, 3)
    a = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(5))
    c = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    # top_k=1 is greedy whatever the temperature.
    torch.testing.assert_close(model.generate(prompt, 8, temperature=5.0, top_k=1), plain_greedy(model, prompt, 8))


def test_repetition_penalty_sees_prompt_and_generated_tokens():
    model = tiny()
    with torch.no_grad():  # every logit negative: a penalised token (logit * 1e9) can then never be the argmax
        model.head.bias -= 100.0
    prompt = ids(2, 3)
    out = model.generate(prompt, 12, temperature=0.0, repetition_penalty=1e9)
    for row in out.tolist():
        assert len(set(row[3:])) == 12, row  # no generated token repeats ...
        assert not set(row[3:]) & set(row[:3]), row  # ... nor one of the prompt
    # Without the penalty the greedy loop of this model does repeat itself.
    plain = model.generate(prompt, 12, temperature=0.0)
    assert any(len(set(row[3:])) < 12 for row in plain.tolist())


def test_half_precision_model_keeps_the_cell_state_fp32():
    model = tiny().to(torch.bfloat16)
    h, c = model.zero_state(2)
    assert h.dtype == torch.bfloat16 and c.dtype == torch.float32
    out = model.generate(ids(2, 4), 5, temperature=0.0)
    assert out.shape == (2, 9) and int(out.max()) < V


@pytest.mark.parametrize("call,error,match", [
    (lambda m: m.generate(ids(2, 3).int(), 2), ValueError, "input_ids must be int64"),
    (lambda m: m.generate(ids(2, 3)[:, :0], 2), ValueError, "T >= 1"),
    (lambda m: m.generate(ids(2, 3) + V, 2), ValueError, r"token ids in \[0, 23\)"),
    (lambda m: m.generate(ids(2, 3), -1), ValueError, "max_new_tokens must be an int >= 0"),
    (lambda m: m.generate(ids(2, 3), 10**15), ValueError, "max_new_tokens=1000000000000000 needs"),
    (lambda m: m.generate(ids(2, 3), 2, temperature=-1.0), ValueError, "temperature"),
    (lambda m: m.generate(ids(2, 3), 2, generator=3), TypeError, "generator must be a torch.Generator"),
    (lambda m: m.generate(ids(2, 3), 2, stream=1), TypeError, "stream must be a bool"),
    (lambda m: m(ids(2, 3).float()), ValueError, "idx must be int64"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(tiny())


def test_config_is_checked():
    with pytest.raises(ValueError, match="LSTMConfig.n_hidden must be an int >= 1"):
        LSTMConfig(n_hidden=0)
    with pytest.raises(ValueError, match="LSTMConfig.dropout"):
        LSTMConfig(dropout=1.0)
    with pytest.raises(ValueError, match="unknown options"):
        LSTMConfig.from_dict({"hidden": 3})
