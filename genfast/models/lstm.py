"""LSTMLM: a recurrent language model (embedding -> stacked LSTM -> linear head) that writes text one token at a time.

    model = LSTMLM(LSTMConfig.preset("small", vocab_size=tokenizer.vocab_size))
    logits, loss = model(idx, targets)                        # idx, targets int64 [B, T]
    out = model.generate(prompt, 200, temperature=0.8, top_k=20)

The recurrent layers are one ``torch.nn.LSTM`` (parameters ``lstm.weight_ih_l0`` ...), so the weights are
nn.LSTM's, in its gate order (i, f, g, o). Two ways run them:
- a whole sequence (training, evaluation, a prompt): nn.LSTM itself by default. The benchmark
  (benchmarks/bench_lstm.py, "train step" rows) measured it faster than a Python loop over the fused cell on the CPU
  (nn.LSTM runs one oneDNN RNN primitive per layer there), so ``forward(..., fused=True)`` only serves tests and the
  benchmark: one GEMM for every step's input gates, then per step one GEMM and one ``genfast.ops.lstm_cell``;
- one token at a time (``generate``): ``genfast.ops.lstm_cell``, which fuses the gates' activations and the cell
  update into one pass, after a GEMM per gate source; the first layer's input gates of every token are
  precomputed once per call (``embedding @ W_ih.T + b_ih`` is a [V, 4H] table, so a step reads one row of it), and
  the token is drawn by ``genfast.ops.sample_tokens``. The state (h, c) is carried from step to step: the prompt is
  read once, never again.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from genfast import ops
from genfast.models._config import ModelConfig, check_ints, check_number
from genfast.ops import _checks

# How a whole sequence runs by default: nn.LSTM (see the module docstring and benchmarks/bench_lstm.py).
TRAIN_WITH_LSTM_CELL = False

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each [n_layer, B, n_hidden]; c float32 beside half weights


@dataclass
class LSTMConfig(ModelConfig):
    vocab_size: int = 128
    n_embd: int = 64
    n_hidden: int = 128
    n_layer: int = 2
    dropout: float = 0.1

    PRESETS = {
        "tiny": dict(n_embd=16, n_hidden=32),  # tests
        "small": dict(n_embd=64, n_hidden=128),  # the default run: minutes on two CPU cores
        "medium": dict(n_embd=128, n_hidden=512),
    }

    def __post_init__(self):
        check_ints(self, ("vocab_size", "n_embd", "n_hidden", "n_layer"))
        check_number(self, "dropout", minimum=0.0, below=1.0)


class LSTMLM(nn.Module):
    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        # nn.LSTM's dropout acts between layers; self.drop on the embeddings and on the last layer's output.
        self.lstm = nn.LSTM(config.n_embd, config.n_hidden, num_layers=config.n_layer, batch_first=True,
                            dropout=config.dropout if config.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.n_hidden, config.vocab_size)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", *, allow_nonfinite: bool = False) -> "LSTMLM":
        """The model of a `genfast train lstm` run folder (or its checkpoint/ folder), in eval mode."""
        from genfast.models._checkpoint import build_and_load, read_run

        directory, saved = read_run(path, "lstm")
        config = LSTMConfig.from_dict(saved["model"])
        return build_and_load(lambda: cls(config), directory, "model",
                              allow_nonfinite=allow_nonfinite).to(device).eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _layer_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        lstm = self.lstm
        return (getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}"),
                getattr(lstm, f"bias_ih_l{layer}"), getattr(lstm, f"bias_hh_l{layer}"))

    def zero_state(self, batch_size: int) -> State:
        cfg, weight = self.config, self.head.weight
        h = torch.zeros(cfg.n_layer, batch_size, cfg.n_hidden, dtype=weight.dtype, device=weight.device)
        return h, torch.zeros(h.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)

    # ------------------------------------------------------------------------------------------ sequences
    def encode(self, idx: torch.Tensor, state: State | None = None, *, fused: bool | None = None):
        """The last layer's outputs [B, T, n_hidden] for tokens ``idx`` [B, T], and the state after them."""
        x = self.drop(self.embed(idx))  # (B, T, E)
        fused = TRAIN_WITH_LSTM_CELL if fused is None else fused
        if fused:
            return self._fused_sequence(x, state)
        if state is not None:
            state = (state[0], state[1].to(state[0].dtype))  # nn.LSTM keeps c in the weights' dtype
        out, (h, c) = self.lstm(x, state)
        return out, (h, c.to(torch.promote_types(c.dtype, torch.float32)))

    def _fused_sequence(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        b, t, _ = x.shape
        h0, c0 = state if state is not None else self.zero_state(b)
        hs, cs = [], []
        layer_input = x
        for layer in range(self.config.n_layer):
            w_ih, w_hh, b_ih, b_hh = self._layer_weights(layer)
            x_gates = F.linear(layer_input, w_ih, b_ih)  # (B, T, 4H): every step's input gates in one GEMM
            h, c = h0[layer], c0[layer]
            outputs = []
            for step in range(t):
                h, c = ops.lstm_cell(x_gates[:, step], F.linear(h, w_hh, b_hh), c)
                outputs.append(h)
            layer_input = torch.stack(outputs, dim=1)  # (B, T, H)
            if layer + 1 < self.config.n_layer:  # nn.LSTM's dropout between layers
                layer_input = F.dropout(layer_input, self.lstm.dropout, self.training)
            hs.append(h)
            cs.append(c)
        return layer_input, (torch.stack(hs), torch.stack(cs))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, fused: bool | None = None):
        """(logits [B, T, V], mean cross-entropy over ``targets`` [B, T] or None); the sequences start from zero
        state. ``fused``: run the recurrence with genfast.ops.lstm_cell (default: ``TRAIN_WITH_LSTM_CELL``)."""
        _check_ids("LSTMLM.forward", "idx", idx, self.config.vocab_size, self.head.weight.device)
        out, _ = self.encode(idx, fused=fused)
        logits = self.head(self.drop(out))
        loss = None
        if targets is not None:
            # fp32 loss: half logits are too coarse for a log-softmax over the vocabulary.
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature=1.0, top_k=0, top_p=1.0,
                 min_p=0.0, repetition_penalty=1.0, generator: torch.Generator | None = None, stream: bool = False):
        """Continue the prompts ``input_ids`` [B, T] (int64, T >= 1) by ``max_new_tokens`` tokens.

        Returns [B, T + max_new_tokens]; with ``stream=True`` an iterator yielding each step's tokens [B] as they
        are drawn. Sampling knobs are genfast.ops.sample_tokens' (temperature 0: greedy); the repetition penalty
        sees the prompt and the tokens generated so far. The prompt runs once through nn.LSTM, then each token costs
        one fused step per layer (module docstring) and one sample_tokens; the only host synchronisation is the
        check of the first step's logits. Generation never applies dropout.
        """
        op = "LSTMLM.generate"
        if not isinstance(stream, bool):
            raise TypeError(f"{op}: stream must be a bool, got {type(stream).__name__}")
        device = self.head.weight.device
        _check_ids(op, "input_ids", input_ids, self.config.vocab_size, device)
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"{op}: input_ids must be [B, T] with B, T >= 1, got {tuple(input_ids.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise ValueError(f"{op}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        b, t = input_ids.shape
        # The output and the repetition penalty's buffer of seen ids: [B, T + n] int64 each.
        _checks.fits_in_memory(op, "max_new_tokens", max_new_tokens, 16 * b * (t + max_new_tokens), device)
        _checks.generator(op, generator, device)
        knobs = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        # Checked once here, so that every step can skip the checks (filter_logits applies the same rules).
        ops.filter_logits(torch.zeros(b, 1, device=device), **knobs, repetition_penalty=repetition_penalty)
        steps = self._generate_steps(input_ids, max_new_tokens, knobs, repetition_penalty, generator)
        if stream:
            return steps
        new = list(steps)
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids.clone()

    @torch.no_grad()
    def _generate_steps(self, input_ids, max_new_tokens, knobs, repetition_penalty,
                        generator) -> Iterator[torch.Tensor]:
        if max_new_tokens == 0:
            return
        b, t = input_ids.shape
        device = input_ids.device
        # The prompt but its last token through nn.LSTM (once); the loop starts by stepping the last token.
        if t > 1:
            was_training = self.training
            self.eval()
            _, (h, c) = self.encode(input_ids[:, :-1], fused=False)
            self.train(was_training)
        else:
            h, c = self.zero_state(b)
        hs, cs = list(h.unbind(0)), list(c.unbind(0))
        layers = [self._layer_weights(layer) for layer in range(self.config.n_layer)]
        w_ih0, _, b_ih0, _ = layers[0]
        table = torch.addmm(b_ih0, self.embed.weight, w_ih0.t())  # (V, 4H): layer 0's input gates of each token
        # Scalar knobs become per-row tensors once, rather than at every step.
        knobs = {name: torch.full((b,), value, device=device, dtype=torch.int64 if name == "top_k" else torch.float32)
                 for name, value in knobs.items()}
        knobs["repetition_penalty"] = repetition_penalty
        seen = None
        if not (isinstance(repetition_penalty, numbers.Real) and repetition_penalty == 1.0):
            # One buffer of fixed shape: the prompt, then each new token in its column; columns not yet written
            # repeat the prompt's last token (a token seen twice is penalised once, so the filler changes nothing).
            seen = torch.cat([input_ids, input_ids[:, -1:].expand(b, max_new_tokens)], dim=1).contiguous()
        token = input_ids[:, -1]
        for i in range(max_new_tokens):
            x_gates = table.index_select(0, token)  # (B, 4H)
            for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
                if layer:
                    x_gates = torch.addmm(b_ih, hs[layer - 1], w_ih.t())
                hs[layer], cs[layer] = ops.lstm_cell(x_gates, torch.addmm(b_hh, hs[layer], w_hh.t()), cs[layer])
            logits = torch.addmm(self.head.bias, hs[-1], self.head.weight.t())  # (B, V)
            # The first step checks its real logits (one sync); later steps trust them (no sync per token).
            token = ops.sample_tokens(logits, **knobs, prev_tokens=seen, generator=generator, validate=i == 0)
            yield token
            if seen is not None:
                seen[:, t + i] = token


def _check_ids(op: str, name: str, ids, vocab_size: int, device: torch.device) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise ValueError(f"{op}: {name} must be int64 [B, T], got {ids.dtype} {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{op}: {name} is on {ids.device} but the model is on {device}")
    if ids.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(ids)
        if int(lo) < 0 or int(hi) >= vocab_size:
            raise ValueError(f"{op}: {name} must hold token ids in [0, {vocab_size}), got values in "
                             f"[{int(lo)}, {int(hi)}]")


__all__ = ["LSTMLM", "LSTMConfig", "TRAIN_WITH_LSTM_CELL"]
