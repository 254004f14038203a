"""genfast.nn.MultiheadAttention against torch.nn.MultiheadAttention, fuse() on torch transformers, and
CausalSelfAttention with and without a KV cache.

Shapes are tiny (E = 32, 2 heads of D = 16): the modules are glue around genfast.ops.attention, whose kernels
tests/test_attention.py covers; here what matters is that every torch semantic (masks, layouts, weights) is kept.
"""

import copy

import pytest
import torch
from torch import nn

import genfast
from genfast.nn import CausalSelfAttention, KVCache, MultiheadAttention
from genfast.nn.attention import attend_cached
from genfast.ops.attention import attention_ref
from tests.conftest import backend_params

E, H, B, L, S = 32, 2, 2, 5, 7
TOL = dict(atol=2e-5, rtol=2e-5)
BACKENDS = [pytest.param("cpu", "auto", id="cpu-auto")] + backend_params("attention")


def pair(seed=0, **kw):
    """(torch module, genfast module) with the same weights, in training mode (torch's default)."""
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, **kw)
    if ref.in_proj_bias is not None:  # torch zero-initialises the biases: make them count
        with torch.no_grad():
            ref.in_proj_bias.normal_()
            ref.out_proj.bias.normal_()
    ours = MultiheadAttention(E, H, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def inputs(batch_first, nq=L, nk=S, kdim=E, vdim=E, seed=1):
    gen = torch.Generator().manual_seed(seed)

    def make(n, e):
        shape = (B, n, e) if batch_first else (n, B, e)
        return torch.randn(shape, generator=gen).requires_grad_()

    return make(nq, E), make(nk, kdim), make(nk, vdim)


def make_mask(kind, nq=L, nk=S, seed=2):
    """(key_padding_mask, attn_mask) of one kind; no row is fully masked (rows all masked differ by design)."""
    gen = torch.Generator().manual_seed(seed)
    bool2 = torch.rand(nq, nk, generator=gen) < 0.4
    bool2[:, 0] = False
    bool3 = torch.rand(B * H, nq, nk, generator=gen) < 0.4
    bool3[..., 1] = False
    kpm = torch.zeros(B, nk, dtype=torch.bool)
    kpm[0, -2:] = True
    kpm[1, 2] = True
    float_of = lambda m: torch.randn(m.shape, generator=gen).masked_fill(m, float("-inf"))  # noqa: E731
    return {
        "none": (None, None),
        "bool-2d": (None, bool2),
        "float-2d": (None, float_of(bool2)),
        "bool-3d": (None, bool3),
        "float-3d": (None, float_of(bool3)),
        "kpm-bool": (kpm, None),
        "kpm-float": (float_of(kpm), None),
        "kpm-bool+bool-3d": (kpm, bool3),
        "kpm-float+float-2d": (float_of(kpm), float_of(bool2)),
    }[kind]


def run_both(ref, ours, q, k, v, grad_seed=3, **kw):
    """Outputs, weights and gradients (inputs and parameters) of both modules for the same upstream gradient."""
    results = []
    for m in (ref, ours):
        out, w = m(q, k, v, **kw)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
        leaves = [t for t in (q, k, v) if t.requires_grad] + list(m.parameters())
        grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
        results.append((out, w, grads))
    return results


def assert_same(a, b):
    (out_a, w_a, g_a), (out_b, w_b, g_b) = a, b
    torch.testing.assert_close(out_b, out_a, **TOL)
    assert (w_a is None) == (w_b is None)
    if w_a is not None:
        torch.testing.assert_close(w_b, w_a, **TOL)
    for x, y in zip(g_a, g_b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(y, x, **TOL)


# ------------------------------------------------------------------------------------------- MultiheadAttention
MASKS = ["none", "bool-2d", "float-2d", "bool-3d", "float-3d", "kpm-bool", "kpm-float", "kpm-bool+bool-3d",
         "kpm-float+float-2d"]
WEIGHTS = [pytest.param(False, True, id="fused"), pytest.param(True, True, id="weights-avg"),
           pytest.param(True, False, id="weights-per-head")]


@pytest.mark.parametrize("need_weights,average", WEIGHTS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("mask", MASKS)
def test_cross_attention_matches_torch(mask, batch_first, need_weights, average):
    ref, ours = pair(batch_first=batch_first)
    kpm, am = make_mask(mask)
    q, k, v = inputs(batch_first)
    res = run_both(ref, ours, q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights,
                   average_attn_weights=average)
    assert_same(*res)
    if need_weights:
        assert res[1][1].shape == ((B, L, S) if average else (B, H, L, S))


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
@pytest.mark.parametrize("kpm", [False, True], ids=["no-kpm", "kpm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_causal_self_attention_matches_torch(batch_first, kpm, need_weights):
    """is_causal with torch's causal mask (torch requires the mask); query is key is value (one fused GEMM)."""
    ref, ours = pair(batch_first=batch_first)
    x = inputs(batch_first, nq=6)[0]
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    pad = make_mask("kpm-bool", nk=6)[0] if kpm else None
    res = run_both(ref, ours, x, x, x, attn_mask=mask, key_padding_mask=pad, is_causal=True,
                   need_weights=need_weights)
    assert_same(*res)
    # Unlike torch, is_causal alone (no mask) is accepted and means torch's (top-left) causal mask.
    torch.testing.assert_close(ours(x, x, x, is_causal=True, key_padding_mask=pad, need_weights=need_weights)[0],
                               res[0][0], **TOL)


def test_causal_hint_cross_attention_is_top_left():
    """Nq != Nk: torch's causal is aligned top-left (genfast's op bottom-right): the module keeps torch's."""
    ref, ours = pair(batch_first=True)
    q, k, v = inputs(True)
    mask = torch.ones(L, S, dtype=torch.bool).tril().logical_not()
    want = ref(q, k, v, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(ours(q, k, v, is_causal=True, need_weights=False)[0], want, **TOL)
    torch.testing.assert_close(ours(q, k, v, attn_mask=mask, is_causal=True, need_weights=False)[0], want, **TOL)


CONFIGS = {
    "kdim-vdim": dict(kdim=12, vdim=20),
    "no-bias": dict(bias=False),
    "kdim-no-bias": dict(kdim=12, vdim=12, bias=False),
    "bias-kv": dict(add_bias_kv=True),
    "zero-attn": dict(add_zero_attn=True),
    "bias-kv+zero-attn+kdim": dict(add_bias_kv=True, add_zero_attn=True, kdim=12, vdim=20),
}


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
@pytest.mark.parametrize("mask", ["none", "kpm-bool+bool-3d", "kpm-float+float-2d"])
@pytest.mark.parametrize("config", CONFIGS)
def test_configurations_match_torch(config, mask, need_weights):
    kw = CONFIGS[config]
    ref, ours = pair(batch_first=True, **kw)
    if ref.bias_k is not None:
        with torch.no_grad():
            ref.bias_k.normal_()
            ref.bias_v.normal_()
        ours.load_state_dict(ref.state_dict())
    kpm, am = make_mask(mask)
    q, k, v = inputs(True, kdim=kw.get("kdim", E), vdim=kw.get("vdim", E))
    assert_same(*run_both(ref, ours, q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights))


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
def test_unbatched_and_eval(need_weights):
    ref, ours = pair()
    q, k, v = (t[:, 0].detach() for t in inputs(False))  # [N, E]
    kpm, am = make_mask("kpm-bool+bool-3d")
    kpm, am = kpm[0], am[:H]
    for mode in ("train", "eval"):
        ref.train(mode == "train")
        ours.train(mode == "train")
        with torch.no_grad():  # eval + no grad: torch takes its own native fast path; the outputs must still agree
            a = ref(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)
            b = ours(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)
        assert b[0].shape == (L, E)
        torch.testing.assert_close(b[0], a[0], **TOL)
        if need_weights:
            assert b[1].shape == (L, S)
            torch.testing.assert_close(b[1], a[1], **TOL)
        else:
            assert b[1] is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_error_within_torchs(dtype):
    """Fused path in fp16/bf16 vs torch in fp32: at most twice torch's own error in that dtype plus a floor."""
    ref, ours = pair(batch_first=True)
    q, k, v = (t.detach() for t in inputs(True))
    kpm, am = make_mask("kpm-float+float-2d")
    want = ref(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)[0]
    low = [copy.deepcopy(m).to(dtype) for m in (ref, ours)]
    args = [x.to(dtype) for x in (q, k, v)]
    masks = dict(key_padding_mask=kpm.to(dtype), attn_mask=am.to(dtype), need_weights=False)
    err_torch = (low[0](*args, **masks)[0].float() - want).abs().max().item()
    err_ours = (low[1](*args, **masks)[0].float() - want).abs().max().item()
    floor = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert err_ours <= 2 * err_torch + floor, (err_ours, err_torch)


def test_fp64_takes_the_written_out_path():
    ref, ours = pair(batch_first=True)
    ref, ours = ref.double(), ours.double()
    q, k, v = (t.detach().double() for t in inputs(True))
    causal = ~torch.ones(L, S, dtype=torch.bool).tril()
    torch.testing.assert_close(ours(q, k, v, need_weights=False, is_causal=True)[0],
                               ref(q, k, v, need_weights=False, attn_mask=causal)[0])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_fused_path_on_each_backend(device, backend):
    """need_weights=False through each attention backend serving here (Triton in its interpreter on CPU)."""
    ref, ours = pair(batch_first=True)
    ref, ours = ref.to(device), ours.to(device)
    kpm, am = make_mask("kpm-bool+bool-3d")
    q, k, v = (t.detach().to(device).requires_grad_() for t in inputs(True))
    with genfast.backend(backend):
        assert_same(*run_both(ref, ours, q, k, v, key_padding_mask=kpm.to(device), attn_mask=am.to(device),
                              need_weights=False))


def test_dropout_exact_and_statistical():
    """Training dropout on the fused path is genfast's seeded dropout: the same as attention_ref given the seed
    the module draws from torch's default generator, and unbiased (its mean over draws is the eval output)."""
    p = 0.3
    _, ours = pair(batch_first=True, dropout=p)
    q, k, v = (t.detach() for t in inputs(True))
    torch.manual_seed(5)
    got = ours(q, k, v, need_weights=False)[0]
    torch.manual_seed(5)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)  # what genfast.ops.attention draws
    qh, kh, vh = ours._project(q, k, v, False)
    want = attention_ref(qh, kh, vh, dropout_p=p, seed=seed)
    want = ours.out_proj(want.transpose(1, 2).reshape(B, L, E))
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got, ours(q, k, v, need_weights=False)[0])  # a new seed each call
    with torch.no_grad():
        draws = torch.stack([ours(q, k, v, need_weights=False)[0] for _ in range(400)])
        ours.eval()
        clean = ours(q, k, v, need_weights=False)[0]
    # The mean of 400 draws is within 5 standard errors of the undropped output, everywhere.
    stderr = draws.std(dim=0) / 400**0.5
    assert ((draws.mean(dim=0) - clean).abs() <= 5 * stderr + 1e-4).all()
    # The weights path drops the returned weights as torch does: about p of them are zero.
    _, w = ours.train()(q, k, v, need_weights=True, average_attn_weights=False)
    assert abs((w == 0).float().mean().item() - p) < 0.1


def test_fully_masked_row_is_zero_on_fused_path():
    ref, ours = pair(batch_first=True)
    q, k, v = (t.detach() for t in inputs(True))
    am = torch.zeros(L, S, dtype=torch.bool)
    am[2] = True  # query 2 may see no key
    out = ours(q, k, v, attn_mask=am, need_weights=False)[0]
    torch.testing.assert_close(out[:, 2], ours.out_proj.bias.expand(B, E))  # zero attention, then out_proj
    assert ours(q, k, v, attn_mask=am)[1][:, 2].isnan().all()  # the weights path, like torch's weights


@pytest.mark.parametrize("config", ["default", "kdim-vdim", "no-bias", "bias-kv"])
def test_state_dict_both_ways(config):
    kw = {} if config == "default" else CONFIGS[config]
    torch.manual_seed(0)
    theirs, ours = nn.MultiheadAttention(E, H, **kw), MultiheadAttention(E, H, **kw)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, t in theirs.state_dict().items():
        assert ours.state_dict()[name].shape == t.shape, name
    ours.load_state_dict(theirs.state_dict())
    for name, t in ours.state_dict().items():
        assert torch.equal(t, theirs.state_dict()[name])
    with torch.no_grad():
        for prm in ours.parameters():
            prm.normal_()
    theirs.load_state_dict(ours.state_dict())
    for name, t in theirs.state_dict().items():
        assert torch.equal(t, ours.state_dict()[name])
    assert isinstance(ours, nn.MultiheadAttention)


def test_compile_fullgraph():
    _, ours = pair(batch_first=True)
    q, k, v = (t.detach() for t in inputs(True))
    kpm, am = make_mask("kpm-bool+bool-3d")
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)[0],
                               ours(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)[0], **TOL)


def test_bad_input():
    mha = MultiheadAttention(E, H, batch_first=True, kdim=12, vdim=20)
    q, k, v = torch.randn(B, L, E), torch.randn(B, S, 12), torch.randn(B, S, 20)
    cases = [
        ((q[..., :8], k, v), {}, ValueError, "query must have 32 features"),
        ((q, v, v), {}, ValueError, "key must have 12 features"),
        ((q, k, k), {}, ValueError, "value must have 20 features"),
        ((q, k, v[:, :3]), {}, ValueError, "key .* and value .* must agree"),
        ((q, k[:1], v[:1]), {}, ValueError, "key has batch 1 but query has batch 2"),
        ((q[None], k, v), {}, ValueError, "3-D .* or 2-D"),
        ((q.double(), k, v), {}, TypeError, "key has dtype"),
        ((q.int(), k, v), {}, TypeError, "query must be a floating tensor"),
        ((q, k, v), {"key_padding_mask": torch.zeros(B, S + 1, dtype=torch.bool)}, ValueError, "key_padding_mask"),
        ((q, k, v), {"attn_mask": torch.zeros(L, L)}, ValueError, "attn_mask must have shape"),
        ((q, k, v), {"attn_mask": torch.zeros(B, L, S)}, ValueError, "attn_mask must have shape"),
        ((q, k, v), {"attn_mask": torch.zeros(L, S, dtype=torch.int64)}, TypeError, "attn_mask must be bool"),
        ((q, k, v), {"key_padding_mask": [[0]]}, TypeError, "key_padding_mask must be a torch.Tensor"),
        ((q, k, torch.randn(B, S, 20, device="meta")), {}, ValueError, "value is on meta"),
    ]
    for args, kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            mha(*args, **kw)


# ------------------------------------------------------------------------------------------- fuse()
def transformer(batch_first=True, nhead=H):
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, nhead, 64, dropout=0.0, batch_first=batch_first), 2,
                                enable_nested_tensor=False)
    dec = nn.TransformerDecoderLayer(E, nhead, 64, dropout=0.0, batch_first=batch_first)
    return nn.ModuleDict({"enc": enc, "dec": dec})


def run_transformer(model, x, y, kpm, causal):
    mem = model["enc"](x, src_key_padding_mask=kpm)
    mask = nn.Transformer.generate_square_subsequent_mask(y.shape[1 if model["dec"].self_attn.batch_first else 0])
    return model["dec"](y, mem, tgt_mask=mask, tgt_is_causal=causal, memory_key_padding_mask=kpm)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_fuse_transformer(batch_first, monkeypatch):
    model = transformer(batch_first)
    fused = copy.deepcopy(model)
    before = {n: prm for n, prm in fused.named_parameters()}
    fused, report = genfast.fuse(fused)
    paths = [p for p, _ in report.replaced]
    assert paths == ["enc.layers.0.self_attn", "enc.layers.1.self_attn", "dec.self_attn", "dec.multihead_attn"]
    assert all(type(m) is not nn.MultiheadAttention for m in fused.modules())
    assert "bypasses self_attn" in dict(report.replaced)["enc.layers.0.self_attn"]
    assert "note" not in dict(report.replaced)["dec.self_attn"]
    # Weights shared, not copied, with the modules they replaced: the same parameter objects under the same names.
    assert {n: id(prm) for n, prm in fused.named_parameters()} == {n: id(prm) for n, prm in before.items()}

    calls = []
    forward = MultiheadAttention.forward
    monkeypatch.setattr(MultiheadAttention, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    gen = torch.Generator().manual_seed(1)
    shape = (lambda n: (B, n, E)) if batch_first else (lambda n: (n, B, E))
    x, y = torch.randn(shape(S), generator=gen), torch.randn(shape(L), generator=gen)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -3:] = True
    for causal in (False, True):
        # Training mode with gradients: every attention is genfast's.
        calls.clear()
        out = run_transformer(fused, x, y, kpm, causal)
        assert len(calls) == 4
        want = run_transformer(model, x, y, kpm, causal)
        torch.testing.assert_close(out, want, **TOL)
        g = torch.randn(out.shape, generator=gen)
        for a, b in zip(torch.autograd.grad(want, list(model.parameters()), g),
                        torch.autograd.grad(out, list(fused.parameters()), g)):
            torch.testing.assert_close(b, a, **TOL)
    # Eval without gradients: the encoder layers take torch's own fused layer kernel when batch_first (as the
    # report says); outputs are unchanged either way.
    model.eval()
    fused.eval()
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(run_transformer(fused, x, y, kpm, False), run_transformer(model, x, y, kpm, False),
                                   **TOL)
    assert len(calls) == (2 if batch_first else 4)


def test_fuse_idempotent_and_root():
    model = nn.Sequential(nn.MultiheadAttention(E, H))
    _, report = genfast.fuse(model)
    assert [p for p, _ in report.replaced] == ["0"]
    _, again = genfast.fuse(model)
    assert again.replaced == []
    _, root = genfast.fuse(nn.MultiheadAttention(E, H), rewrites=["attention"])
    assert root.replaced == [] and "root module" in root.left_alone[0][1]


# ------------------------------------------------------------------------------------------- CausalSelfAttention
def gpt_attention(dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    m = CausalSelfAttention(E, H, dropout=dropout, bias=bias, max_seq_len=16)
    return m.eval()


def test_causal_self_attention_is_nanogpt():
    """Same as nanoGPT's CausalSelfAttention written with torch's SDPA, outputs and gradients."""
    m = gpt_attention(bias=False).train()
    x = torch.randn(B, 9, E, requires_grad=True)
    out = m(x)

    q, k, v = m.c_attn(x).split(E, dim=2)
    q, k, v = (t.view(B, 9, H, E // H).transpose(1, 2) for t in (q, k, v))
    y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = m.c_proj(y.transpose(1, 2).reshape(B, 9, E))
    torch.testing.assert_close(out, want, **TOL)
    g = torch.randn_like(out)
    leaves = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(want, leaves, g), torch.autograd.grad(out, leaves, g)):
        torch.testing.assert_close(b, a, **TOL)
    assert set(m.state_dict()) == {"c_attn.weight", "c_proj.weight"}


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_kv_cache_incremental_equals_full(device, backend):
    """Prefill 5 tokens, then 1, 1, a chunk of 3 and 1: the same outputs as the whole sequence at once."""
    m = gpt_attention().to(device)
    x = torch.randn(B, 11, E, device=device)
    with torch.no_grad(), genfast.backend(backend):
        full = m(x)
        cache = m.new_cache(B)
        pieces, start = [], 0
        for t in (5, 1, 1, 3, 1):
            pieces.append(m(x[:, start:start + t], kv_cache=cache))
            start += t
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)
    assert cache.lengths.tolist() == [11, 11] and cache.bound == 11


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_kv_cache_ragged_lengths(device, backend):
    """Sequences with prompts of different lengths decode together: each equals its own full pass."""
    m = gpt_attention().to(device)
    prompts = [torch.randn(1, 3, E, device=device), torch.randn(1, 6, E, device=device)]
    steps = torch.randn(B, 4, E, device=device)
    with torch.no_grad(), genfast.backend(backend):
        cache = m.new_cache(B, lengths=[3, 6])
        for i, p in enumerate(prompts):  # prefill each sequence alone, then copy its keys/values into the batch
            own = m.new_cache(1)
            m(p, kv_cache=own)
            cache.k[i], cache.v[i] = own.k[0], own.v[0]
        out = torch.cat([m(steps[:, i:i + 1], kv_cache=cache) for i in range(4)], dim=1)
        for i, p in enumerate(prompts):
            want = m(torch.cat([p, steps[i:i + 1]], dim=1))[:, -4:]
            torch.testing.assert_close(out[i:i + 1], want, **TOL)
    assert cache.lengths.tolist() == [7, 10] and cache.bound == 10


def test_kv_cache_errors():
    m = gpt_attention()
    cache = m.new_cache(B, max_seq_len=4)
    with torch.no_grad():
        m(torch.randn(B, 3, E), kv_cache=cache)
        with pytest.raises(ValueError, match="overflow max_seq_len=4"):
            m(torch.randn(B, 2, E), kv_cache=cache)
        with pytest.raises(ValueError, match="kv_cache holds 2 sequences, x has 1"):
            m(torch.randn(1, 1, E), kv_cache=cache)
    with pytest.raises(ValueError, match=r"x must be \[B, T, C\]"):
        m(torch.randn(B, 3, E + 1))
    with pytest.raises(ValueError, match="n_embd=30 must be a multiple of n_head=4"):
        CausalSelfAttention(30, 4)
    with pytest.raises(ValueError, match="lengths must lie in"):
        KVCache(2, 2, 4, 16, lengths=[1, 5])
    with pytest.raises(ValueError, match="max_seq_len must be an int"):
        KVCache(2, 2, 0, 16)
    with pytest.raises(ValueError, match="KVCache.append: k and v"):
        cache.append(torch.randn(B, H, 1, 8), torch.randn(B, H, 1, 8))


def test_kv_cache_set_lengths_rewinds_and_copies():
    """set_lengths forgets tokens (later appends overwrite them) and copies its argument, so caches of several
    layers given one lengths tensor do not advance each other's lengths."""
    m = gpt_attention()
    x = torch.randn(B, 6, E)
    with torch.no_grad():
        shared = torch.tensor([2, 4])
        caches = [m.new_cache(B), m.new_cache(B)]
        for cache in caches:
            m(x[:, :4], kv_cache=cache)
            cache.set_lengths(shared)
        out = [m(x[:, 5:6], kv_cache=cache) for cache in caches]
        assert shared.tolist() == [2, 4] and all(c.lengths.tolist() == [3, 5] and c.bound == 5 for c in caches)
        for i, n in enumerate((2, 4)):  # row i == its own prefix of n tokens, then token 5
            want = m(torch.cat([x[i:i + 1, :n], x[i:i + 1, 5:6]], dim=1))[:, -1:]
            torch.testing.assert_close(out[0][i:i + 1], want, **TOL)
            torch.testing.assert_close(out[1][i:i + 1], want, **TOL)
    with pytest.raises(ValueError, match="set_lengths: lengths must be a tensor of shape"):
        caches[0].set_lengths(torch.tensor([1]))
    with pytest.raises(ValueError, match="set_lengths: bound must be an int"):
        caches[0].set_lengths(torch.tensor([1, 1]), bound=10**6)


@pytest.mark.parametrize("new_tokens", [1, 17])  # the decode path and the prefill path
def test_kv_cache_set_lengths_past_the_bound_is_followed(new_tokens):
    """Issue 18 #8: lengths set past the host-side bound (slots the caller filled itself) are attended, the new
    tokens' own keys included: the bound follows the lengths."""
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(2, 2, 40, 8)
    cache.append(*(torch.randn(2, 2, 2, 8, generator=gen) for _ in range(2)))
    cache.k[:, :, 2:9], cache.v[:, :, 2:9] = torch.randn(2, 2, 2, 7, 8, generator=gen)  # filled by the caller
    cache.set_lengths(torch.tensor([5, 9]))
    assert cache.bound == 9
    k, v, q = (torch.randn(2, 2, new_tokens, 8, generator=gen) for _ in range(3))
    with torch.no_grad():
        cache.append(k, v)
        got = attend_cached(q, cache)
    for i, n in enumerate((5, 9)):
        keys = torch.cat([cache.k[i:i + 1, :, :n], k[i:i + 1]], dim=2)
        values = torch.cat([cache.v[i:i + 1, :, :n], v[i:i + 1]], dim=2)
        want = nn.functional.scaled_dot_product_attention(q[i:i + 1], keys, values,
                                                          attn_mask=torch.ones(new_tokens, n + new_tokens,
                                                                               dtype=torch.bool).tril(n))
        torch.testing.assert_close(got[i:i + 1], want, **TOL)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, max_seq_len=40\]"):
        cache.set_lengths(torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, max_seq_len=40\]"):
        cache.set_lengths(torch.tensor([41, 3]))
    with pytest.raises(ValueError, match=r"bound must be an int in \[max\(lengths\)=7, 40\]"):
        cache.set_lengths(torch.tensor([7, 3]), bound=5)
    with pytest.raises(TypeError, match="lengths must hold integers"):
        cache.set_lengths(torch.tensor([1.0, 3.0]))
