"""genfast inside transformers and diffusers, timed as their users call them.

- ``hf_llama_prefill``: ``model(input_ids, attention_mask=...)`` of a transformers Llama-shaped model (random
  weights; Llama-3.2-1B's shape in bf16 on a GPU, a tiny one in fp32 on a CPU), a left-padded batch (one row
  padded by a quarter), so the padding mask is in play.
- ``hf_llama_decode``: ``model.generate(...)`` greedy, a fixed number of new tokens after a prompt (KV cache).
- ``diffusers_unet_step``: one ``UNet2DConditionModel`` call at batch 2 (a guidance pair): Stable Diffusion 1.5's
  shape in fp16 on a GPU (64x64 latents, 77 text tokens), a tiny one in fp32 on a CPU.

Providers: ``genfast-auto`` (``attn_implementation="genfast"`` / ``GenfastAttnProcessor``, genfast's default
backend choice), ``transformers-sdpa``, ``transformers-flash_attention_2`` (where flash-attn is installed and a GPU
is present), ``diffusers-default`` (``AttnProcessor2_0``: torch SDPA). FLOPs are the standard counts: 2 x the
non-embedding parameters per token plus the causal attention's 2 x 2 x T^2 x d / 2 per layer (prefill); decode
cases carry the weights' bytes read once per new token, as bench_models_gpt does.

Replaced rows (``replaced``, see harness.ReplacedCase): ``attn_implementation="genfast"`` against ``"sdpa"`` on the
tiny Llama's forward (the suite's left-padded B2 T128, and T512 unpadded, the larger size), and
``GenfastAttnProcessor`` against diffusers' default ``AttnProcessor2_0`` on the tiny UNet (the suite's 16x16 and a
32x32), the same weights on both sides.

What remains on top of "sdpa" / the default processor (torch.profiler op counts per forward, 2026-12-06): per
attention call one read-only reduction of q to a scalar and its host read (aten::sum, isnan, item: the NaN rule's
check) and about 14 us of Python; every other op is the same op, the same number of times, on both sides.

The left-padded Llama row (0.96x / 0.95x in the two committed runs at 077a555) had one more: genfast views the
[B, 1, Nq, Nk] padding mask transformers builds as [B, Hq, Nq, Nk] for its kernels, and handed so to torch's SDPA,
whose CPU kernel converts a bool mask to a float one at the size it gets, that conversion (aten::where, twice per
call) ran over Hq = 8 times the elements "sdpa"'s does. The CPU path now gives SDPA the mask with its broadcast
dims at size 1 (ops/attention.py ``_unbroadcast``). Same-process A/B, loaded machine, CPU time, 1 thread, median
ratio of 150 alternating repetitions, "sdpa" / genfast: 0.955x before, 0.984x after (wall time at 2 threads, with
the load: 0.88x / 0.97x). Per attention call genfast then runs SDPA with enable_gqa (K/V not repeated: 610 against
648 us with transformers' repeat_kv) and about 25 us more Python (the mask path's argument checks and the NaN
check), so "auto" keeps genfast's path; the rest of the forward is the same ops. The suite's replaced rows after
the fix (2 threads, wall time, loaded machine): left-padded B2 T128 1.00x (0.98-1.03x), B1 T512 0.98x.
"""

from __future__ import annotations

import importlib.util

import torch

from benchmarks.harness import BenchCase, ReplacedCase

FAMILY = "integrations"
PAD, BOS, EOS = 0, 1, 2


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _llama_config(device: torch.device):
    from transformers import LlamaConfig

    tokens = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
    if device.type == "cuda":  # Llama-3.2-1B's shape
        return "llama-1B", LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                       num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                       max_position_embeddings=4096, tie_word_embeddings=True, **tokens)
    return "llama-tiny", LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                                     **tokens)


def _attn_providers(device: torch.device) -> dict[str, str]:
    """provider name -> attn_implementation."""
    from genfast.integrations.transformers import register

    providers = {"genfast-auto": register(), "transformers-sdpa": "sdpa"}
    if device.type == "cuda" and _available("flash_attn"):
        providers["transformers-flash_attention_2"] = "flash_attention_2"
    return providers


def _llama(config, implementation: str, device, dtype):
    import copy

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation,
                                                 dtype=dtype)
    model.generation_config.eos_token_id = None  # every provider generates the same number of tokens
    model.generation_config.pad_token_id = PAD
    return model.eval()


def _left_padded(config, batch: int, length: int, device):
    ids = torch.randint(3, config.vocab_size, (batch, length), device=device)
    mask = torch.ones_like(ids)
    mask[0, : length // 4] = 0
    ids[0, : length // 4] = PAD
    return ids, mask


def _non_embedding_params(config) -> int:
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = d * config.num_key_value_heads // config.num_attention_heads
    return layers * (2 * d * d + 2 * d * kv + 3 * d * f) + d * config.vocab_size  # + the head


def _llama_cases(device, quick):
    name, config = _llama_config(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, prompt, new = (4, 1024, 64) if device.type == "cuda" else (2, 128, 16)
    if quick:
        batch, new = max(1, batch // 2), new // 2
    params = _non_embedding_params(config)
    out = []
    for provider, implementation in _attn_providers(device).items():
        def prefill_setup(implementation=implementation):
            model = _llama(config, implementation, device, dtype)
            ids, mask = _left_padded(config, batch, prompt, device)

            def run():
                with torch.no_grad():
                    return model(input_ids=ids, attention_mask=mask).logits
            return run

        def decode_setup(implementation=implementation):
            model = _llama(config, implementation, device, dtype)
            ids, mask = _left_padded(config, batch, prompt, device)

            def run():
                with torch.no_grad():
                    return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                          do_sample=False)
            return run

        attention_flops = 2.0 * config.num_hidden_layers * batch * prompt * prompt * config.hidden_size
        out.append(BenchCase(FAMILY, "hf_llama_prefill", f"{name} {str(dtype)[6:]} B{batch} T{prompt} left-padded",
                             provider, prefill_setup, flops=2.0 * params * batch * prompt + attention_flops))
        weight_bytes = params * torch.finfo(dtype).bits // 8
        out.append(BenchCase(FAMILY, "hf_llama_decode",
                             f"{name} {str(dtype)[6:]} B{batch} prompt{prompt} new{new} greedy ({batch * new} tokens)",
                             provider, decode_setup, flops=2.0 * params * batch * new, bytes=weight_bytes * new))
    return out


def _unet(device, dtype, processor):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if device.type == "cuda":  # Stable Diffusion 1.5's UNet
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    else:
        unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                    norm_num_groups=8, cross_attention_dim=64, attention_head_dim=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet = unet.to(device).eval()
    if dtype == torch.float16:
        unet = unet.half()  # ModelMixin.to(dtype=...) logs a warning meant for checkpoints; half() is the same cast
    unet.set_attn_processor(processor)
    return unet


def _unet_cases(device, quick):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from genfast.integrations.diffusers import GenfastAttnProcessor

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size, context, width = (64, 77, 768) if device.type == "cuda" else (16, 8, 64)
    label = f"{'sd15' if device.type == 'cuda' else 'tiny'} {str(dtype)[6:]} B2 {size}x{size} context{context}"
    out = []
    for provider, make in (("genfast-auto", GenfastAttnProcessor), ("diffusers-default", AttnProcessor2_0)):
        def setup(make=make):
            unet = _unet(device, dtype, make())
            x = torch.randn(2, unet.config.in_channels, size, size, device=device, dtype=dtype)
            text = torch.randn(2, context, width, device=device, dtype=dtype)
            t = torch.tensor([500, 500], device=device)

            def run():
                with torch.no_grad():
                    return unet(x, t, encoder_hidden_states=text).sample
            return run

        out.append(BenchCase(FAMILY, "diffusers_unet_step", label, provider, setup))
    return out


def _llama_swaps(device, quick):
    from genfast.integrations.transformers import register

    name, config = _llama_config(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = [(2, 128, True), (1, 512, False)] if device.type == "cpu" else [(4, 1024, True), (1, 4096, False)]
    out = []
    for batch, length, padded in sizes[:1] if quick else sizes:
        def setup(batch=batch, length=length, padded=padded):
            ours, theirs = _llama(config, register(), device, dtype), _llama(config, "sdpa", device, dtype)
            torch.manual_seed(1)
            ids, mask = _left_padded(config, batch, length, device)
            if not padded:
                mask = torch.ones_like(mask)

            def call(model):
                def run():
                    with torch.no_grad():
                        return model(input_ids=ids, attention_mask=mask).logits
                return run
            return call(ours), call(theirs)

        label = f"{name} {str(dtype)[6:]} B{batch} T{length}{' left-padded' if padded else ''} forward"
        out.append(ReplacedCase(FAMILY, 'attn_implementation="genfast"', label, 'attn_implementation="sdpa"', setup))
    return out


def _unet_swaps(device, quick):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from genfast.integrations.diffusers import GenfastAttnProcessor

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    context, width = (77, 768) if device.type == "cuda" else (8, 64)
    sizes = [16, 32] if device.type == "cpu" else [64]
    out = []
    for size in sizes[:1] if quick else sizes:
        def setup(size=size):
            ours, theirs = _unet(device, dtype, GenfastAttnProcessor()), _unet(device, dtype, AttnProcessor2_0())
            x = torch.randn(2, ours.config.in_channels, size, size, device=device, dtype=dtype)
            text = torch.randn(2, context, width, device=device, dtype=dtype)
            t = torch.tensor([500, 500], device=device)

            def call(unet):
                def run():
                    with torch.no_grad():
                        return unet(x, t, encoder_hidden_states=text).sample
                return run
            return call(ours), call(theirs)

        label = f"{'sd15' if device.type == 'cuda' else 'tiny'} UNet2DConditionModel {str(dtype)[6:]} B2 {size}x{size}"
        out.append(ReplacedCase(FAMILY, "GenfastAttnProcessor", label, "AttnProcessor2_0 (diffusers' default)",
                                setup))
    return out


def replaced(device: torch.device, quick: bool = False) -> list[ReplacedCase]:
    out = []
    if _available("transformers"):
        out += _llama_swaps(device, quick)
    if _available("diffusers"):
        out += _unet_swaps(device, quick)
    return out


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    out = []
    if _available("transformers"):
        out += _llama_cases(device, quick)
    if _available("diffusers"):
        out += _unet_cases(device, quick)
    return out
