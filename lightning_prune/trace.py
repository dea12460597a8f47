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
gates, concatenated views), *block* labels that must be kept (model outputs, unknown ops), and
record which parameter dims hold which labels (what export will slice) and the values that
reach each channel-mixing consumer (to find pruned channels that carry a nonzero constant).
"""

from __future__ import annotations

import math
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
    blocked: list[Tensor] = field(default_factory=list)
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
    reshaped: list[Tensor] = field(default_factory=list)  # labels a view spread over several dims
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
                    self.trace.blocked.append(labels)
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
                    self.trace.blocked.append(rep.labels.flatten())
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

    def couple(self, a: Tensor, b: Tensor) -> None:
        a, b = a.flatten(), b.flatten()
        both = (a >= 0) & (b >= 0)
        self.trace.edges.append((a[both], b[both]))
        one = (a >= 0) ^ (b >= 0)  # a channel tied position-wise to a fixed one cannot move
        if bool(one.any()):
            self.block(torch.where(a >= 0, a, b)[one])

    def block(self, labels: Tensor) -> None:
        labels = labels.flatten()
        self.trace.blocked.append(labels[labels >= 0])

    def block_inputs(self, args: Any) -> None:
        for tensor in tree_leaves(args):
            if (rep := self.rep(tensor)) is not None:
                self.block(rep.labels)

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
                    self.couple(labels, labels.narrow(axis, 0, 1).expand_as(labels))
            self.trace.reshaped.append(labels.flatten())
        return Rep(tuple(varying), labels)

    def warn_unknown(self, op: str, args: Any) -> None:
        self.block_inputs(args)
        if op not in self.warned:
            self.warned.add(op)
            self.trace.warnings.append(
                f"lightning_prune: op '{op}' is not understood; the channels that reach it are kept."
            )

    # ------------------------------------------------------------- dispatch
    def record(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property such as Tensor.T or Tensor.data
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        op = rules.normalise_op_name(name)
        rule = rules.rule_for(op)
        self.func = func
        labeled = any(self.rep(t) is not None for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor))
        if op == "setitem":
            if labeled:
                self.block_inputs(args)
            return
        if not labeled:
            self.outputs_unlabeled(out)
            if rule in ("conv", "linear", "conv_transpose"):  # a producer even of unlabelled input
                self.handlers[rule](op, args, kwargs, out)
            return
        if not any(isinstance(t, Tensor) for t in tree_leaves(out)):
            return
        if rule is None:
            self.warn_unknown(op, (args, kwargs))
            self.outputs_unlabeled(out)
            return
        try:
            self.handlers[rule](op, args, kwargs, out)
        except Exception as err:  # a rule that cannot make sense of an op keeps its channels
            self.warn_unknown(f"{op} ({type(err).__name__}: {err})", (args, kwargs))
            self.outputs_unlabeled(out)

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
                return self._give_up(op, args, kwargs, out)  # a labelled dim broadcast across others
            aligned.append((tuple(d + shift for d in rep.dims), rep.labels))
        dims, result = aligned[-1]  # the last labelled operand names the result (seed: `out += residual`)
        for other_dims, labels in aligned[:-1]:
            if other_dims != dims or labels.shape != result.shape:
                return self._give_up(op, args, kwargs, out)
            self.couple(labels, result)
        for tensor in plain:
            shift = len(shape) - tensor.ndim
            spans = [d for d in dims if d >= shift and tensor.shape[d - shift] > 1]
            is_param = self.param_name(tensor) is not None
            if not spans:
                if tensor.numel() == 1 or is_param:
                    continue
                # data-dependent factor broadcast over channels: a pruned channel stays zero
                # (times anything) but its constant may not be input-independent any more
                multiplicative = op in rules.MULTIPLICATIVE and not (op.endswith("div") and tensor is args[0])
                (self.trace.tainted if multiplicative else self.trace.blocked).append(result.flatten())
            elif is_param and len(dims) == 1 and spans == list(dims):
                self.add_axis(tensor, dims[0] - shift, result)
            else:
                self.block(result)
        for tensor in outs:
            self.set_rep(tensor, Rep(dims, result) if tensor.shape == shape else None)

    def _give_up(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        self.block_inputs((args, kwargs))
        self.outputs_unlabeled(out)

    def _concat_along_channels(self, op: str, args: tuple, kwargs: dict, out: Tensor) -> bool:
        """Fast path for ``cat`` along the labelled dim (DenseNet, Inception): join the label vectors."""
        if op not in ("cat", "concat", "concatenate") or not isinstance(out, Tensor):
            return False
        tensors = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % out.ndim
        pieces = []
        for tensor in tensors:
            rep = self.rep(tensor)
            if rep is not None and rep.dims != (dim,):
                return False
            pieces.append(rep.labels if rep is not None else torch.full((tensor.shape[dim],), -1, dtype=torch.long))
        self.set_rep(out, Rep((dim,), torch.cat(pieces)))
        return True

    def _movement(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        if self._concat_along_channels(op, args, kwargs, out):
            return
        data = args[0]
        if isinstance(data, (list, tuple)):
            sources = [t for t in data if isinstance(t, Tensor)]
            substituted = type(data)(self.full_labels(t) if isinstance(t, Tensor) else t for t in data)
        else:
            sources = [data]
            substituted = self.full_labels(data)
        result = self.func(substituted, *args[1:], **kwargs)
        outs, _ = tree_flatten(out)
        results, _ = tree_flatten(result)
        seen = []
        split = all(len(self.rep(t).dims) == 1 for t in sources if self.rep(t) is not None)
        for tensor, labels in zip(outs, results):
            if isinstance(tensor, Tensor) and isinstance(labels, Tensor):
                rep = self.compress(labels, split)
                self.set_rep(tensor, rep)
                if rep is not None:
                    seen.append(rep.labels.flatten())
        before = [self.rep(t).labels.flatten() for t in sources if self.rep(t) is not None]
        if not before:
            return
        before = torch.cat(before)
        after = torch.cat(seen) if seen else torch.empty(0, dtype=torch.long)
        if not bool(torch.isin(before[before >= 0], after).all()):
            self.block(before)  # a fixed slice of the channels: they must stay where they are

    def _split(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        data = args[0]
        rep = self.rep(data)
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0) if op != "unbind" else kwargs.get(
            "dim", args[1] if len(args) > 1 else 0
        )
        dim = dim % data.ndim
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        if dim not in rep.dims:
            for tensor in outs:
                dims = tuple(d - (op == "unbind" and d > dim) for d in rep.dims)
                self.set_rep(tensor, Rep(dims, rep.labels))
            return
        sizes = {t.shape[dim] for t in outs}
        if op != "chunk" or len(rep.dims) != 1 or len(sizes) != 1:
            return self._give_up(op, args, kwargs, out)
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
            return self._give_up(op, args, kwargs, out)
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
            return self._give_up(op, args, kwargs, out)
        reduced = {d % data.ndim for d in dim}
        if reduced & set(rep.dims):
            return self._give_up(op, args, kwargs, out)
        dims = rep.dims if keepdim else tuple(d - sum(q < d for q in reduced) for d in rep.dims)
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor):
                self.set_rep(tensor, Rep(dims, rep.labels))

    def _softmax(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        rep = self.rep(args[0])
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if dim is None or dim % args[0].ndim in rep.dims:
            return self._give_up(op, args, kwargs, out)
        self.set_rep(out, rep)

    def _channel_labels(self, data: Tensor, channel_dim: int) -> Tensor:
        """Labels along ``channel_dim`` of a consumer's input; labels on other dims are blocked."""
        rep = self.rep(data)
        if rep is None:
            return torch.full((data.shape[channel_dim],), -1, dtype=torch.long)
        if rep.dims == (channel_dim,):
            return rep.labels
        self.block(rep.labels)
        return torch.full((data.shape[channel_dim],), -1, dtype=torch.long)

    def _conv(self, op: str, args: tuple, kwargs: dict, out: Any, transposed: bool = False) -> None:
        data, weight = args[0], _arg(args, kwargs, 1, "weight")
        bias = _arg(args, kwargs, 2, "bias")
        owner = self.param_name(weight)
        if owner is None:  # a computed weight (e.g. weight standardisation) cannot be sliced
            return self._give_up(op, args, kwargs, out) if self.rep(data) is not None else None
        module = owner[0]
        spatial = weight.ndim - 2
        channel_dim = data.ndim - spatial - 1
        groups = _arg(args, kwargs, 6, "groups", 1)
        padding = _arg(args, kwargs, 4, "padding", 0)
        in_labels = self._channel_labels(data, channel_dim)
        n_in = data.shape[channel_dim]
        n_out = out.shape[channel_dim]
        self.trace.ran.add(module)
        self.trace.layer_inputs.setdefault(module, in_labels)
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
            return self._give_up(op, args, kwargs, out) if self.rep(data) is not None else None
        module = owner[0]
        in_labels = self._channel_labels(data, data.ndim - 1)
        self.trace.ran.add(module)
        self.trace.layer_inputs.setdefault(module, in_labels)
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
            self._give_up(op, args, kwargs, out)
            return None
        for tensor in params:
            if tensor is None:
                continue
            owner = self.param_name(tensor)
            if owner is None:
                self._give_up(op, args, kwargs, out)
                return None
            self.add_axis(tensor, 0, rep.labels)
            self.trace.ran.add(owner[0])
            self.trace.layer_inputs.setdefault(owner[0], rep.labels)
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
            return self._give_up(op, args, kwargs, out)
        labels = self._per_channel(op, args, kwargs, out, [weight, bias])
        if labels is not None:  # statistics are per group: only whole groups may go
            per_group = labels.reshape(num_groups, -1)
            self.couple(per_group, per_group[:, :1].expand_as(per_group))

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
            return self._give_up(op, args, kwargs, out)
        labels = self._per_channel(op, args, kwargs, out, [weight, bias], dim=-1)
        self.trace.consumers.append(Consumer(owner[0], "layer_norm", labels, _constants(data, data.ndim - 1), False))


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


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
