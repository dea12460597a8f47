"""Record how channels flow through a model during one real forward pass.

Why a ``TorchFunctionMode`` rather than ``torch.fx`` or the autograd graph: the mode sees every
``torch`` function, ``Tensor`` method and ``torch.nn.functional`` call as it really runs, with
real tensors and real arguments, so Python control flow, dict/tuple inputs and outputs,
functional calls, reused modules and in-place ops need no special handling, and the parameters
an op uses identify the layer (and the layer's call site) without any module bookkeeping. The
autograd graph loses in-place ops and anything under ``no_grad``; fx fails on control flow.

Every channel of every producer (a conv or linear layer's output channel, or a channel of the
network input) gets an integer *label*. Each traced tensor carries a :class:`Rep`: the tensor
dims along which labels vary, and the labels there. Rules (see :mod:`lightning_prune.rules`)
move labels through ops, *couple* labels that must share a keep decision (residual adds,
gates, concatenated views), *block* labels that must be kept (model outputs, unknown ops; each
block carries the reason export reports), and record which parameter dims hold which labels
(what export will slice) and the values that reach each channel-mixing consumer (to find
pruned channels that carry a nonzero constant).

Assignment moves labels too: a cost volume built as ``cost = f.new_empty(...).fill_(0.)`` then
``cost[:, :c, i, :, i:] = torch.abs(a - b)`` per disparity gets ``f``'s channels on its channel
dim, so the 3D convs that read it shrink with the features (see ``_Tracer._write_into``).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves

from lightning_prune import rules
from lightning_prune.errors import ExampleInputError


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
    ran: set[str] = field(default_factory=set)
    followers: set[str] = field(default_factory=set)  # depthwise layers: their channels are their input's
    warnings: list[str] = field(default_factory=list)
    input_labels: list[Tensor] = field(default_factory=list)
    reshaped: list[Tensor] = field(default_factory=list)  # labels whose exported size is a guess to verify
    reshaped_inputs: set[str] = field(default_factory=set)  # layers that read a tensor a view gave another rank
    output: Any = None  # what the traced (masked) model returned

    def new_labels(self, owner: str | None, count: int) -> Tensor:
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
    tracer = _Tracer(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracer.run(example_input)
    for message in tracer.trace.warnings:
        warnings.warn(message, stacklevel=2)
    return tracer.trace


class _Mode(TorchFunctionMode):
    def __init__(self, tracer: _Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.tracer.record(func, args, kwargs, out)
        return out


class _Tracer:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.trace = ChannelTrace()
        self.reps: dict[int, tuple[Tensor, Rep]] = {}  # id(tensor) -> (tensor kept alive, rep)
        self.params: dict[int, tuple[str, str]] = {}
        for mod_name, module in model.named_modules():
            for kind in (module._parameters, module._buffers):
                for p_name, tensor in kind.items():
                    if tensor is not None:
                        self.params.setdefault(id(tensor), (mod_name, p_name))
        self.warned: set[str] = set()
        self.op = ""  # the op being recorded, for block reasons
        # Storages of fresh tensors (factories such as new_empty, zeros): storage key -> (tensor kept
        # alive, per-element "fresh" mask or None for all). A fresh element holds a constant and
        # exists as the model's code sizes it; a write gives it the written labels.
        self.fresh: dict[Any, tuple[Tensor, Tensor | None]] = {}
        self.handlers: dict[str, Callable[[str, tuple, dict, Any], None]] = {
            rule: getattr(self, f"_{rule}") for rule in rules.RULES
        }

    # ----------------------------------------------------------------- running
    def run(self, example_input: Any) -> None:
        hooks = [
            module.register_forward_pre_hook(self._norm_pre_hook(name))
            for name, module in self.model.named_modules()
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm))
        ]
        was_training = self.model.training
        self.model.eval()
        try:
            for tensor in tree_leaves(example_input):
                if isinstance(tensor, Tensor) and tensor.is_floating_point() and tensor.ndim >= 1:
                    dim = 1 if tensor.ndim >= 2 else 0
                    labels = self.trace.new_labels(None, tensor.shape[dim])
                    self.trace.input_labels.append(labels)
                    self.trace.blocked.append((labels, "they are tied to the network input"))
                    self.set_rep(tensor, Rep((dim,), labels))
            try:
                with torch.no_grad(), _Mode(self):
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
        finally:
            for hook in hooks:
                hook.remove()
            self.model.train(was_training)

    def _norm_pre_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], Tensor) and (rep := self.rep(args[0])) and len(rep.dims) == 1:
                self.trace.norm_channel_dim[name] = rep.dims[0] - args[0].ndim

        return hook

    # ----------------------------------------------------------- bookkeeping
    def rep(self, tensor: Any) -> Rep | None:
        entry = self.reps.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def set_rep(self, tensor: Tensor, rep: Rep | None) -> None:
        if rep is None or bool((rep.labels < 0).all()):
            self.reps.pop(id(tensor), None)
        else:
            self.reps[id(tensor)] = (tensor, rep)

    def param_name(self, tensor: Any) -> tuple[str, str] | None:
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
        for tensor in tree_leaves(args):
            if (rep := self.rep(tensor)) is not None:
                self.block(rep.labels, reason)

    def add_axis(self, tensor: Any, dim: int, labels: Tensor, groups: int = 1) -> bool:
        """Record that ``tensor`` (a parameter or buffer) is sliced along ``dim`` by ``labels``."""
        owner = self.param_name(tensor)
        if owner is None:
            return False
        self.trace.axes.append(ParamAxis(owner[0], owner[1], dim, labels.flatten(), groups))
        return True

    def outputs_unlabeled(self, out: Any) -> None:
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor):
                self.set_rep(tensor, None)

    def full_labels(self, tensor: Tensor) -> Tensor:
        rep = self.rep(tensor)
        if rep is None:
            return torch.full(tuple(tensor.shape), -1, dtype=torch.long)
        view = [1] * tensor.ndim
        for d, size in zip(rep.dims, rep.labels.shape):
            view[d] = size
        order = sorted(range(len(rep.dims)), key=lambda i: rep.dims[i])
        labels = rep.labels.permute(order) if len(order) > 1 else rep.labels
        return labels.reshape(view).expand(tuple(tensor.shape)).contiguous()

    def compress(self, full: Tensor, split: bool) -> Rep | None:
        """The :class:`Rep` of a full label tensor.

        When ``split`` (a view or stack just spread single-dim channels over several dims), the
        labels are coupled along every dim but the one the model's code will shrink: the model
        recomputes one factor of the view from the tensor size, and that is taken to be the
        largest (ShuffleNet's ``view(b, groups, c // groups, ...)``, a stack of a few tensors).
        Export checks the guess and keeps these channels if the exported model disagrees.
        """
        if full.numel() == 0 or int(full.max()) < 0:
            return None
        varying = [d for d in range(full.ndim) if full.shape[d] > 1 and not bool((full == full.narrow(d, 0, 1)).all())]
        index = tuple(slice(None) if d in varying else 0 for d in range(full.ndim))
        labels = full[index]
        if split and labels.ndim > 1:
            sizes = list(labels.shape)
            shrinking = len(sizes) - 1 - sizes[::-1].index(max(sizes))
            for axis in range(labels.ndim):
                if axis != shrinking:
                    self.couple(
                        labels,
                        labels.narrow(axis, 0, 1).expand_as(labels),
                        f"op '{self.op}' spreads them over several dims, one of them fixed",
                    )
            self.trace.reshaped.append(labels.flatten())
        return Rep(tuple(varying), labels)

    def warn_unknown(self, op: str, args: Any) -> None:
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

    # ------------------------------------------------------------- dispatch
    def record(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property such as Tensor.T or Tensor.data
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        op = rules.normalise_op_name(name)
        rule = rules.rule_for(op)
        self.func, self.func_name, self.op = func, name, op
        if rule in ("write", "fill", "factory"):  # they track fresh and written tensors, labelled or not
            return self.dispatch(rule, op, args, kwargs, out)
        if self.fresh and _in_place(name) and args and isinstance(args[0], Tensor):
            self.fresh.pop(_storage_key(args[0]), None)  # its fresh elements now hold data
        labeled = any(self.rep(t) is not None for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor))
        if not labeled:
            self.outputs_unlabeled(out)
            if rule in ("conv", "linear", "conv_transpose"):  # a producer even of unlabelled input
                self.dispatch(rule, op, args, kwargs, out)
            return
        if not any(isinstance(t, Tensor) for t in tree_leaves(out)):
            return
        if rule is None:
            self.warn_unknown(op, (args, kwargs))
            self.outputs_unlabeled(out)
            return
        self.dispatch(rule, op, args, kwargs, out)

    def dispatch(self, rule: str, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        try:
            self.handlers[rule](op, args, kwargs, out)
        except Exception as err:  # a rule that cannot make sense of a call keeps its channels
            self.rule_failed(op, err, (args, kwargs), out)

    # ----------------------------------------------------------------- rules
    def _ignore(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        pass

    def _identity(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        rep = self.rep(args[0])
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor) and tensor.shape == args[0].shape:
                self.set_rep(tensor, rep)

    def _elementwise(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        shape = outs[0].shape
        operands = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        labeled, plain = [], []
        for tensor in operands:
            (labeled if self.rep(tensor) is not None else plain).append(tensor)
        aligned = []
        for tensor in labeled:
            rep = self.rep(tensor)
            shift = len(shape) - tensor.ndim
            if any(tensor.shape[d] != shape[d + shift] for d in rep.dims):
                return self._give_up(op, args, kwargs, out, "broadcasts them across a dim of another operand")
            aligned.append((tuple(d + shift for d in rep.dims), rep.labels))
        dims, result = aligned[-1]  # the last labelled operand names the result (seed: `out += residual`)
        for other_dims, labels in aligned[:-1]:
            if other_dims != dims or labels.shape != result.shape:
                return self._give_up(op, args, kwargs, out, "combines operands whose channels lie along different dims")
            self.couple(labels, result)
        for tensor in plain:
            shift = len(shape) - tensor.ndim
            spans = [d for d in dims if d >= shift and tensor.shape[d - shift] > 1]
            is_param = self.param_name(tensor) is not None
            if not spans:
                if tensor.numel() == 1 or is_param or self.is_fresh(tensor):  # input-independent constants
                    continue
                # data-dependent factor broadcast over channels: a pruned channel stays zero
                # (times anything) but its constant may not be input-independent any more
                if op in rules.MULTIPLICATIVE and not (op.endswith("div") and tensor is args[0]):
                    self.trace.tainted.append(result.flatten())
                else:
                    self.block(result, f"op '{op}' adds input-dependent values that belong to no channel across them")
            elif is_param and len(dims) == 1 and spans == list(dims):
                self.add_axis(tensor, dims[0] - shift, result)
            elif self.is_fresh(tensor):  # a constant sized by the model's code (torch.zeros(x.shape)): checked at export
                self.trace.reshaped.append(result.flatten())
            else:
                self.block(result, f"op '{op}' combines them position by position with a tensor that belongs to no prunable channel")
        for tensor in outs:
            self.set_rep(tensor, Rep(dims, result) if tensor.shape == shape else None)

    def _give_up(self, op: str, args: tuple, kwargs: dict, out: Any, why: str) -> None:
        self.block_inputs((args, kwargs), f"op '{op}' {why}")
        self.outputs_unlabeled(out)

    def _join(self, op: str, args: tuple, kwargs: dict, out: Any) -> bool:
        """``cat``/``stack`` of tensors whose channels lie along the same dims.

        Along the channel dim, ``cat`` joins the label vectors (DenseNet, Inception). Along any
        other dim (a batch of left and right images, a stack of feature maps), position ``i`` of
        every piece lands at one position of the result: the pieces' channels there are coupled.
        """
        if op not in ("cat", "concat", "concatenate", "stack") or not isinstance(out, Tensor):
            return False
        tensors = kwargs["tensors"] if "tensors" in kwargs else (args[0] if args else None)
        dim = kwargs.get("dim", kwargs.get("axis", args[1] if len(args) > 1 else 0))
        if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
            return False
        if not all(isinstance(t, Tensor) for t in tensors):
            return False
        reps = [self.rep(t) for t in tensors]
        known = [r for r in reps if r is not None]
        dims = known[0].dims
        if any(r.dims != dims for r in known):
            return False
        dim %= out.ndim
        if op != "stack" and dims == (dim,):
            pieces = [r.labels if r is not None else torch.full((t.shape[dim],), -1, dtype=torch.long) for r, t in zip(reps, tensors)]
            self.set_rep(out, Rep(dims, torch.cat(pieces)))
            return True
        if dim in dims and op != "stack":
            return False
        shape = known[0].labels.shape
        if any(r.labels.shape != shape for r in known):
            return False
        first = known[0].labels
        for rep in reps:
            labels = rep.labels if rep is not None else torch.full(tuple(shape), -1, dtype=torch.long)
            self.couple(labels, first, f"op '{op}' joins them, along another dim, with values that belong to no prunable channel")
        self.set_rep(out, Rep(tuple(d + (d >= dim) for d in dims) if op == "stack" else dims, first))
        return True

    def _movement(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        if self._join(op, args, kwargs, out):
            return
        if args:
            data = args[0]
        else:  # called with keywords only: torch.cat(tensors=...), torch.flatten(input=...)
            name = next(k for k in ("tensors", "input", "self") if k in kwargs)
            data = kwargs[name]
        if isinstance(data, (list, tuple)):
            sources = [t for t in data if isinstance(t, Tensor)]
            substituted = type(data)(self.full_labels(t) if isinstance(t, Tensor) else t for t in data)
        else:
            sources = [data]
            substituted = self.full_labels(data)
        if args:
            result = self.func(substituted, *args[1:], **kwargs)
        else:
            result = self.func(**{**kwargs, name: substituted})
        outs, _ = tree_flatten(out)
        results, _ = tree_flatten(result)
        seen = []
        split = all(len(self.rep(t).dims) == 1 for t in sources if self.rep(t) is not None)
        for tensor, labels in zip(outs, results):
            if isinstance(tensor, Tensor) and isinstance(labels, Tensor):
                rep = self.compress(labels, split)
                if rep is not None and len(sources) == 1 and tensor.ndim != sources[0].ndim:
                    rep.from_view = True
                self.set_rep(tensor, rep)
                if rep is not None:
                    seen.append(rep.labels.flatten())
        before = [self.rep(t).labels.flatten() for t in sources if self.rep(t) is not None]
        if not before:
            return
        before = torch.cat(before)
        after = torch.cat(seen) if seen else torch.empty(0, dtype=torch.long)
        if not bool(torch.isin(before[before >= 0], after).all()):
            # a fixed slice of the channels: they must stay where they are
            self.block(before, f"op '{op}' keeps a fixed part of them (a view it cannot shrink)")

    def _split(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        data = args[0] if args else kwargs.get("input", kwargs.get("self"))
        rep = self.rep(data)
        # torch.unbind(x, dim) and x.unbind(dim) both arrive as (x, dim); split/chunk take (x, size, dim)
        dim = _arg(args, kwargs, 1, "dim", 0) if op == "unbind" else _arg(args, kwargs, 2, "dim", 0)
        dim %= data.ndim
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        if dim not in rep.dims:
            for tensor in outs:
                dims = tuple(d - (op == "unbind" and d > dim) for d in rep.dims)
                self.set_rep(tensor, Rep(dims, rep.labels))
            return
        if op == "unbind":
            return self._give_up(op, args, kwargs, out, "makes one tensor of each of them")
        sizes = {t.shape[dim] for t in outs}
        if op != "chunk" or len(rep.dims) != 1 or len(sizes) != 1:
            return self._give_up(op, args, kwargs, out, "splits them into pieces of fixed sizes")
        pieces = rep.labels.split(sizes.pop())
        for tensor, labels in zip(outs, pieces):
            self.couple(labels, pieces[0])  # equal chunks must lose the same channels
            self.set_rep(tensor, Rep(rep.dims, labels))

    def _spatial(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        data = args[0]
        rep = self.rep(data)
        if op == "pad":
            pad = kwargs.get("pad", args[1] if len(args) > 1 else ())
            trailing = len(pad) // 2
        elif op in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"):
            trailing = data.ndim - 2
        else:
            trailing = int(op.split("pool")[1][0])
        if any(d >= data.ndim - trailing for d in rep.dims):
            return self._give_up(op, args, kwargs, out, "pools, pads or resizes along their dim")
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor):
                self.set_rep(tensor, rep)

    def _reduce(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        if op in ("max", "min") and len(args) > 1 and isinstance(args[1], Tensor):
            return self._elementwise(op, args, kwargs, out)
        data = args[0]
        rep = self.rep(data)
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
        if isinstance(dim, int):
            dim = (dim,)
        if not isinstance(dim, (tuple, list)) or not all(isinstance(d, int) for d in dim):
            return self._give_up(op, args, kwargs, out, "reduces over every dim, theirs included")
        reduced = {d % data.ndim for d in dim}
        if reduced & set(rep.dims):
            return self._give_up(op, args, kwargs, out, "reduces over their dim")
        dims = rep.dims if keepdim else tuple(d - sum(q < d for q in reduced) for d in rep.dims)
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor):
                self.set_rep(tensor, Rep(dims, rep.labels))

    def _softmax(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        rep = self.rep(args[0])
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if dim is None or dim % args[0].ndim in rep.dims:
            return self._give_up(op, args, kwargs, out, "normalises along their dim")
        self.set_rep(out, rep)

    # ------------------------------------------------- fresh tensors and writes
    def _factory(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        """Ops that read only a tensor's metadata. A ``*_like`` result has its input's shape, so its
        positions follow the input's channels (values: a constant or noise). A sized factory
        (``new_empty(b, c, ...)``, ``torch.zeros(x.shape)``) is *fresh*: a constant whose size the
        model's code computes; what is written into it gives it channels (see :meth:`_write_into`)."""
        if not isinstance(out, Tensor):
            return
        if op.endswith("_like"):
            source = args[0] if args else kwargs.get("input")
            rep = self.rep(source) if isinstance(source, Tensor) else None
            self.set_rep(out, Rep(rep.dims, rep.labels) if rep is not None else None)
            return
        self.set_rep(out, None)
        if out.numel() and (key := _storage_key(out)) is not None:
            self.fresh[key] = (out, None)

    def _fill(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        if not self.func_name.endswith("_"):  # torch.fill(x, v): a new constant of x's shape
            if isinstance(out, Tensor):
                rep = self.rep(args[0])
                self.set_rep(out, Rep(rep.dims, rep.labels) if rep is not None else None)
            return
        value = _arg(args, kwargs, 1, "value", 0.0) if op == "fill" else 0.0
        self._write_into(args[0], None, value, op, put=False)

    def _write(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        put = op == "index_put"
        if op == "setitem":
            dst, index, src = args[0], args[1], args[2]
        elif op == "copy":
            dst, index, src = args[0], None, _arg(args, kwargs, 1, "src")
        else:
            dst, index, src = args[0], tuple(_arg(args, kwargs, 1, "indices")), _arg(args, kwargs, 2, "values")
        if put and not self.func_name.endswith("_"):  # out-of-place index_put: a new tensor like dst
            if not isinstance(out, Tensor):
                return
            rep = self.rep(dst)
            self.set_rep(out, Rep(rep.dims, rep.labels) if rep is not None else None)
            dst = out
        self._write_into(dst, index, src, op, put)

    def is_fresh(self, tensor: Tensor) -> bool:
        """Whether every element of ``tensor`` still holds what a sized factory put there."""
        entry = self.fresh.get(_storage_key(tensor))
        if entry is None:
            return False
        return entry[1] is None or bool(_region(entry[1], tensor).all())

    def _aliases(self, dst: Tensor, key: Any) -> list[Tensor]:
        """``dst``, the tensor it is a view of, and every labelled tensor on the same memory."""
        found = {id(dst): dst}
        if dst._base is not None:
            found.setdefault(id(dst._base), dst._base)
        if key in self.fresh:
            found.setdefault(id(self.fresh[key][0]), self.fresh[key][0])
        for tensor, _ in list(self.reps.values()):
            if id(tensor) not in found and _storage_key(tensor) == key:
                found[id(tensor)] = tensor
        return list(found.values())

    def _source(self, src: Any) -> tuple[Tensor, Tensor]:
        """Labels and fresh-mask of what is written: a number is a constant (fresh everywhere)."""
        if not isinstance(src, Tensor):
            return torch.tensor(-1), torch.tensor(True)
        entry = self.fresh.get(_storage_key(src))
        if entry is None:
            fresh = torch.tensor(False)
        else:
            fresh = torch.tensor(True) if entry[1] is None else _region(entry[1], src).clone()
        return self.full_labels(src), fresh

    def _write_into(self, dst: Any, index: Any, src: Any, op: str, put: bool) -> None:
        """Write ``src`` into ``dst`` (``dst[index] = src``, ``dst.copy_(src)``, ``dst.fill_(v)``,
        ``dst.index_put_(index, src)``) and update the labels of every tensor on that memory.

        Labels are followed through a copy of the memory: each element has a label (a channel),
        ``-1`` (a value that belongs to no channel: its position always exists) or is *fresh* (a
        constant a factory put there; its position exists as the model's code sizes it). Written
        data takes a fresh position over; over a labelled position it couples the two labels (the
        position exists as the old channel says, and now carries the new one); a label meeting
        ``-1`` is blocked; a constant written anywhere changes no label. Each tensor's labels are
        then projected on its channel dims (its own, and the dims the source's channels land on):
        channels met at one position there are coupled, fresh positions go with their channel
        (they stay constant). Export checks by running the exported model that the code sizes
        the written tensor as the channels say, and keeps them otherwise.
        """
        if not isinstance(dst, Tensor) or dst.numel() == 0:
            return
        what = f"op '{op}'"
        src_rep = self.rep(src) if isinstance(src, Tensor) else None
        for tensor in tree_leaves(index):
            if isinstance(tensor, Tensor) and (rep := self.rep(tensor)) is not None:
                whole = tensor.dtype == torch.bool and tensor.shape == dst.shape and (index is tensor or index == (tensor,))
                if whole:  # x[x < 0] = 0: the mask's positions are dst's, channel for channel
                    self.couple(self.full_labels(tensor), self.full_labels(dst), f"{what} masks a tensor whose positions carry no channel with them")
                else:
                    self.block(rep.labels, f"{what} uses them as an index")
        key = _storage_key(dst)
        base = dst._base
        if src_rep is None and key not in self.fresh and self.rep(dst) is None and (base is None or self.rep(base) is None):
            return  # nothing with channels is written or overwritten
        aliases = self._aliases(dst, key)
        if (
            key is None
            or any(t.layout != torch.strided or t.element_size() != dst.element_size() for t in aliases)
            or (isinstance(src, Tensor) and src.layout != torch.strided)
        ):
            for tensor in aliases + ([src] if isinstance(src, Tensor) else []):
                if (rep := self.rep(tensor)) is not None:
                    self.block(rep.labels, f"{what} writes memory the tracer cannot follow")
            for tensor in aliases:
                self.set_rep(tensor, None)
            self.fresh.pop(key, None)
            return
        n = dst.untyped_storage().nbytes() // dst.element_size()
        entry = self.fresh.get(key)
        labels = torch.full((n,), -1, dtype=torch.long)
        fresh = torch.zeros(n, dtype=torch.bool)
        if entry is not None:
            fresh = torch.ones(n, dtype=torch.bool) if entry[1] is None else entry[1].clone()
        seeded = False
        for tensor in sorted(aliases, key=lambda t: -t.numel()):  # the memory as the labelled views see it
            rep = self.rep(tensor)
            if rep is None or any(s == 0 and n_ > 1 for s, n_ in zip(tensor.stride(), tensor.shape)):
                continue
            region = _region(labels, tensor)
            full, current = self.full_labels(tensor), region.clone()
            both = (current >= 0) & (full >= 0)
            self.trace.edges.append((current[both], full[both]))
            claim = (full >= 0) & (current < 0) & ~_region(fresh, tensor)
            if seeded and bool(claim.any()):
                self.block(full[claim], f"{what} writes memory that two views label differently")
            seeded = True
            stale = (current >= 0) & (full < 0)
            if bool(stale.any()):
                self.block(current[stale], f"{what} writes memory that two views label differently")
            region.copy_(torch.where(full >= 0, full, current))
        fresh &= labels < 0
        src_labels, src_fresh = self._source(src)
        cpu_index = tuple(t.cpu() if isinstance(t, Tensor) else t for t in index) if isinstance(index, tuple) else (
            index.cpu() if isinstance(index, Tensor) else index
        )

        def write(flat: Tensor, value: Tensor) -> None:
            view = _region(flat, dst)
            if index is None:
                view.copy_(value)
            elif put:
                view.index_put_(cpu_index, value.to(flat.dtype).expand_as(view[cpu_index]) if value.ndim == 0 else value.to(flat.dtype))
            else:
                view[cpu_index] = value

        written = torch.zeros(n, dtype=torch.bool)
        write(written, torch.tensor(True))
        new_labels = torch.full((n,), -1, dtype=torch.long)
        write(new_labels, src_labels)
        new_fresh = torch.zeros(n, dtype=torch.bool)
        write(new_fresh, src_fresh)
        if index is not None and src_rep is not None:  # an index list or tensor may repeat a position
            selection = tuple(slice(None) if i is None else i for i in cpu_index) if put else cpu_index
            if int(written.sum()) < _region(labels, dst)[selection].numel():
                self.block(src_rep.labels, f"{what} writes several of them to one position")
        old, old_fresh = labels[written], fresh[written]
        new, constant = new_labels[written], new_fresh[written]
        takes = ~constant & old_fresh  # data written over a fresh position
        meets = ~constant & ~old_fresh  # data written over a position that exists as a channel or always
        both = meets & (old >= 0) & (new >= 0)
        self.trace.edges.append((old[both], new[both]))
        lost = meets & ((old >= 0) ^ (new >= 0))
        if bool(lost.any()):
            self.block(torch.where(old >= 0, old, new)[lost], f"{what} writes values that belong to no prunable channel over them, or them over such values")
        labels[written] = torch.where(takes, new, old)
        fresh[written] = old_fresh & constant
        probes = []  # where each channel dim of the source lands in memory
        if src_rep is not None:
            for d in src_rep.dims:
                shape = [1] * src.ndim
                shape[d] = src.shape[d]
                probe = torch.full((n,), -1, dtype=torch.long)
                write(probe, torch.arange(src.shape[d]).reshape(shape).expand(tuple(src.shape)))
                probes.append(probe)
        for tensor in aliases:
            rep = self.rep(tensor)
            dims = set(rep.dims) if rep is not None else set()
            for probe in probes:
                dims |= _varying_dims(_region(probe, tensor))
            new_rep = self._project(_region(labels, tensor), _region(fresh, tensor), sorted(dims), what)
            self.set_rep(tensor, new_rep)
            if new_rep is not None and tensor is dst and (src_rep is not None or index is not None):
                # the code must size the tensor so, and its index must mean the same positions
                self.trace.reshaped.append(new_rep.labels.flatten())
        if bool(fresh.any()):
            self.fresh[key] = (entry[0] if entry is not None else dst, fresh)
        else:
            self.fresh.pop(key, None)

    def _project(self, labels: Tensor, fresh: Tensor, dims: list[int], what: str) -> Rep | None:
        """The :class:`Rep` of a written tensor on ``dims``: per index there, the labels of its
        non-fresh elements are coupled (or blocked if some element belongs to no channel)."""
        if labels.numel() == 0:
            return None
        other = [d for d in range(labels.ndim) if d not in dims]
        sizes = [labels.shape[d] for d in dims]
        rows = math.prod(sizes)
        values = labels.permute(dims + other).reshape(rows, -1)
        live = ~fresh.permute(dims + other).reshape(rows, -1)
        top = torch.where(live, values, torch.full_like(values, -2)).amax(1)
        low = torch.where(live, values, torch.full_like(values, torch.iinfo(torch.long).max)).amin(1)
        fixed = (live & (values < 0)).any(1)
        mixed = fixed & (top >= 0)
        if bool(mixed.any()):
            chosen = values[mixed]
            self.block(chosen[live[mixed] & (chosen >= 0)], f"{what} leaves them at a channel position that also holds values of no prunable channel")
        several = ~fixed & (top >= 0) & (low != top)
        if bool(several.any()):
            chosen, keep = values[several], live[several]
            self.trace.edges.append((chosen[keep], top[several].unsqueeze(1).expand_as(chosen)[keep]))
        result = torch.where(fixed | (top < 0), torch.full_like(top, -1), top)
        if not bool((result >= 0).any()):
            return None
        return Rep(tuple(dims), result.reshape(sizes))

    def _channel_labels(self, data: Tensor, channel_dim: int, module: str) -> Tensor:
        """Labels along ``channel_dim`` of a consumer's input; labels on other dims are blocked."""
        rep = self.rep(data)
        if rep is None:
            return torch.full((data.shape[channel_dim],), -1, dtype=torch.long)
        if rep.dims == (channel_dim,):
            return rep.labels
        self.block(rep.labels, f"'{module}' reads them along a dim other than its channel dim (a view it cannot shrink)")
        return torch.full((data.shape[channel_dim],), -1, dtype=torch.long)

    def _layer_input(self, module: str, data: Tensor, labels: Tensor) -> None:
        self.trace.ran.add(module)
        self.trace.layer_inputs.setdefault(module, labels)
        rep = self.rep(data)
        if rep is not None and rep.from_view:
            self.trace.reshaped_inputs.add(module)

    def _conv(self, op: str, args: tuple, kwargs: dict, out: Any, transposed: bool = False) -> None:
        data, weight = args[0], _arg(args, kwargs, 1, "weight")
        bias = _arg(args, kwargs, 2, "bias")
        owner = self.param_name(weight)
        if owner is None:  # a computed weight (e.g. weight standardisation) cannot be sliced
            return self._give_up(op, args, kwargs, out, "uses a computed weight, which export cannot slice") if self.rep(data) is not None else None
        module = owner[0]
        spatial = weight.ndim - 2
        channel_dim = data.ndim - spatial - 1
        groups = _arg(args, kwargs, 6, "groups", 1)
        padding = _arg(args, kwargs, 4, "padding", 0)
        in_labels = self._channel_labels(data, channel_dim, module)
        n_in = data.shape[channel_dim]
        n_out = out.shape[channel_dim]
        self._layer_input(module, data, in_labels)
        out_labels = self.trace.producers.get(module)
        if out_labels is None:
            out_labels = self.trace.new_labels(module, n_out)
            self.trace.producers[module] = out_labels
        if groups == n_in == n_out:  # depthwise: one input channel per output channel
            self.couple(in_labels, out_labels)
            self.trace.followers.add(module)
            self.add_axis(weight, 0, out_labels)  # (channels, 1, *kernel) for conv and transposed conv
        else:
            if transposed:
                self.add_axis(weight, 0, in_labels)
                self.add_axis(weight, 1, out_labels, groups)
            else:
                self.add_axis(weight, 1, in_labels, groups)
                self.add_axis(weight, 0, out_labels)
            if groups > 1:
                self.trace.even_groups.append((module, in_labels, groups))
                self.trace.even_groups.append((module, out_labels, groups))
            no_padding = padding == "valid" or all(p == 0 for p in _as_tuple(padding))
            self.trace.consumers.append(
                Consumer(
                    module,
                    "conv_transpose" if transposed else "conv",
                    in_labels,
                    _constants(data, channel_dim),
                    foldable=not transposed and no_padding,
                    groups=groups,
                )
            )
        if bias is not None:
            self.add_axis(bias, 0, out_labels)
        self.set_rep(out, Rep((channel_dim,), out_labels))

    def _conv_transpose(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        self._conv(op, args, kwargs, out, transposed=True)

    def _linear(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        data, weight = args[0], _arg(args, kwargs, 1, "weight")
        bias = _arg(args, kwargs, 2, "bias")
        owner = self.param_name(weight)
        if owner is None:
            return self._give_up(op, args, kwargs, out, "uses a computed weight, which export cannot slice") if self.rep(data) is not None else None
        module = owner[0]
        in_labels = self._channel_labels(data, data.ndim - 1, module)
        self._layer_input(module, data, in_labels)
        out_labels = self.trace.producers.get(module)
        if out_labels is None:
            out_labels = self.trace.new_labels(module, out.shape[-1])
            self.trace.producers[module] = out_labels
        self.add_axis(weight, 1, in_labels)
        self.add_axis(weight, 0, out_labels)
        if bias is not None:
            self.add_axis(bias, 0, out_labels)
        self.trace.consumers.append(Consumer(module, "linear", in_labels, _constants(data, data.ndim - 1), True))
        self.set_rep(out, Rep((out.ndim - 1,), out_labels))

    def _per_channel(self, op: str, args: tuple, kwargs: dict, out: Any, params: list, dim: int = 1) -> Tensor | None:
        """Shared by norms with per-channel parameters: slice ``params`` along the channel labels."""
        data = args[0]
        rep = self.rep(data)
        channel_dim = dim % data.ndim
        if rep.dims != (channel_dim,):
            self._give_up(op, args, kwargs, out, "sees them along a dim other than its channel dim")
            return None
        for tensor in params:
            if tensor is None:
                continue
            owner = self.param_name(tensor)
            if owner is None:
                self._give_up(op, args, kwargs, out, "uses parameters that are not the model's, which export cannot slice")
                return None
            self.add_axis(tensor, 0, rep.labels)
            self._layer_input(owner[0], data, rep.labels)
        self.set_rep(out, rep)
        return rep.labels

    def _batch_norm(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        params = [_arg(args, kwargs, i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
        self._per_channel(op, args, kwargs, out, params)

    _instance_norm = _batch_norm  # same signature, per-channel statistics too

    def _prelu(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        weight = _arg(args, kwargs, 1, "weight")
        self._per_channel(op, args, kwargs, out, [weight] if weight.numel() > 1 else [])

    def _group_norm(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        num_groups = _arg(args, kwargs, 1, "num_groups")
        weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
        if weight is None:  # without affine parameters nothing names the layer to resize
            return self._give_up(op, args, kwargs, out, "has no affine parameters that name the layer to resize")
        labels = self._per_channel(op, args, kwargs, out, [weight, bias])
        if labels is not None:  # statistics are per group: only whole groups may go
            per_group = labels.reshape(num_groups, -1)
            self.couple(per_group, per_group[:, :1].expand_as(per_group), f"op '{op}' normalises them in groups")

    def _layer_norm(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        data = args[0]
        rep = self.rep(data)
        shape = _arg(args, kwargs, 1, "normalized_shape")
        weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
        normalised = set(range(data.ndim - len(shape), data.ndim))
        if not normalised & set(rep.dims):
            self.set_rep(out, rep)
            return
        owner = self.param_name(weight)
        if len(shape) != 1 or rep.dims != (data.ndim - 1,) or owner is None:
            return self._give_up(op, args, kwargs, out, "normalises them together with other dims, or without the model's parameters")
        labels = self._per_channel(op, args, kwargs, out, [weight, bias], dim=-1)
        self.trace.consumers.append(Consumer(owner[0], "layer_norm", labels, _constants(data, data.ndim - 1), False))


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _storage_key(tensor: Any) -> Any:
    """Identifies the memory a tensor lives in (views share it); None for tensors without one."""
    if not isinstance(tensor, Tensor):
        return None
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except Exception:  # sparse, functional or other tensors without plain storage
        return None
    return (tensor.device.type, tensor.device.index, pointer) if pointer else None


def _region(flat: Tensor, tensor: Tensor) -> Tensor:
    """The elements of ``flat`` (one per element of ``tensor``'s memory) that ``tensor`` views."""
    return flat.as_strided(tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())


def _varying_dims(probe: Tensor) -> set[int]:
    """Dims along which the written (>= 0) entries of ``probe`` take more than one value."""
    written = probe >= 0
    dims = set()
    for d in range(probe.ndim):
        if probe.shape[d] < 2:
            continue
        high = torch.where(written, probe, torch.full_like(probe, -1)).amax(d)
        low = torch.where(written, probe, torch.full_like(probe, torch.iinfo(torch.long).max)).amin(d)
        if bool((written.any(d) & (high > low)).any()):
            dims.add(d)
    return dims


_IN_PLACE_DUNDER = re.compile(r"__i(add|sub|mul|truediv|floordiv|div|mod|pow|and|or|xor|lshift|rshift|matmul)__")


def _in_place(name: str) -> bool:
    return (name.endswith("_") and not name.endswith("__")) or bool(_IN_PLACE_DUNDER.fullmatch(name))


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _constants(data: Tensor, dim: int) -> Tensor:
    """Per position along ``dim``: its value if the same everywhere else, else NaN (float64, CPU)."""
    flat = data.detach().movedim(dim, 0).reshape(data.shape[dim], -1)
    if flat.shape[1] == 0:
        return torch.full((data.shape[dim],), math.nan, dtype=torch.float64)
    low, high = flat.amin(dim=1), flat.amax(dim=1)
    return torch.where(low == high, low, torch.full_like(low, math.nan)).double().cpu()


def _describe(example_input: Any) -> str:
    leaves = tree_leaves(example_input)
    shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in leaves]
    return f"{type(example_input).__name__} of {shapes}"
