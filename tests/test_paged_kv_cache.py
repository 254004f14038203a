"""Paged KV caches (issue 30): attention_decode(..., block_table=) and kv_cache_append(..., block_table=).

A paged cache is the dense cache [B, Hk, Nmax, D] cut into blocks of block_size slots that live anywhere in a pool
[num_blocks, Hk, block_size, D]; ``block_table[b, j]`` names the block holding sequence b's slots
[j * block_size, (j + 1) * block_size). Every test builds the same cache both ways, with the blocks dealt to the
sequences in a shuffled order, the unused blocks of the pool and the slots past each length filled with NaN and the
table entries past each length set to -1 (so a kernel that reads what it must not gives NaN or faults), and checks:

- decode: the paged result equals the dense one *bitwise* on every backend (reference, C++ CPU, interpreted Triton):
  each kernel runs the dense path's tiles, key blocks and splits over the logical slots and only fetches the rows
  through the table, so the arithmetic is the same (the C++ kernel copies a key block that spans pages into its fp32
  buffer first: a copy, not arithmetic). The dense path itself is held to the spec in test_attention_decode.py;
- append: the paged cache read back through its table equals the dense cache after the same append, bitwise;
- validation: wrong dtype/shape/device/block size, a needed entry outside the pool, two tokens written to one slot;
- without validation: decode clamps a needed entry into the pool, the append drops the token (every backend alike).
"""

import pytest
import torch

import genfast
from genfast.ops import attention_decode, kv_cache_append
from genfast.ops.attention_decode import attention_decode_ref, paged_to_dense
from tests.conftest import backend_params, serving_backends

PARAMS = backend_params("attention_decode") + [pytest.param("cpu", "reference", id="cpu-reference")]
APPEND_PARAMS = backend_params("kv_cache_append") + [pytest.param("cpu", "reference", id="cpu-reference")]
DTYPES = [torch.float32, torch.bfloat16]


def _shuffled_table(b: int, per_seq: int, spare: int, seed: int) -> tuple[torch.Tensor, int]:
    """A block table dealing a pool of b * per_seq + spare blocks to the sequences in a random order."""
    gen = torch.Generator().manual_seed(seed)
    blocks = b * per_seq + spare
    return torch.randperm(blocks, generator=gen)[:b * per_seq].view(b, per_seq).to(torch.int32), blocks


def _to_paged(dense: torch.Tensor, table: torch.Tensor, blocks: int, lengths: list[int]) -> torch.Tensor:
    """The pool holding ``dense``'s slots below each length where ``table`` says; NaN everywhere else."""
    b, hk, nmax, d = dense.shape
    page = nmax // table.shape[1]
    pool = torch.full((blocks, hk, page, d), float("nan"), dtype=dense.dtype)
    for i in range(b):
        for j in range(table.shape[1]):
            lo, hi = j * page, min((j + 1) * page, lengths[i])
            if hi > lo:
                pool[int(table[i, j]), :, :hi - lo] = dense[i, :, lo:hi]
    return pool


def _forget_unused(table: torch.Tensor, page: int, lengths: list[int]) -> torch.Tensor:
    """The table with -1 in every entry past a sequence's length (entries a kernel must never read)."""
    table = table.clone()
    for i, n in enumerate(lengths):
        table[i, -(-n // page):] = -1
    return table


def _caches(b, hk, page, per_seq, d, dtype, lengths, seed, spare=3):
    gen = torch.Generator().manual_seed(seed)
    nmax = page * per_seq
    k = torch.randn(b, hk, nmax, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hk, nmax, d, generator=gen, dtype=torch.float64).to(dtype)
    for i, n in enumerate(lengths):  # slots past a length hold NaN in the dense cache too
        k[i, :, n:] = float("nan")
        v[i, :, n:] = float("nan")
    table, blocks = _shuffled_table(b, per_seq, spare, seed)
    kp, vp = _to_paged(k, table, blocks, lengths), _to_paged(v, table, blocks, lengths)
    return k, v, kp, vp, _forget_unused(table, page, lengths)


def _device(device, *tensors):
    return [t.to(device) for t in tensors]


# (B, Hq, Hk, Nq, block_size, max_blocks_per_seq, D, lengths, options)
CASES = {
    "one-token-page16": (3, 2, 2, 1, 16, 7, 16, [1, 17, 112], {}),
    "gqa-4-new-mid-block": (3, 4, 2, 4, 16, 5, 32, [4, 31, 70], {}),
    "mqa-page32-noncausal": (2, 4, 1, 3, 32, 3, 16, [3, 96], {"causal": False}),
    "window-left-page16": (2, 2, 1, 2, 16, 6, 16, [2, 90], {"window": (9, None)}),
    "window-both-noncausal": (2, 2, 2, 5, 16, 4, 16, [7, 50], {"window": (4, 2), "causal": False}),
    "16-new-page64-d80": (2, 2, 1, 16, 64, 2, 80, [16, 100], {"scale": 0.2}),
    "page128-odd-d": (2, 3, 1, 1, 128, 2, 24, [129, 200], {}),
    "page256-splits": (2, 2, 2, 2, 256, 2, 16, [5, 300], {"num_splits": 3}),
    "invariant-page16": (3, 4, 2, 1, 16, 8, 16, [1, 65, 128], {"batch_invariant": True}),
    "invariant-gqa-window": (2, 4, 1, 2, 32, 8, 16, [40, 256], {"batch_invariant": True, "window": (50, None)}),
}


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_decode_paged_equals_dense(device, backend, dtype, case):
    b, hq, hk, nq, page, per_seq, d, lengths, options = CASES[case]
    k, v, kp, vp, table = _caches(b, hk, page, per_seq, d, dtype, lengths, seed=len(case))
    q = torch.randn(b, hq, nq, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    q, k, v, kp, vp, table = _device(device, q, k, v, kp, vp, table)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    with genfast.backend(backend):
        dense = attention_decode(q, k, v, seqlens, return_lse=True, **options)
        paged = attention_decode(q, kp, vp, seqlens, return_lse=True, block_table=table, **options)
        dense_out = attention_decode(q, k, v, seqlens, **options)  # the reference runs SDPA without lse
        paged_out = attention_decode(q, kp, vp, seqlens, block_table=table, **options)
    assert not paged[0].isnan().any() and not paged[1].isnan().any()
    assert torch.equal(paged[0], dense[0]) and torch.equal(paged[1], dense[1])
    assert torch.equal(paged_out, dense_out)


def test_reference_spec_reads_the_logical_view():
    """attention_decode_ref(block_table=) is the dense spec over the table's view, exactly."""
    b, hq, hk, nq, page, per_seq, d, lengths, options = CASES["gqa-4-new-mid-block"]
    k, v, kp, vp, table = _caches(b, hk, page, per_seq, d, torch.float64, lengths, seed=4)
    q = torch.randn(b, hq, nq, d, dtype=torch.float64)
    seqlens = torch.tensor(lengths)
    want = attention_decode_ref(q, k, v, seqlens, return_lse=True)
    got = attention_decode_ref(q, kp, vp, seqlens, return_lse=True, block_table=table)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    view = paged_to_dense(kp, table)
    for i, n in enumerate(lengths):
        assert torch.equal(view[i, :, :n], k[i, :, :n])


@pytest.mark.parametrize("device,backend", PARAMS)
def test_unvalidated_zero_lengths(device, backend):
    """validate=False with a length 0 (or past Nmax): the dense semantics (0 and lse -inf; clamped to Nmax)."""
    k, v, kp, vp, table = _caches(3, 2, 16, 3, 16, torch.float32, [0, 48, 20], seed=2)
    table[0] = torch.tensor([-5, 99, 1 << 30], dtype=torch.int32)  # never needed: the row has no key
    q = torch.randn(3, 2, 1, 16)
    q, k, v, kp, vp, table = _device(device, q, k, v, kp, vp, table)
    seqlens = torch.tensor([0, 1000, 20], device=device)
    with genfast.backend(backend):
        dense = attention_decode(q, k, v, seqlens, return_lse=True, validate=False)
        paged = attention_decode(q, kp, vp, seqlens, return_lse=True, block_table=table, validate=False)
    assert torch.equal(paged[0], dense[0]) and torch.equal(paged[1], dense[1])
    assert (paged[0][0] == 0).all() and (paged[1][0] == float("-inf")).all()


# ------------------------------------------------------------------------------------------ append
# (lengths before, Nnew): a write inside a block, one that crosses a block boundary, one from 0 over several blocks
APPENDS = {
    "crosses-a-boundary": ([14, 0, 31], 5),
    "from-zero-over-blocks": ([0, 16, 40], 16),
    "one-token": ([15, 16, 47], 1),
}


@pytest.mark.parametrize("device,backend", APPEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(APPENDS))
def test_append_paged_equals_dense(device, backend, dtype, case):
    lengths, nnew = APPENDS[case]
    b, hk, page, per_seq, d = 3, 2, 16, 4, 24
    k, v, kp, vp, table = _caches(b, hk, page, per_seq, d, dtype, lengths, seed=7)
    full = [n + nnew for n in lengths]
    table = _forget_unused(_shuffled_table(b, per_seq, 3, 7)[0], page, full)  # the blocks the new tokens need
    gen = torch.Generator().manual_seed(8)
    k_new = torch.randn(b, hk, nnew, d, generator=gen).to(dtype)
    v_new = torch.randn(b, hk, nnew, d, generator=gen).to(dtype)
    k, v, kp, vp, table, k_new, v_new = _device(device, k, v, kp, vp, table, k_new, v_new)
    before = kp.clone()
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    with genfast.backend(backend):
        kv_cache_append(k, v, k_new, v_new, seqlens)
        kv_cache_append(kp, vp, k_new, v_new, seqlens, block_table=table)
    kd, vd = paged_to_dense(kp, table), paged_to_dense(vp, table)
    for i, n in enumerate(full):
        assert torch.equal(kd[i, :, :n], k[i, :, :n]) and torch.equal(vd[i, :, :n], v[i, :, :n])
    # Nothing but the new tokens' slots changed: the pool's other slots are as they were (NaN included).
    written = torch.zeros(kp.shape[0], page, dtype=torch.bool)
    for i, n in enumerate(lengths):
        for pos in range(n, n + nnew):
            written[int(table[i, pos // page]), pos % page] = True
    untouched = ~written[:, None, :, None].expand(kp.shape).to(device)
    assert torch.equal(kp[untouched].isnan(), before[untouched].isnan())
    assert torch.equal(kp[untouched].nan_to_num(), before[untouched].nan_to_num())


@pytest.mark.parametrize("device,backend", APPEND_PARAMS)
def test_append_then_decode_paged(device, backend):
    """A generation's pattern: append Nq tokens through the table, then decode them: the dense result, bitwise."""
    b, hq, hk, page, per_seq, d, nq = 2, 4, 2, 16, 4, 16, 3
    lengths = [13, 45]
    k, v, kp, vp, _ = _caches(b, hk, page, per_seq, d, torch.float32, lengths, seed=9)
    table = _forget_unused(_shuffled_table(b, per_seq, 3, 9)[0], page, [n + nq for n in lengths])
    q = torch.randn(b, hq, nq, d)
    k_new, v_new = torch.randn(b, hk, nq, d), torch.randn(b, hk, nq, d)
    q, k, v, kp, vp, table, k_new, v_new = _device(device, q, k, v, kp, vp, table, k_new, v_new)
    seqlens = torch.tensor(lengths, device=device)
    with genfast.backend(backend):
        kv_cache_append(k, v, k_new, v_new, seqlens)
        kv_cache_append(kp, vp, k_new, v_new, seqlens, block_table=table)
    decode_backend = "reference" if backend == "reference" else backend
    with genfast.backend(decode_backend):
        dense = attention_decode(q, k, v, seqlens + nq, return_lse=True)
        paged = attention_decode(q, kp, vp, seqlens + nq, return_lse=True, block_table=table)
    assert torch.equal(paged[0], dense[0]) and torch.equal(paged[1], dense[1])


# ------------------------------------------------------------------------------------------ without validation
@pytest.mark.parametrize("device,backend", PARAMS)
def test_unvalidated_bad_entries_are_clamped_by_decode(device, backend):
    """A needed entry outside the pool reads the clamped block (memory-safe; every backend alike)."""
    k, v, kp, vp, table = _caches(2, 2, 16, 3, 16, torch.float32, [40, 48], seed=11, spare=0)
    kp, vp = kp.nan_to_num(), vp.nan_to_num()
    table[0, 1], table[1, 2] = -7, 1 << 20
    q = torch.randn(2, 2, 1, 16)
    clamped = table.clamp(0, kp.shape[0] - 1)
    q, kp, vp, table, clamped = _device(device, q, kp, vp, table, clamped)
    seqlens = torch.tensor([40, 48], device=device)
    with genfast.backend(backend):
        got = attention_decode(q, kp, vp, seqlens, block_table=table, validate=False, return_lse=True)
        want = attention_decode(q, kp, vp, seqlens, block_table=clamped, return_lse=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device,backend", APPEND_PARAMS)
def test_unvalidated_bad_entries_drop_the_append(device, backend):
    """A token whose block entry is outside the pool is dropped (never written into another block); the others land."""
    pool = torch.zeros(6, 1, 16, 4)
    table = torch.tensor([[2, -1], [5, 1 << 30]], dtype=torch.int32)
    new = torch.arange(1, 1 + 2 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    lengths = [14, 15]
    kp, vp, table, new = _device(device, pool, pool.clone(), table, new)
    with genfast.backend(backend):
        kv_cache_append(kp, vp, new, new, torch.tensor(lengths, device=device), block_table=table, validate=False)
    want = torch.zeros(6, 1, 16, 4)
    want[2, 0, 14:16] = new[0, 0, :2].cpu()  # tokens 2 and 3 of row 0 were headed for entry -1
    want[5, 0, 15] = new[1, 0, 0].cpu()  # tokens 1.. of row 1 for an entry past the pool
    assert torch.equal(kp.cpu(), want) and torch.equal(vp.cpu(), want)


# ------------------------------------------------------------------------------------------ validation
def _args():
    k, v, kp, vp, table = _caches(2, 2, 16, 3, 16, torch.float32, [5, 40], seed=12)
    return torch.randn(2, 2, 1, 16), kp, vp, torch.tensor([5, 40]), table


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(block_table=a["block_table"].long()), TypeError, "block_table must have dtype int32"),
    (lambda a: a.update(block_table=a["block_table"][0]), ValueError, "block_table must be 2-D"),
    (lambda a: a.update(block_table=a["block_table"][:1]), ValueError, "one row of blocks per sequence"),
    (lambda a: a.update(block_table=a["block_table"][:, :0]), ValueError, "at least one block"),
    (lambda a: a.update(block_table=[[0, 1, 2]] * 2), TypeError, "block_table must be a torch.Tensor"),
    (lambda a: a.update(k=a["k"][:, :, :8], v=a["v"][:, :, :8]), ValueError, "block_size=8"),
    (lambda a: a.update(k=torch.zeros(4, 2, 48, 16), v=torch.zeros(4, 2, 48, 16)), ValueError, "block_size=48"),
    (lambda a: a.update(k=a["k"][:0], v=a["v"][:0]), ValueError, "at least one block"),
    (lambda a: a["block_table"].__setitem__((1, 2), 9), ValueError, r"block_table\[1, 2\] = 9"),
    (lambda a: a["block_table"].__setitem__((1, 0), -1), ValueError, r"block_table\[1, 0\] = -1"),
    (lambda a: a.update(seqlens=torch.tensor([5, 49])), ValueError, r"cache_seqlens must be in \[1, 48\]"),
])
def test_decode_validation(change, error, match):
    q, k, v, seqlens, table = _args()
    a = dict(q=q, k=k, v=v, seqlens=seqlens, block_table=table)
    change(a)
    with pytest.raises(error, match=match):
        attention_decode(a["q"], a["k"], a["v"], a["seqlens"], block_table=a["block_table"])


def test_decode_entries_not_needed_are_not_validated():
    """-1 past a length, and left of a window, is what a serving engine leaves there: no error, the same answer."""
    q, k, v, seqlens, table = _args()
    want = attention_decode(q, k, v, seqlens, block_table=table, window=(3, None))
    table[1, 0] = -1  # row 1 (40 tokens) with a window of 3 sees keys 36..39 only: block 0 is not needed
    assert torch.equal(attention_decode(q, k, v, seqlens, block_table=table, window=(3, None)), want)
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = -1"):
        attention_decode(q, k, v, seqlens, block_table=table)


def test_append_validation():
    pool = torch.zeros(6, 2, 16, 8)
    new = torch.zeros(2, 2, 3, 8)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    ok = torch.tensor([0, 29])
    kv_cache_append(pool, pool.clone(), new, new, ok, block_table=table)
    with pytest.raises(ValueError, match=r"cache_seqlens must be in \[0, 29\]"):
        kv_cache_append(pool, pool.clone(), new, new, torch.tensor([0, 30]), block_table=table)
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 6"):
        kv_cache_append(pool, pool.clone(), new, new, torch.tensor([0, 15]),
                        block_table=torch.tensor([[0, 1], [2, 6]], dtype=torch.int32))
    # Row 1's first block is not written (its tokens go to slots 16..18): -1 there is fine.
    kv_cache_append(pool, pool.clone(), new, new, torch.tensor([0, 16]),
                    block_table=torch.tensor([[0, 1], [-1, 3]], dtype=torch.int32))
    with pytest.raises(ValueError, match="two of the new tokens to one slot"):
        kv_cache_append(pool, pool.clone(), new, new, torch.tensor([0, 0]),
                        block_table=torch.tensor([[0, 1], [0, 3]], dtype=torch.int32))
    with pytest.raises(ValueError, match="one row of blocks per sequence"):
        kv_cache_append(pool, pool.clone(), new, new, ok, block_table=table[:1])
    with pytest.raises(ValueError, match="block_size=12"):
        kv_cache_append(torch.zeros(6, 2, 12, 8), torch.zeros(6, 2, 12, 8), new, new, ok, block_table=table)
    with pytest.raises(TypeError, match="block_table must have dtype int32"):
        kv_cache_append(pool, pool.clone(), new, new, ok, block_table=table.long())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_block_table_device():
    q, k, v, seqlens, table = _args()
    with pytest.raises(ValueError, match="block_table is on"):
        attention_decode(q.cuda(), k.cuda(), v.cuda(), seqlens.cuda(), block_table=table)


# ------------------------------------------------------------------------------------------ opcheck, compile
@pytest.mark.parametrize("device,backend", backend_params("attention_decode"))
def test_opcheck_paged(device, backend):
    q, k, v, seqlens, table = _args()
    q, k, v, seqlens, table = _device(device, q, k.nan_to_num(), v.nan_to_num(), seqlens, table.clamp(min=0))
    op = torch.ops.genfast.attention_decode if backend in ("cuda", "cpu") else torch.ops.genfast.attention_decode_triton
    torch.library.opcheck(op, (q, k, v, seqlens, True, 0.25, 4, 0, 2, table))
    appends = [torch.ops.genfast.kv_cache_append_triton, torch.ops.genfast.kv_cache_append_torch]
    if backend == "cpu":
        appends.append(torch.ops.genfast.kv_cache_append)
    new = torch.randn(2, 2, 3, 16, device=device)
    for op in appends:
        torch.library.opcheck(op, (k.clone(), v.clone(), new, new.clone(), seqlens - 3, table))


@pytest.mark.parametrize("device,backend", PARAMS)
def test_compile_fullgraph_paged(device, backend):
    q, k, v, seqlens, table = _args()
    q, k, v, seqlens, table = _device(device, q, k.nan_to_num(), v.nan_to_num(), seqlens, table.clamp(min=0))
    new = torch.randn(2, 2, 1, 16, device=device)

    def step(q, k_cache, v_cache, lengths):
        kv_cache_append(k_cache, v_cache, new, new, lengths, block_table=table)
        out, lse = attention_decode(q, k_cache, v_cache, lengths + 1, return_lse=True, block_table=table)
        return out * 2 + lse[..., None]

    with genfast.backend(backend):
        k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
        got = torch.compile(step, fullgraph=True)(q, k1, v1, seqlens - 1)
        want = step(q, k2, v2, seqlens - 1)
    torch.testing.assert_close(got, want)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


# ------------------------------------------------------------------------------------------ GPT.generate, KVCache
def _gpt(seed: int):
    from genfast.models import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=61, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def _prompts(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 61, (n,), generator=gen) for n in lengths]
    t = max(lengths)
    idx = torch.full((len(lengths), t), 5, dtype=torch.int64)
    mask = torch.zeros(len(lengths), t, dtype=torch.int64)
    for i, p in enumerate(prompts):
        idx[i, t - len(p):], mask[i, t - len(p):] = p, 1
    return prompts, idx, mask


# auto: the C++ CPU decode kernel; a backend by name applies to every op, and only Triton serves them all.
GEN_BACKENDS = ["reference", "auto"] + serving_backends("attention", "cpu")


@pytest.mark.parametrize("backend,block_size", [(b, 16) for b in GEN_BACKENDS] + [("auto", 32)])
def test_generate_paged_tokens_equal_dense(backend, block_size):
    """kv_block_size= gives the dense caches' tokens: greedy and seeded sampling, one prompt alone and a batch of
    prompts of different lengths (left-padded; prompts past 16 tokens prefill through the gathered prefix)."""
    model = _gpt(3)
    prompts, idx, mask = _prompts([3, 19, 7, 11], seed=4)
    knobs = dict(temperature=0.9, top_k=20, top_p=0.95)
    made = []  # the caches' block sizes: the option must reach them (tokens alone cannot tell)
    new_caches = model.new_caches
    model.new_caches = lambda *a, **kw: made.append(kw.get("block_size")) or new_caches(*a, **kw)
    with genfast.backend(backend):
        for kwargs in (dict(temperature=0.0), dict(seed=torch.tensor([9, 8, 7, 6]), **knobs)):
            dense = model.generate(idx, 14, attention_mask=mask, **kwargs)
            paged = model.generate(idx, 14, attention_mask=mask, kv_block_size=block_size, **kwargs)
            assert torch.equal(paged, dense), kwargs
        alone_kwargs = (dict(temperature=0.0), dict(seed=torch.tensor([8]), **knobs))
        for kwargs in alone_kwargs:
            dense = model.generate(prompts[1][None], 8, **kwargs)
            assert torch.equal(model.generate(prompts[1][None], 8, kv_block_size=block_size, **kwargs), dense)
        # The seeded row alone and in the batch, paged: issue 30's two guarantees together.
        batch = model.generate(idx, 8, attention_mask=mask, kv_block_size=block_size,
                               seed=torch.tensor([9, 8, 7, 6]), **knobs)
    assert torch.equal(batch[1, idx.shape[1]:], dense[0, len(prompts[1]):])
    assert made == [None, block_size] * 4 + [block_size]


def test_generate_kv_block_size_errors():
    model = _gpt(3)
    idx = torch.zeros(1, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="kv_block_size must be None or one of"):
        model.generate(idx, 2, kv_block_size=24)
    with pytest.raises(TypeError, match="kv_block_size must be None or an int"):
        model.generate(idx, 2, kv_block_size=16.0)


def test_kv_cache_paged_allocates_only_the_capacities():
    from genfast.nn import KVCache

    cache = KVCache(3, 2, 100, 8, block_size=16, capacity=[5, 40, 100])
    assert cache.k.shape == (1 + 3 + 7, 2, 16, 8) and cache.block_table.shape == (3, 7)
    assert cache.block_table[0, 1:].eq(-1).all() and cache.block_table[1, 3:].eq(-1).all()
    k = torch.randn(3, 2, 5, 8)
    cache.append(k, k)
    with pytest.raises(ValueError, match="overflow a sequence's capacity"):
        cache.append(k[:, :, :1], k[:, :, :1])  # row 0 holds 5 at most
    cache.set_lengths(torch.tensor([0, 10, 10]))
    cache.append(k, k)
    assert torch.equal(cache.prefix(15)[0][1, :, 10:15], k[1])
    with pytest.raises(ValueError, match="exceed the sequences' capacities"):
        cache.set_lengths(torch.tensor([6, 0, 0]))
    with pytest.raises(ValueError, match="block_size must be None"):
        KVCache(1, 1, 8, 8, block_size=8)
    with pytest.raises(ValueError, match="capacity must be 1 ints"):
        KVCache(1, 1, 8, 8, block_size=16, capacity=[9])
