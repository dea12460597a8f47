"""The tracer's bookkeeping: the labels each tensor carries and the API an op rule uses to move them.

A rule (:mod:`lightning_prune.core.trace.op_rules`) receives the running tracer as a
:class:`Bookkeeping`: ``rep``, ``set_rep``, ``full_labels``, ``couple``, ``block``, ``block_inputs``,
``give_up``, ``add_axis``, ``param_name``, ``parameter_origin``, ``slice_parameter``,
``from_parameters``, ``follow_concatenation``, ``size_guess``, ``outputs_unlabeled``, ``is_fresh``,
and ``trace`` (what the run records). Running the model and dispatching each call to its rule is
:class:`~lightning_prune.core.trace.tracer.Tracer`'s part, built on this one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.core.trace.constants import LastConstants
from lightning_prune.core.trace.records import ChannelTrace, OpCall, ParamAxis, Rep, leaves, region, storage_key

_FOLLOWED_PARAMETER_SIZE = 1 << 22  # larger parameters reach attention through layers, not views


class Bookkeeping:
    """Each tensor's :class:`Rep` and what the pass recorded; the methods are the API the rules use."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.trace = ChannelTrace()
        self.reps: dict[int, tuple[Tensor, Rep]] = {}  # id(tensor) -> (tensor kept alive, rep)
        self.params: dict[int, tuple[str, str]] = {}
        self.modules: dict[str, nn.Module] = dict(model.named_modules())  # by name: asked for each recorded axis
        for mod_name, module in self.modules.items():
            for kind in (module._parameters, module._buffers):
                for p_name, tensor in kind.items():
                    if tensor is not None:
                        first = self.params.setdefault(id(tensor), (mod_name, p_name))
                        if first != (mod_name, p_name):
                            self.trace.shared[(mod_name, p_name)] = first
        self.warned: set[str] = set()
        self.constants = LastConstants()  # channel_constants of a consumer's input, read once for the pass and the rule
        self.released: list[Tensor] = []  # small tensors a module was loaded with, alive to the end of the pass
        # Tensors made from one parameter by views and indexing (a class token expanded, a relative
        # position table gathered): id -> (tensor kept alive, parameter, flat parameter index per element)
        self.derived: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        # A cat of such tensors and constants (BEiT's, EVA's query/key/value bias): id -> (tensor
        # kept alive, the dim of the cat, its parts); sliced part by part
        self.concatenated: dict[int, tuple[Tensor, int, tuple[Tensor, ...]]] = {}
        self.module_stack: list[str] = []  # the model's modules now running, outermost first (see run)
        self.op = ""  # the op being recorded, for block reasons
        # Storages of fresh tensors (factories such as new_empty, zeros): storage key -> (tensor kept
        # alive, per-element "fresh" mask or None for all). A fresh element holds a constant and
        # exists as the model's code sizes it; a write gives it the written labels.
        self.fresh: dict[Any, tuple[Tensor, Tensor | None]] = {}

    def track(self, module_name: str, module: nn.Module) -> None:
        """``module``'s own tensors were replaced (loaded from a file): know them by their names."""
        for kind in (module._parameters, module._buffers):
            for p_name, tensor in kind.items():
                if tensor is not None:
                    name = (module_name, p_name)
                    self.params[id(tensor)] = self.trace.shared.get(name, name)

    def untrack(self, module: nn.Module) -> None:
        """``module``'s own tensors are about to be dropped: forget the large ones (their ids may be
        reused). Small ones are kept alive and known to the end of the pass: a table a module returns
        (a relative position bias) is followed after the module has finished."""
        for kind in (module._parameters, module._buffers):
            for tensor in kind.values():
                if tensor is None:
                    continue
                if tensor.numel() <= _FOLLOWED_PARAMETER_SIZE:
                    self.released.append(tensor)
                else:
                    self.params.pop(id(tensor), None)

    def rep(self, tensor: Any) -> Rep | None:
        """The labels ``tensor`` carries, or ``None`` if it carries none."""
        entry = self.reps.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def set_rep(self, tensor: Tensor, rep: Rep | None) -> None:
        """Give ``tensor`` its labels (``None``, or only ``-1`` labels: it carries no channel)."""
        if rep is None or bool((rep.labels < 0).all()):
            self.reps.pop(id(tensor), None)
        else:
            self.reps[id(tensor)] = (tensor, rep)

    def labelled_tensors(self) -> list[Tensor]:
        """Every tensor that carries labels now."""
        return [tensor for tensor, _ in self.reps.values()]

    def param_name(self, tensor: Any) -> tuple[str, str] | None:
        """``(module, parameter or buffer name)`` if ``tensor`` is one of the model's, else ``None``."""
        return self.params.get(id(tensor)) if isinstance(tensor, Tensor) else None

    def couple(self, a: Tensor, b: Tensor, reason: str | None = None) -> None:
        """``a`` and ``b`` share one keep decision, position by position; a channel tied to a
        position without a channel (label -1) cannot move and is blocked."""
        a, b = a.flatten(), b.flatten()
        both = (a >= 0) & (b >= 0)
        self.trace.edges.append((a[both], b[both]))
        one = (a >= 0) ^ (b >= 0)  # a channel tied position-wise to a fixed one cannot move
        if bool(one.any()):
            self.block(
                torch.where(a >= 0, a, b)[one],
                reason or f"op '{self.op}' ties them position by position to values that belong to no prunable channel",
            )

    def block(self, labels: Tensor, reason: str) -> None:
        """Keep ``labels`` whatever the masks say; ``reason`` says why (it becomes the export note)."""
        labels = labels.flatten()
        labels = labels[labels >= 0]
        if labels.numel():
            self.trace.blocked.append((labels, reason))

    def block_inputs(self, args: Any, reason: str) -> None:
        """Block the labels of every tensor in ``args`` (any nesting of tuples, lists and dicts)."""
        for tensor in leaves(args):
            if (rep := self.rep(tensor)) is not None:
                self.block(rep.labels, reason)

    def give_up(self, call: OpCall, why: str) -> None:
        """The rule cannot follow this call: keep its inputs' channels (``op '...' why``), label no output."""
        self.block_inputs(call.inputs, f"op '{call.op}' {why}")
        self.outputs_unlabeled(call.out)

    def add_axis(self, tensor: Any, dim: int, labels: Tensor, groups: int = 1) -> bool:
        """Record that ``tensor`` (a parameter or buffer) is sliced along ``dim`` by ``labels``."""
        owner = self.param_name(tensor)
        if owner is None:
            return False
        self.trace.axes.append(ParamAxis(owner[0], owner[1], dim, labels.flatten(), groups))
        return True

    def outputs_unlabeled(self, out: Any) -> None:
        """No tensor in ``out`` carries labels."""
        for tensor in leaves(out):
            if isinstance(tensor, Tensor):
                self.set_rep(tensor, None)

    def full_labels(self, tensor: Tensor, materialize: bool = True) -> Tensor:
        """A label per element of ``tensor`` (``-1`` where it carries no channel); with
        ``materialize=False`` an expanded view (stride 0 along the dims without channels)."""
        rep = self.rep(tensor)
        if rep is None:
            return torch.full(tuple(tensor.shape), -1, dtype=torch.long)
        view = [1] * tensor.ndim
        for d, size in zip(rep.dims, rep.labels.shape, strict=False):
            view[d] = size
        order = sorted(range(len(rep.dims)), key=lambda i: rep.dims[i])
        labels = rep.labels.permute(order) if len(order) > 1 else rep.labels
        expanded = labels.reshape(view).expand(tuple(tensor.shape))
        return expanded.contiguous() if materialize else expanded

    def parameter_origin(self, tensor: Any) -> tuple[Tensor, Tensor] | None:
        """``(parameter, flat index per element)`` if ``tensor`` is a parameter or buffer of the model, or
        was made from one by views and indexing; else ``None``."""
        if not isinstance(tensor, Tensor):
            return None
        if self.param_name(tensor) is not None:
            if tensor.numel() > _FOLLOWED_PARAMETER_SIZE:
                return None
            return tensor, torch.arange(tensor.numel()).reshape(tensor.shape)
        entry = self.derived.get(id(tensor))
        return (entry[1], entry[2]) if entry is not None and entry[0] is tensor else None

    def slice_parameter(self, tensor: Tensor, dim: int, labels: Tensor) -> bool:
        """Record the parameter ``tensor`` comes from as sliced by ``labels``, which lie along ``tensor``'s
        ``dim``: possible when one parameter dim follows ``dim`` one to one and no other parameter
        dim varies along it (a class token expanded over the batch, a per-head table gathered
        over positions). ``False`` (nothing recorded) where no such dim exists."""
        entry = self.concatenated.get(id(tensor))
        if entry is not None and entry[0] is tensor and labels.ndim == 1 and labels.numel() == tensor.shape[dim]:
            return self._slice_parts(entry[1], entry[2], dim, labels)
        origin = self.parameter_origin(tensor)
        if origin is None or labels.ndim != 1 or labels.numel() != tensor.shape[dim]:
            return False
        parameter, index = origin
        coords = [c.movedim(dim, 0).reshape(tensor.shape[dim], -1) for c in torch.unravel_index(index, parameter.shape)]
        along = [p for p, c in enumerate(coords) if bool((c == c[:, :1]).all())]
        fixed = [p for p, c in enumerate(coords) if bool((c == c[:1]).all())]
        for p in along:
            position = coords[p][:, 0]
            if set(fixed) >= set(range(parameter.ndim)) - {p} and position.unique().numel() == position.numel():
                per_index = torch.full((parameter.shape[p],), -1, dtype=torch.long)
                per_index[position] = labels
                return self.add_axis(parameter, p, per_index)
        return False

    def follow_concatenation(self, call: OpCall) -> None:
        """``torch.cat`` of parameters (or tensors made from them by views) and constants, with no
        channels yet: remember its parts, which :meth:`slice_parameter` slices one by one. A constant
        part is a buffer, a ``zeros_like`` of a parameter or a sized factory's fresh tensor (a key
        bias of zeros); any other part (computed from data) leaves the result unknown."""
        parts, dim, out = call.arg(0, "tensors"), call.arg(1, "dim", 0), call.out
        if not isinstance(parts, (list, tuple)) or not isinstance(out, Tensor) or not isinstance(dim, int):
            return
        known = [
            isinstance(p, Tensor) and p.ndim == out.ndim and (self.from_parameters(p) or self.is_fresh(p))
            for p in parts
        ]
        if parts and all(known) and any(self.from_parameters(p) for p in parts):
            self.concatenated[id(out)] = (out, dim % out.ndim, tuple(parts))

    def from_parameters(self, tensor: Any) -> bool:
        """Whether ``tensor`` is made from the model's parameters alone, so that :meth:`slice_parameter` may
        slice it: a parameter, a view or index of one, or a cat of those (and constants)."""
        entry = self.concatenated.get(id(tensor))
        return self.parameter_origin(tensor) is not None or (entry is not None and entry[0] is tensor)

    def _slice_parts(self, cat_dim: int, parts: tuple[Tensor, ...], dim: int, labels: Tensor) -> bool:
        """:meth:`slice_parameter` for a cat: each part takes its own labels (along the cat's dim) or all of
        them (along another). A fresh part's size is the model code's: export checks it. All or nothing."""
        pieces = labels.split([p.shape[dim] for p in parts]) if dim == cat_dim else [labels] * len(parts)
        axes, guesses = len(self.trace.axes), len(self.trace.reshaped)
        for part, piece in zip(parts, pieces, strict=True):
            if not self.from_parameters(part):
                self.size_guess(piece)
            elif not self.slice_parameter(part, dim, piece):
                del self.trace.axes[axes:], self.trace.reshaped[guesses:]
                return False
        return True

    def size_guess(self, labels: Tensor) -> None:
        """The exported size of ``labels``' tensor is a guess (the model's code may fix it): export checks it."""
        self.trace.reshaped.append((labels.flatten(), self.current_module))

    @property
    def current_module(self) -> str:
        """The innermost of the model's modules running the op now (``""``: the model itself)."""
        return self.module_stack[-1] if self.module_stack else ""

    def is_fresh(self, tensor: Tensor) -> bool:
        """Whether every element of ``tensor`` still holds what a sized factory put there."""
        entry = self.fresh.get(storage_key(tensor))
        if entry is None:
            return False
        return entry[1] is None or bool(region(entry[1], tensor).all())


Rule = Callable[[Bookkeeping, OpCall], None]
"""A rule: ``rule(tracer, call) -> None``, updating the tracer's labels for one call."""

__all__ = ["Bookkeeping", "Rule"]
