"""Batch invariance of attention_decode (issue 30): with ``batch_invariant=True`` a row's output is bitwise the same
whatever the batch size, the other rows' lengths and the thread count, on every kernel backend that runs here (the C++
CPU kernel, and the Triton kernels in the interpreter: tests/conftest.py sets TRITON_INTERPRET=1).

The caches are long enough that the fixed split count is above 1 (the CPU kernel: 2 * Nmax * D * 4 bytes / 128 KiB,
8 at Nmax 2048, D 64 fp32; the interpreter: one split per 64 keys), so the split merge is exercised; by default both
kernels split a lone row's keys more than a batch of 8's (they fill the threads / the GPU), which this catches.
"""

import pytest
import torch

import genfast
from genfast.ops import attention_decode, attention_decode_ref
from genfast.ops.attention_decode import batch_invariant_decode, decode_checked_cache
from tests.conftest import backend_params

PARAMS = backend_params("attention_decode")
NMAX = 2048
# Mixed lengths: short (under one key block), across blocks and splits, and the full cache.
LENGTHS = [1500, 7, 2048, 333, 64, 1999, 900, 65]


def _inputs(b, hq, hk, nq, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen).to(dtype).to(device)
               for shape in ((b, hq, nq, d), (b, hk, NMAX, d), (b, hk, NMAX, d)))
    return q, k, v


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("hq,hk,nq,d,dtype", [(4, 2, 1, 64, torch.float32), (4, 1, 3, 32, torch.float32),
                                               (2, 2, 1, 64, torch.bfloat16)], ids=["gqa", "mqa-3-new", "mha-bf16"])
def test_row_alone_equals_row_in_batch(device, backend, hq, hk, nq, d, dtype):
    """Batches of 1, 3 and 8 rows with mixed lengths: each row's out and lse equal (torch.equal) the row alone."""
    q, k, v = _inputs(8, hq, hk, nq, d, dtype, device)
    lengths = torch.tensor(LENGTHS, dtype=torch.int32, device=device)
    with genfast.backend(backend):
        alone = [attention_decode(q[i:i + 1], k[i:i + 1], v[i:i + 1], lengths[i:i + 1], batch_invariant=True,
                                  return_lse=True) for i in range(8)]
        for rows in ([5], [2, 0, 7], list(range(8))):
            idx = torch.tensor(rows, device=device)
            out, lse = attention_decode(q[idx], k[idx], v[idx], lengths[idx], batch_invariant=True, return_lse=True)
            for j, i in enumerate(rows):
                assert torch.equal(out[j], alone[i][0][0]), (rows, i)
                assert torch.equal(lse[j], alone[i][1][0]), (rows, i)
    # And it is still attention: the spec's answer within fp32 rounding.
    ref = attention_decode_ref(q.double(), k.double(), v.double(), lengths)
    torch.testing.assert_close(out.double(), ref, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_other_rows_lengths_and_threads_do_not_matter(device, backend):
    """Row 0 fixed; the other row's length changes from short to full, and the CPU thread count from 1 to 3 (by
    default the CPU kernel splits 2 sequences x 1 kv head by the thread count and the longest length)."""
    q, k, v = _inputs(2, 4, 1, 1, 64, torch.float32, device, seed=1)
    threads = torch.get_num_threads()
    outs = []
    try:
        for others, nthreads in (([5], 1), ([2048], 2), ([1000], 3)):
            torch.set_num_threads(nthreads)
            lengths = torch.tensor([1234] + others, device=device)
            with genfast.backend(backend):
                outs.append(attention_decode(q, k, v, lengths, batch_invariant=True)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("device,backend", PARAMS)
def test_trusted_decode_follows_the_context(device, backend):
    """decode_checked_cache (genfast.nn's decode) runs batch-invariant inside batch_invariant_decode() only."""
    q, k, v = _inputs(8, 4, 2, 1, 64, torch.float32, device, seed=2)
    lengths = torch.tensor(LENGTHS, device=device)
    with genfast.backend(backend):
        want = attention_decode(q[:1], k[:1], v[:1], lengths[:1], batch_invariant=True)
        with batch_invariant_decode():
            got = decode_checked_cache(q, k, v, lengths)[:1]
            alone = decode_checked_cache(q[:1], k[:1], v[:1], lengths[:1])
    assert torch.equal(got, want) and torch.equal(alone, want)


def test_batch_invariant_argument_errors():
    q, k, v = _inputs(1, 2, 2, 1, 16, torch.float32, "cpu")
    lengths = torch.tensor([10])
    with pytest.raises(TypeError, match="batch_invariant"):
        attention_decode(q, k, v, lengths, batch_invariant=1)
    with pytest.raises(ValueError, match="num_splits or batch_invariant"):
        attention_decode(q, k, v, lengths, batch_invariant=True, num_splits=2)
