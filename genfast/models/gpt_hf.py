"""GPT-2 in Hugging Face's files: what genfast's GPT (genfast/models/gpt.py) reads from and writes to a
transformers GPT-2 folder (config.json, model.safetensors or pytorch_model.bin).

transformers' GPT2LMHeadModel names its modules as genfast's GPT does (``transformer.h.0.attn.c_attn`` ...), but
its Conv1D modules store their weight as [in, out], the transpose of nn.Linear's; older files also hold the causal
mask as a buffer and may leave out the ``transformer.`` prefix. This module converts the config, the names, the
shapes (read from a header, before loading) and the tensors both ways. It imports nothing of the model, so that
gpt.py imports it downward; the files are untrusted, and every size a config file gives is bounded by
``CONFIG_LIMITS`` (in either format: gpt.py bounds a run folder's config with them too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from genfast import _io
from genfast.models._checkpoint import short

# Conv1D modules of transformers' GPT-2 store their weight as [in, out], the transpose of nn.Linear's.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers of older transformers checkpoints (the causal mask), not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# The largest sizes from_pretrained accepts from a config file (a hostile one must not exhaust memory): far above
# any GPT-2-like model, and each is also checked against the weights file before anything is allocated.
CONFIG_LIMITS = {"vocab_size": 2**24, "block_size": 2**20, "n_layer": 1024, "n_head": 4096, "n_embd": 2**17,
                 "n_inner": 2**19}
WHERE = "GPT.from_pretrained"


def config_size(values: dict, key: str, default: Any, where: str, label: str | None = None,
                limit: str | None = None) -> int:
    """An int size from a config file, in [1, CONFIG_LIMITS[limit or key]] (ValueError naming the file and key)."""
    value = values.get(key, default)
    high = CONFIG_LIMITS[limit or key]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ValueError(f"{where}: key {label or key!r} must be an int in [1, {high}], got {short(value)}")
    return value


def is_hf_config(raw: dict) -> bool:
    """A config.json that is not a genfast run's (which always has format_version or recipe)."""
    return "format_version" not in raw and "recipe" not in raw


def config_from_hf(hf: dict, source: Path, config_class: type):
    """``config_class`` (GPTConfig) of a transformers GPT2Config dict read from ``source``; ValueError naming the
    file for another architecture, options genfast's GPT does not implement, or sizes out of bounds."""
    where = f"{WHERE}: {source}"
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{where} describes a {short(hf.get('model_type'))} model, not GPT-2 (model_type 'gpt2'): "
                         "another architecture, or not a run folder of `genfast train gpt` (no 'format_version')")
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh")),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False) is not False,
        "add_cross_attention": hf.get("add_cross_attention", False) is not False,
        "tie_word_embeddings": hf.get("tie_word_embeddings", True) is not True,
    }
    bad = [f"{k}={short(hf.get(k))}" for k, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"{where}: options genfast's GPT does not implement: {', '.join(bad)}")
    sizes = {ours: config_size(hf, theirs, default, where, limit=ours) for ours, theirs, default in (
        ("vocab_size", "vocab_size", 50257), ("block_size", "n_positions", 1024), ("n_layer", "n_layer", 12),
        ("n_head", "n_head", 12), ("n_embd", "n_embd", 768))}
    n_inner = None if hf.get("n_inner") is None else config_size(hf, "n_inner", None, where)
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"{where}: key 'layer_norm_epsilon' must be a number in (0, 1), got {short(eps)}")
    try:
        return config_class(**sizes, n_inner=n_inner, dropout=0.0, layer_norm_epsilon=float(eps))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def weights_file(folder: Path) -> Path:
    """The weights of a Hugging Face folder: model.safetensors, else pytorch_model.bin."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{WHERE}: no model.safetensors or pytorch_model.bin in {folder}")


def read_bin(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a pytorch_model.bin, read with torch.load(weights_only=True) (no pickled code runs)."""
    # A pickle has no header to read first: torch.load holds at least the file's size, then the model as much.
    _io.check_fits_memory(2 * path.stat().st_size, f"{WHERE}: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{WHERE}: {path} could not be loaded safely: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{WHERE}: {path} does not hold a state dict of tensors")
    return state


def _our_name(key: str) -> str | None:
    """A Hugging Face tensor name in our state dict's naming (None: a buffer to skip)."""
    if key.endswith(IGNORED_SUFFIXES):
        return None
    if not key.startswith(("transformer.", "lm_head.")):
        return f"transformer.{key}"
    return key


def our_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A Hugging Face file's tensor shapes (name -> shape as stored) in our names and orientation."""
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        name = _our_name(key)
        if name is not None:
            out[name] = tuple(shape[::-1]) if name.endswith(CONV1D_SUFFIXES) and len(shape) == 2 else tuple(shape)
    return out


def our_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict in our names and orientation (Conv1D weights transposed: views, no copy)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = _our_name(key)
        if name is not None:
            out[name] = tensor.t() if name.endswith(CONV1D_SUFFIXES) and tensor.dim() == 2 else tensor
    return out


def hf_config(config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The transformers GPT2Config (as config.json holds it) of a GPTConfig whose weights are ``dtype``."""
    if not config.bias:
        raise ValueError("GPT.save_pretrained: transformers' GPT-2 has biases everywhere; a GPT with "
                         "bias=False has no Hugging Face equivalent")
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
        "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.n_inner,
        "activation_function": "gelu_new", "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout, "layer_norm_epsilon": config.layer_norm_epsilon, "initializer_range": 0.02,
        "tie_word_embeddings": True, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "torch_dtype": str(dtype).replace("torch.", ""),
        # GPT-2's <|endoftext|> where the vocabulary has it; None otherwise (transformers warns about an id
        # outside the vocabulary, its default 50256, at every load).
        "bos_token_id": 50256 if config.vocab_size > 50256 else None,
        "eos_token_id": 50256 if config.vocab_size > 50256 else None,
    }


def hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict as a Hugging Face GPT-2 file holds it: on the CPU, contiguous, Conv1D weights transposed,
    without the head (tied to transformer.wte.weight; transformers ties it again on load)."""
    tensors = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach().to("cpu")
        tensors[name] = (tensor.t() if name.endswith(CONV1D_SUFFIXES) else tensor).contiguous()
    return tensors


__all__ = ["CONFIG_LIMITS", "CONV1D_SUFFIXES", "config_from_hf", "config_size", "hf_config", "hf_state",
           "is_hf_config", "our_shapes", "our_state", "read_bin", "weights_file"]
