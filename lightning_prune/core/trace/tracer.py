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
that bookkeeping and hands each call to its rule (:mod:`lightning_prune.core.trace.op_rules`). Rules move
labels through ops, *couple* labels that must share a keep decision (residual adds, gates,
concatenated views), *block* labels that must be kept (model outputs, unknown ops; each block
carries the reason export reports), and record which parameter dims hold which labels (what
export will slice) and the values that reach each channel-mixing consumer (to find pruned
channels that carry a nonzero constant).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_prune.core.errors import ExampleInputError, PruneExportError
from lightning_prune.core.modules import evaluating, running_modules
from lightning_prune.core.trace import op_rules
from lightning_prune.core.trace.bookkeeping import Bookkeeping, Rule
from lightning_prune.core.trace.deferred import resolve_deferred
from lightning_prune.core.trace.masked_outputs import MaskedOutputs
from lightning_prune.core.trace.records import (
    ChannelTrace,
    OpCall,
    Rep,
    call_model,
    leaves,
    storage_key,
)
from lightning_prune.core.trace.streaming import streaming_hooks
from lightning_prune.core.trace.zeroing import WholeChannel
from lightning_prune.core.weights import TensorSource


def trace_channels(
    model: nn.Module,
    example_input: Any,
    weights: TensorSource | None = None,
    whole_channel: Mapping[str, Tensor] | None = None,
) -> ChannelTrace:
    """Run ``model`` once on ``example_input`` (eval mode, no grad) and record its channel flow.

    With ``weights`` (a file's weights, or zeroed copies), each module that ``weights`` holds tensors
    for gets them as it runs and gives them back after, so the pass holds about one module's at a time.
    With ``whole_channel`` (the masks), the parameter slices the pruned channels reach are zeroed as the
    pass finds them (:class:`~lightning_prune.core.trace.zeroing.WholeChannel`; what it zeroed is
    :attr:`ChannelTrace.zeroed`)."""
    tracer = Tracer(model, weights, whole_channel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracer.run(example_input)
    for message in tracer.trace.warnings:
        warnings.warn(message, stacklevel=2)
    zeroing, tracer.zeroing = tracer.zeroing, None  # it refers to the tracer: no cycle may keep the pass's tensors
    if zeroing is not None and zeroing.failed is None:
        tracer.trace.zeroed = zeroing.slices
        tracer.trace.zeroing_changed = zeroing.changed
    return tracer.trace


class _Mode(TorchFunctionMode):
    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = self.tracer
        if tracer.paused:
            return func(*args, **kwargs)
        cut, op = None, tracer.describe(func)[0]
        if tracer.masked_outputs.pending:  # a masked layer runs on its own weights, for its kept outputs
            args, kwargs, cut = tracer.masked_outputs.prepare(tracer, op, args, kwargs)
        zeroing, used = tracer.zeroing, []
        if zeroing is not None:
            zeroing.before(op, args, kwargs)
            args, kwargs, used = zeroing.substitute(args, kwargs)
        out = func(*args, **kwargs) if cut is None else tracer.masked_outputs.call(func, args, kwargs, cut)
        first_axis = len(tracer.trace.axes)
        tracer.record(func, args, kwargs, out)
        return out if zeroing is None else zeroing.after(func, args, kwargs, out, first_axis, used)


class Tracer(Bookkeeping):
    """Runs a model under the mode and dispatches every call to its rule; the bookkeeping the rules use
    is :class:`~lightning_prune.core.trace.bookkeeping.Bookkeeping`'s."""

    def __init__(
        self, model: nn.Module, weights: TensorSource | None = None, whole_channel: Mapping[str, Tensor] | None = None
    ) -> None:
        super().__init__(model)
        self.weights = weights
        self.paused = False  # loading weights: what runs is not the model's
        self._module_inputs: dict[str, list[Tensor]] = {}
        self._ops: dict[Callable, tuple[str, str, Rule | None, bool]] = {}  # func -> describe(func)
        self.zeroing = None if whole_channel is None else WholeChannel(self, whole_channel)
        self.masked_outputs = MaskedOutputs(self.modules, weights, self.constants)

    # ----------------------------------------------------------------- running
    def run(self, example_input: Any) -> None:
        """Label the example input's channels, run the model once, block what reaches the output."""
        hooks = [
            module.register_forward_pre_hook(self._norm_pre_hook(name))
            for name, module in self.modules.items()
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm))
        ]
        if self.weights is not None:
            hooks += streaming_hooks(self.model, self.weights, self)
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
            except PruneExportError:  # a weights file that failed to load names itself
                raise
            except Exception as err:
                raise ExampleInputError(
                    f"{type(self.model).__name__} rejected the example input "
                    f"({_describe(example_input)}): {type(err).__name__}: {err}"
                ) from err
            self._join_module_inputs()
            self.trace.output = output
            for tensor in tree_leaves(output):
                if isinstance(tensor, Tensor) and (rep := self.rep(tensor)) is not None:
                    self.block(rep.labels, "they reach the model output")
            resolve_deferred(self)
        finally:
            for hook in hooks:
                hook.remove()

    def _entered(self, name: str, args: tuple) -> None:
        # the labels of its first call's inputs, joined once the pass is over: a torch op here would be traced
        if name not in self._module_inputs:
            self._module_inputs[name] = [rep.labels for x in leaves(args) if (rep := self.rep(x)) is not None]

    def _join_module_inputs(self) -> None:
        for name, labels in self._module_inputs.items():
            joined = torch.cat([x.flatten() for x in labels]) if labels else torch.empty(0, dtype=torch.long)
            self.trace.module_inputs[name] = joined

    def _norm_pre_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], Tensor) and (rep := self.rep(args[0])) and len(rep.dims) == 1:
                self.trace.norm_channel_dim[name] = rep.dims[0] - args[0].ndim

        return hook

    # ------------------------------------------------------------- dispatch
    def record(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        """Called by the mode after every op: find its rule and run it when channels are involved."""
        op, name, rule, in_place = self.describe(func)
        call = OpCall(op, name, func, args, kwargs, out)
        self.op = op
        if rule in op_rules.TRACKS_MEMORY:  # they follow fresh and written tensors, labelled or not
            return self.dispatch(rule, call)
        if self.fresh and in_place and args and isinstance(args[0], Tensor):
            self.fresh.pop(storage_key(args[0]), None)  # its fresh elements now hold data
        if not self._labelled(args) and not (kwargs and self._labelled(kwargs)):
            self.outputs_unlabeled(out)
            if rule in op_rules.PRODUCERS:  # a producer even of unlabelled input
                self.dispatch(rule, call)
            elif rule in op_rules.FOLLOWS_PARAMETERS:
                self.follow_parameter(call)
            return
        if not any(isinstance(t, Tensor) for t in leaves(out)):
            return
        if rule is None:
            self.warn_unknown(op, (args, kwargs))
            self.outputs_unlabeled(out)
            return
        self.dispatch(rule, call)

    def describe(self, func: Callable) -> tuple[str, str, Rule | None, bool]:
        """``(op, name, rule, in place)`` of ``func``, kept for the rest of the pass (the rule table does not
        change during one)."""
        try:
            return self._ops[func]
        except (KeyError, TypeError):  # TypeError: an unhashable callable
            pass
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property such as Tensor.T or Tensor.data
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        op = op_rules.normalise_op_name(name)
        described = (op, name, op_rules.rule_for(op), _in_place(name))
        with suppress(TypeError):  # an unhashable callable is described again at each call
            self._ops[func] = described
        return described

    def _labelled(self, value: Any) -> bool:
        """Whether a tensor in ``value`` (nested tuples, lists and dicts, as an op's arguments are) carries labels."""
        for item in value.values() if isinstance(value, dict) else value:
            if isinstance(item, Tensor):
                if self.rep(item) is not None:
                    return True
            elif isinstance(item, (tuple, list, dict)) and self._labelled(item):
                return True
        return False

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
        for tensor in leaves(out):  # an in-place op's output is one of its inputs
            if isinstance(tensor, Tensor) and (rep := self.rep(tensor)) is not None:
                self.block(rep.labels, what)
        self.outputs_unlabeled(out)
        if what not in self.warned:
            self.warned.add(what)
            self.trace.warnings.append(f"lightning_prune: {what}; its channels are kept.")

    def follow_parameter(self, call: OpCall) -> None:
        """A view or index of a parameter: remember which parameter element each output element is."""
        source = call.args[0] if call.args else None
        if call.op in ("cat", "concat", "concatenate"):
            return self.follow_concatenation(call)
        origin = self.parameter_origin(source)
        if origin is None:
            return
        parameter, index = origin
        rule = op_rules.rule_for(call.op)
        if rule is op_rules.RULES["elementwise"]:  # exp(scale), clamp(scale, max=...): element by element
            others = [x for x in leaves(call.inputs) if isinstance(x, Tensor) and x is not source]
            if any(x.numel() != 1 for x in others):
                return
        if rule is not op_rules.RULES["movement"]:
            results = [index if tensor.shape == source.shape else None for tensor in leaves(call.out)]
        else:
            try:
                results = leaves(call.func(index, *call.args[1:], **call.kwargs))
            except Exception:  # an op that needs real values (a float index, a boolean mask of data)
                return
        for tensor, result in zip(leaves(call.out), results, strict=False):
            if isinstance(tensor, Tensor) and isinstance(result, Tensor) and result.shape == tensor.shape:
                self.derived[id(tensor)] = (tensor, parameter, result)


_IN_PLACE_DUNDER = re.compile(r"__i(add|sub|mul|truediv|floordiv|div|mod|pow|and|or|xor|lshift|rshift|matmul)__")


def _in_place(name: str) -> bool:
    return (name.endswith("_") and not name.endswith("__")) or bool(_IN_PLACE_DUNDER.fullmatch(name))


def _describe(example_input: Any) -> str:
    found = tree_leaves(example_input)
    shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in found]
    return f"{type(example_input).__name__} of {shapes}"


__all__ = ["Tracer", "trace_channels"]
