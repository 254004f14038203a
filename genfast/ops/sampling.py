"""Token sampling: Hugging Face's logits processors fused into one sort-free pass per row.

``filter_logits`` returns the processed logits (removed tokens at -inf) and ``sample_tokens`` draws one
token per row from them. The semantics are transformers' processors, applied in their order:

1. repetition penalty: every token that occurs in ``prev_tokens[b]`` is penalised once (negative
   logits multiplied by the penalty, positive ones divided);
2. temperature: ``y = x / temperature``; temperature 0 (or any value that is not > 0 with
   ``validate=False``) means greedy: the argmax of the penalised logits, lowest index on ties;
3. top-k: keep ``y_i >= `` the k-th largest value (ties with it kept); ``top_k`` 0 or >= V disables;
4. top-p: keep a token iff the probability mass of the tokens strictly more probable than it, within
   the top-k-filtered distribution, is < ``top_p`` (crossing token and boundary ties kept); 1 disables;
5. min-p: remove tokens with ``p_i < min_p * p_max``, evaluated as ``(y_i - y_max) < log(min_p)``
   with the fp32 difference compared in fp64; 0 disables.

The kept set is always ``{i : y_i >= t}`` for one threshold per row, which the kernels find without
sorting (genfast/kernels/sampling.py, csrc/cpu/sampling.cpp, csrc/cuda/sampling.cu). Sampling is
Gumbel-max, ``argmax_i y_i - log(-log(u_i))`` over kept tokens (lowest index on ties), so the exact
noise can be shared: ``u[b, i]`` is the caller's ``noise[b, i]``, or Philox ``uniform(seed_b, step_b * V + i)``
with ``(seed_b, step_b) = (seed, b)`` for one seed drawn from ``generator`` (row b's noise depends on its place in
the batch), or ``(seeds[b], offsets[b])`` for per-row seeds (it depends on nothing else: a request replays
exactly, alone or in any batch). One mechanism on every backend: a seed per row (or one for all) and a counter
block per row.

The references ``filter_logits_ref`` / ``sample_tokens_ref`` below are the specification: plain,
sort-based PyTorch in fp32 (top-p mass in fp64). The kernels sum top-p mass in integers (each weight
``exp(y_i - y_max)`` in 2^-38 fixed point, csrc/common/sampling.h), the same arithmetic on every backend, so
they agree with each other at near-ties; they can differ from the reference only when the mass before a
token is within about ``V * 2^-38`` (relative) of ``top_p``.

Value checks cost no extra pass: every backend sets per-row flags (NaN, +inf, rows of all -inf, overflow
of ``logits / temperature``, knobs out of range) while it reads the row, and the op raises the named
error afterwards (``_FLAG_MESSAGES``). Gradients of ``filter_logits`` reach ``logits`` only: ``1 /
temperature`` at kept tokens (1 in greedy rows), 0 at removed ones; the thresholds are piecewise constant.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F

from genfast import _backend, _ext, _philox
from genfast.kernels._sampling_flags import SamplingFlag
from genfast.ops import _checks
from genfast.ops.random import STREAM_END

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------ reference
def _penalize(x: torch.Tensor, penalty: torch.Tensor, prev_tokens: torch.Tensor | None) -> torch.Tensor:
    """fp32 copy of ``x`` [B, V] with every token of ``prev_tokens`` [B, L] penalised once.

    Sparse and out of place: gather the seen logits, penalise them, scatter them back. A token seen twice
    is gathered twice from the *unpenalised* copy and both scatters write the same value, so duplicates
    cannot penalise twice and the result does not depend on scatter order. Indices outside [0, V)
    (possible only with validate=False) are sent to a padding column that is dropped afterwards.
    """
    return _penalize_and_check(x, penalty, prev_tokens)[0]


def _penalize_and_check(x, penalty, prev_tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_penalize`, plus a bool tensor: some id of ``prev_tokens`` is outside [0, V) (None if no ids)."""
    batch, vocab = x.shape
    if prev_tokens is None or prev_tokens.shape[1] == 0:
        return x.float(), None
    padded = F.pad(x.float(), (0, 1))  # (B, V+1); column V absorbs invalid indices
    in_range = (prev_tokens >= 0) & (prev_tokens < vocab)
    index = torch.where(in_range, prev_tokens, vocab)
    seen = padded.gather(1, index)
    p = penalty.float()[:, None]
    padded = padded.scatter(1, index, torch.where(seen < 0, seen * p, seen / p))
    return padded[:, :vocab], ~in_range.all()


def _filter_ref(x: torch.Tensor, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """The processed logits [B, V] fp32 of penalised logits ``x`` [B, V] and per-row knobs [B]."""
    batch, vocab = x.shape
    x = x.float()
    greedy = ~(temperature > 0)
    y = x / torch.where(greedy, 1.0, temperature)[:, None]
    sorted_y, _ = torch.sort(y, dim=-1, descending=True)

    # top-k: the k-th largest value; everything >= it is kept, so ties with it stay.
    k = top_k.clamp(0, vocab)
    kth = sorted_y.gather(1, (k - 1).clamp(min=0)[:, None])
    t_k = torch.where(((k > 0) & (k < vocab))[:, None], kth, NEG_INF)
    sorted_y = sorted_y.masked_fill(sorted_y < t_k, NEG_INF)  # still sorted

    # top-p: keep a sorted position iff the mass strictly before it is < top_p; the kept positions form a
    # prefix, and keeping every value >= the last kept one also keeps ties of the boundary token. The mass is
    # summed in fp64: an fp32 cumulative sum drifts by ~1e-6 over thousands of tokens, which would make the
    # specification itself wrong at near-ties that the kernels' exact integer sums resolve correctly.
    probs = torch.softmax(sorted_y.double(), dim=-1)
    mass_before = F.pad(probs.cumsum(-1)[:, :-1], (1, 0))
    last = (mass_before < top_p.double()[:, None]).sum(-1, keepdim=True).clamp(min=1) - 1
    t_p = torch.where((top_p < 1)[:, None], sorted_y.gather(1, last), NEG_INF)

    # min-p: p_i / p_max = exp(y_i - y_max); compared in log space, the fp32 difference in fp64.
    y_max = sorted_y[:, :1]
    # min_p NaN disables the filter and min_p > 1 keeps the max token(s) (reachable with validate=False).
    log_min_p = torch.log(min_p.double())
    log_min_p = torch.where(torch.isnan(log_min_p), NEG_INF, log_min_p).clamp(max=0)
    min_p_ok = (y - y_max).double() >= log_min_p[:, None]

    out = y.masked_fill((y < t_k) | (y < t_p) | ~min_p_ok, NEG_INF)
    # Greedy rows keep only the argmax (lowest index on ties) of the penalised logits, unscaled.
    best = x.argmax(-1, keepdim=True)
    only_best = torch.full_like(x, NEG_INF).scatter(1, best, x.gather(1, best))
    return torch.where(greedy[:, None], only_best, out)


def _gumbel_argmax_ref(x: torch.Tensor, filtered: torch.Tensor, temperature, noise: torch.Tensor) -> torch.Tensor:
    # Removed tokens score -inf for every u in [0, 1); a kept token with u == 0 scores -inf as well. A row
    # whose kept tokens all score -inf returns its argmax, the lowest index of the max kept value.
    scores = filtered - torch.log(-torch.log(noise.float()))
    best, sampled = scores.max(-1)
    sampled = torch.where(best > NEG_INF, sampled, filtered.argmax(-1))
    return torch.where(temperature > 0, sampled, x.argmax(-1))


# The per-row flags the kernels set while they read the logits (SamplingFlag), in the order the errors are
# raised: (flag, argument, what is wrong).
_FLAG_MESSAGES = (
    (SamplingFlag.TEMPERATURE, "temperature", "must be finite and >= 0"),
    (SamplingFlag.TOP_K, "top_k", "must be >= 0"),
    (SamplingFlag.TOP_P, "top_p", "must be in (0, 1]"),
    (SamplingFlag.MIN_P, "min_p", "must be in [0, 1]"),
    (SamplingFlag.NAN, "logits", "must not contain NaN"),
    (SamplingFlag.POS_INF, "logits", "must not contain +inf"),
    (SamplingFlag.ALL_NEG_INF, "logits", "must have a finite value in every row (a row is all -inf)"),
    (SamplingFlag.OVERFLOW, "temperature", "is so small that logits / temperature overflows float32"),
)


def _value_flags_ref(x: torch.Tensor, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """The flags [B] int32 of penalised logits ``x`` [B, V] and the knobs, as the kernels set them."""
    x = x.float()
    y = x / torch.where(temperature > 0, temperature, 1.0)[:, None]
    bits = [
        (~(temperature >= 0) | (temperature == float("inf")), SamplingFlag.TEMPERATURE),
        (top_k < 0, SamplingFlag.TOP_K),
        (~((top_p > 0) & (top_p <= 1)), SamplingFlag.TOP_P),
        (~((min_p >= 0) & (min_p <= 1)), SamplingFlag.MIN_P),
        (torch.isnan(x).any(-1), SamplingFlag.NAN),
        ((x == float("inf")).any(-1), SamplingFlag.POS_INF),
        (~(x > NEG_INF).any(-1), SamplingFlag.ALL_NEG_INF),  # NaN is not > -inf either, as in the kernels
        ((torch.isinf(y) & ~torch.isinf(x)).any(-1), SamplingFlag.OVERFLOW),
    ]
    flags = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
    for bad, bit in bits:
        flags |= bad.to(torch.int32) * int(bit)
    return flags


# ------------------------------------------------------------------------------------------ arguments
def _knob(op, name, value, batch, device, *, integer=False) -> torch.Tensor:
    """A scalar or per-row knob as a [B] tensor (int64 for top_k, else float32) on ``device``."""
    if isinstance(value, torch.Tensor):
        if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
            raise TypeError(f"{op}: {name} must be an integer tensor, got {value.dtype}")
        if not integer and not value.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {value.dtype}")
        if value.shape != (batch,):
            raise ValueError(f"{op}: {name} must have shape ({batch},) (one value per row), got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{op}: {name} is on {value.device} but logits is on {device}")
        # Knobs are not differentiated: gradients of filter_logits reach logits only, on every backend.
        return value.detach().to(torch.int64 if integer else torch.float32).contiguous()
    if integer:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{op}: {name} must be an int or an integer tensor of shape ({batch},), got "
                            f"{type(value).__name__}")
        if not -(2**63) <= int(value) < 2**63:
            raise ValueError(f"{op}: {name} must fit in int64 (0 disables it), got {int(value)}")
        return torch.full((batch,), int(value), dtype=torch.int64, device=device)
    value = _checks.real_number(op, name, value)
    if abs(value) != float("inf") and abs(value) > torch.finfo(torch.float32).max:
        raise ValueError(f"{op}: {name} must be finite in float32 (magnitude <= 3.4e38), got {value}")
    return torch.full((batch,), value, dtype=torch.float32, device=device)


def _prepare(op, logits, temperature, top_k, top_p, min_p, repetition_penalty, prev_tokens, validate):
    """Checks what needs no values; returns the penalised logits, the per-row knob tensors and the value checks
    left for after the kernel: (argument, what is wrong, bool tensor) for what the kernels do not flag."""
    _checks.tensor(op, "logits", logits, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    if logits.device.type == "meta":
        raise ValueError(f"{op}: logits is on the meta device, which holds no values to filter or sample; "
                         "pass logits on cpu or cuda")
    batch, vocab = logits.shape
    if batch < 1 or vocab < 1:
        raise ValueError(f"{op}: logits must have at least one row and one column, got shape {tuple(logits.shape)}")
    if not isinstance(validate, bool):
        raise TypeError(f"{op}: validate must be a bool, got {type(validate).__name__}")
    dev = logits.device
    knobs = {
        "temperature": _knob(op, "temperature", temperature, batch, dev),
        "top_k": _knob(op, "top_k", top_k, batch, dev, integer=True),
        "top_p": _knob(op, "top_p", top_p, batch, dev),
        "min_p": _knob(op, "min_p", min_p, batch, dev),
        "repetition_penalty": _knob(op, "repetition_penalty", repetition_penalty, batch, dev),
    }
    checks = []
    if validate:
        # The one knob the kernels never see: checked on the host when it is a Python number.
        penalty_rule = "must be finite and > 0"
        if isinstance(repetition_penalty, torch.Tensor):
            r = knobs["repetition_penalty"]
            checks.append(("repetition_penalty", penalty_rule, (~(r > 0) | torch.isinf(r)).any()))
        elif not (0 < float(repetition_penalty) < float("inf")):
            raise ValueError(f"{op}: repetition_penalty {penalty_rule}")
    if prev_tokens is not None:
        _checks.tensor(op, "prev_tokens", prev_tokens, dtypes=(torch.int64,), ndim=2)
        _checks.same_device(op, "logits", logits, prev_tokens=prev_tokens)
        if prev_tokens.shape[0] != batch:
            raise ValueError(f"{op}: prev_tokens must have shape ({batch}, L), got {tuple(prev_tokens.shape)}")
    x, bad_ids = _penalize_and_check(logits, knobs["repetition_penalty"], prev_tokens)
    if bad_ids is not None and validate:
        checks.append(("prev_tokens", f"must hold token ids in [0, {vocab})", bad_ids))
    if prev_tokens is None or prev_tokens.shape[1] == 0:
        x = logits  # no copy: the kernels read float16/bfloat16 themselves
    return x.contiguous(), knobs, checks


def max_offset(vocab: int) -> int:
    """The largest ``offsets[b]`` for a vocabulary of ``vocab`` tokens: row b draws Philox elements
    ``offsets[b] * V .. offsets[b] * V + V - 1``, and the stream's element indices are int64 on every backend
    (genfast.ops.random.STREAM_END), so ``(offsets[b] + 1) * V <= 2**63 - 1``: about 1.8e14 steps at V = 50257."""
    return STREAM_END // vocab - 1


def _noise_source(op, logits, noise, generator, seeds, offsets, validate):
    """(noise, seed, offsets, checks) for the kernels: the caller's ``noise``, or one seed drawn from
    ``generator`` (offsets None: row b's counter block is b), or the per-row ``seeds`` with their ``offsets``
    (zeros by default), moved to the logits' device. ``checks`` are the value checks of ``offsets``."""
    if seeds is None:
        if offsets is not None:
            raise ValueError(f"{op}: offsets is the step of per-row seeds: pass seeds with it")
        return *_checks.noise_or_seed(op, logits, noise, generator), None, []
    if generator is not None:
        raise ValueError(f"{op}: pass seeds or generator, not both")
    if noise is not None:
        raise ValueError(f"{op}: pass seeds or noise, not both")
    batch, vocab = logits.shape
    rows = {"seeds": seeds, "offsets": offsets}
    for name, value in rows.items():
        if value is None:
            continue
        _checks.tensor(op, name, value, dtypes=(torch.int64,), ndim=1)
        if value.shape != (batch,):
            raise ValueError(f"{op}: {name} must have shape ({batch},) (one value per row), got {tuple(value.shape)}")
        if value.device != logits.device and value.device.type != "cpu":
            raise ValueError(f"{op}: {name} is on {value.device} but must be on the logits' device "
                             f"({logits.device}) or the CPU")
    seeds = seeds.to(logits.device, non_blocking=True).contiguous()
    if offsets is None:
        offsets = torch.zeros(batch, dtype=torch.int64, device=logits.device)
    else:
        offsets = offsets.to(logits.device, non_blocking=True).contiguous()
    checks = []
    if validate:
        # Past the bound the counter would wrap onto another step's noise (or another row's).
        bound = max_offset(vocab)
        bad = (offsets < 0) | (offsets > bound)
        checks.append(("offsets", f"must be in [0, {bound}] (offsets * V + V must stay within the int64 Philox "
                                  "stream)", bad.any()))
    return None, seeds, offsets, checks


def _noise_check(noise: torch.Tensor | None) -> list:
    """One pass over caller-given noise: NaN, or values outside [0, 1), make the backends disagree."""
    if noise is None:
        return []
    low, high = torch.aminmax(noise)
    return [("noise", "must hold values in [0, 1) (no NaN)", ~((low >= 0) & (high < 1)))]


def _raise_bad_values(op: str, flags: torch.Tensor | None, checks: list, x, knobs) -> None:
    """Raises the first error, the host-side checks first, then in _FLAG_MESSAGES order, with one synchronisation.

    ``flags`` are the kernel's, or None from the reference (computed here from ``x`` and ``knobs``). Skipped
    under torch.compile (the errors need the host), as with ``validate=False``.
    """
    if torch.compiler.is_compiling():
        return
    if flags is None:
        flags = _value_flags_ref(x, knobs["temperature"], knobs["top_k"], knobs["top_p"], knobs["min_p"])
    found = torch.stack([flags.ne(0).any()] + [bad for _, _, bad in checks]).tolist()
    for (name, message, _), bad in zip(checks, found[1:]):
        if bad:
            raise ValueError(f"{op}: {name} {message}")
    if not found[0]:
        return
    flags = flags.cpu()
    for bit, name, message in _FLAG_MESSAGES:
        rows = (flags & int(bit)).nonzero()
        if rows.numel():
            raise ValueError(f"{op}: {name} {message} (row {int(rows[0])})")
    raise AssertionError(f"{op}: unknown value flags {flags.tolist()}")


# ------------------------------------------------------------------------------------------ custom ops
# Both ops return (result, flags int32 [B]): the value flags each backend sets while it reads a row.
def _filter_fake(logits, temperature, top_k, top_p, min_p):
    batch = logits.shape[0]
    return logits.new_empty(logits.shape, dtype=torch.float32), logits.new_empty((batch,), dtype=torch.int32)


def _sample_fake(logits, temperature, top_k, top_p, min_p, noise, seed, offsets=None):
    batch = logits.shape[0]
    return logits.new_empty((batch,), dtype=torch.int64), logits.new_empty((batch,), dtype=torch.int32)


def _filter_setup_context(ctx, inputs, output):
    logits, temperature = inputs[0], inputs[1]
    ctx.logits_dtype = logits.dtype
    ctx.save_for_backward(output[0], temperature)


def _filter_backward(ctx, grad, _grad_flags):
    """d out / d logits: 1 / temperature at kept tokens (1 in greedy rows), 0 at removed ones, as the reference's
    autograd gives (its division's backward is the same fp32 division)."""
    out, temperature = ctx.saved_tensors
    scale = torch.where(temperature > 0, temperature, 1.0)[:, None]
    grad_logits = torch.where(out > NEG_INF, grad / scale, 0.0).to(ctx.logits_dtype)
    return grad_logits, None, None, None, None


if _ext.loaded:
    torch.library.register_fake("genfast::filter_logits")(_filter_fake)
    torch.library.register_fake("genfast::sample_tokens")(_sample_fake)
    torch.library.register_autograd("genfast::filter_logits", _filter_backward, setup_context=_filter_setup_context)


@torch.library.custom_op("genfast::filter_logits_triton", mutates_args=())
def _filter_logits_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                          min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from genfast.kernels.sampling import filter_logits

    return filter_logits(logits, temperature, top_k, top_p, min_p)


@torch.library.custom_op("genfast::sample_tokens_triton", mutates_args=())
def _sample_tokens_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                          min_p: torch.Tensor, noise: torch.Tensor | None, seed: torch.Tensor | None,
                          offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from genfast.kernels.sampling import sample_tokens

    return sample_tokens(logits, temperature, top_k, top_p, min_p, noise, seed, offsets)


_filter_logits_triton.register_fake(_filter_fake)
_sample_tokens_triton.register_fake(_sample_fake)
_filter_logits_triton.register_autograd(_filter_backward, setup_context=_filter_setup_context)


def _supports(device, dtype=None, vocab: int = 0, **_):
    if dtype is not None and dtype not in _checks.FLOAT_DTYPES:
        return f"logits of dtype {dtype} (the kernels read float32, float16, bfloat16)"
    if vocab >= 2**24:
        return f"a vocabulary of {vocab} >= 2**24 tokens (the kernels' fixed-point top-p sums assume fewer)"
    return None


# On CUDA the CUDA kernel first: it runs the same search as the Triton kernel, but splits a row over a thread
# block cluster when the batch is small, and has neither Triton's Python launch path nor the launcher's small
# torch ops, which matter at decode-step sizes (one call per generated token). Not yet measured on a GPU.
_PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


# The reference returns no flags (None): the op computes them with _value_flags_ref only when it validates, so
# the sort-based baseline with validate=False pays for nothing it does not need.
def _filter_dispatch_ref(x, temperature, top_k, top_p, min_p):
    return _filter_ref(x, temperature, top_k, top_p, min_p), None


def _sample_dispatch_ref(x, temperature, top_k, top_p, min_p, noise, seed, offsets=None):
    batch, vocab = x.shape
    if noise is None and offsets is None and seed.numel() == 1:
        noise = _philox_uniform(seed, batch * vocab).view(batch, vocab)
    elif noise is None:
        noise = _philox_rows(seed, offsets, batch, vocab)
    return _gumbel_argmax_ref(x, _filter_ref(x, temperature, top_k, top_p, min_p), temperature, noise), None


def _philox_rows(seed, offsets, batch, vocab):
    """u [B, V] float32 with ``u[b, i] = uniform(seed_b, step_b * V + i)``: ``seed_b`` = seed[b] (seed[0] if it
    has one element), ``step_b`` = offsets[b] (b without offsets), in the NumPy specification (genfast/_philox.py).
    The counter wraps modulo 2**64 as in the kernels' uint64 arithmetic (reachable only with validate=False)."""
    seeds = seed.cpu().expand(batch).numpy()
    steps = (offsets.cpu() if offsets is not None else torch.arange(batch)).numpy().astype(np.uint64)
    counters = steps[:, None] * np.uint64(vocab) + np.arange(vocab, dtype=np.uint64)
    return torch.from_numpy(_philox.uniform(seeds[:, None], counters)).to(seed.device)


def _philox_uniform(seed, numel):
    from genfast.ops.random import philox_noise

    return philox_noise(seed, numel)


_filter_dispatch = _backend.dispatcher("filter_logits", _filter_dispatch_ref, _PREFERENCE)
_filter_dispatch.register("triton", _supports)(lambda *a: torch.ops.genfast.filter_logits_triton(*a))
_filter_dispatch.register("cpu", _supports)(lambda *a: torch.ops.genfast.filter_logits(*a))
_filter_dispatch.register("cuda", _supports)(lambda *a: torch.ops.genfast.filter_logits(*a))

_sample_dispatch = _backend.dispatcher("sample_tokens", _sample_dispatch_ref, _PREFERENCE)
_sample_dispatch.register("triton", _supports)(lambda *a: torch.ops.genfast.sample_tokens_triton(*a))
_sample_dispatch.register("cpu", _supports)(lambda *a: torch.ops.genfast.sample_tokens(*a))
_sample_dispatch.register("cuda", _supports)(lambda *a: torch.ops.genfast.sample_tokens(*a))


# ------------------------------------------------------------------------------------------ public API
_INVALID_ROWS = """
    With ``validate=False`` no value is checked (no host synchronisation) and the kernels stay memory-safe:
    prev_tokens ids outside [0, V) are ignored; temperature that is not > 0 (negative, NaN) means greedy;
    top_k < 0 disables top-k; top_p > 1 or NaN disables top-p and top_p <= 0 keeps the max token(s);
    min_p > 1 keeps only the max token(s), NaN disables min-p. A row with NaN or +inf logits, or all -inf,
    or noise outside [0, 1), yields some token in [0, V) (filter_logits: unspecified values in that row),
    never an out-of-range id. With ``validate=True`` the kernels flag bad values while they read the logits
    (no extra pass), and one host synchronisation afterwards raises the error. Under torch.compile the value
    checks are skipped as with ``validate=False`` (they need the host).
"""


def filter_logits(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                  prev_tokens: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
    """The processed logits: float32 [B, V], removed tokens at -inf (see the module docstring).

    ``logits`` [B, V] float32/float16/bfloat16. Each knob is a Python scalar or a per-row tensor [B] on
    ``logits``' device (top_k integer, the others floating point). ``prev_tokens`` int64 [B, L]: ids seen
    so far, for the repetition penalty. Kept tokens hold ``penalised_logit / temperature``; greedy rows
    (temperature 0) keep only the argmax, holding its penalised logit. ``validate=True`` checks values too
    (NaN/+inf logits, all -inf rows, knob ranges, prev_tokens ids). Differentiable in ``logits``.
    """
    op = "filter_logits"
    x, k, checks = _prepare(op, logits, temperature, top_k, top_p, min_p, repetition_penalty, prev_tokens, validate)
    args = (x, k["temperature"], k["top_k"], k["top_p"], k["min_p"])
    out, flags = _filter_dispatch(*args, device=x.device, dtype=x.dtype, facts={"vocab": x.shape[1]})
    if validate:
        _raise_bad_values(op, flags, checks, x, k)
    return out


def sample_tokens(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                  prev_tokens: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None, seeds: torch.Tensor | None = None,
                  offsets: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
    """One token per row: int64 [B], drawn from ``filter_logits(...)`` by Gumbel-max.

    Arguments as for :func:`filter_logits`; ``noise`` (uniform in [0, 1), [B, V]) replaces the in-kernel
    Philox noise, which otherwise uses a seed drawn from ``generator`` on the logits' device, so that
    ``sample_tokens(x, generator=g)`` equals ``sample_tokens_ref(x, noise=philox_noise(seed, B*V).view(B, V))``
    for the seed ``g`` yields. Greedy rows (temperature 0) return the argmax and ignore the noise.

    Per-row seeds, for serving: ``seeds`` int64 [B] (any int64; its 64 bits key Philox) and ``offsets`` int64
    [B] (the step within each request, zeros by default), on the logits' device or the CPU. Row b draws
    ``philox_noise(seeds[b], V, offset=offsets[b] * V)`` and nothing else decides its token: the same row gives
    the same token alone or at any place in any batch, on every backend. ``offsets[b]`` must be in
    ``[0, max_offset(V)]`` (checked with ``validate``). ``seeds`` excludes ``generator`` and ``noise``.
    """
    op = "sample_tokens"
    x, k, checks = _prepare(op, logits, temperature, top_k, top_p, min_p, repetition_penalty, prev_tokens, validate)
    noise, seed, offsets, seed_checks = _noise_source(op, logits, noise, generator, seeds, offsets, validate)
    args = (x, k["temperature"], k["top_k"], k["top_p"], k["min_p"], noise, seed, offsets)
    tokens, flags = _sample_dispatch(*args, device=x.device, dtype=x.dtype, facts={"vocab": x.shape[1]})
    if validate:
        _raise_bad_values(op, flags, checks + seed_checks + _noise_check(noise), x, k)
    return tokens


# A string expression after a docstring would stop it being one, so the shared paragraph is appended here.
filter_logits.__doc__ += _INVALID_ROWS
sample_tokens.__doc__ += _INVALID_ROWS


def filter_logits_ref(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                      repetition_penalty=1.0, prev_tokens: torch.Tensor | None = None,
                      validate: bool = True) -> torch.Tensor:
    """The specification of :func:`filter_logits`: sort-based PyTorch in fp32, same arguments."""
    op = "filter_logits_ref"
    x, k, checks = _prepare(op, logits, temperature, top_k, top_p, min_p, repetition_penalty, prev_tokens, validate)
    out, flags = _filter_dispatch_ref(x, k["temperature"], k["top_k"], k["top_p"], k["min_p"])
    if validate:
        _raise_bad_values(op, flags, checks, x, k)
    return out


def sample_tokens_ref(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                      repetition_penalty=1.0, prev_tokens: torch.Tensor | None = None,
                      generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                      seeds: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
                      validate: bool = True) -> torch.Tensor:
    """The specification of :func:`sample_tokens`: Gumbel-max over :func:`filter_logits_ref`'s output."""
    op = "sample_tokens_ref"
    x, k, checks = _prepare(op, logits, temperature, top_k, top_p, min_p, repetition_penalty, prev_tokens, validate)
    noise, seed, offsets, seed_checks = _noise_source(op, logits, noise, generator, seeds, offsets, validate)
    tokens, flags = _sample_dispatch_ref(x, k["temperature"], k["top_k"], k["top_p"], k["min_p"], noise, seed, offsets)
    if validate:
        _raise_bad_values(op, flags, checks + seed_checks + _noise_check(noise), x, k)
    return tokens


__all__ = ["filter_logits", "filter_logits_ref", "max_offset", "sample_tokens", "sample_tokens_ref"]
