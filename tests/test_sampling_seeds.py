"""Per-row seeds of sample_tokens: row b's noise is Philox(seeds[b], offsets[b] * V + col), on every backend.

The guarantee is that a row's token depends on its own logits, knobs, seed and offset only: not on its place in
the batch, nor on the batch size. Each test compares with a noise tensor built row by row from
``philox_noise`` (the documented stream), so a kernel that counted from the row index, or read seed[0] for every
row, fails.
"""

import pytest
import torch

import genfast
from genfast.ops import philox_noise, sample_tokens, sample_tokens_ref
from genfast.ops.sampling import max_offset
from tests.conftest import backend_params

BACKENDS = [pytest.param("cpu", "reference", id="cpu-reference")] + backend_params("sample_tokens")
BATCH, VOCAB = 8, 997  # an odd vocabulary: row blocks do not start on round counters


def _logits(batch=BATCH, vocab=VOCAB, device="cpu", dtype=torch.float32):
    # Scale 1.5: a flat enough distribution that a different noise almost always picks a different token.
    x = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(5)) * 1.5
    x[:, 10:14] = x[:, 9:10]  # ties
    return x.to(dtype).to(device)


def _seeds(device="cpu"):
    # Negative and large int64 seeds: all 64 bits key Philox on every backend.
    seeds = torch.tensor([7, 7, -3, 2**62 + 11, 0, 123456789, -(2**63), 2**63 - 1], dtype=torch.int64)
    offsets = torch.tensor([0, 1, 5, 2**32 + 3, 0, 2**40, 17, 9], dtype=torch.int64)  # >= 2^32: the counter's high word
    return seeds.to(device), offsets.to(device)


# Per-row knobs: a greedy row (ignores the noise), top-k, top-p, min-p, and rows without filters.
def _knobs(device):
    return dict(temperature=torch.tensor([1.0, 0.8, 0.0, 1.3, 1.0, 1.0, 0.7, 1.0], device=device),
                top_k=torch.tensor([0, 50, 0, 0, 3, 0, 40, 0], device=device),
                top_p=torch.tensor([1.0, 1.0, 1.0, 0.9, 1.0, 0.95, 0.8, 1.0], device=device),
                min_p=torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.02, 0.0], device=device))


def _documented_noise(seeds, offsets, vocab):
    """Row b: elements offsets[b] * V .. offsets[b] * V + V - 1 of the stream of seeds[b]."""
    rows = [philox_noise(torch.tensor([int(s)]), vocab, offset=int(o) * vocab) for s, o in zip(seeds, offsets)]
    return torch.stack(rows)


def _row(knobs, b):
    return {k: v[b:b + 1] for k, v in knobs.items()}


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_in_a_batch_equals_the_row_alone(device, backend, dtype):
    x = _logits(device=device, dtype=dtype)
    seeds, offsets = _seeds(device)
    knobs = _knobs(device)
    with genfast.backend(backend):
        batch = sample_tokens(x, seeds=seeds, offsets=offsets, **knobs)
        alone = torch.cat([sample_tokens(x[b:b + 1], seeds=seeds[b:b + 1], offsets=offsets[b:b + 1], **_row(knobs, b))
                           for b in range(BATCH)])
        perm = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4], device=device)
        shuffled = sample_tokens(x[perm], seeds=seeds[perm], offsets=offsets[perm],
                                 **{k: v[perm] for k, v in knobs.items()})
        head = sample_tokens(x[:3], seeds=seeds[:3], offsets=offsets[:3], **{k: v[:3] for k, v in knobs.items()})
    assert torch.equal(batch, alone)
    assert torch.equal(shuffled, batch[perm])
    assert torch.equal(head, batch[:3])
    # The tokens are the documented stream's (so the test above could fail: see the next assertion).
    expected = sample_tokens_ref(x.cpu(), noise=_documented_noise(seeds.cpu(), offsets.cpu(), VOCAB),
                                 **{k: v.cpu() for k, v in knobs.items()})
    assert torch.equal(batch.cpu(), expected)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_row_index_counters_would_fail_the_batch_test(device, backend):
    # The generator= path counts from the row index (row b's block is b): the same row alone and at row 5 draws
    # different noise. Per-row seeds exist for exactly this; the check shows the batch test above has power.
    x = _logits(device=device)
    seed = torch.tensor([99], device=device)
    with genfast.backend(backend):
        rows = sample_tokens(x, seeds=seed.expand(BATCH).contiguous())  # one seed, offsets 0: same noise per row
        for b in range(BATCH):
            assert torch.equal(rows[b:b + 1], sample_tokens(x[b:b + 1], seeds=seed))
    by_index = sample_tokens_ref(x.cpu(), noise=philox_noise(seed.cpu(), BATCH * VOCAB).view(BATCH, VOCAB))
    assert not torch.equal(rows.cpu(), by_index)


def test_backends_agree():
    x = _logits()
    seeds, offsets = _seeds()
    knobs = _knobs("cpu")
    got = {}
    for device, backend in [("cpu", "reference")] + [p.values for p in backend_params("sample_tokens")]:
        with genfast.backend(backend):
            got[backend] = sample_tokens(x.to(device), seeds=seeds.to(device), offsets=offsets.to(device),
                                         **{k: v.to(device) for k, v in knobs.items()}).cpu()
    assert len(set(map(tuple, (t.tolist() for t in got.values())))) == 1, got


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_default_offsets_are_zero_and_seeds_may_live_on_the_cpu(device, backend):
    x = _logits(device=device)
    seeds, _ = _seeds("cpu")
    with genfast.backend(backend):
        implicit = sample_tokens(x, seeds=seeds)
        explicit = sample_tokens(x, seeds=seeds.to(device), offsets=torch.zeros(BATCH, dtype=torch.int64))
    assert torch.equal(implicit, explicit)
    assert torch.equal(implicit.cpu(), sample_tokens_ref(x.cpu(), noise=_documented_noise(seeds, [0] * BATCH, VOCAB)))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_the_last_offset_is_the_end_of_the_stream(device, backend):
    # offsets[b] = max_offset(V) draws the stream's last V elements (indices up to 2**63 - 2); one more is refused.
    vocab = 1000
    x = _logits(2, vocab, device=device)
    seeds = torch.tensor([3, 4], device=device)
    last = max_offset(vocab)
    assert (last + 1) * vocab <= 2**63 - 1 < (last + 2) * vocab
    offsets = torch.tensor([last, last - 1], device=device)
    with genfast.backend(backend):
        got = sample_tokens(x, seeds=seeds, offsets=offsets)
        with pytest.raises(ValueError, match=rf"offsets must be in \[0, {last}\]"):
            sample_tokens(x, seeds=seeds, offsets=offsets + 1)
    assert torch.equal(got.cpu(), sample_tokens_ref(x.cpu(), noise=_documented_noise(seeds.cpu(), [last, last - 1],
                                                                                          vocab)))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_validate_false_wraps_alike_on_every_backend(device, backend):
    # Unchecked, a negative or huge offset wraps the uint64 counter: some token in [0, V), the same everywhere.
    x = _logits(device=device)
    seeds, _ = _seeds(device)
    offsets = torch.tensor([-1, -(2**63), 2**63 - 1, 2**62, -5, 0, 1, 2], device=device)
    with genfast.backend(backend):
        got = sample_tokens(x, seeds=seeds, offsets=offsets, validate=False)
    with genfast.backend("reference"):
        expected = sample_tokens(x.cpu(), seeds=seeds.cpu(), offsets=offsets.cpu(), validate=False)
    assert ((got >= 0) & (got < VOCAB)).all()
    assert torch.equal(got.cpu(), expected)


def _bad_cases():
    x = torch.randn(2, 10)
    seeds = torch.tensor([1, 2])
    return [
        (dict(seeds=seeds, generator=torch.Generator()), ValueError, "pass seeds or generator, not both"),
        (dict(seeds=seeds, noise=torch.rand(2, 10)), ValueError, "pass seeds or noise, not both"),
        (dict(offsets=torch.tensor([0, 1])), ValueError, "offsets is the step of per-row seeds: pass seeds"),
        (dict(seeds=[1, 2]), TypeError, "seeds must be a torch.Tensor"),
        (dict(seeds=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "seeds must have dtype int64, got int32"),
        (dict(seeds=torch.tensor([1.0, 2.0])), TypeError, "seeds must have dtype int64"),
        (dict(seeds=torch.tensor([[1, 2]])), ValueError, "seeds must be 1-D"),
        (dict(seeds=torch.tensor([1])), ValueError, r"seeds must have shape \(2,\) \(one value per row\)"),
        (dict(seeds=seeds, offsets=torch.tensor([0, 1], dtype=torch.int32)), TypeError,
         "offsets must have dtype int64"),
        (dict(seeds=seeds, offsets=torch.tensor([0, 1, 2])), ValueError, r"offsets must have shape \(2,\)"),
        (dict(seeds=seeds, offsets=torch.tensor([0, -1])), ValueError, r"offsets must be in \[0, "),
        (dict(seeds=seeds.to("meta")), ValueError, "seeds is on meta but must be on the logits' device"),
    ], x


@pytest.mark.parametrize("fn", [sample_tokens, sample_tokens_ref])
def test_bad_arguments(fn):
    cases, x = _bad_cases()
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            fn(x, **kwargs)


@pytest.mark.parametrize("device,backend", backend_params("sample_tokens"))
def test_raw_ops_refuse_bad_seeds(device, backend):
    op = torch.ops.genfast.sample_tokens_triton if backend == "triton" else torch.ops.genfast.sample_tokens
    error = ValueError if backend == "triton" else RuntimeError
    x = _logits(3, 40, device=device)
    knobs = [torch.ones(3, device=device), torch.zeros(3, dtype=torch.int64, device=device),
             torch.ones(3, device=device), torch.zeros(3, device=device)]
    with pytest.raises(error, match="seed must hold 1 or 3"):
        op(x, *knobs, None, torch.tensor([1, 2], device=device), None)
    with pytest.raises(error, match="offsets"):
        op(x, *knobs, None, torch.tensor([1, 2, 3], device=device), torch.tensor([0, 1], device=device))
    with pytest.raises(error, match="offsets needs seed"):
        op(x, *knobs, torch.rand(3, 40, device=device), None, torch.tensor([0, 1, 2], device=device))


@pytest.mark.parametrize("device,backend", backend_params("sample_tokens"))
def test_op_level_one_seed_with_row_offsets_is_the_generator_stream(device, backend):
    # One mechanism: the generator path is seed_b = seed, step_b = b; passing offsets = arange(B) says the same.
    op = torch.ops.genfast.sample_tokens_triton if backend == "triton" else torch.ops.genfast.sample_tokens
    x = _logits(device=device)
    knobs = list(_knobs(device).values())
    seed = torch.tensor([2**61 + 5], device=device)
    plain, _ = op(x, *knobs, None, seed)
    counted, _ = op(x, *knobs, None, seed, torch.arange(BATCH, device=device))
    assert torch.equal(plain, counted)


@pytest.mark.parametrize("device,backend", backend_params("sample_tokens"))
def test_opcheck_and_compile(device, backend):
    suffix = "_triton" if backend == "triton" else ""
    op = getattr(torch.ops.genfast, "sample_tokens" + suffix)
    x = _logits(2, 40, device=device)
    knobs = (torch.tensor([0.8, 1.0], device=device), torch.tensor([5, 0], device=device),
             torch.tensor([0.9, 1.0], device=device), torch.tensor([0.01, 0.0], device=device))
    seeds, offsets = torch.tensor([5, -6], device=device), torch.tensor([3, 0], device=device)
    torch.library.opcheck(op, (x, *knobs, None, seeds, offsets))
    torch.library.opcheck(op, (x, *knobs, None, seeds, None))

    def step(logits, seeds, offsets):
        return sample_tokens(logits, top_k=5, top_p=0.9, temperature=0.8, seeds=seeds, offsets=offsets)

    with genfast.backend(backend):
        compiled = torch.compile(step, fullgraph=True)(x, seeds, offsets)
        eager = step(x, seeds, offsets)
    assert torch.equal(compiled, eager)
