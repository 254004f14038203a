"""genfast.ops.scaled_dot_product_attention: torch's signature and semantics over genfast's attention (issue 27).

Compared with the fp64 spec by the tolerance rule (CONTRIBUTING.md section 3) and with torch's own SDPA, whose
semantics it copies: top-left is_causal, GQA only when asked, leading dims, dropout from the default generator.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F

import genfast
from genfast.ops import attention, attention_ref, scaled_dot_product_attention
from tests.attention_checks import FLOOR, max_error
from tests.conftest import backend_params
from tests.tolerance import assert_within_tolerance

PARAMS = backend_params("attention") + [pytest.param("cpu", "reference", id="cpu-reference")]


def _qkv(shape_q, shape_k, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device)
            for s in (shape_q, shape_k, shape_k)]


def test_signature_is_torchs():
    ours = inspect.signature(scaled_dot_product_attention)
    assert list(ours.parameters) == ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                                     "enable_gqa"]
    assert [p.kind for p in ours.parameters.values()][-2:] == [inspect.Parameter.KEYWORD_ONLY] * 2
    assert [p.default for p in list(ours.parameters.values())[3:]] == [None, 0.0, False, None, False]


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shapes,kwargs", [
    (((2, 4, 17, 16), (2, 4, 17, 16)), {}),
    (((2, 4, 17, 16), (2, 4, 17, 16)), {"is_causal": True}),
    (((1, 4, 5, 16), (1, 2, 23, 16)), {"is_causal": True, "enable_gqa": True}),  # L < S: top-left
    (((1, 2, 23, 16), (1, 2, 5, 16)), {"is_causal": True}),  # L > S: top-left, every row sees key 0
    (((3, 9, 16), (3, 11, 16)), {"scale": 0.3}),  # 3-D: one head
    (((2, 3, 2, 9, 16), (2, 3, 2, 9, 16)), {"is_causal": True}),  # 5-D: leading dims folded
], ids=["plain", "causal", "gqa-causal-l<s", "causal-l>s", "3d-scale", "5d-causal"])
def test_matches_torch_semantics_within_the_rule(device, backend, dtype, shapes, kwargs):
    """Against torch's own SDPA in fp64 (its semantics, the spec here) and torch's SDPA in the low dtype."""
    q, k, v = _qkv(*shapes, dtype=dtype, device=device)
    with genfast.backend(backend):
        got = scaled_dot_product_attention(q, k, v, **kwargs)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kwargs)
    torch_low = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert got.shape == exact.shape and got.dtype == dtype
    floor = FLOOR[dtype] + torch.finfo(dtype).eps * exact.abs().max().item()
    assert_within_tolerance("out", max_error(got, exact), max_error(torch_low, exact), floor)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_masks_and_gradients_match_attention(mask_kind):
    q, k, v = (t.requires_grad_(True) for t in _qkv((2, 4, 9, 16), (2, 2, 13, 16), seed=1))
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(2, 1, 9, 13, generator=gen) > 0.3 if mask_kind == "bool" else torch.randn(9, 13, generator=gen)
    got = scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    want = attention_ref(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    for g, w in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)


def test_nan_query_row_gives_nan_where_torchs_cpu_kernel_gives_zero():
    q, k, v = _qkv((1, 2, 5, 8), (1, 2, 5, 8))
    q[0, 1, 2, 3] = float("nan")
    got = scaled_dot_product_attention(q, k, v)
    assert got[0, 1, 2].isnan().all() and got.isnan().any(dim=-1).sum() == 1


def test_dropout_draws_from_torchs_default_generator():
    q, k, v = _qkv((1, 2, 16, 8), (1, 2, 16, 8))
    torch.manual_seed(5)
    first = scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    again = scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    same_seed = attention(q, k, v, dropout_p=0.3)  # attention's default generator is torch's default one
    assert torch.equal(first, again) and torch.equal(first, same_seed)
    assert not torch.equal(first, scaled_dot_product_attention(q, k, v, dropout_p=0.3))  # the generator moved on
    assert not torch.equal(first, scaled_dot_product_attention(q, k, v))


def test_bad_input_names_the_argument():
    q, k, v = _qkv((1, 4, 5, 8), (1, 2, 5, 8))
    with pytest.raises(ValueError, match="enable_gqa=True"):
        scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError):  # torch refuses the same call
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="attn_mask must be None when is_causal"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True,
                                     enable_gqa=True)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        scaled_dot_product_attention(q, k, v, is_causal=1, enable_gqa=True)
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        scaled_dot_product_attention([1.0], k, v)
    with pytest.raises(ValueError, match="value's last dim"):
        scaled_dot_product_attention(q, k, torch.randn(1, 2, 5, 4), enable_gqa=True)
    with pytest.raises(ValueError, match="query must have at least 3"):
        scaled_dot_product_attention(torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        scaled_dot_product_attention(q, k, v, dropout_p=1.5, enable_gqa=True)


def test_compile_fullgraph():
    q, k, v = _qkv((1, 2, 7, 16), (1, 2, 9, 16), seed=3)

    def fn(q, k, v):
        return scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v))


def test_exported():
    assert genfast.ops.scaled_dot_product_attention is scaled_dot_product_attention
    assert "scaled_dot_product_attention" in genfast.ops.__all__
