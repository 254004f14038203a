"""The decode steps that CUDA graphs capture (GPT.generate, the translator's greedy and beam decoding), checked on
the CPU: fixed shapes and addresses, no host synchronisation, and the same answer as the dynamic computation.
(The capture itself needs a GPU; these are what make it valid.)"""

import pytest
import torch

from genfast.models import GPT, GPTConfig, Transformer, TransformerConfig

V = 61


def small_gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, block_size=48, n_layer=2, n_head=2, n_embd=32)).eval()


def tokens(b: int, t: int, seed: int = 1, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def translator_and_sources():
    """A random tiny translator and two sources, the second padded (True = padding)."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny", src_vocab_size=13, tgt_vocab_size=11)).eval()
    src = tokens(2, 7, seed=2, vocab=13).clamp(min=3)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    src[1, 4:], pad[1, 4:] = model.config.pad_id, True
    return model, src, pad


class NoHostSync:
    """Fails the test if the code inside asks the device for a value (a host synchronisation on a GPU)."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}

        def refuse(name):
            def fn(*args, **kwargs):
                raise AssertionError(f"Tensor.{name} called inside the decode step")
            return fn

        for name in self.NAMES:
            setattr(torch.Tensor, name, refuse(name))

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


def test_decode_step_has_static_shapes_and_no_host_sync():
    """The step the CUDA graph captures, checked on the CPU: it reads nothing back from the device, keeps every
    cache tensor at its address (lengths advanced in place), and gives the logits of a full forward pass."""
    model = small_gpt(seed=4)
    idx = tokens(3, 7)
    lengths = torch.tensor([7, 4, 6])  # ragged rows, as a left-padded batch has after its prefill
    caches = model.new_caches(3, 12)
    with torch.no_grad():
        model.hidden_states(idx, torch.arange(7), caches)
        for cache in caches:
            cache.set_lengths(lengths)
        addresses = [(c.k.data_ptr(), c.v.data_ptr(), c.lengths.data_ptr(), id(c.lengths)) for c in caches]
        step = model._decode_step(caches)
        token, positions = tokens(3, 1, seed=9)[:, 0], lengths.clone()
        with NoHostSync():
            logits = step(token, positions)
        assert [(c.k.data_ptr(), c.v.data_ptr(), c.lengths.data_ptr(), id(c.lengths)) for c in caches] == addresses
        assert all(c.lengths.tolist() == [8, 5, 7] for c in caches)
        for i, n in enumerate(lengths.tolist()):
            full, _ = model(torch.cat([idx[i:i + 1, :n], token[i:i + 1, None]], dim=1))
            torch.testing.assert_close(logits[i], full[0, -1], atol=2e-5, rtol=2e-5)


def test_cached_decode_step_has_static_shapes_and_no_host_sync():
    """The step a CUDA graph captures, checked on the CPU: nothing read back from the device, cache tensors at
    fixed addresses, and the log-probabilities of the whole-prefix decoder."""
    model, src, pad = translator_and_sources()
    memory, memory_kv, keep, bos, _ = model._start_decode(src, pad, 6, None, None)
    step, caches = model._stepper(memory, memory_kv, keep, pad, 2, 6, bos, True, None)
    token, position = torch.full((2,), bos), torch.zeros(2, dtype=torch.long)
    history = torch.zeros(2, 0, dtype=torch.long)
    addresses = [(c.k.data_ptr(), c.v.data_ptr(), c.lengths.data_ptr()) for c in caches]
    for _ in range(3):
        with NoHostSync():
            log_probs = step(token, position, history)
        reference, _ = model._stepper(memory, memory_kv, keep, pad, 2, 6, bos, False, None)
        torch.testing.assert_close(log_probs, reference(token, position, history), atol=1e-5, rtol=1e-5)
        token, position = log_probs.argmax(-1), position + 1
        history = torch.cat([history, token[:, None]], dim=1)
    assert [(c.k.data_ptr(), c.v.data_ptr(), c.lengths.data_ptr()) for c in caches] == addresses
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device"):
        model.greedy_decode(src, max_len=3, src_pad_mask=pad, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs use_cache=True"):
        model.beam_search(src, max_len=3, src_pad_mask=pad, use_cache=False, cuda_graph=True)
