"""The replaced rows of the random, diffusion, GAN, CycleGAN/VAE and GPT benchmarks compare like with like.

Each quick row runs once on each side: cfg_combine, the fused generators and GPT-2's greedy generation compute what
the call they replace computes (fp32: summation order aside); philox_noise and torch.randn draw from different
streams, so that row is held to the same shape and dtype and to standard-normal moments.
"""

import pytest
import torch

from benchmarks import bench_diffusion, bench_models_cyclevae, bench_models_gans, bench_models_gpt, bench_random

DEVICE = torch.device("cpu")


def _rows():
    rows = []
    for module in (bench_diffusion, bench_models_gans, bench_models_cyclevae, bench_models_gpt):
        rows += module.replaced(DEVICE, quick=True)
    return rows


@pytest.mark.parametrize("row", _rows(), ids=lambda r: r.name)
def test_both_sides_compute_the_same(row):
    ours, theirs = row.setup()
    got, want = ours(), theirs()
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.dtype == torch.int64:  # generated token ids (greedy): identical
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_every_family_has_its_rows():
    names = {r.drop_in for r in _rows() + bench_random.replaced(DEVICE, quick=True)}
    assert {"genfast.ops.cfg_combine", "genfast.fuse(dcgan generator)", "genfast.fuse(cyclegan generator)",
            "genfast.fuse(vae decode)", "GPT.generate", "genfast.ops.philox_noise(normal=True)"} <= names


@pytest.mark.parametrize("row", bench_random.replaced(DEVICE, quick=True), ids=lambda r: r.name)
def test_noise_rows_draw_standard_normals_of_one_shape(row):
    ours, theirs = row.setup()
    got, want = ours(), theirs()
    assert got.shape == want.shape and got.dtype == want.dtype
    n = got.numel()
    assert abs(got.double().mean().item()) < 5 / n ** 0.5 and abs(got.double().var().item() - 1) < 5 * (2 / n) ** 0.5
