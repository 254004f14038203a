"""attn_implementation="genfast" against "sdpa" on the same weights (tiny random configs, offline), and
GenfastLogitsProcessor against transformers' own processors."""

import copy
import subprocess
import sys

import pytest
import torch

import genfast
from tests.attention_checks import AttentionKernelCalls

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    LogitsProcessorList,
    MinPLogitsWarper,
    MistralConfig,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from genfast.integrations import transformers as integration  # noqa: E402
from genfast.integrations.transformers import GenfastLogitsProcessor, UnsupportedAttentionError  # noqa: E402

VOCAB, PAD = 61, 0
TOKENS = {"pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": 2}
CONFIGS = {
    # GQA: 4 query heads read 2 key/value heads.
    "llama-gqa": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     **TOKENS),
    # GPT-2 with per-layer scaling, so the module's `scaling` differs from 1/sqrt(D) and must be passed through.
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               scale_attn_by_inverse_layer_idx=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               **TOKENS),
    # Mistral-style sliding window shorter than the sequences below, with GQA.
    "mistral-window": lambda: MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                            head_dim=8, sliding_window=4, max_position_embeddings=64, **TOKENS),
}
# Both CPU paths: "auto" (genfast's reference dispatch) and the Triton kernels, interpreted here.
BACKENDS = ["auto", "triton"]
TOL = {"rtol": 1e-4, "atol": 1e-5}  # fp32 throughout: genfast and SDPA differ only in summation order


def pair(name: str, **overrides):
    """(sdpa model, genfast model) with the same random weights."""
    config = CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    # Separate config copies: from_config records the implementation on the config object it is given.
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=integration.register())
    ours.load_state_dict(reference.state_dict())
    assert (reference.config._attn_implementation, ours.config._attn_implementation) == ("sdpa", "genfast")
    return reference.eval(), ours.eval()


def left_padded_batch(lengths=(9, 5, 1)):
    """ids [3, 9] with each row's tokens right-aligned after PAD, and its 0/1 attention mask."""
    torch.manual_seed(1)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, VOCAB, (n,))
        mask[row, width - n:] = 1
    return ids, mask


def test_register_returns_the_name_and_is_idempotent():
    assert integration.register() == "genfast"
    assert integration.register() == "genfast"
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert AttentionInterface._global_mapping["genfast"] is integration.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["genfast"] is integration.mask_forward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_sdpa_left_padded_and_unpadded(name, backend, monkeypatch):
    reference, ours = pair(name)
    ids, mask = left_padded_batch()
    calls = AttentionKernelCalls(monkeypatch)
    with torch.no_grad(), genfast.backend(backend):
        want = reference(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
        # No padding: transformers passes no mask, and genfast's causal (and window) flags do the masking.
        want_full = reference(input_ids=ids[:1]).logits
        got_full = ours(input_ids=ids[:1]).logits
    keep = mask.bool()  # padded query rows have no key to attend to: their output is not defined the same way
    torch.testing.assert_close(got[keep], want[keep], **TOL)
    torch.testing.assert_close(got_full, want_full, **TOL)
    assert calls.fwd == (4 if backend == "triton" else 0)  # 2 layers x 2 forwards, through the kernels


def test_a_wrong_mask_would_be_caught():
    """The padded comparison above has teeth: the same batch without its mask gives other logits."""
    reference, ours = pair("llama-gqa")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).logits
        unmasked = ours(input_ids=ids).logits
    keep = mask.bool()
    assert (unmasked[keep] - want[keep]).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_match_sdpa(name, backend, monkeypatch):
    reference, ours = pair(name)
    reference.train()
    ours.train()  # every dropout is 0 in these configs: train mode changes nothing else
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    calls = AttentionKernelCalls(monkeypatch)
    with genfast.backend(backend):
        reference(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    mine = dict(ours.named_parameters())
    for key, param in reference.named_parameters():
        if param.grad is None:
            assert mine[key].grad is None, key
            continue
        torch.testing.assert_close(mine[key].grad, param.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
    assert calls.bwd == (2 if backend == "triton" else 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generate_matches_sdpa(name, backend, monkeypatch):
    reference, ours = pair(name)
    ids, mask = left_padded_batch()
    calls = AttentionKernelCalls(monkeypatch)
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": PAD}
    with genfast.backend(backend):
        want = reference.generate(ids, **kwargs)
        got = ours.generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert want.shape[1] == ids.shape[1] + 6
    # Prefill + 5 decode steps with the KV cache, 2 layers each (the sixth token needs no forward).
    assert calls.fwd == (2 * 6 if backend == "triton" else 0)


class Spy:
    """Records the arguments the integration passes to genfast.ops.attention."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = genfast.ops.attention

        def spy(q, k, v, **kwargs):
            self.calls.append({"q": tuple(q.shape), "k": tuple(k.shape), **kwargs})
            return real(q, k, v, **kwargs)

        monkeypatch.setattr(genfast.ops, "attention", spy)


def test_gqa_masks_scaling_and_causal_reach_genfast(monkeypatch):
    spy = Spy(monkeypatch)
    _, llama = pair("llama-gqa")
    ids, _ = left_padded_batch()
    with torch.no_grad():
        llama(input_ids=ids[:1])
    first = spy.calls[0]
    assert first["q"][1] == 4 and first["k"][1] == 2  # K/V not repeated
    assert first["causal"] is True and first["attn_mask"] is None and first["window"] is None
    assert first["scale"] == pytest.approx(8 ** -0.5)

    # A sequence longer than the sliding window: transformers hands over the window as a boolean mask.
    spy.calls.clear()
    _, mistral = pair("mistral-window")
    with torch.no_grad():
        mistral(input_ids=ids[:1])
    first = spy.calls[0]
    assert first["k"][1] == 1 and first["causal"] is False
    expected = torch.tril(torch.ones(9, 9, dtype=torch.bool)) & ~torch.tril(torch.ones(9, 9, dtype=torch.bool), -4)
    assert torch.equal(first["attn_mask"][0, 0], expected)

    spy.calls.clear()
    _, gpt2 = pair("gpt2")
    with torch.no_grad():
        gpt2(input_ids=ids[:1])
    assert [c["scale"] for c in spy.calls] == pytest.approx([8 ** -0.5, 8 ** -0.5 / 2])  # 1/(layer_idx+1)


class _LargestWrite(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor any aten op writes while the mode is on (views of its inputs are not writes)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def test_a_padding_mask_reaches_sdpa_unexpanded():
    """Issue 26: the left-padded forward ran at 0.95x "sdpa" on a CPU. genfast views the [B, 1, Nq, Nk] mask
    transformers builds as [B, Hq, Nq, Nk] for its kernels, and SDPA's CPU kernel turned the bool mask into a float
    one at that size: Hq times the pass "sdpa" makes. The call now writes nothing larger than its output (the
    expanded float mask, 2x the output here, was written before)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 16, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool).tril()
    mask[0, :, :, :5] = False  # row 0 left-padded by 5
    mask[0, :, :5, 0] = True  # (its padding queries see one key, as transformers' mask does for them)
    with _LargestWrite() as seen, genfast.backend("auto"), torch.no_grad():
        got = genfast.ops.attention(q, k, v, attn_mask=mask)
    assert seen.largest <= got.numel() < 2 * 8 * 16 * 16
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                            attn_mask=mask)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("q_len, kv_len", [(7, 7), (1, 7), (3, 10)])
def test_sliding_window_without_a_mask_uses_the_kernel_window(q_len, kv_len):
    """What a module gets when transformers passes no mask: causal + window flags, bottom-right aligned."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, q_len, 8), torch.randn(2, 2, kv_len, 8), torch.randn(2, 2, kv_len, 8)
    module = torch.nn.Module()
    module.is_causal = True
    got, _ = integration.attention_forward(module, q, k, v, None, scaling=0.3, sliding_window=3)
    if q_len > 1 and kv_len > q_len:  # transformers' empty-static-cache prefill: the extra keys are empty slots
        k, v, kv_len = k[:, :, :q_len], v[:, :, :q_len], q_len
    pos = torch.arange(q_len)[:, None] + kv_len - q_len
    j = torch.arange(kv_len)[None, :]
    keep = (j <= pos) & (pos - j < 3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            attn_mask=keep, scale=0.3)
    torch.testing.assert_close(got, want.transpose(1, 2), **TOL)


def test_dropout_in_training_only(monkeypatch):
    spy = Spy(monkeypatch)
    _, ours = pair("llama-gqa", attention_dropout=0.5)
    ids, mask = left_padded_batch()
    ours.train()
    torch.manual_seed(3)
    first = ours(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(3)
    again = ours(input_ids=ids, attention_mask=mask).logits
    ours.eval()
    with torch.no_grad():
        plain = ours(input_ids=ids, attention_mask=mask).logits
    assert [c["dropout_p"] for c in spy.calls] == [0.5, 0.5, 0.5, 0.5, 0.0, 0.0]
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # seeded from torch's generator
    assert (first - plain).abs().max() > 1e-3


def test_unsupported_features_raise_instead_of_falling_back():
    q = torch.randn(1, 2, 3, 8)
    module = torch.nn.Module()
    with pytest.raises(UnsupportedAttentionError, match="soft-capping"):
        integration.attention_forward(module, q, q, q, None, softcap=30.0)
    with pytest.raises(UnsupportedAttentionError, match="output_attentions"):
        integration.attention_forward(module, q, q, q, None, output_attentions=True)
    with pytest.raises(UnsupportedAttentionError, match="sinks"):
        integration.attention_forward(module, q, q, q, None, s_aux=torch.zeros(2))
    with pytest.raises(UnsupportedAttentionError, match="value head dim"):
        integration.attention_forward(module, q, q, torch.randn(1, 2, 3, 4), None)
    with pytest.raises(ValueError, match="attention_mask must be 4-D"):
        integration.attention_forward(module, q, q, q, torch.ones(1, 3, dtype=torch.bool))


def test_importing_genfast_imports_neither_library():
    code = ("import sys, genfast, genfast.integrations; "
            "assert 'transformers' not in sys.modules and 'diffusers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ------------------------------------------------------------------------------------------ sampling
KNOBS = [
    {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.3},
    {"temperature": 1.3, "top_k": 0, "top_p": 0.5, "min_p": 0.0, "repetition_penalty": 1.0},
    {"temperature": 1.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 0.8},
    {"temperature": 0.5, "top_k": 0, "top_p": 1.0, "min_p": 0.2, "repetition_penalty": 1.0},
]


def transformers_processors(temperature, top_k, top_p, min_p, repetition_penalty) -> LogitsProcessorList:
    """What generate builds for these knobs, in its order (generation/utils.py)."""
    out = LogitsProcessorList()
    if repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    if min_p:
        out.append(MinPLogitsWarper(min_p))
    return out


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_logits_processor_matches_transformers(knobs):
    torch.manual_seed(0)
    scores = torch.randn(5, 97) * 3
    scores[1, :10] = 2.0  # ties around the top-k boundary
    input_ids = torch.randint(0, 97, (5, 17))
    want = transformers_processors(**knobs)(input_ids, scores.clone())
    got = GenfastLogitsProcessor(**knobs)(input_ids, scores.clone())
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)], rtol=1e-6, atol=1e-6)


def test_sampling_generate_matches_transformers_warpers():
    reference, _ = pair("llama-gqa")
    ids, mask = left_padded_batch()
    knobs = KNOBS[0]
    proc = GenfastLogitsProcessor(**knobs)
    torch.manual_seed(5)
    got = reference.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD, **proc.generate_kwargs())
    torch.manual_seed(5)
    want = reference.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD, do_sample=True, **knobs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bad, match", [
    ({"temperature": 0.0}, "temperature must be in"),
    ({"temperature": float("nan")}, "temperature must be a finite"),
    ({"top_k": -1}, "top_k must be an int"),
    ({"top_k": 2.5}, "top_k must be an int"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"min_p": 1.5}, "min_p must be in"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be in"),
])
def test_logits_processor_checks_its_arguments(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GenfastLogitsProcessor(**bad)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_output_attentions_is_refused_not_answered_empty(name):
    """Issue 27: GPT-2 (which does not pass output_attentions to the attention function) returned attentions=().
    (transformers' own "sdpa" answers () there too; genfast says it cannot, as it does for Llama and BERT.)"""
    reference, ours = pair(name)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedAttentionError, match="output_attentions"):
        ours(ids, output_attentions=True)
    with torch.no_grad():  # and without the flag, nothing changes
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, **TOL)
