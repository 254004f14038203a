"""End-to-end benchmarks of genfast.models.GPT: a training step, and generation, against the reference and
against Hugging Face transformers on the same weights.

- ``gpt_train_step``: forward + backward + AdamW step on a batch of B x T tokens (bf16 autocast on a GPU, fp32 on
  a CPU). Providers: genfast backends that serve every op of the model, ``genfast-auto``, ``reference``.
- ``gpt_generate``: ``model.generate`` of ``new`` greedy tokens after a prompt, batch 1 and 32 on a GPU (prompt
  128, 256 new tokens: the targets of issue 5), smaller on a CPU. Providers as above plus ``transformers`` (its
  GPT2LMHeadModel.generate, eager, default attention, KV cache, on the same weights in the same dtype).

Tokens per second = tokens in the case label / ms. FLOPs are the standard 6 * N * tokens for training and
2 * N * tokens for generation (N = parameters but the position table, as nanoGPT counts: the tied
output head does compute), so TFLOP/s compares the providers on one
yardstick. Random weights (no download); eos is disabled so every provider generates the same number of tokens.
"""

from __future__ import annotations

import tempfile

import torch

import genfast
from benchmarks.harness import BenchCase, genfast_providers
from genfast.models import GPT, GPTConfig

FAMILY = "models_gpt"
MODEL_OPS = ("attention", "attention_decode", "kv_cache_append", "sample_tokens")


def _model_backends(device: torch.device) -> list[str]:
    """genfast backends that serve every op the model calls (a named backend must serve all of them)."""
    served = [set(genfast_providers(op, device)) for op in MODEL_OPS]
    return sorted(set.intersection(*served))


def _config(device: torch.device) -> tuple[str, GPTConfig]:
    if device.type == "cuda":
        return "gpt2", GPTConfig.preset("gpt2")
    return "tiny-v1024", GPTConfig.preset("tiny", vocab_size=1024)


def _flop_params(config: GPTConfig) -> int:
    """Parameters that cost 2 FLOPs per token forward: all but the position table (the tied head computes)."""
    with torch.device("meta"):
        return GPT(config).num_parameters(non_embedding=True)


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _train_cases(device, quick, name, config, providers):
    b, t = (8, 1024) if device.type == "cuda" else (4, 128)
    if quick:
        b = max(1, b // 2)
    label = f"{name} B{b} T{t} ({b * t} tokens)"

    def setup_for(backend_name):
        def setup():
            torch.manual_seed(0)
            model = GPT(config).to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            x = torch.randint(0, config.vocab_size, (b, t), device=device)
            y = torch.randint(0, config.vocab_size, (b, t), device=device)
            amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

            def step():
                with genfast.backend(backend_name), amp:
                    _, loss = model(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step
        return setup

    n = _flop_params(config)
    return [BenchCase(FAMILY, "gpt_train_step", label, provider, setup_for(backend), flops=6.0 * n * b * t)
            for provider, backend in providers.items()]


def _transformers_generate(model: GPT, device, dtype, new):
    try:
        import transformers
    except ImportError:
        return None
    directory = tempfile.mkdtemp(prefix="genfast-bench-gpt-")
    model.save_pretrained(directory)
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).to(device=device, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None

    def run(idx):
        with torch.no_grad():
            return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=0)
    return run


def _generate_cases(device, quick, name, config, providers):
    if device.type == "cuda":
        prompt, new, batches = 128, 256, ([1] if quick else [1, 32])
    else:
        prompt, new, batches = 32, 32 if quick else 64, ([1] if quick else [1, 8])
    dtype = _dtype(device)
    out = []
    for b in batches:
        label = f"{name} {str(dtype).replace('torch.', '')} B{b} prompt{prompt} new{new} ({b * new} tokens)"

        def setup_for(provider, backend_name, b=b):
            def setup():
                torch.manual_seed(0)
                model = GPT(config).to(device=device, dtype=dtype).eval()
                idx = torch.randint(0, config.vocab_size, (b, prompt), device=device)
                if provider == "transformers":
                    run = _transformers_generate(model, device, dtype, new)
                    return lambda: run(idx)

                def run_ours():
                    with genfast.backend(backend_name):
                        return model.generate(idx, new, temperature=0.0)
                return run_ours
            return setup

        n = _flop_params(config)
        rows = dict(providers)
        try:
            import transformers  # noqa: F401

            rows["transformers"] = None
        except ImportError:
            pass
        for provider, backend in rows.items():
            out.append(BenchCase(FAMILY, "gpt_generate", label, provider, setup_for(provider, backend),
                                 flops=2.0 * n * b * new))
    return out


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    name, config = _config(device)
    providers = {f"genfast-{b}": b for b in _model_backends(device)}
    providers["genfast-auto"] = "auto"
    providers["reference"] = "reference"
    return _train_cases(device, quick, name, config, providers) + _generate_cases(device, quick, name, config,
                                                                                  providers)


__all__ = ["cases"]
