"""Record how channels flow through a model during one real forward pass.

Why a ``TorchFunctionMode`` rather than ``torch.fx`` or the autograd graph: the mode sees every
``torch`` function, ``Tensor`` method and ``torch.nn.functional`` call as it really runs, with
real tensors and real arguments, so Python control flow, dict/tuple inputs and outputs,
functional calls, reused modules and in-place ops need no special handling, and the parameters
an op uses identify the layer (and the layer's call site) without any module bookkeeping. The
autograd graph loses in-place ops and anything under ``no_grad``; fx fails on control flow.

Every channel of every producer (a conv or linear layer's output channel, or a channel of the
network input) gets an integer *label*. Each traced tensor carries a :class:`Rep`: the tensor
dims along which labels vary, and the labels there. The :class:`Tracer` runs the model, keeps
that bookkeeping and hands each call to its rule (:mod:`lightning_prune.core.op_rules`). Rules move
labels through ops, *couple* labels that must share a keep decision (residual adds, gates,
concatenated views), *block* labels that must be kept (model outputs, unknown ops; each block
carries the reason export reports), and record which parameter dims hold which labels (what
export will slice) and the values that reach each channel-mixing consumer (to find pruned
channels that carry a nonzero constant).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_prune.core.errors import ExampleInputError
from lightning_prune.core.modules import evaluating, running_modules

if TYPE_CHECKING:
    from lightning_prune.core.op_rules import OpCall, Rule


@dataclass
class Rep:
    """Where a tensor's channel labels live: ``labels[i, j, ...]`` is the label of every element
    whose indices along ``dims`` are ``(i, j, ...)``. Label ``-1`` means no channel."""

    dims: tuple[int, ...]
    labels: Tensor
    from_view: bool = False  # made by a view that changed the tensor's rank (a 2D conv over a 5D volume)


@dataclass
class ParamAxis:
    """One sliceable axis of a parameter or buffer.

    ``labels`` has one entry per channel along ``dim``; with ``groups > 1`` the axis is the
    grouped input (or transposed-conv output) axis of a convolution: ``labels`` then covers all
    groups and the weight rows of group ``k`` take the channels of block ``k``.
    """

    module: str
    param: str
    dim: int
    labels: Tensor
    groups: int = 1


@dataclass
class Consumer:
    """A call that mixes channels: conv/linear inputs and norms over channels.

    ``constants[i]`` is the value of input position ``i`` if it was the same everywhere in the
    traced batch (NaN otherwise); a pruned position with a nonzero constant cannot simply be
    dropped.
    """

    module: str
    kind: str  # "conv", "conv_transpose", "linear", "layer_norm"
    labels: Tensor
    constants: Tensor
    foldable: bool
    groups: int = 1


@dataclass
class AttentionHeads:
    """The heads an attention op found, for the module that called it (export updates its head counts).

    ``query[h]`` is a label of query head ``h`` (every channel of a head shares its keep decision),
    ``key_value[g]`` one of key/value head ``g``; under grouped-query attention each key/value head
    is coupled with the query heads that share it, so both counts shrink by the same factor.
    """

    query: Tensor
    key_value: Tensor
    head_dim: int


@dataclass
class Deferred:
    """A coupling or block that depends on what attention finds later in the pass.

    A view that splits channels into ``(heads, head_dim)`` and an op that treats the positions of a
    head differently (rotary embeddings, a per-position scale, a slice of ``head_dim``) are exact
    when whole heads go, and otherwise are not. They are decided when the pass ends, once the
    attention ops have said which labels form heads: see :meth:`Tracer.resolve_deferred`.
    ``kind`` is ``"split"`` (``labels``: the split labels, coupled as :func:`movement` guesses unless
    they all form heads), ``"within"`` (``labels`` blocked unless, along each of ``axes``, they stay
    inside one head), ``"in_heads"`` (blocked unless they all belong to heads: a head's output is
    checked where it is projected, so what is added to its scores does not matter) or
    ``"fixed_part"`` (``labels`` blocked unless each of their heads keeps a label in ``survivors``,
    so that what the op drops is a fixed part of every head).
    """

    kind: str
    labels: Tensor
    reason: str
    axes: tuple[int, ...] = ()
    survivors: Tensor | None = None


@dataclass
class ChannelTrace:
    """Everything one traced forward pass recorded about channels."""

    label_owner: list[tuple[str | None, int, int]] = field(default_factory=list)  # (producer, first label, count)
    num_labels: int = 0
    edges: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    blocked: list[tuple[Tensor, str]] = field(default_factory=list)  # (labels, why they must be kept)
    tainted: list[Tensor] = field(default_factory=list)
    axes: list[ParamAxis] = field(default_factory=list)
    producers: dict[str, Tensor] = field(default_factory=dict)
    consumers: list[Consumer] = field(default_factory=list)
    even_groups: list[tuple[str, Tensor, int]] = field(default_factory=list)  # (layer, labels, groups)
    layer_inputs: dict[str, Tensor] = field(default_factory=dict)  # first call's input labels per layer
    norm_channel_dim: dict[str, int] = field(default_factory=dict)
    followers: set[str] = field(default_factory=set)  # depthwise layers: their channels are their input's
    warnings: list[str] = field(default_factory=list)
    input_labels: list[Tensor] = field(default_factory=list)
    reshaped: list[tuple[Tensor, str]] = field(
        default_factory=list
    )  # (labels, module): exported size a guess to verify
    module_inputs: dict[str, Tensor] = field(default_factory=dict)  # module -> labels of its first call's inputs
    head_units: list[Tensor] = field(default_factory=list)  # (heads, channels per head) labels attention found
    deferred: list[Deferred] = field(default_factory=list)
    reshaped_inputs: set[str] = field(default_factory=set)  # layers that read a tensor a view gave another rank
    heads: dict[str, AttentionHeads] = field(default_factory=dict)  # attention module -> its heads
    # a tensor held under several names (b.weight = a.weight): (module, name) -> the first name
    # ``named_modules`` gives it, which the trace uses for it everywhere
    shared: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    output: Any = None  # what the traced (masked) model returned

    def new_labels(self, owner: str | None, count: int) -> Tensor:
        """``count`` fresh labels for the channels of ``owner`` (``None``: the network input)."""
        labels = torch.arange(self.num_labels, self.num_labels + count)
        self.label_owner.append((owner, self.num_labels, count))
        self.num_labels += count
        return labels


def call_model(model: nn.Module, example_input: Any) -> Any:
    """Call ``model`` the way ``example_input`` asks: a tensor, a tuple of positional inputs, or a dict of keywords."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def trace_channels(model: nn.Module, example_input: Any) -> ChannelTrace:
    """Run ``model`` once on ``example_input`` (eval mode, no grad) and record its channel flow."""
    tracer = Tracer(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracer.run(example_input)
    for message in tracer.trace.warnings:
        warnings.warn(message, stacklevel=2)
    return tracer.trace


class _Mode(TorchFunctionMode):
    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.tracer.record(func, args, kwargs, out)
        return out


class Tracer:
    """Runs a model under the mode, keeps each tensor's :class:`Rep`, and dispatches every call to its
    rule. The methods below the running part are the bookkeeping API the rules use."""

    def __init__(self, model: nn.Module) -> None:
        from lightning_prune.core import op_rules  # the rules build Reps: imported here, not above, to avoid a cycle

        self.rules = op_rules
        self.model = model
        self.trace = ChannelTrace()
        self.reps: dict[int, tuple[Tensor, Rep]] = {}  # id(tensor) -> (tensor kept alive, rep)
        self.params: dict[int, tuple[str, str]] = {}
        for mod_name, module in model.named_modules():
            for kind in (module._parameters, module._buffers):
                for p_name, tensor in kind.items():
                    if tensor is not None:
                        first = self.params.setdefault(id(tensor), (mod_name, p_name))
                        if first != (mod_name, p_name):
                            self.trace.shared[(mod_name, p_name)] = first
        self.warned: set[str] = set()
        # Tensors made from one parameter by views and indexing (a class token expanded, a relative
        # position table gathered): id -> (tensor kept alive, parameter, flat parameter index per element)
        self.derived: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.module_stack: list[str] = []  # the model's modules now running, outermost first (see run)
        self.op = ""  # the op being recorded, for block reasons
        # Storages of fresh tensors (factories such as new_empty, zeros): storage key -> (tensor kept
        # alive, per-element "fresh" mask or None for all). A fresh element holds a constant and
        # exists as the model's code sizes it; a write gives it the written labels.
        self.fresh: dict[Any, tuple[Tensor, Tensor | None]] = {}

    # ----------------------------------------------------------------- running
    def run(self, example_input: Any) -> None:
        """Label the example input's channels, run the model once, block what reaches the output."""
        hooks = [
            module.register_forward_pre_hook(self._norm_pre_hook(name))
            for name, module in self.model.named_modules()
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm))
        ]
        try:
            for tensor in tree_leaves(example_input):
                if isinstance(tensor, Tensor) and tensor.is_floating_point() and tensor.ndim >= 1:
                    dim = 1 if tensor.ndim >= 2 else 0
                    labels = self.trace.new_labels(None, tensor.shape[dim])
                    self.trace.input_labels.append(labels)
                    self.trace.blocked.append((labels, "they are tied to the network input"))
                    self.set_rep(tensor, Rep((dim,), labels))
            try:  # which of the model's modules is running: attention ops report heads to it
                with running_modules(self.model, self._entered) as self.module_stack:
                    with torch.no_grad(), evaluating(self.model), _Mode(self):
                        output = call_model(self.model, example_input)
            except Exception as err:
                raise ExampleInputError(
                    f"{type(self.model).__name__} rejected the example input "
                    f"({_describe(example_input)}): {type(err).__name__}: {err}"
                ) from err
            self.trace.output = output
            for tensor in tree_leaves(output):
                if isinstance(tensor, Tensor) and (rep := self.rep(tensor)) is not None:
                    self.block(rep.labels, "they reach the model output")
            self.resolve_deferred()
        finally:
            for hook in hooks:
                hook.remove()

    def _entered(self, name: str, args: tuple) -> None:
        if name not in self.trace.module_inputs:  # the labels of its first call's inputs
            labels = [rep.labels.flatten() for x in tree_leaves(args) if (rep := self.rep(x)) is not None]
            self.trace.module_inputs[name] = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)

    def resolve_deferred(self) -> None:
        """Decide what :class:`Deferred` left open, now that the attention ops have named the heads.

        A split whose labels all belong to heads is not coupled across heads (the heads dim is the
        one that shrinks, and export updates the module's head count); any other split gets
        :func:`movement`'s guess. Then a ``"within"`` or ``"fixed_part"`` block is dropped where
        it only concerns positions inside whole heads, and applied otherwise.
        """
        trace = self.trace
        in_head = torch.zeros(trace.num_labels, dtype=torch.bool)
        for units in trace.head_units:
            in_head[units[units >= 0]] = True

        def all_in_heads(labels: Tensor) -> bool:
            labels = labels[labels >= 0]
            return bool(in_head[labels].all())

        for item in trace.deferred:
            if item.kind == "split" and not all_in_heads(item.labels):
                couple_split(self, item.labels, item.reason)
        root = torch.from_numpy(components(trace.num_labels, trace.edges))
        for item in trace.deferred:
            labels = item.labels
            if item.kind == "within":
                fine = all_in_heads(labels) and all(_constant_along(root, labels, axis) for axis in item.axes)
            elif item.kind == "in_heads":
                fine = all_in_heads(labels)
            elif item.kind == "fixed_part":
                live = labels[labels >= 0]
                fine = all_in_heads(live) and bool(torch.isin(root[live], root[item.survivors]).all())
            else:
                continue
            if not fine:
                self.block(labels, item.reason)

    def _norm_pre_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], Tensor) and (rep := self.rep(args[0])) and len(rep.dims) == 1:
                self.trace.norm_channel_dim[name] = rep.dims[0] - args[0].ndim

        return hook

    # ------------------------------------------------------------- dispatch
    def record(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        """Called by the mode after every op: find its rule and run it when channels are involved."""
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property such as Tensor.T or Tensor.data
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        op = self.rules.normalise_op_name(name)
        rule = self.rules.rule_for(op)
        call = self.rules.OpCall(op, name, func, args, kwargs, out)
        self.op = op
        if rule in self.rules.TRACKS_MEMORY:  # they follow fresh and written tensors, labelled or not
            return self.dispatch(rule, call)
        if self.fresh and _in_place(name) and args and isinstance(args[0], Tensor):
            self.fresh.pop(storage_key(args[0]), None)  # its fresh elements now hold data
        labeled = any(self.rep(t) is not None for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor))
        if not labeled:
            self.outputs_unlabeled(out)
            if rule in self.rules.PRODUCERS:  # a producer even of unlabelled input
                self.dispatch(rule, call)
            elif rule in self.rules.FOLLOWS_PARAMETERS:
                self.follow_parameter(call)
            return
        if not any(isinstance(t, Tensor) for t in tree_leaves(out)):
            return
        if rule is None:
            self.warn_unknown(op, (args, kwargs))
            self.outputs_unlabeled(out)
            return
        self.dispatch(rule, call)

    def dispatch(self, rule: Rule, call: OpCall) -> None:
        """Run ``rule`` on ``call``; a rule that cannot make sense of a call keeps its channels."""
        try:
            rule(self, call)
        except Exception as err:
            self.rule_failed(call.op, err, call.inputs, call.out)

    def warn_unknown(self, op: str, args: Any) -> None:
        """An op without a rule: keep the channels that reach it, and warn once per op."""
        self.block_inputs(args, f"op '{op}' is not understood by the tracer")
        if op not in self.warned:
            self.warned.add(op)
            self.trace.warnings.append(
                f"lightning_prune: op '{op}' is not understood; the channels that reach it are kept."
            )

    def rule_failed(self, op: str, err: Exception, args: Any, out: Any) -> None:
        """A rule raised: our bug or a call form it does not know; keep the channels, say so plainly."""
        what = f"op '{op}' could not be traced (rule raised {type(err).__name__}: {err})"
        self.block_inputs(args, what)
        for tensor in tree_leaves(out):  # an in-place op's output is one of its inputs
            if isinstance(tensor, Tensor) and (rep := self.rep(tensor)) is not None:
                self.block(rep.labels, what)
        self.outputs_unlabeled(out)
        if what not in self.warned:
            self.warned.add(what)
            self.trace.warnings.append(f"lightning_prune: {what}; its channels are kept.")

    # ----------------------------------------------------------- bookkeeping
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
        for tensor in tree_leaves(args):
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
        for tensor in tree_leaves(out):
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

    def follow_parameter(self, call: OpCall) -> None:
        """A view or index of a parameter: remember which parameter element each output element is."""
        source = call.args[0] if call.args else None
        origin = self.parameter_origin(source)
        if origin is None:
            return
        parameter, index = origin
        rule = self.rules.rule_for(call.op)
        if rule is self.rules.RULES["elementwise"]:  # exp(scale), clamp(scale, max=...): element by element
            others = [x for x in tree_leaves(call.inputs) if isinstance(x, Tensor) and x is not source]
            if any(x.numel() != 1 for x in others):
                return
        if rule is not self.rules.RULES["movement"]:
            results = [index if tensor.shape == source.shape else None for tensor in tree_leaves(call.out)]
        else:
            try:
                results = tree_leaves(call.func(index, *call.args[1:], **call.kwargs))
            except Exception:  # an op that needs real values (a float index, a boolean mask of data)
                return
        for tensor, result in zip(tree_leaves(call.out), results, strict=False):
            if isinstance(tensor, Tensor) and isinstance(result, Tensor) and result.shape == tensor.shape:
                self.derived[id(tensor)] = (tensor, parameter, result)

    def slice_parameter(self, tensor: Tensor, dim: int, labels: Tensor) -> bool:
        """Record the parameter ``tensor`` comes from as sliced by ``labels``, which lie along ``tensor``'s
        ``dim``: possible when one parameter dim follows ``dim`` one to one and no other parameter
        dim varies along it (a class token expanded over the batch, a per-head table gathered
        over positions). ``False`` (nothing recorded) where no such dim exists."""
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


def couple_split(t: Tracer, labels: Tensor, reason: str) -> None:
    """A view spread channels over several dims (``labels`` is at least 2-D): couple them along every
    dim but the one the model's code will shrink, taken to be the largest (the model recomputes one
    factor of the view from the tensor size: ShuffleNet's ``view(b, groups, c // groups, ...)``, a
    stack of a few tensors)."""
    sizes = list(labels.shape)
    shrinking = len(sizes) - 1 - sizes[::-1].index(max(sizes))
    for axis in range(labels.ndim):
        if axis != shrinking:
            t.couple(labels, labels.narrow(axis, 0, 1).expand_as(labels), reason)


def components(count: int, edges: list[tuple[Tensor, Tensor]]) -> np.ndarray:
    """Connected components of labels under ``edges``: each label -> the smallest label of its group."""
    parent = np.arange(count, dtype=np.int64)
    if not edges:
        return parent
    a = np.concatenate([e[0].numpy().ravel() for e in edges]).astype(np.int64)
    b = np.concatenate([e[1].numpy().ravel() for e in edges]).astype(np.int64)
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return parent
        np.minimum.at(parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
        while True:  # pointer jumping: every label points at its root again
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


def _constant_along(root: Tensor, labels: Tensor, axis: int) -> bool:
    """Whether, along ``axis`` of ``labels``, every label lies in one coupled group."""
    groups = root[labels.clamp(min=0)]
    return bool((groups == groups.narrow(axis, 0, 1)).all())


def storage_key(tensor: Any) -> Any:
    """Identifies the memory a tensor lives in (views share it); None for tensors without one."""
    if not isinstance(tensor, Tensor):
        return None
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except Exception:  # sparse, functional or other tensors without plain storage
        return None
    return (tensor.device.type, tensor.device.index, pointer) if pointer else None


def region(flat: Tensor, tensor: Tensor) -> Tensor:
    """The elements of ``flat`` (one per element of ``tensor``'s memory) that ``tensor`` views."""
    return flat.as_strided(tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())


_IN_PLACE_DUNDER = re.compile(r"__i(add|sub|mul|truediv|floordiv|div|mod|pow|and|or|xor|lshift|rshift|matmul)__")


def _in_place(name: str) -> bool:
    return (name.endswith("_") and not name.endswith("__")) or bool(_IN_PLACE_DUNDER.fullmatch(name))


_FOLLOWED_PARAMETER_SIZE = 1 << 22  # larger parameters reach attention through layers, not views


def _describe(example_input: Any) -> str:
    leaves = tree_leaves(example_input)
    shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in leaves]
    return f"{type(example_input).__name__} of {shapes}"
