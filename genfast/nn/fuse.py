"""genfast.fuse(model): swap the blocks genfast has fused kernels for into a model.

A *rewrite* looks at one module's direct children and replaces the ones it recognises, recording what it
replaced and what it left alone (and why) in the report. Rewrites live in a small registry so each op family
adds its own (``@register_rewrite("attention")`` for nn.MultiheadAttention, say) without touching the walk.

``fuse(model)`` modifies ``model`` in place and returns it; ``fuse(model, inplace=False)`` fuses a deep copy and
leaves ``model`` untouched. In place, replaced modules keep the original parameter and buffer *objects*: weights
are shared, not copied, so outputs are unchanged and an optimizer built before fuse() still updates them.

The state_dict keys stay the original model's. Fusing a run of an nn.Sequential (ConvTranspose2d, BatchNorm2d,
ReLU) moves the norm and activation into one block at the convolution's index and leaves nn.Identity at theirs
(a :class:`FusedSlot`, whose repr names what it held; every genfast module's repr names genfast);
hooks on that parent (:class:`KeepStateDictKeys`) write the block's entries under their original names
("0.weight", "1.running_mean", ...) and read either those names or the block's own ("0.0.weight", "0.1...."), so
checkpoints load into and out of a fused model both ways. ``named_parameters()`` shows the block's layout.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

from torch import nn

from genfast.nn.attention import MultiheadAttention
from genfast.nn.conv_transpose import ConvTranspose2d, ConvTranspose2dNormAct, activation_name


@dataclasses.dataclass
class FuseReport:
    """What fuse() did: ``replaced`` as (module path, what it became), ``left_alone`` as (module path, why)."""

    replaced: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    left_alone: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"genfast.fuse: {len(self.replaced)} replaced, {len(self.left_alone)} left alone"]
        lines += [f"  replaced   {path or '<root>'}: {what}" for path, what in self.replaced]
        lines += [f"  left alone {path or '<root>'}: {why}" for path, why in self.left_alone]
        return "\n".join(lines)


# A rewrite gets (parent module, its path in the model, the report) and replaces children of the parent.
Rewrite = Callable[[nn.Module, str, FuseReport], None]
REWRITES: dict[str, Rewrite] = {}


def register_rewrite(name: str) -> Callable[[Rewrite], Rewrite]:
    def decorate(fn: Rewrite) -> Rewrite:
        REWRITES[name] = fn
        return fn

    return decorate


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def fuse(model: nn.Module, *, rewrites: list[str] | None = None, inplace: bool = True) -> tuple[nn.Module, FuseReport]:
    """Replace every block of ``model`` that a registered rewrite recognises; returns (fused model, report).

    ``inplace=True`` (default) modifies ``model`` itself and returns it (weights shared with the caller's modules);
    ``inplace=False`` fuses a ``copy.deepcopy`` of it (weights copied) and leaves ``model`` as it was.
    ``rewrites``: names from REWRITES to apply (default: all). The root module itself is never replaced (it has no
    parent to hold the replacement); wrap it in an nn.Sequential to fuse it. state_dict keys are kept (see the
    module docstring).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"fuse: inplace must be a bool, got {type(inplace).__name__}")
    chosen = list(REWRITES) if rewrites is None else rewrites
    unknown = [r for r in chosen if r not in REWRITES]
    if unknown:
        raise ValueError(f"fuse: unknown rewrites {unknown}; registered: {', '.join(REWRITES)}")
    if not inplace:
        model = copy.deepcopy(model)
    report = FuseReport()
    # Snapshot first: the modules a rewrite inserts are not walked again (fuse() is idempotent).
    for prefix, module in list(model.named_modules()):
        for name in chosen:
            REWRITES[name](module, prefix, report)
    if type(model) in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.MultiheadAttention):
        report.left_alone.append(("", "the root module itself is not replaced; wrap it in nn.Sequential"))
    return model, report


class FusedSlot(nn.Identity):
    """What fuse() leaves at the index of a module it moved into a fused block: an nn.Identity (the block already
    applies it) whose repr says what was there and which block now runs it, e.g.
    ``genfast.FusedSlot(BatchNorm2d fused into '0')``."""

    def __init__(self, replaced: str, into: str):
        super().__init__()
        self.replaced, self.into = replaced, into

    def _get_name(self) -> str:
        return "genfast.FusedSlot"

    def extra_repr(self) -> str:
        return f"{self.replaced} fused into {self.into!r}"


# ------------------------------------------------------------------------------------------- state_dict keys
class KeepStateDictKeys:
    """State_dict hooks on a parent module whose children fuse() moved: its entries keep their original names.

    ``moves`` maps a child's new relative path to its original one, e.g. {"0.0": "0", "0.1": "1"} after
    (ConvTranspose2d, BatchNorm2d, ReLU) at "0", "1", "2" became one block at "0". Saving renames the block's
    entries back ("0.1.running_mean" -> "1.running_mean"); loading accepts the original names and renames them to
    the block's (the block's own names load as they are). A class rather than a closure, so that deepcopy and
    pickle of the model keep working.
    """

    def __init__(self, moves: dict[str, str]):
        self.moves = dict(moves)

    @staticmethod
    def _rename(key: str, prefix: str, table: dict[str, str]) -> str:
        rest = key[len(prefix):]
        for old, new in table.items():
            if rest.startswith(old + "."):
                return prefix + new + rest[len(old):]
        return key

    def __call__(self, module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
        """state_dict post-hook (a callable object: torch marks public post-hooks with an attribute, which a bound
        method cannot take): the block's entries under their original names, order kept."""
        items = list(state_dict.items())
        state_dict.clear()
        for key, value in items:
            state_dict[self._rename(key, prefix, self.moves) if key.startswith(prefix) else key] = value
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:  # per-module versions (BatchNorm's) follow their modules' names
            for new, old in self.moves.items():
                if prefix + new in metadata:
                    metadata[prefix + old] = metadata.pop(prefix + new)

    def loading(self, module: nn.Module, state_dict, prefix: str, local_metadata, strict, missing_keys,
                unexpected_keys, error_msgs) -> None:
        """load_state_dict pre-hook: original names renamed to the block's; the block's own names pass."""
        back = {old: new for new, old in self.moves.items()}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if any(key.startswith(prefix + new + ".") for new in self.moves):
                continue  # already the block's name ("0.1.weight" must not read as the conv "0"'s "1.weight")
            renamed = self._rename(key, prefix, back)
            if renamed != key:
                if renamed in state_dict:
                    error_msgs.append(f"genfast.fuse: the checkpoint holds both {key!r} and {renamed!r}, which name "
                                      "the same tensor of the fused model")
                    continue
                state_dict[renamed] = state_dict.pop(key)


def keep_state_dict_keys(parent: nn.Module, moves: dict[str, str]) -> None:
    """Register (or extend) :class:`KeepStateDictKeys` on ``parent`` for children moved as ``moves`` says."""
    for hook in parent._state_dict_hooks.values():
        if isinstance(hook, KeepStateDictKeys):
            hook.moves.update(moves)
            return
    keeper = KeepStateDictKeys(moves)
    parent.register_state_dict_post_hook(keeper)
    parent.register_load_state_dict_pre_hook(keeper.loading)


# ------------------------------------------------------------------------------------------- conv_transpose
def _norm_fits(module: nn.Module, conv: nn.ConvTranspose2d) -> bool:
    return type(module) in (nn.BatchNorm2d, nn.InstanceNorm2d) and module.num_features == conv.out_channels


@register_rewrite("conv_transpose")
def _rewrite_conv_transpose(parent: nn.Module, prefix: str, report: FuseReport) -> None:
    """nn.ConvTranspose2d (+ a following BatchNorm2d/InstanceNorm2d + a supported activation, inside an
    nn.Sequential) -> genfast ConvTranspose2dNormAct; a lone nn.ConvTranspose2d -> genfast ConvTranspose2d."""
    if isinstance(parent, ConvTranspose2dNormAct):
        return
    names = list(parent._modules)
    sequential = isinstance(parent, nn.Sequential)
    i = 0
    while i < len(names):
        name, child = names[i], parent._modules[names[i]]
        path = _path(prefix, name)
        if type(child) in (nn.ConvTranspose1d, nn.ConvTranspose3d):
            report.left_alone.append((path, f"{type(child).__name__}: genfast fuses 2-D transposed convolutions "
                                            "only (conv_transpose1d exists as an op)"))
        if type(child) is not nn.ConvTranspose2d:  # subclasses may override forward: leave them alone silently
            i += 1
            continue
        if child.padding_mode != "zeros":
            report.left_alone.append((path, f"padding_mode={child.padding_mode!r} (torch supports only zeros)"))
            i += 1
            continue
        norm = act = None
        taken = [name]
        if sequential:
            after = [parent._modules[n] for n in names[i + 1:i + 3]]
            if after and _norm_fits(after[0], child):
                norm = after[0]
                taken.append(names[i + 1])
                after = after[1:]
            elif after and isinstance(after[0], nn.modules.batchnorm._NormBase):
                report.left_alone.append((_path(prefix, names[i + 1]), f"{type(after[0]).__name__} after {path} "
                                          "is not a 2-D norm over its output channels; not fused"))
                after = []
            if after and activation_name(after[0]) is not None:
                act = after[0]
                taken.append(names[i + len(taken)])
            elif after and type(after[0]).__module__.startswith("torch.nn.modules.activation"):
                report.left_alone.append((_path(prefix, names[i + len(taken)]),
                                          f"{after[0]!r}: not an activation genfast fuses "
                                          "(relu, leaky_relu, tanh, sigmoid, silu, exact gelu)"))
        if norm is None and act is None:
            parent._modules[name] = ConvTranspose2d.from_module(child)
            report.replaced.append((path, "genfast.nn.ConvTranspose2d"))
        else:
            parent._modules[name] = ConvTranspose2dNormAct.from_modules(child, norm, act)
            for extra in taken[1:]:
                parent._modules[extra] = FusedSlot(type(parent._modules[extra]).__name__, name)
            # The block's children are 0, 1, ... in the order taken: keep their entries under the old names.
            keep_state_dict_keys(parent, {f"{name}.{k}": original for k, original in enumerate(taken)})
            parts = ", ".join(type(m).__name__ for m in (child, norm, act) if m is not None)
            report.replaced.append((_path(prefix, "+".join(taken)), f"genfast.nn.ConvTranspose2dNormAct({parts})"))
        i += len(taken)


# ------------------------------------------------------------------------------------------- attention
# Layers whose inference fast path (eval, no grad, batch_first, ...) calls torch's fused layer kernel with
# self_attn's weights and never calls self_attn.forward: replacing self_attn keeps outputs, but genfast runs there
# only outside that regime (training, or with gradients).
_LAYER_FAST_PATH = (nn.TransformerEncoderLayer,)


@register_rewrite("attention")
def _rewrite_attention(parent: nn.Module, prefix: str, report: FuseReport) -> None:
    """nn.MultiheadAttention -> genfast.nn.MultiheadAttention sharing its parameters (subclasses left alone: they
    may override forward)."""
    for name, child in list(parent._modules.items()):
        if type(child) is not nn.MultiheadAttention:
            continue
        parent._modules[name] = MultiheadAttention.from_module(child)
        what = "genfast.nn.MultiheadAttention"
        if isinstance(parent, _LAYER_FAST_PATH):
            what += (f" (note: {type(parent).__name__}'s eval/no-grad fast path calls torch's fused layer kernel and "
                     "bypasses self_attn; genfast runs in training or with gradients)")
        report.replaced.append((_path(prefix, name), what))
