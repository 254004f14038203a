"""Property-based sweeps of every op family: attention, attention_varlen, attention_decode, kv_cache_append,
sampling (filter_logits, sample_tokens), conv_transpose, diffusion (scheduler_step, cfg_combine), latent
(reparameterize, gaussian_kl, langevin_step) and random (philox_noise).

Each example draws shapes (zero sizes included), layouts (contiguous, strided, permuted, expanded), dtypes, knobs
and special values, then runs the op on every backend that serves it here. Every backend must either refuse with
a ValueError/TypeError whose message starts with the op's name and names one of its arguments, or agree with the
op's reference (``*_ref``). All backends must make the same choice. Any other exception fails the example.

The families are one table (FAMILIES, at the end): a family is a function that draws one example and returns it as
a Case (the op call, its reference, what agreement means); one ``check`` runs every Case. Counting: each family's
main test runs 200 examples on auto, reference and the C++ cpu backend where it serves; a second test runs 20 more
examples on the Triton interpreter, which is slow. The examples are fixed by each test's name (hypothesis ``seed``).
"""

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

import genfast
from genfast.ops import (
    _checks,
    attention,
    attention_decode,
    attention_decode_ref,
    attention_ref,
    attention_varlen,
    attention_varlen_ref,
    cfg_combine,
    cfg_combine_ref,
    conv_transpose2d,
    conv_transpose2d_ref,
    filter_logits,
    filter_logits_ref,
    gaussian_kl,
    gaussian_kl_ref,
    kv_cache_append,
    kv_cache_append_ref,
    langevin_step,
    langevin_step_ref,
    philox_noise,
    philox_noise_ref,
    reparameterize,
    reparameterize_ref,
    sample_tokens,
    sample_tokens_ref,
    scheduler_step,
    scheduler_step_ref,
)
from tests.conftest import serving_backends

# No shrinking phase: CI time goes to the 200 examples; a failure prints every draw of its example.
MAIN = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate))
TRITON = settings(MAIN, max_examples=20)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
LAYOUTS = ("contiguous", "strided", "permuted", "expanded")


# ------------------------------------------------------------------------------------------ shared helpers
def draw_tensor(data, shape, dtype, name, *, special=False, layouts=LAYOUTS):
    """A float tensor of ``shape``/``dtype`` in a drawn layout; returns a factory making fresh equal copies."""
    layout = data.draw(st.sampled_from(layouts), label=f"{name}.layout")
    seed = data.draw(st.integers(0, 2**16), label=f"{name}.seed")
    value = data.draw(st.sampled_from([None, None, None, "nan", "inf", "-inf"]), label=f"{name}.special") \
        if special else None
    spot = data.draw(st.integers(0, 2**16), label=f"{name}.spot")
    shape = tuple(shape)
    expand_dim = data.draw(st.integers(0, max(len(shape) - 1, 0)), label=f"{name}.expand_dim")

    def make():
        gen = torch.Generator().manual_seed(seed)
        if layout == "strided" and shape:
            base = torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen).to(dtype)
            view = lambda b: b[..., ::2]  # noqa: E731
        elif layout == "permuted" and len(shape) >= 2:
            base = torch.randn(shape[::-1], generator=gen).to(dtype)
            view = lambda b: b.permute(*reversed(range(len(shape))))  # noqa: E731
        elif layout == "expanded" and shape:
            small = list(shape)
            small[expand_dim] = 1
            base = torch.randn(small, generator=gen).to(dtype)
            view = lambda b: b.expand(shape)  # noqa: E731
        else:
            base = torch.randn(shape, generator=gen).to(dtype)
            view = lambda b: b  # noqa: E731
        if value is not None and base.numel() and base.is_floating_point():
            base.view(-1)[spot % base.numel()] = float(value)
        return view(base)

    return make


def names_an_argument(op_fn, message: str, extra=()) -> bool:
    names = list(inspect.signature(op_fn).parameters) + list(extra)
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])", message) for n in names)


def outcomes(call, backends):
    """{backend: result or ValueError/TypeError}; a backend that cannot serve the call (BackendError) is left out."""
    results = {}
    for backend in backends:
        with genfast.backend(backend):
            try:
                results[backend] = call()
            except genfast.BackendError:
                continue
            except (ValueError, TypeError) as error:
                results[backend] = error
    return results


def refused(op_name, op_fn, results, extra_names=()) -> bool:
    """True if every backend refused (each with a message naming an argument); fails if only some refused."""
    errors = {b: r for b, r in results.items() if isinstance(r, Exception)}
    for backend, error in errors.items():
        message = str(error)
        assert message.startswith(op_name) and names_an_argument(op_fn, message, extra_names), \
            f"{backend}: {type(error).__name__} does not name an argument: {message}"
    assert not errors or len(errors) == len(results), \
        f"backends disagree on refusing: {{{', '.join(f'{b}: {r!r:.120}' for b, r in results.items())}}}"
    return bool(errors)


def assert_agrees(got, expected, dtype, what):
    tol = TOL.get(dtype, 2e-5)
    got = got.float() if got.is_floating_point() else got
    expected = expected.float() if expected.is_floating_point() else expected
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def backends_for(op: str, triton: bool) -> list[str]:
    serving = serving_backends(op, "cpu")
    if triton:
        return [b for b in serving if b == "triton"]
    return ["auto", "reference"] + [b for b in serving if b != "triton"]


@dataclass(frozen=True)
class Case:
    """One drawn example of a family. ``call`` and ``reference`` build fresh inputs each time they run."""

    op_name: str  # what its error messages start with, and its dispatcher's name
    op: Callable  # the public function, whose parameter names a refusal must mention
    call: Callable[[], Any]
    reference: Callable[[], Any]
    agrees: Callable[[Any, Any, str], None]  # (got, expected, backend): asserts that got matches the reference
    extra_names: tuple[str, ...] = ()  # names a refusal may mention besides the op's parameters


def check(case: Case, triton: bool) -> None:
    """Every backend picked for ``triton`` refuses ``case`` alike (naming an argument), or agrees with the reference."""
    results = outcomes(case.call, backends_for(case.op_name, triton))
    if not results or refused(case.op_name, case.op, results, case.extra_names):
        return
    expected = case.reference()
    for backend, got in results.items():
        case.agrees(got, expected, backend)


def draw_dtype(data, name="dtype"):
    # Mostly the supported floats; sometimes one that must be refused with a TypeError.
    return data.draw(st.sampled_from(FLOATS * 4 + (torch.float64, torch.int32)), label=name)


def draw_window(data):
    return data.draw(st.one_of(st.none(), st.tuples(st.one_of(st.none(), st.integers(-2, 3)),
                                                    st.one_of(st.none(), st.integers(-2, 3)))), label="window")


def draw_scale(data):
    return data.draw(st.sampled_from([None, None, 0.3, 1.0, float("nan"), float("inf"), "x"]), label="scale")


# ------------------------------------------------------------------------------------------ attention
def attention_case(data) -> Case:
    dtype = draw_dtype(data)
    b = data.draw(st.integers(0, 2), label="B")
    hk = data.draw(st.integers(1, 2), label="Hk")
    hq = hk * data.draw(st.integers(1, 2), label="group") + data.draw(st.sampled_from([0] * 9 + [1]), label="bad Hq")
    nq, nk = data.draw(st.integers(0, 5), label="Nq"), data.draw(st.integers(0, 5), label="Nk")
    d = data.draw(st.sampled_from([1, 3, 8, 16]), label="D")
    dk = d + data.draw(st.sampled_from([0] * 9 + [1]), label="bad Dk")
    q = draw_tensor(data, (b, hq, nq, d), dtype, "q", special=True)
    k = draw_tensor(data, (b, hk, nk, dk), dtype, "k")
    v = draw_tensor(data, (b, hk, nk, dk), dtype, "v")
    mask_kind = data.draw(st.sampled_from([None, None, "bool", "float", "bad"]), label="mask")
    mask_seed = data.draw(st.integers(0, 100), label="mask seed")
    causal = data.draw(st.booleans(), label="causal")
    window = draw_window(data)
    scale = draw_scale(data)
    dropout_p = data.draw(st.sampled_from([0.0, 0.0, 0.0, 0.25, 1.0, -0.1]), label="dropout_p")
    return_lse = data.draw(st.booleans(), label="return_lse")
    gen_seed = data.draw(st.integers(0, 100), label="generator seed")

    def mask():
        g = torch.Generator().manual_seed(mask_seed)
        if mask_kind == "bool":
            return torch.rand(nq, nk, generator=g) > 0.3
        if mask_kind == "float":
            return torch.randn(1, hq, nq, nk, generator=g).to(dtype if dtype in FLOATS else torch.float32)
        if mask_kind == "bad":
            return torch.rand(nq + 1, nk, generator=g) > 0.3
        return None

    def call():
        gen = torch.Generator().manual_seed(gen_seed) if dropout_p else None
        return attention(q(), k(), v(), causal=causal, attn_mask=mask(), dropout_p=dropout_p, scale=scale,
                         window=window, return_lse=return_lse, generator=gen)

    def reference():
        seed = _checks.draw_seed(torch.Generator().manual_seed(gen_seed), torch.device("cpu")) if dropout_p else None
        return attention_ref(q(), k(), v(), causal=causal, attn_mask=mask(), dropout_p=dropout_p, scale=scale,
                             window=window, return_lse=True, seed=seed)

    def agrees(got, expected, backend):
        out_ref, lse_ref = expected
        out, lse = got if return_lse else (got, None)
        assert out.shape == out_ref.shape and out.dtype == out_ref.dtype
        assert_agrees(out, out_ref, dtype, f"attention out on {backend}")
        if lse is not None:
            assert_agrees(lse, lse_ref, torch.float32 if dtype == torch.float32 else dtype, f"lse on {backend}")

    return Case("attention", attention, call, reference, agrees, ("attn_mask", "window[0] (left)", "D", "Hq"))


# ------------------------------------------------------------------------------------------ attention_varlen
def attention_varlen_case(data) -> Case:
    dtype = draw_dtype(data)
    nseq = data.draw(st.integers(0, 3), label="B")
    len_q = data.draw(st.lists(st.integers(0, 4), min_size=nseq, max_size=nseq), label="lengths q")
    len_k = data.draw(st.lists(st.integers(0, 4), min_size=nseq, max_size=nseq), label="lengths k")
    hk = data.draw(st.integers(1, 2), label="Hk")
    hq = hk * data.draw(st.integers(1, 2), label="group")
    d = data.draw(st.sampled_from([1, 4, 8]), label="D")
    total_q, total_k = sum(len_q), sum(len_k)
    q = draw_tensor(data, (total_q, hq, d), dtype, "q", special=True)
    k = draw_tensor(data, (total_k, hk, d), dtype, "k")
    v = draw_tensor(data, (total_k, hk, d), dtype, "v")
    cu_dtype = data.draw(st.sampled_from([torch.int32, torch.int64, torch.int64, torch.float32]), label="cu dtype")
    slack_q = data.draw(st.sampled_from([0, 0, 1, 3, -1]), label="max_seqlen_q slack")
    slack_k = data.draw(st.sampled_from([0, 0, 2, 100, -1]), label="max_seqlen_k slack")
    max_q, max_k = max(len_q, default=0) + slack_q, max(len_k, default=0) + slack_k
    bad_cu = data.draw(st.sampled_from([None] * 8 + ["start", "end"]), label="bad cu")
    causal = data.draw(st.booleans(), label="causal")
    window = draw_window(data)
    scale = draw_scale(data)
    dropout_p = data.draw(st.sampled_from([0.0, 0.0, 0.0, 0.25]), label="dropout_p")
    return_lse = data.draw(st.booleans(), label="return_lse")

    def cu(lengths):
        values = [0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()
        if bad_cu == "start":
            values[0] = 1
        elif bad_cu == "end":
            values[-1] += 1
        return torch.tensor(values, dtype=cu_dtype)

    def call():
        gen = torch.Generator().manual_seed(7) if dropout_p else None
        return attention_varlen(q(), k(), v(), cu(len_q), cu(len_k), max_q, max_k, causal=causal, dropout_p=dropout_p,
                                scale=scale, window=window, return_lse=return_lse, generator=gen)

    def reference():
        seed = _checks.draw_seed(torch.Generator().manual_seed(7), torch.device("cpu")) if dropout_p else None
        return attention_varlen_ref(q(), k(), v(), cu(len_q), cu(len_k), max_q, max_k, causal=causal,
                                    dropout_p=dropout_p, scale=scale, window=window, return_lse=True, seed=seed)

    def agrees(got, expected, backend):
        out_ref, lse_ref = expected
        out, lse = got if return_lse else (got, None)
        assert out.shape == out_ref.shape
        assert_agrees(out, out_ref, dtype, f"attention_varlen out on {backend}")
        if lse is not None:
            assert_agrees(lse, lse_ref, dtype, f"attention_varlen lse on {backend}")

    extra = ("cu_seqlens_q", "cu_seqlens_k", "window[0] (left)", "D", "Hq")
    return Case("attention_varlen", attention_varlen, call, reference, agrees, extra)


# ------------------------------------------------------------------------------------------ attention_decode
def attention_decode_case(data) -> Case:
    dtype = draw_dtype(data)
    b = data.draw(st.integers(0, 3), label="B")
    hk = data.draw(st.integers(1, 2), label="Hk")
    hq = hk * data.draw(st.integers(1, 2), label="group")
    nq = data.draw(st.sampled_from([1, 1, 2, 3, 0, 17]), label="Nq")
    nmax = data.draw(st.integers(1, 6), label="Nmax")
    d = data.draw(st.sampled_from([1, 4, 8]), label="D")
    q = draw_tensor(data, (b, hq, nq, d), dtype, "q", special=True)
    k_cache = draw_tensor(data, (b, hk, nmax, d), dtype, "k_cache")
    v_cache = draw_tensor(data, (b, hk, nmax, d), dtype, "v_cache")
    lengths = data.draw(st.lists(st.integers(-1, nmax + 1), min_size=b, max_size=b), label="cache_seqlens")
    seqlen_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]), label="cache_seqlens dtype")
    causal = data.draw(st.booleans(), label="causal")
    window = draw_window(data)
    scale = draw_scale(data)
    return_lse = data.draw(st.booleans(), label="return_lse")
    num_splits = data.draw(st.sampled_from([None, None, 1, 2, 0]), label="num_splits")

    def call():
        return attention_decode(q(), k_cache(), v_cache(), torch.tensor(lengths, dtype=seqlen_dtype), scale=scale,
                                causal=causal, window=window, return_lse=return_lse, num_splits=num_splits)

    def reference():
        return attention_decode_ref(q(), k_cache(), v_cache(), torch.tensor(lengths, dtype=seqlen_dtype),
                                    scale=scale, causal=causal, window=window, return_lse=True)

    def agrees(got, expected, backend):
        out_ref, lse_ref = expected
        out, lse = got if return_lse else (got, None)
        assert_agrees(out, out_ref, dtype, f"attention_decode out on {backend}")
        if lse is not None:
            assert_agrees(lse, lse_ref, dtype, f"attention_decode lse on {backend}")

    extra = ("cache_seqlens", "Nq", "D", "Hq", "window[0] (left)")
    return Case("attention_decode", attention_decode, call, reference, agrees, extra)


# ------------------------------------------------------------------------------------------ kv_cache_append
def kv_cache_append_case(data) -> Case:
    dtype = draw_dtype(data)
    b = data.draw(st.integers(0, 3), label="B")
    hk = data.draw(st.integers(1, 2), label="Hk")
    nmax = data.draw(st.integers(1, 6), label="Nmax")
    nnew = data.draw(st.integers(0, 3), label="Nnew")
    d = data.draw(st.sampled_from([1, 4, 8]), label="D")
    # The caches are written in place: an expanded cache (rows sharing memory) must be refused.
    k_cache = draw_tensor(data, (b, hk, nmax, d), dtype, "k_cache")
    v_cache = draw_tensor(data, (b, hk, nmax, d), dtype, "v_cache")
    aliased = data.draw(st.sampled_from([False] * 9 + [True]), label="v_cache is k_cache")
    k_new = draw_tensor(data, (b, hk, nnew, d), dtype, "k_new", special=True)
    v_new = draw_tensor(data, (b, hk, nnew, d), dtype, "v_new")
    lengths = data.draw(st.lists(st.integers(-1, nmax + 1), min_size=b, max_size=b), label="cache_seqlens")

    def fresh():
        kc = k_cache()
        return kc, (kc if aliased else v_cache()), k_new(), v_new(), torch.tensor(lengths, dtype=torch.int64)

    def call():
        kc, vc, kn, vn, lens = fresh()
        assert kv_cache_append(kc, vc, kn, vn, lens) is None
        return kc, vc

    def reference():
        kc, vc, kn, vn, lens = fresh()
        kc, vc = kc.clone(), vc.clone()
        kv_cache_append_ref(kc, vc, kn, vn, lens)
        return kc, vc

    def agrees(got, expected, backend):
        (kc, vc), (k_ref, v_ref) = got, expected
        assert_agrees(kc, k_ref, dtype, f"k_cache on {backend}")
        assert_agrees(vc, v_ref, dtype, f"v_cache on {backend}")

    return Case("kv_cache_append", kv_cache_append, call, reference, agrees, ("cache_seqlens", "Nnew", "D"))


# ------------------------------------------------------------------------------------------ sampling
def sampling_case(data) -> Case:
    dtype = draw_dtype(data)
    b, vocab = data.draw(st.integers(0, 3), label="B"), data.draw(st.integers(0, 9), label="V")
    logits = draw_tensor(data, (b, vocab), dtype, "logits", special=True)
    knobs = dict(
        temperature=data.draw(st.sampled_from([1.0, 1.0, 0.0, 0.7, 2.0, -1.0, float("nan")]), label="temperature"),
        top_k=data.draw(st.sampled_from([0, 0, 1, 3, 50, -1, 2**70]), label="top_k"),
        top_p=data.draw(st.sampled_from([1.0, 1.0, 0.9, 0.3, 0.0, 1.5]), label="top_p"),
        min_p=data.draw(st.sampled_from([0.0, 0.0, 0.05, 0.5, 1.0, -0.1]), label="min_p"),
        repetition_penalty=data.draw(st.sampled_from([1.0, 1.0, 1.3, 0.8, 0.0]), label="repetition_penalty"),
    )
    prev_len = data.draw(st.sampled_from([None, None, 0, 3]), label="prev_tokens length")
    prev_hi = data.draw(st.sampled_from([vocab, vocab, vocab + 2]), label="prev_tokens high")
    noise_seed = data.draw(st.integers(0, 1000), label="noise seed")
    sample = data.draw(st.booleans(), label="sample_tokens")

    def prev():
        if prev_len is None:
            return None
        return torch.randint(0, max(prev_hi, 1), (b, prev_len), generator=torch.Generator().manual_seed(1))

    def noise():
        return torch.rand((b, vocab), generator=torch.Generator().manual_seed(noise_seed)).clamp(1e-6, 1 - 1e-6)

    if sample:
        op_name, op = "sample_tokens", sample_tokens
        call = lambda: sample_tokens(logits(), prev_tokens=prev(), noise=noise(), **knobs)  # noqa: E731
        reference = lambda: sample_tokens_ref(logits(), prev_tokens=prev(), noise=noise(), **knobs)  # noqa: E731
    else:
        op_name, op = "filter_logits", filter_logits
        call = lambda: filter_logits(logits(), prev_tokens=prev(), **knobs)  # noqa: E731
        reference = lambda: filter_logits_ref(logits(), prev_tokens=prev(), **knobs)  # noqa: E731

    def agrees(got, expected, backend):
        if sample:
            assert torch.equal(got, expected), f"sample_tokens on {backend}: {got.tolist()} != {expected.tolist()}"
        else:
            assert torch.equal(got.isinf(), expected.isinf()), f"filter_logits kept set on {backend}"
            assert_agrees(got, expected, torch.float32, f"filter_logits on {backend}")

    return Case(op_name, op, call, reference, agrees)


# ------------------------------------------------------------------------------------------ conv_transpose
def conv_transpose_case(data) -> Case:
    dtype = draw_dtype(data)
    n = data.draw(st.integers(0, 2), label="N")
    groups = data.draw(st.sampled_from([1, 1, 2]), label="groups")
    cin = groups * data.draw(st.integers(1, 2), label="C_in per group")
    cout = groups * data.draw(st.integers(1, 2), label="C_out per group")
    h, w = data.draw(st.integers(0, 4), label="H"), data.draw(st.integers(1, 4), label="W")
    kh, kw = data.draw(st.integers(1, 3), label="KH"), data.draw(st.integers(1, 3), label="KW")
    stride = data.draw(st.sampled_from([1, 2, (1, 2), 0]), label="stride")
    padding = data.draw(st.sampled_from([0, 1, (0, 1), -1]), label="padding")
    output_padding = data.draw(st.sampled_from([0, 0, 1]), label="output_padding")
    dilation = data.draw(st.sampled_from([1, 1, 2]), label="dilation")
    activation = data.draw(st.sampled_from([None, "relu", "leaky_relu", "tanh", "sigmoid", "silu", "gelu", "bad"]),
                           label="activation")
    x = draw_tensor(data, (n, cin, h, w), dtype, "x", special=True)
    weight = draw_tensor(data, (cin, cout // groups, kh, kw), dtype, "weight")
    bias = draw_tensor(data, (cout,), dtype, "bias") if data.draw(st.booleans(), label="bias") else None
    scaled = data.draw(st.booleans(), label="scale and shift")
    scale = draw_tensor(data, (cout,), dtype, "scale") if scaled else None
    shift = draw_tensor(data, (cout,), dtype, "shift") if scaled else None
    args = lambda: (x(), weight(), bias() if bias else None)  # noqa: E731
    kwargs = lambda: dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups,  # noqa: E731
                          dilation=dilation, activation=activation, scale=scale() if scale else None,
                          shift=shift() if shift else None)

    def agrees(got, expected, backend):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert_agrees(got, expected, dtype, f"conv_transpose2d on {backend}")

    return Case("conv_transpose2d", conv_transpose2d, lambda: conv_transpose2d(*args(), **kwargs()),
                lambda: conv_transpose2d_ref(*args(), **kwargs()), agrees)


# ------------------------------------------------------------------------------------------ diffusion
def diffusion_case(data) -> Case:
    dtype = draw_dtype(data)
    shape = tuple(data.draw(st.lists(st.integers(0, 4), min_size=0, max_size=3), label="shape"))
    sample = draw_tensor(data, shape, dtype, "sample", special=True)
    model_output = draw_tensor(data, shape, dtype, "model_output")
    guided = data.draw(st.booleans(), label="guided")
    uncond = draw_tensor(data, shape, dtype, "model_output_uncond") if guided else None
    guidance_scale = data.draw(st.sampled_from([1.0, 7.5, 0.0, float("nan")]), label="guidance_scale")
    coef_seed = data.draw(st.integers(0, 1000), label="coefs seed")
    clip = data.draw(st.sampled_from([(-1.0, 1.0), (-float("inf"), float("inf"))]), label="clip")
    noise_kind = data.draw(st.sampled_from(["given", "given", "drawn", "none"]), label="noise")
    noise = draw_tensor(data, shape, torch.float32, "noise")
    cfg = data.draw(st.booleans(), label="cfg_combine")

    def coefs():
        c = torch.randn(11, generator=torch.Generator().manual_seed(coef_seed))
        c[2], c[3] = clip
        return c

    if cfg:
        op_name, op = "cfg_combine", cfg_combine
        call = lambda: cfg_combine(model_output(), sample(), guidance_scale)  # noqa: E731
        reference = lambda: cfg_combine_ref(model_output(), sample(), guidance_scale)  # noqa: E731
    else:
        op_name, op = "scheduler_step", scheduler_step

        def call():
            gen = torch.Generator().manual_seed(5) if noise_kind == "drawn" else None
            return scheduler_step(sample(), model_output(), coefs(), model_output_uncond=uncond() if guided else None,
                                  guidance_scale=guidance_scale, noise=noise() if noise_kind == "given" else None,
                                  generator=gen, add_noise=noise_kind != "none")

        def reference():
            seed = _checks.draw_seed(torch.Generator().manual_seed(5), torch.device("cpu"))
            return scheduler_step_ref(sample(), model_output(), uncond() if guided else None, guidance_scale, coefs(),
                                      noise() if noise_kind == "given" else None,
                                      seed if noise_kind == "drawn" else None)

    def agrees(got, expected, backend):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        # The C++ step folds its three terms into coefficients of x0, x and m (csrc/cpu/diffusion.cpp): with an
        # infinite input, inf * a + inf * b (the reference's order) can be NaN where (a + b) * inf is +-inf. Both
        # are non-finite; what must hold is that non-finite input never comes out finite, nor the reverse.
        assert torch.equal(got.isfinite(), expected.isfinite()), f"{op_name} on {backend}: finite positions differ"
        finite = expected.isfinite()
        assert_agrees(got[finite], expected[finite], dtype, f"{op_name} on {backend}")

    return Case(op_name, op, call, reference, agrees)


# ------------------------------------------------------------------------------------------ latent
def latent_case(data) -> Case:
    dtype = draw_dtype(data)
    shape = tuple(data.draw(st.lists(st.integers(0, 4), min_size=0, max_size=3), label="shape"))
    a = draw_tensor(data, shape, dtype, "first", special=True)
    b = draw_tensor(data, shape, dtype, "second")
    noise = draw_tensor(data, shape, torch.float32, "noise")
    which = data.draw(st.sampled_from(["reparameterize", "gaussian_kl", "langevin_step"]), label="op")
    given_noise = data.draw(st.booleans(), label="noise given")
    reduction = data.draw(st.sampled_from(["per_sample", "sum", "mean", "none", "max"]), label="reduction")
    step_size = data.draw(st.sampled_from([0.1, 0.0, -0.1, float("nan")]), label="step_size")
    noise_scale = data.draw(st.sampled_from([0.5, 0.0, float("inf")]), label="noise_scale")
    clamp = data.draw(st.sampled_from([None, (-1.0, 1.0), (1.0, -1.0)]), label="clamp")

    def kwargs_noise():
        if given_noise:
            return dict(noise=noise())
        return dict(generator=torch.Generator().manual_seed(9))

    def ref_noise():
        if given_noise:
            return dict(noise=noise())
        return dict(seed=_checks.draw_seed(torch.Generator().manual_seed(9), torch.device("cpu")))

    if which == "reparameterize":
        op = reparameterize
        call = lambda: reparameterize(a(), b(), **kwargs_noise())  # noqa: E731
        reference = lambda: reparameterize_ref(a(), b(), **ref_noise())  # noqa: E731
    elif which == "gaussian_kl":
        op = gaussian_kl
        call = lambda: gaussian_kl(a(), b(), reduction=reduction)  # noqa: E731
        reference = lambda: gaussian_kl_ref(a(), b(), reduction)  # noqa: E731
    else:
        op = langevin_step
        call = lambda: langevin_step(a(), b(), step_size, noise_scale, clamp=clamp, **kwargs_noise())  # noqa: E731

        def reference():
            lo, hi = clamp if clamp else (-float("inf"), float("inf"))
            return langevin_step_ref(a(), b(), step_size, noise_scale, lo, hi, **ref_noise())

    def agrees(got, expected, backend):
        assert got.shape == expected.shape
        assert_agrees(got, expected, dtype if which != "gaussian_kl" else torch.float32, f"{which} on {backend}")

    return Case(which, op, call, reference, agrees, ("mu", "x"))


# ------------------------------------------------------------------------------------------ random
def random_case(data) -> Case:
    seed = data.draw(st.sampled_from([0, 1, 2**62 + 5, 2**63 - 1, -1, 2**63, "s", True]), label="seed")
    numel = data.draw(st.sampled_from([0, 1, 5, 17, 1000, -1, 2**40]), label="numel")
    offset = data.draw(st.sampled_from([0, 3, 2**33 + 1, 2**63 - 20, 2**63 - 1, 2**63, -2]), label="offset")
    normal = data.draw(st.booleans(), label="normal")
    as_tensor = data.draw(st.booleans(), label="seed as tensor")

    def seed_arg():
        if as_tensor and isinstance(seed, int) and not isinstance(seed, bool) and -2**63 <= seed < 2**63:
            return torch.tensor([seed], dtype=torch.int64)
        return seed

    def agrees(got, expected, backend):
        if normal:
            torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
        else:
            assert torch.equal(got, expected), backend

    return Case("philox_noise", philox_noise, lambda: philox_noise(seed_arg(), numel, offset=offset, normal=normal),
                lambda: philox_noise_ref(torch.tensor([int(seed)]), numel, offset, normal), agrees)


# ------------------------------------------------------------------------------------------ the table
FAMILIES = {
    "attention": attention_case,
    "attention_varlen": attention_varlen_case,
    "attention_decode": attention_decode_case,
    "kv_cache_append": kv_cache_append_case,
    "sampling": sampling_case,
    "conv_transpose": conv_transpose_case,
    "diffusion": diffusion_case,
    "latent": latent_case,
    "random": random_case,
}


def property_test(name: str, case: Callable[[Any], Case], triton: bool):
    """The test ``name``: examples drawn by ``case``, checked on the Triton interpreter or on the other backends."""

    def test(data):
        check(case(data), triton)

    test.__name__ = test.__qualname__ = name
    # Seeded by its name: every run draws the same examples, and no two tests draw the same ones.
    return seed(name)((TRITON if triton else MAIN)(given(st.data())(test)))


# Module-level names, so that pytest collects them as test_<family>_properties and test_<family>_properties_triton.
for _family, _case in FAMILIES.items():
    for _triton in (False, True):
        _name = f"test_{_family}_properties" + ("_triton" if _triton else "")
        globals()[_name] = property_test(_name, _case, _triton)
