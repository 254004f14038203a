"""Bad or unusual input gets a clear error or the right answer on every backend (issue "Nothing silent").

Cases owned elsewhere live with their op's tests; here: NaN through attention, the varlen CPU path's memory and
its size bounds. The property-based sweeps are in tests/test_properties_*.py.
"""

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import genfast
from genfast.ops import attention, attention_ref, attention_varlen, attention_varlen_ref
from tests.conftest import serving_backends

NAN = float("nan")
varlen_module = importlib.import_module("genfast.ops.attention_varlen")


def _qkv(shape_q, shape_k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape_q, generator=gen), torch.randn(shape_k, generator=gen),
            torch.randn(shape_k, generator=gen))


# ------------------------------------------------------------------------------------------ NaN through attention
ATTENTION_BACKENDS = ["auto", "reference"] + serving_backends("attention", "cpu")


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_nan_in_q_stays_nan_on_every_backend(backend, return_lse, causal):
    # SDPA's CPU kernel (auto and reference on CPU tensors) turned the row into zeros: a plausible number.
    q, k, v = _qkv((2, 2, 5, 8), (2, 1, 5, 8))
    q[1, 0, 3, 2] = NAN
    with genfast.backend(backend):
        got = attention(q, k, v, causal=causal, return_lse=return_lse)
    out, lse = got if return_lse else (got, None)
    exp_out, exp_lse = attention_ref(q, k, v, causal=causal, return_lse=True)
    assert out[1, 0, 3].isnan().all() and exp_out[1, 0, 3].isnan().all()
    nan_rows = out.isnan().any(dim=-1)
    assert nan_rows.sum() == 1  # only that row: nothing leaks into the other rows or heads
    torch.testing.assert_close(out, exp_out, equal_nan=True, rtol=1e-5, atol=1e-5)
    if lse is not None:
        assert lse[1, 0, 3].isnan() and exp_lse[1, 0, 3].isnan()
        torch.testing.assert_close(lse, exp_lse, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "reference"] + serving_backends("attention_varlen", "cpu"))
@pytest.mark.parametrize("return_lse", [False, True])
def test_attention_varlen_nan_in_q_stays_nan(backend, return_lse):
    q, k, v = _qkv((9, 2, 8), (11, 2, 8))
    cu_q, cu_k = torch.tensor([0, 4, 9]), torch.tensor([0, 5, 11])
    q[6, 1, 0] = NAN
    with genfast.backend(backend):
        got = attention_varlen(q, k, v, cu_q, cu_k, 5, 6, return_lse=return_lse)
    out = got[0] if return_lse else got
    exp = attention_varlen_ref(q, k, v, cu_q, cu_k, 5, 6)
    assert out[6, 1].isnan().all()
    assert out.isnan().any(dim=-1).sum() == 1
    torch.testing.assert_close(out, exp, equal_nan=True, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ varlen memory
class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("return_lse,dropout_p", [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_attention_varlen_cpu_memory_follows_the_real_lengths(return_lse, dropout_p):
    # 14 packed tokens with max_seqlen = 4096 used to build B x H x 4096 x 4096 masks and scores (516 MiB).
    q, k, v = _qkv((14, 2, 16), (14, 2, 16))
    cu = torch.tensor([0, 5, 14])
    gen = torch.Generator().manual_seed(3)
    with genfast.backend("reference"), _LargestTensor() as largest:
        out = attention_varlen(q, k, v, cu, cu, 4096, 4096, return_lse=return_lse, dropout_p=dropout_p,
                               generator=gen if dropout_p else None)
    # The padded batch is B x H x 9 x 9 scores here; allow the packed inputs and the gather indices.
    assert largest.largest <= 2 * 2 * 9 * 16, largest.largest
    exp = attention_varlen_ref(q, k, v, cu, cu, 4096, 4096, dropout_p=dropout_p,
                               seed=None if not dropout_p else _seed_of(torch.Generator().manual_seed(3)))
    torch.testing.assert_close(out[0] if return_lse else out, exp, rtol=1e-5, atol=1e-5)


def _seed_of(gen):
    from genfast.ops import _checks

    return _checks.draw_seed(gen, torch.device("cpu"))


def test_attention_varlen_padded_lengths_are_the_longest_sequences():
    cu_q, cu_k = torch.tensor([0, 3, 3, 10]), torch.tensor([0, 1, 6, 8])
    packing = varlen_module.Packing(cu_q, cu_k, 4096, 4096)
    assert varlen_module.padded_lengths(packing, 10, 8) == (7, 5)


@pytest.mark.parametrize("name,value,match", [("max_seqlen_q", 10**12, "<= 2\\*\\*31 - 1"),
                                              ("max_seqlen_k", 2**31, "<= 2\\*\\*31 - 1"),
                                              ("max_seqlen_q", -1, ">= 0")])
def test_attention_varlen_max_seqlen_out_of_range_names_the_argument(name, value, match):
    # max_seqlen = 10**12 used to reach the allocator ("you tried to allocate 8000000000000 bytes").
    q, k, v = _qkv((14, 2, 8), (14, 2, 8))
    cu = torch.tensor([0, 14])
    sizes = {"max_seqlen_q": 14, "max_seqlen_k": 14, name: value}
    with pytest.raises(ValueError, match=f"attention_varlen: {name} must be {match}"):
        attention_varlen(q, k, v, cu, cu, sizes["max_seqlen_q"], sizes["max_seqlen_k"])


def test_attention_varlen_loose_max_seqlen_is_served_without_the_memory():
    q, k, v = _qkv((14, 2, 8), (14, 2, 8))
    cu = torch.tensor([0, 6, 14])
    with _LargestTensor() as largest:
        out = attention_varlen(q, k, v, cu, cu, 2**31 - 1, 2**31 - 1, causal=True)
    assert largest.largest < 10_000
    torch.testing.assert_close(out, attention_varlen_ref(q, k, v, cu, cu, 8, 8, causal=True), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("triton" not in serving_backends("attention_varlen", "cpu"), reason="needs the Triton backend")
def test_attention_varlen_triton_loose_max_seqlen_agrees_and_keeps_the_dropout_counter():
    q, k, v = _qkv((7, 2, 8), (9, 2, 8))
    cu_q, cu_k = torch.tensor([0, 3, 7]), torch.tensor([0, 4, 9])
    with genfast.backend("triton"):
        out = attention_varlen(q, k, v, cu_q, cu_k, 2**31 - 1, 2**31 - 1)
        dropped = attention_varlen(q, k, v, cu_q, cu_k, 2**31 - 1, 6, dropout_p=0.3,
                                   generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, attention_varlen_ref(q, k, v, cu_q, cu_k, 4, 5), rtol=1e-5, atol=1e-5)
    seed = _seed_of(torch.Generator().manual_seed(1))
    exp = attention_varlen_ref(q, k, v, cu_q, cu_k, 4, 6, dropout_p=0.3, seed=seed)
    torch.testing.assert_close(dropped, exp, rtol=1e-5, atol=1e-5)
