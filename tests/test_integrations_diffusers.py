"""GenfastAttnProcessor against diffusers' default processor on tiny UNets (same weights), and genfast's DDIM
scheduler inside diffusers' DDIMPipeline."""

import copy

import pytest
import torch

import genfast
from tests.attention_checks import AttentionKernelCalls

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers import DDIMScheduler as DiffusersDDIM  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

from genfast.diffusion import DDIMScheduler  # noqa: E402
from genfast.integrations.diffusers import GenfastAttnProcessor, set_attn_processor  # noqa: E402

BACKENDS = ["auto", "triton"]  # genfast's CPU dispatch, and the Triton kernels (interpreted here)
TOL = {"rtol": 1e-4, "atol": 2e-5}  # fp32 on both sides: only summation order differs


def tiny_conditional_unet() -> UNet2DConditionModel:
    """Self- and cross-attention transformer blocks at 4x4 and 2x2, head dim 16, text context of width 16."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=4, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
                                attention_head_dim=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def tiny_unet() -> UNet2DModel:
    """UNet2DModel's attention blocks: group norm, residual connection, rescale_output_factor."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=4, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       norm_num_groups=8, attention_head_dim=8, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D")).eval()


def with_genfast(model):
    ours = copy.deepcopy(model)
    if hasattr(ours, "set_attn_processor"):
        ours.set_attn_processor(GenfastAttnProcessor())
    else:
        set_attn_processor(ours, GenfastAttnProcessor())
    attentions = [m for m in ours.modules() if isinstance(m, Attention)]
    assert attentions and all(isinstance(m.processor, GenfastAttnProcessor) for m in attentions)
    # The reference really is diffusers' default.
    assert all(isinstance(m.processor, AttnProcessor2_0) for m in model.modules() if isinstance(m, Attention))
    return ours


def conditional_inputs(batch=2):
    torch.manual_seed(1)
    return torch.randn(batch, 3, 4, 4), torch.tensor([10, 500])[:batch], torch.randn(batch, 5, 16)


def assert_same_outputs_and_gradients(theirs, ours, backend, *args, **kwargs):
    """diffusers' model and its genfast copy: the same sample, and the same parameter gradients of a square loss."""
    with genfast.backend(backend):
        want = theirs(*args, **kwargs).sample
        got = ours(*args, **kwargs).sample
        torch.testing.assert_close(got, want, **TOL)
        want.square().mean().backward()
        got.square().mean().backward()
    mine = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        torch.testing.assert_close(mine[name].grad, param.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_conditional_unet_outputs_and_gradients(backend, monkeypatch):
    theirs = tiny_conditional_unet()
    ours = with_genfast(theirs)
    x, t, context = conditional_inputs(batch=1 if backend == "triton" else 2)  # the interpreter is slow
    calls = AttentionKernelCalls(monkeypatch)
    assert_same_outputs_and_gradients(theirs, ours, backend, x, t, encoder_hidden_states=context)
    # 4 transformer blocks (down, mid, 2 up) x (self + cross attention), forward and backward, through the kernels.
    assert (calls.fwd, calls.bwd) == ((8, 8) if backend == "triton" else (0, 0))


def test_cross_attention_mask_is_applied():
    theirs = tiny_conditional_unet()
    ours = with_genfast(theirs)
    x, t, context = conditional_inputs()
    mask = torch.ones(2, 5)
    mask[0, 3:] = 0  # diffusers' encoder_attention_mask: 1 keep, 0 discard
    with torch.no_grad():
        want = theirs(x, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
        got = ours(x, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
        unmasked = ours(x, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(got, want, **TOL)
    assert (unmasked[0] - want[0]).abs().max() > 1e-4  # the mask changed something: the test can fail


@pytest.mark.parametrize("backend", BACKENDS)
def test_unet2d_outputs_and_gradients(backend, monkeypatch):
    theirs = tiny_unet()
    assert not hasattr(theirs, "set_attn_processor")  # the helper is what serves it
    ours = with_genfast(theirs)
    torch.manual_seed(2)
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([3, 700])
    calls = AttentionKernelCalls(monkeypatch)
    assert_same_outputs_and_gradients(theirs, ours, backend, x, t)
    # Attention in the down block, the mid block and the up block's two layers, forward and backward.
    assert (calls.fwd, calls.bwd) == ((4, 4) if backend == "triton" else (0, 0))


def pipeline_images(unet, scheduler, steps=3, batch_size=2):
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(batch_size=batch_size, generator=generator, num_inference_steps=steps, output_type="np").images


def test_genfast_scheduler_drops_into_ddim_pipeline():
    unet = tiny_unet()
    theirs = DiffusersDDIM(num_train_timesteps=1000)
    want = pipeline_images(unet, theirs)
    got = pipeline_images(unet, DDIMScheduler.from_config(theirs.config))
    assert got.shape == want.shape == (2, 4, 4, 3)
    assert abs(got - want).max() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddim_pipeline_with_genfast_processor_and_scheduler(backend):
    unet = tiny_unet()
    theirs = DiffusersDDIM(num_train_timesteps=1000)
    want = pipeline_images(unet, theirs, batch_size=1)
    with genfast.backend(backend):
        got = pipeline_images(with_genfast(unet), DDIMScheduler.from_config(theirs.config), batch_size=1)
    assert abs(got - want).max() < 1e-4
    assert got.std() > 0.01  # images, not a constant


def test_what_cannot_be_served_raises():
    attn = Attention(query_dim=16, heads=2, dim_head=8, added_kv_proj_dim=16)
    attn.set_processor(GenfastAttnProcessor())
    with pytest.raises(NotImplementedError, match="added K/V projections"):
        attn(torch.randn(1, 4, 16), encoder_hidden_states=torch.randn(1, 3, 16))
    plain = Attention(query_dim=16, heads=2, dim_head=8)
    with pytest.raises(TypeError, match="legacy `scale`"):
        GenfastAttnProcessor()(plain, torch.randn(1, 4, 16), None, None, None, 0.5)
    with pytest.raises(ValueError, match="holds no diffusers Attention"):
        set_attn_processor(torch.nn.Linear(2, 2), GenfastAttnProcessor())
    with pytest.raises(TypeError, match="processor must be callable"):
        set_attn_processor(tiny_unet(), "genfast")


def test_scale_follows_the_module():
    """scale_qk=False (scale 1): genfast follows attn.scale as diffusers' math processor AttnProcessor does."""
    from diffusers.models.attention_processor import AttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, scale_qk=False)
    x = torch.randn(2, 5, 16)
    want = AttnProcessor()(attn, x)
    got = GenfastAttnProcessor()(attn, x)
    torch.testing.assert_close(got, want, **TOL)
