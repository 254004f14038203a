"""The tolerance rule of CONTRIBUTING.md section 3, written once for every test:

    err(fused) <= 2 * err(torch computing the same formula in the low precision) + a floor

where err is measured against a reference computed in fp32 or fp64. Two forms: on maximum errors
(``assert_within_tolerance``, with ``max_error``), and elementwise with a relative term (``assert_close_to_ref``).
"""

import torch


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over want's finite entries; got must have the same -inf pattern and no NaN."""
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(want)), "-inf pattern differs"
    assert not torch.isnan(got).any()
    finite = torch.isfinite(want)
    return (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0


def assert_within_tolerance(what: str, err: float, torch_err: float, floor: float) -> None:
    """The rule on maximum errors: ``err <= 2 * torch_err + floor``."""
    assert err <= 2 * torch_err + floor, f"{what}: error {err:.3g} > 2 * torch's {torch_err:.3g} + {floor:.3g}"


def assert_close_to_ref(got: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, atol: float, rtol: float = 0.0,
                        what: str = "out") -> None:
    """The rule elementwise: |got - ref| <= 2 * max|low - ref| + atol + rtol * |ref|; ``low`` is torch in the low
    precision, ``ref`` the high-precision reference."""
    got, ref, low = got.detach().double().cpu(), ref.detach().double().cpu(), low.detach().double().cpu()
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    budget = 2 * (low - ref).abs().max() + atol + rtol * ref.abs()
    err = (got - ref).abs()
    assert bool(torch.all(err <= budget)), f"{what}: max error {err.max():.3g}, worst excess {(err - budget).max():.3g}"
