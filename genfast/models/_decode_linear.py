"""DecodeLinear: an nn.Linear that, inside a CPU decode step, multiplies by a copy of its weight laid out for the
few rows a decode step has.

Why: a decode step multiplies M rows (M = the batch size) by every weight of the model, so on a CPU its time is
reading the weights, and torch's fp32 CPU matmul reads nn.Linear's [out, in] layout slowly there. Measured on a
2-core AMD EPYC (AVX-512, MKL and oneDNN of torch 2.13), one thread, CPU time, GPT-2 124M's 12 layers' weights in
turn (streamed from memory as in a real step; benchmarks/bench_models_gpt.py has the table):

- M = 1: MKL's GEMV over the transposed [in, out] copy (x @ W_t, what transformers' Conv1D stores) read
  768->2304 at 1.3x, 768->768 at 1.2x, 768->3072 at 1.6x and the tied head 768->50257 at 1.8x F.linear's speed;
  at 3072->768 it was slower (0.9x), and oneDNN's inner product over a weight reordered for M
  (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, what torch.compile's freezing uses on a
  CPU) 1.1-1.4x faster. So at M = 1: the [in, out] copy where out >= in, oneDNN's layout where in > out.
- M >= 2: MKL re-packs the weight at every call; oneDNN's prepacked layout ran 1.2-1.8x (M = 2, 4, 8) faster than
  F.linear on the block weights and 2-3x on the head; the [in, out] copy 0.85-1.1x beyond M = 2.

The results are the same fp32 products summed in another order (the logits differ from F.linear's in the last
bits; the [in, out] copy's are bitwise transformers' Conv1D's).

Where: only inside ``with decode_linears():`` (GPT's decode step enters it) entered in no-grad mode, under the
``auto`` or ``cpu`` backend (``reference`` keeps F.linear), where torch has oneDNN and it is enabled, not while
torch.compile traces; and there on fp32 CPU tensors. Everywhere else, and always outside the block, forward is
nn.Linear's, so training, export and the checkpoint format (names and shapes of ``state_dict()``) are unchanged.

Memory: one copy of each weight, kept after the call so that later decode steps and generate calls reuse it:
about the size of the model's linear weights (GPT-2 124M in fp32: 85M block weights and the 38.6M tied head,
0.49 GB), built at the first decode step (0.1-0.3 s for GPT-2 124M). A copy is rebuilt when its weight's
``data_ptr`` or ``_version`` changes (an optimizer step, ``load_state_dict``, ``model.to(...)``, any in-place
write outside ``.data``) or the batch size does, and freed with its module or by ``release_packed(model)``
(``GPT.release_decode_copies()``). Writes through ``weight.data`` bump no version: release the copies after them.

Under CPU contention (more runnable threads than cores), oneDNN's parallel regions wait for descheduled threads
as every OpenMP region does (torch.set_num_threads(1) avoids it); on a quiet machine they do not.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from genfast._backend import get_backend

_COPY = "_decode_copy"  # the instance attribute holding ((weight data_ptr, _version, shape, rows or 0), the copy)


class _ThreadState(threading.local):
    """Whether this thread is inside a ``decode_linears`` block that qualified when it was entered (per thread,
    like genfast.backend blocks). Decided once per block, so that each linear call only checks its tensors."""

    def __init__(self) -> None:
        self.on = False


_state = _ThreadState()


@contextlib.contextmanager
def decode_linears() -> Iterator[None]:
    """Run the block's DecodeLinear calls on their decode copies where they qualify (see the module docstring)."""
    outer = _state.on
    _state.on = (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                 and get_backend() in ("auto", "cpu")
                 and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)
    try:
        yield
    finally:
        _state.on = outer


def release_packed(module: nn.Module) -> int:
    """Free the decode copies of ``module``'s DecodeLinears (e.g. after writing weights through ``.data``);
    returns how many were freed. The next decode step makes them again."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"release_packed: module must be an nn.Module, got {type(module).__name__}")
    freed = 0
    for m in module.modules():
        if m.__dict__.pop(_COPY, None) is not None:
            freed += 1
    return freed


class DecodeLinear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose forward, inside ``decode_linears()``, multiplies by a
    cached copy of the weight laid out for the call's rows where that serves it (CPU, fp32; see the module
    docstring); F.linear otherwise. The copy is an instance attribute that deepcopy and pickling leave out
    (oneDNN's packed tensor cannot be copied); a copy of the module makes its own."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DecodeLinear":
        """A DecodeLinear holding ``linear``'s own parameters (the same tensors: nothing copied, no RNG drawn)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"DecodeLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        out.weight = linear.weight
        out.bias = linear.bias
        out.train(linear.training)
        return out

    def __getstate__(self):
        state = super().__getstate__()
        if _COPY in state:
            state = {k: v for k, v in state.items() if k != _COPY}
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if not (_state.on and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() >= 2
                and x.device.type == "cpu" and weight.device.type == "cpu" and x.numel() > 0
                and (bias is None or bias.dtype == torch.float32)):
            return F.linear(x, weight, bias)
        rows = x.numel() // x.shape[-1]
        # The copy's layout, from the measurements in the module docstring: MKL's GEMV over [in, out] where one row
        # meets a weight at least as wide as it is deep, oneDNN's layout for M = rows elsewhere.
        transposed = rows == 1 and weight.shape[0] >= weight.shape[1]
        key = (weight.data_ptr(), weight._version, weight.shape, 0 if transposed else rows)
        entry = self.__dict__.get(_COPY)
        if entry is None or entry[0] != key:
            self.__dict__.pop(_COPY, None)  # the stale copy goes first: never two copies of one weight at once
            w = weight.detach()
            copy = w.t().contiguous() if transposed else torch.ops.mkldnn._reorder_linear_weight(
                w.contiguous(), rows)  # the batch size is the reorder's hint: oneDNN's blocking for that M
            entry = self.__dict__[_COPY] = (key, copy)
        if not transposed:
            return torch.ops.mkldnn._linear_pointwise(x, entry[1], bias, "none", [], "")
        x2 = x.reshape(1, x.shape[-1])
        y = torch.mm(x2, entry[1]) if bias is None else torch.addmm(bias, x2, entry[1])
        return y.view(*x.shape[:-1], y.shape[-1])


__all__ = ["DecodeLinear", "decode_linears", "release_packed"]
