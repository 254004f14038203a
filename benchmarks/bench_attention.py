"""Benchmarks of genfast.ops.attention: forward and backward against every attention torch offers.

Providers: each genfast backend that can serve the call (``genfast-triton`` on a GPU; the interpreter is not
timed), ``genfast-auto`` (what a user gets by default), ``reference`` (attention_ref's dispatcher path), every
torch SDPA backend that runs here (``torch-sdpa-flash``, ``-efficient``, ``-cudnn``, ``-math``), and on a GPU
FlexAttention under torch.compile (``flex-attention``; its block mask is built in setup, not timed). The backward
also as ``genfast-triton-deterministic``: under torch.use_deterministic_algorithms(True) dQ gets its own pass in
a fixed order (seven matmuls a tile) instead of the default's atomics (five).

FLOPs are the standard count: 4 * B * H * Nq * Nk * D for the forward, halved when causal; the backward
(``attention_bwd``: dq, dk, dv from a saved forward, the forward not included) counts 2.5x that.
Grid on a GPU: bf16 and fp16, D 64 and 128 (H = 2048 / D), N 512 to 16k with B * N = 16k tokens, causal and
not (--quick: bf16 D 128 at N 1k and 4k). On a CPU a small grid (fp32 and bf16, D 64, N 256 and 1024 with
B * N = 2048, H 8). The report gives each TFLOP/s as a share of the bf16 matmul measured in the same run.

Decode (``attention_decode``, see ``decode_cases``): one new token per sequence over full caches, bytes = the
K and V caches read once (memory bound), so GB/s compares directly with the copy bandwidth of the same run.
Providers: genfast backends, auto, the reference, and torch's SDPA (default backend choice) on the cache.
Paged rows (``<provider>-paged16`` / ``-paged128``, issue 30): the same caches cut into blocks of 16 or 128 slots,
dealt to the sequences in a shuffled order through ``block_table``, at the same lengths, so each paged row's ratio
to its dense row is the cost of the indirection.

Varlen (``attention_varlen``, see ``varlen_cases``): packed self-attention sequences of mixed lengths (drawn
uniformly in [1, 2 * mean), a fixed total of tokens), forward and backward. Providers: genfast backends, auto,
the reference, ``torch-sdpa-padded`` (the same sequences padded to the longest, as a padded pipeline holds
them; padding not timed: SDPA with a key-padding mask, or ``is_causal``, exact for causal self-attention
padded at the end) and, where torch has it, ``torch-varlen-attn`` (torch.nn.attention.varlen). FLOPs count only
the real pairs, 4 * H * D * sum(N_b^2) (halved when causal), so padding shows up as lost TFLOP/s.

Replaced rows (``replaced``, see harness.ReplacedCase): ``genfast.ops.attention`` and
``genfast.ops.scaled_dot_product_attention`` against ``F.scaled_dot_product_attention`` (forward, and forward +
backward), and ``genfast.ops.attention_varlen`` against what a user of padded batches runs: pad the packed
sequences to the longest, SDPA with a key-padding mask (``is_causal`` when causal), unpad; padding and unpadding
timed, as they are part of that user's call. Each varlen row names the CPU plan auto took (``cpu_path``).

What genfast adds on top of torch's SDPA on a CPU (profiled with torch.profiler and cProfile, 2026-12-06):
- The NaN rule (a NaN query row gives NaN, where SDPA's CPU kernel gives 0) used to cost four full-tensor passes
  per call, isnan/ne, any, where, and where's backward: about a third of the call under load. It is now one
  read-only reduction of q to a scalar per call, with the row fix-up only when that sum is NaN: 0.03-0.2% of the
  SDPA call at [8,8,256,64], [4,8,1024,64], [2,8,128,32] and [2,8,256,40], fp32 and bf16 (median of 21
  alternating repetitions, 1 thread, on a loaded machine). tests/test_attention.py checks that the path writes
  no tensor torch's own call does not, forward and backward. The reduction is still a parallel region of its own:
  on 2 threads of a machine loaded 6x over, waiting for the second thread cost a scheduler slice often enough that
  SDPA + check measured 0.68-0.88x of SDPA alone (two runs); judge it on a quiet machine, as the issue says.
- Python per call: about 14 us over SDPA's 4 us on a tiny call (the dispatcher's backend choice, the Knobs
  record, the NaN check's scalar read); the argument checks (about 5 us) are skipped for the everyday call that
  is valid by inspection (``_everyday``). That is 0.1% of a 10 ms call and dominates only calls under ~1 ms.
- Varlen: one SDPA call per sequence costs a Python loop (about 30 us per sequence) and one concatenation of
  the outputs (what the padded user pays in unpadding); the padded plan pays the gather into the padded batch
  and the scatter back. ``cpu_path`` weighs both by operation count, so many tiny sequences stay padded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import genfast
from benchmarks.harness import BenchCase, ReplacedCase, genfast_providers
from genfast.ops import attention, attention_decode, attention_varlen, scaled_dot_product_attention
from genfast.ops.attention_varlen import cpu_path

FAMILY = "attention"
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}
MATH_MAX_N = 4096  # the math backend materialises B*H*N*N scores: beyond this it only measures the allocator


def _grid(device: torch.device, quick: bool):
    """(dtype, D, H, B, N, causal) per case."""
    if device.type == "cuda":
        # quick (make gpu-check's headline): the Hopper targets' case, bf16 d128 at N 4k, beside a short one.
        dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
        dims = [128] if quick else [64, 128]
        lengths = [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
        tokens = 16384
    else:
        dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
        dims = [64]
        lengths = [128] if quick else [256, 1024]
        tokens = 2048
    out = []
    for dtype in dtypes:
        for d in dims:
            heads = 2048 // d if device.type == "cuda" else 8
            for n in lengths:
                for causal in (False, True):
                    out.append((dtype, d, heads, max(1, tokens // n), n, causal))
    return out


def _sdpa_runs(device: torch.device, name: str, dtype: torch.dtype) -> bool:
    """Whether SDPA backend ``name`` serves a small call of this dtype here (torch raises when it cannot)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 64, 64, device=device, dtype=dtype)
    try:
        with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name])):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return True
    except (RuntimeError, AttributeError):
        return False


def _inputs(device, dtype, b, h, n, d, grad):
    g = torch.Generator(device).manual_seed(0)
    return [torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g).requires_grad_(grad) for _ in range(3)]


def _timed(forward, device, dtype, shape, backward, deterministic=False):
    """setup() for one provider: inputs allocated, the forward (and for backward, one saved forward) done.
    ``deterministic``: the backward runs under torch.use_deterministic_algorithms(True)."""
    b, h, n, d = shape

    def setup():
        q, k, v = _inputs(device, dtype, b, h, n, d, backward)
        if not backward:
            return lambda: forward(q, k, v)
        out = forward(q, k, v)
        dout = torch.randn_like(out)
        if not deterministic:
            return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

        def run():
            before = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True)
            try:
                return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            finally:
                torch.use_deterministic_algorithms(before)
        return run

    return setup


def _flex(device, causal, n):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, fullgraph=True)
    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, n, n, device=device)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _sdpa(name, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[name])

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    out = []
    sdpa_cache: dict[tuple[str, torch.dtype], bool] = {}
    for dtype, d, h, b, n, causal in _grid(device, quick):
        label = f"{str(dtype).replace('torch.', '')} d{d} B{b} H{h} N{n}{' causal' if causal else ''}"
        flops_fwd = 4.0 * b * h * n * n * d / (2 if causal else 1)

        def ours(backend_name, causal=causal):
            def run(q, k, v):
                with genfast.backend(backend_name):
                    return attention(q, k, v, causal=causal)
            return run

        providers = {f"genfast-{name}": ours(name) for name in genfast_providers("attention", device)}
        providers["genfast-auto"] = ours("auto")
        providers["reference"] = ours("reference")
        for name in SDPA_BACKENDS:
            if name == "math" and n > MATH_MAX_N:
                continue
            if (name, dtype) not in sdpa_cache:
                sdpa_cache[(name, dtype)] = _sdpa_runs(device, name, dtype)
            if sdpa_cache[(name, dtype)]:
                providers[f"torch-sdpa-{name}"] = _sdpa(name, causal)
        if device.type == "cuda":
            providers["flex-attention"] = _flex(device, causal, n)

        for op, backward, flops in (("attention_fwd", False, flops_fwd), ("attention_bwd", True, 2.5 * flops_fwd)):
            for provider, fn in providers.items():
                out.append(BenchCase(FAMILY, op, label, provider, _timed(fn, device, dtype, (b, h, n, d), backward),
                                     flops=flops))
        if "genfast-triton" in providers:
            # The option beside the default: dQ in its own fixed-order pass (seven matmuls) instead of atomics.
            out.append(BenchCase(FAMILY, "attention_bwd", label, "genfast-triton-deterministic",
                                 _timed(providers["genfast-triton"], device, dtype, (b, h, n, d), True, True),
                                 flops=2.5 * flops_fwd))
    return out + decode_cases(device, quick) + varlen_cases(device, quick)


def _decode_grid(device: torch.device, quick: bool):
    """(dtype, D, Hq, Hk, B, cache length) per case: caches 1k to 64k, batch 1 to 64 (<= 2^19 cached tokens)."""
    if device.type == "cuda":
        dtype, d, hq, hk = torch.bfloat16, 128, 32, 8
        lengths = [1024, 65536] if quick else [1024, 4096, 16384, 65536]
        batches = [1, 64] if quick else [1, 8, 64]
        return [(dtype, d, hq, hk, b, n) for b in batches for n in lengths if b * n <= 1 << 19]
    lengths = [1024] if quick else [1024, 4096]
    return [(torch.float32, 64, 8, 2, b, n) for b in (1, 4) for n in lengths]


def decode_cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    out = []
    for dtype, d, hq, hk, b, n in _decode_grid(device, quick):
        label = f"{str(dtype).replace('torch.', '')} d{d} Hq{hq} Hk{hk} B{b} cache{n}"
        kv_bytes = 2.0 * b * hk * n * d * torch.finfo(dtype).bits // 8

        def setup_for(fn, b=b, n=n, d=d, hq=hq, hk=hk, dtype=dtype):
            def setup():
                g = torch.Generator(device).manual_seed(0)
                q = torch.randn(b, hq, 1, d, device=device, dtype=dtype, generator=g)
                k = torch.randn(b, hk, n, d, device=device, dtype=dtype, generator=g)
                v = torch.randn(b, hk, n, d, device=device, dtype=dtype, generator=g)
                lengths = torch.full((b,), n, dtype=torch.int32, device=device)
                return lambda: fn(q, k, v, lengths)
            return setup

        def paged_setup_for(fn, page, b=b, n=n, d=d, hq=hq, hk=hk, dtype=dtype):
            """The dense setup's caches as a pool of ``page``-slot blocks in a shuffled order, and its block table."""
            def setup():
                g = torch.Generator(device).manual_seed(0)
                q = torch.randn(b, hq, 1, d, device=device, dtype=dtype, generator=g)
                per_seq = n // page
                pool = torch.randn(b * per_seq, hk, page, d, device=device, dtype=dtype, generator=g)
                pool_v = torch.randn(b * per_seq, hk, page, d, device=device, dtype=dtype, generator=g)
                order = torch.randperm(b * per_seq, generator=torch.Generator().manual_seed(1))
                table = order.view(b, per_seq).to(device=device, dtype=torch.int32)
                lengths = torch.full((b,), n, dtype=torch.int32, device=device)
                return lambda: fn(q, pool, pool_v, lengths, table)
            return setup

        def ours(backend_name):
            def run(q, k, v, lengths, block_table=None):
                with genfast.backend(backend_name):
                    # validate=False: the timed loop must not include the host sync of the length check.
                    return attention_decode(q, k, v, lengths, validate=False, block_table=block_table)
            return run

        providers = {f"genfast-{name}": ours(name) for name in genfast_providers("attention_decode", device)}
        providers["genfast-auto"] = ours("auto")
        # The cost of batch invariance (issue 30): the split count from Nmax, D and the dtype, not from B.
        providers["genfast-auto-batch-invariant"] = (
            lambda q, k, v, lengths: attention_decode(q, k, v, lengths, validate=False, batch_invariant=True))
        providers["reference"] = ours("reference")
        providers["torch-sdpa"] = lambda q, k, v, lengths: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        for provider, fn in providers.items():
            out.append(BenchCase(FAMILY, "attention_decode", label, provider, setup_for(fn),
                                 flops=4.0 * b * hq * n * d, bytes=kv_bytes))
        paged = {name: ours(name) for name in [*genfast_providers("attention_decode", device), "auto", "reference"]}
        for page in (16, 128):
            for name, fn in paged.items():
                provider = f"{'reference' if name == 'reference' else 'genfast-' + name}-paged{page}"
                out.append(BenchCase(FAMILY, "attention_decode", label, provider, paged_setup_for(fn, page),
                                     flops=4.0 * b * hq * n * d, bytes=kv_bytes))
    return out


def _varlen_lengths(total: int, mean: int) -> list[int]:
    """Sequence lengths uniform in [1, 2 * mean), drawn with a fixed seed until they sum to ``total``."""
    g = torch.Generator().manual_seed(mean)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(min(int(torch.randint(1, 2 * mean, (1,), generator=g)), total - sum(lengths)))
    return lengths


def _varlen_grid(device: torch.device, quick: bool):
    """(dtype, D, H, total tokens, mean length, causal) per case."""
    if device.type == "cuda":
        means = [512] if quick else [128, 512, 2048]
        return [(torch.bfloat16, 128, 16, 16384, m, causal) for m in means for causal in (False, True)]
    means = [64] if quick else [64, 256]
    return [(torch.float32, 64, 8, 2048, m, causal) for m in means for causal in (False, True)]


def _torch_varlen_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.nn.attention.varlen serves a small call here (it is new and CUDA-only)."""
    try:
        from torch.nn.attention.varlen import varlen_attn

        q = torch.randn(8, 2, 64, device=device, dtype=dtype)
        cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
        varlen_attn(q, q, q, cu, cu, 5, 5)
        return True
    except (ImportError, RuntimeError, AttributeError, NotImplementedError):
        return False


def varlen_cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    out = []
    torch_varlen = device.type == "cuda" and _torch_varlen_runs(device, torch.bfloat16)
    for dtype, d, h, total, mean, causal in _varlen_grid(device, quick):
        lengths = _varlen_lengths(total, mean)
        b, n_max = len(lengths), max(lengths)
        label = (f"{str(dtype).replace('torch.', '')} d{d} H{h} tokens{total} B{b} mean{mean} max{n_max}"
                 f"{' causal' if causal else ''}")
        flops_fwd = 4.0 * h * d * sum(n * n for n in lengths) / (2 if causal else 1)

        def packed_setup(fn, backward, lengths=lengths, dtype=dtype, d=d, h=h):
            def setup():
                g = torch.Generator(device).manual_seed(0)
                q, k, v = (torch.randn(sum(lengths), h, d, device=device, dtype=dtype, generator=g)
                           .requires_grad_(backward) for _ in range(3))
                cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
                return _forward_or_backward(lambda: fn(q, k, v, cu, max(lengths)), (q, k, v), backward)
            return setup

        def padded_setup(backward, lengths=lengths, dtype=dtype, d=d, h=h, causal=causal):
            def setup():
                g = torch.Generator(device).manual_seed(0)
                q, k, v = (torch.randn(len(lengths), h, max(lengths), d, device=device, dtype=dtype, generator=g)
                           .requires_grad_(backward) for _ in range(3))
                keys = torch.arange(max(lengths), device=device) < torch.tensor(lengths, device=device)[:, None]
                mask = None if causal else keys[:, None, None, :]
                return _forward_or_backward(
                    lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal), (q, k, v),
                    backward)
            return setup

        def ours(backend_name, causal=causal):
            def run(q, k, v, cu, n_max):
                with genfast.backend(backend_name):
                    # validate=False: the timed loop must not include the host sync of the offsets check.
                    return attention_varlen(q, k, v, cu, cu, n_max, n_max, causal=causal, validate=False)
            return run

        def theirs(q, k, v, cu, n_max, causal=causal):
            from torch.nn.attention.varlen import varlen_attn

            return varlen_attn(q, k, v, cu, cu, n_max, n_max, window_size=(-1, 0) if causal else (-1, -1))

        providers = {f"genfast-{name}": ours(name) for name in genfast_providers("attention_varlen", device)}
        providers["genfast-auto"] = ours("auto")
        providers["reference"] = ours("reference")
        if torch_varlen:
            providers["torch-varlen-attn"] = theirs
        for op, backward, flops in (("attention_varlen_fwd", False, flops_fwd),
                                    ("attention_varlen_bwd", True, 2.5 * flops_fwd)):
            for provider, fn in providers.items():
                out.append(BenchCase(FAMILY, op, label, provider, packed_setup(fn, backward), flops=flops))
            out.append(BenchCase(FAMILY, op, label, "torch-sdpa-padded", padded_setup(backward), flops=flops))
    return out


def _forward_or_backward(forward, leaves, backward: bool):
    """The timed callable: the forward, or the backward of one saved forward (as ``_timed`` does)."""
    if not backward:
        return forward
    out = forward()
    dout = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)


def _attention_swaps(device: torch.device, quick: bool) -> list[ReplacedCase]:
    # The shapes: [4, 8, 1024, 64] causal and not, [8, 8, 256, 64]; on a GPU the bf16 d128 headline.
    if device.type == "cuda":
        shapes = [(torch.bfloat16, (4, 16, 4096, 128), causal, False) for causal in (False, True)]
    else:
        shapes = [(dtype, shape, causal, False) for dtype in (torch.float32, torch.bfloat16)
                  for shape, causal in (((4, 8, 1024, 64), False), ((4, 8, 1024, 64), True),
                                        ((8, 8, 256, 64), False))]
        shapes += [(dtype, (8, 8, 256, 64), True, True) for dtype in (torch.float32, torch.bfloat16)]
    if quick:
        shapes = shapes[:1]
    out = []
    for dtype, (b, h, n, d), causal, backward in shapes:
        label = (f"{str(dtype).replace('torch.', '')} [{b},{h},{n},{d}]{' causal' if causal else ''}"
                 f"{' fwd+bwd' if backward else ''}")

        def setup(dtype=dtype, shape=(b, h, n, d), causal=causal, backward=backward):
            q, k, v = _inputs(device, dtype, *shape, backward)
            ours = _fwd_bwd(lambda: attention(q, k, v, causal=causal), (q, k, v), backward)
            theirs = _fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v), backward)
            return ours, theirs

        def setup_sdpa(dtype=dtype, shape=(b, h, n, d), causal=causal, backward=backward):
            q, k, v = _inputs(device, dtype, *shape, backward)
            ours = _fwd_bwd(lambda: scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v), backward)
            theirs = _fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v), backward)
            return ours, theirs

        out.append(ReplacedCase(FAMILY, "genfast.ops.attention", label, "F.scaled_dot_product_attention", setup))
        if not backward and (n == 1024 or device.type == "cuda") or backward and dtype == torch.float32:
            out.append(ReplacedCase(FAMILY, "genfast.ops.scaled_dot_product_attention", label,
                                    "F.scaled_dot_product_attention", setup_sdpa))
    return out


def _fwd_bwd(forward, leaves, backward: bool):
    """The timed call: the forward alone, or a fresh forward and its backward (what a training step runs)."""
    if not backward:
        return forward

    def run():
        out = forward()
        return torch.autograd.grad(out, leaves, torch.ones_like(out))
    return run


def _varlen_swaps(device: torch.device, quick: bool) -> list[ReplacedCase]:
    """attention_varlen against pad + SDPA with a key mask + unpad, at the suite's shapes and the issue's."""
    if device.type == "cuda":
        grid = [(torch.bfloat16, 128, 16, _varlen_lengths(16384, 512))]
    else:
        grid = [(torch.float32, 64, 8, _varlen_lengths(2048, mean)) for mean in (64, 256)]
        grid.append((torch.float32, 64, 8, [64, 462, 174, 390, 256, 101]))  # the issue's: 6 sequences of 64-462
    if quick:
        grid = grid[-1:]
    out = []
    for dtype, d, h, lengths in grid:
        cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
        for causal in (False, True):
            plan = cpu_path(cu, cu, h, d, causal) if device.type == "cpu" else "triton"
            for backward in (False, True):
                label = (f"{str(dtype).replace('torch.', '')} d{d} H{h} B{len(lengths)} lengths {min(lengths)}-"
                         f"{max(lengths)}{' causal' if causal else ''}{' fwd+bwd' if backward else ''} "
                         f"(auto: {plan})")
                out.append(ReplacedCase(FAMILY, "genfast.ops.attention_varlen", label,
                                        "pad + F.scaled_dot_product_attention(key mask) + unpad",
                                        _varlen_swap_setup(device, dtype, d, h, lengths, causal, backward)))
    return out


def _varlen_swap_setup(device, dtype, d, h, lengths, causal, backward):
    def setup():
        g = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(sum(lengths), h, d, device=device, dtype=dtype, generator=g).requires_grad_(backward)
                   for _ in range(3))
        cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
        valid = torch.arange(max(lengths), device=device) < torch.tensor(lengths, device=device)[:, None]
        mask = None if causal else valid[:, None, None, :]

        def padded_user():
            # What a padded pipeline does: split, pad to the longest, SDPA with the key mask, keep the real rows.
            qp, kp, vp = (torch.nn.utils.rnn.pad_sequence(t.split(lengths), batch_first=True).transpose(1, 2)
                          for t in (q, k, v))
            out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=causal)
            return out.transpose(1, 2)[valid]

        def ours():
            return attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal)

        return _fwd_bwd(ours, (q, k, v), backward), _fwd_bwd(padded_user, (q, k, v), backward)
    return setup


def _decode_swaps(device: torch.device, quick: bool) -> list[ReplacedCase]:
    """attention_decode (its default call) against SDPA over the same cache: the whole cache when it is full, and
    with a boolean mask of the filled slots when it is filled to a quarter (what a static-cache user runs; genfast
    reads only the filled slots). MHA at the issue's B4 H12 cache 2048 d64, GQA at the suite's Hq8 Hk2."""
    if device.type == "cuda":
        grid = [(torch.bfloat16, 128, 32, 8, 8, 16384, fill) for fill in (1.0, 0.25)]
    else:
        grid = [(torch.float32, 64, 12, 12, 4, 2048, fill) for fill in (1.0, 0.25)]
        grid += [(torch.float32, 64, 8, 2, b, n, fill) for b, n in ((4, 4096), (1, 1024)) for fill in (1.0, 0.25)]
    if quick:
        grid = grid[:2]
    out = []
    for dtype, d, hq, hk, b, n, fill in grid:
        label = (f"{str(dtype).replace('torch.', '')} d{d} Hq{hq} Hk{hk} B{b} cache{n} "
                 f"{'full' if fill == 1 else 'filled to a quarter'}")

        def setup(dtype=dtype, d=d, hq=hq, hk=hk, b=b, n=n, fill=fill):
            g = torch.Generator(device).manual_seed(0)
            q = torch.randn(b, hq, 1, d, device=device, dtype=dtype, generator=g)
            k, v = (torch.randn(b, hk, n, d, device=device, dtype=dtype, generator=g) for _ in range(2))
            filled = int(n * fill)
            lengths = torch.full((b,), filled, dtype=torch.int32, device=device)
            mask = None if fill == 1 else (torch.arange(n, device=device) < filled)[None, None, None, :]
            return (lambda: attention_decode(q, k, v, lengths),
                    lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hq != hk))

        what = "F.scaled_dot_product_attention over the cache" + ("" if fill == 1 else " (mask of the filled slots)")
        out.append(ReplacedCase(FAMILY, "genfast.ops.attention_decode", label, what, setup))
    return out


def replaced(device: torch.device, quick: bool = False) -> list[ReplacedCase]:
    """The attention family's replaced rows: attention, scaled_dot_product_attention, varlen and decode."""
    return _attention_swaps(device, quick) + _varlen_swaps(device, quick) + _decode_swaps(device, quick)


__all__ = ["cases", "decode_cases", "varlen_cases", "replaced"]
